"""The airbench ideas as config keys: alternating flips, crop_pad, the whitened stem, bn_bias_lr, translate TTA."""
import pytest
import torch
import torch.nn.functional as F

import augment
import console
import data
import engine
import optim
import run_eval
import run_train
import trainer
from config import Config
from fault_helpers import main_error, quiet, small, synthetic_data
from resnet import ResNet, whiten_


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def tagged_images(n=40):
    """uint8 images, black but for one pixel: value i + 1 at the top-left of image i (at the top-right once flipped)."""
    x = torch.zeros(n, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(1, n + 1, dtype=torch.uint8)
    return x


def seen(batches):
    """{image index: flipped?} of tagged_images in an epoch's normalised batches."""
    out = {}
    for xb, _ in batches:
        tags = ((xb[:, 0, 0, [0, 31]] * data.STD[0] + data.MEAN[0]) * 255).round().long()    # back to uint8 values
        for left, right in tags.tolist():
            out[max(left, right) - 1] = right > left
    return out


def test_alternating_flips_show_every_image_the_other_way_round_each_epoch():
    cfg = Config(batch_size=8, flip="alternate", crop_pad=0)
    x, y = tagged_images(), torch.zeros(40, dtype=torch.long)
    epochs = [seen(data.train_batches(x, y, cfg, epoch)) for epoch in range(3)]
    assert all(sorted(e) == list(range(40)) for e in epochs)     # crop_pad 0: every image whole, once an epoch
    assert 10 < sum(epochs[0].values()) < 30                    # random in the first epoch
    assert all(epochs[1][i] != epochs[0][i] and epochs[2][i] == epochs[0][i] for i in range(40))


def test_random_flips_do_not_alternate_and_crop_pad_0_never_translates():
    cfg = Config(batch_size=8, crop_pad=0)
    x, y = tagged_images(), torch.zeros(40, dtype=torch.long)
    first, second = (seen(data.train_batches(x, y, cfg, epoch)) for epoch in range(2))
    assert sorted(first) == list(range(40)) and any(first[i] == second[i] for i in range(40))


def test_crop_pad_bounds_the_translation():
    x = tagged_images(200)
    for pad in (1, 2):
        out = augment.crop_flip(x, torch.Generator().manual_seed(0), pad=pad, flip=torch.zeros(200, dtype=torch.bool))
        rows, cols = (out[:, 0] > 0).nonzero()[:, 1:].T
        assert rows.max() == pad and cols.max() == pad        # the tagged pixel moved by at most pad, and by pad


@pytest.mark.parametrize("stride", [1, 2])
def test_the_whitened_stem_decorrelates_the_training_patches(stride):
    mixing = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.6, 0.5], [0.0, 0.0, 0.4]])
    images = torch.einsum("ij,njhw->nihw", mixing, torch.randn(256, 3, 32, 32))    # correlated channels
    model = ResNet([1], [64], stem_stride=stride)
    conv = model.stem[0]
    untouched = conv.weight[2 * 3 * conv.kernel_size[0] ** 2:].clone()
    whiten_(conv, images)
    k2 = 3 * conv.kernel_size[0] ** 2
    out = F.conv2d(images, conv.weight[:k2]).permute(0, 2, 3, 1).reshape(-1, k2)
    assert torch.allclose(out.T @ out / len(out), torch.eye(k2), atol=0.02)
    assert torch.equal(conv.weight[k2:2 * k2], -conv.weight[:k2]) and torch.equal(conv.weight[2 * k2:], untouched)


def test_stem_init_whiten_whitens_the_stem_of_a_fresh_run_only(data_dir, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(trainer, "whiten_", lambda conv, images: calls.append((conv, images.shape)))
    quiet(small(tmp_path, data_dir, ("stem_init", "whiten"), ("stem_stride", 2)))
    assert len(calls) == 1 and calls[0][0].kernel_size == (2, 2) and calls[0][1] == (256, 3, 32, 32)
    quiet(small(tmp_path, data_dir, ("stem_stride", 2), ("name", "plain")))
    assert len(calls) == 1


def test_bn_bias_lr_scales_the_lr_of_the_batchnorm_biases_but_not_their_decay_per_step():
    model, x, y = ResNet([1, 1], [16, 32]), torch.randn(8, 3, 32, 32), torch.randint(0, 100, (8,))
    cfg = Config(optimizer="sgd", lr=0.1, weight_decay=5e-4, bn_bias_lr=64.0)
    opt = optim.make_optimizer(model, cfg)
    engine.train_step(model, opt, x, y, cfg, 0.05)
    other, biases = opt.param_groups
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {id(p) for p in biases["params"]} == bn_biases and not bn_biases & {id(p) for p in other["params"]}
    assert (other["lr"], biases["lr"]) == (0.05, pytest.approx(3.2))
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(other["lr"] * other["weight_decay"])
    assert len(optim.make_optimizer(model, Config(optimizer="sgd")).param_groups) == 1    # default: one group


def test_translate_tta_averages_the_flip_pairs_of_the_image_and_of_two_shifted_copies():
    torch.manual_seed(0)
    model = ResNet([1], [8], num_classes=10).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    plain, flip_only = engine.predict(model, x)
    plain_too, tta = engine.predict(model, x, translate=2)
    xn = data.normalize(x)
    pair = lambda v: (model(v) + model(v.flip(3))) / 2        # noqa: E731
    padded = F.pad(xn, (2, 2, 2, 2), mode="reflect")
    with torch.no_grad():
        expected = pair(xn) / 2 + pair(padded[..., :32, :32]) / 4 + pair(padded[..., 4:, 4:]) / 4
        assert torch.allclose(flip_only, pair(xn), atol=1e-5)
    assert torch.equal(plain, plain_too) and torch.allclose(tta, expected, atol=1e-5)
    assert not torch.allclose(tta, flip_only, atol=1e-3)


@pytest.mark.parametrize("setting, message", [
    ("crop_pad=9", "config key 'crop_pad' must be in [0, 8] pixels, got 9"),
    ("tta_translate=-1", "config key 'tta_translate' must be in [0, 8] pixels, got -1"),
    ("flip=sometimes", "config key 'flip' must be one of random, alternate, got 'sometimes'"),
    ("stem_init=pca", "config key 'stem_init' must be one of \"\", whiten, got 'pca'"),
    ("bn_bias_lr=0", "config key 'bn_bias_lr' must be > 0, got 0.0"),
])
def test_a_bad_idea_setting_is_one_error_line(tmp_path, setting, message, monkeypatch, capsys):
    assert message in main_error(run_train, ["--exp", "smoke", "--out", tmp_path, "--set", setting], monkeypatch, capsys)


def test_a_run_with_translate_tta_says_so_and_run_eval_reproduces_its_test_figures(data_dir, tmp_path):
    summary = quiet(small(tmp_path, data_dir, ("tta", True), ("tta_translate", 1)))
    assert "(flip + 1 px translate TTA; " in console.done_line(summary)
    evaluation = run_eval.evaluate_checkpoint(tmp_path / "smoke.ckpt", data_dir=data_dir, device="cpu")
    assert (evaluation["acc"], evaluation["acc_plain"]) == (summary["test_acc"], summary["test_acc_plain"])
    assert evaluation["acc_tta"] == summary["test_acc_tta"] and evaluation["tta_translate"] == 1
