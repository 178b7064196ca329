"""MixUp / CutMix and the automatic policies (augment.py) as data.train_batches gives them to the engine."""
import pytest
import torch

import augment
import config
import data
import engine
import run_train
import trainer
from config import Config
from fault_helpers import main_error
from resnet import ResNet


def distinct_images(n=16):
    """Float images in which every pixel differs from every other image's (image i holds values in [i, i + 0.5))."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + torch.rand(n, 3, 32, 32) / 2


def test_mixup_targets_sum_to_one_and_weigh_the_two_images_mixed():
    x, y = distinct_images(), torch.arange(16)
    for seed in range(5):
        out, t = augment.mix(x, y, "mixup", seed, Config(mixup=0.4), 100)
        assert t.shape == (16, 100) and t.dtype == torch.float32
        assert torch.allclose(t.sum(1), torch.ones(16))
        lam = t[0, 0].item()          # each image is mixed with the one before it: the batch rolled by one
        assert 0 < lam < 1 and torch.allclose(t, lam * torch.eye(100)[y] + (1 - lam) * torch.eye(100)[y.roll(1)])
        assert torch.allclose(out, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)
    plain, t = augment.mix(x, y, None, 0, Config(mixup=0.4), 100)
    assert plain is x and torch.equal(t, torch.eye(100)[:16])


def test_cutmix_boxes_lie_inside_the_image_and_weigh_the_labels_by_their_area():
    x, y = distinct_images(), torch.arange(16)
    areas = set()
    for seed in range(20):
        out, t = augment.mix(x, y, "cutmix", seed, Config(cutmix=1.0), 100)
        pasted = (out == x.roll(1, 0)).all(1)          # (16, 32, 32): the pixels taken from the other image
        assert ((out == x).all(1) | pasted).all()        # every pixel is its own or the other image's
        box = pasted[0]
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        if box.any():
            assert box.sum() == len(rows) * len(cols) == (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)  # one box
        assert (pasted == box).all()                     # the same box in every image of the batch
        area = box.float().mean().item()
        assert torch.allclose(t.sum(1), torch.ones(16))
        assert t[0, 15].item() == pytest.approx(area) and t[0, 0].item() == pytest.approx(1 - area)
        areas.add(round(area, 4))
    assert len(areas) > 10


def test_mixing_per_batch_follows_mix_prob_and_mix_switch():
    g = torch.Generator().manual_seed(0)
    kinds = [k for k, _ in augment.mix_plan(Config(mixup=0.8, cutmix=1.0, mix_prob=0.5, mix_switch=0.25), 4000, g)]
    assert kinds.count(None) == pytest.approx(2000, abs=150) and kinds.count("cutmix") == pytest.approx(500, abs=100)
    assert set(k for k, _ in augment.mix_plan(Config(cutmix=1.0), 100, g)) == {"cutmix"}
    assert set(k for k, _ in augment.mix_plan(Config(mixup=1.0, mix_switch=1.0), 100, g)) == {"mixup"}


@pytest.mark.parametrize("name", ["ta_wide", "ra", "aa_cifar10"])
def test_policies_keep_shape_and_dtype_and_differ_per_image_group(name):
    x = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8).expand(64, -1, -1, -1).contiguous()
    rng = torch.get_rng_state()
    seeds = augment.seeds(64, torch.Generator().manual_seed(0))
    out = augment.auto_augment(x, name, seeds, group=4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    groups = out.view(16, 4, -1)
    assert (groups == groups[:, :1]).all()                               # one draw per group of 4 ...
    assert len({g[0].numpy().tobytes() for g in groups}) >= 6            # ... and another draw per group
    singles = augment.auto_augment(x, name, seeds, group=1)
    assert len({img.numpy().tobytes() for img in singles}) >= 16         # group 1: a draw per image
    split = torch.cat([augment.auto_augment(x[:6], name, seeds, 4), augment.auto_augment(x[6:], name, seeds, 4, first=6)])
    assert torch.equal(split, out)                # a group cut between two calls (images 4-7) gets the same draw
    assert torch.equal(torch.get_rng_state(), rng)      # torch's global generator is left as it was


def test_mixed_and_policy_batches_are_soft_targets_and_repeat_on_a_resumed_epoch():
    x, y = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (512,))
    cfg = Config(batch_size=32, mixup=0.8, cutmix=1.0, mix_prob=0.8, auto_augment="ta_wide", cutout=8)
    rng = torch.get_rng_state()
    batches = list(data.train_batches(x, y, cfg, 0))
    assert len(batches) == 16 and all(t.shape == (32, 100) and torch.allclose(t.sum(1), torch.ones(32))
                                      for _, t in batches)
    assert sum(bool((t.max(1).values < 1).any()) for _, t in batches) >= 8      # most batches mixed
    resumed = list(data.train_batches(x, y, cfg, 0, start=5))
    assert all(torch.equal(a, b) and torch.equal(s, t) for (a, s), (b, t) in zip(batches[5:], resumed))
    assert torch.equal(torch.get_rng_state(), rng)
    other = next(data.train_batches(x, y, cfg, 1))
    assert not torch.equal(other[0], batches[0][0])


def test_training_accuracy_on_mixed_targets_counts_the_dominant_label():
    torch.manual_seed(0)
    model = ResNet([1], [8])
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8)
    soft = 0.6 * torch.eye(100)[y] + 0.4 * torch.eye(100)[y.roll(1)]
    with torch.no_grad():
        predicted = model(x).argmax(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss, correct, objective = engine.train_step(model, opt, x, soft, Config(label_smoothing=0.1), lr=0.0)
    assert correct.item() == (predicted == y).sum().item()
    logits = model(x)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, soft).item(), rel=1e-5)
    assert objective.item() == pytest.approx(torch.nn.functional.cross_entropy(
        logits, soft, label_smoothing=0.1).item(), rel=1e-5)


def test_a_run_with_mixup_cutmix_and_trivialaugment_trains_on_soft_targets(tmp_path, monkeypatch):
    cfg = config.resolve("smoke", [("out_dir", str(tmp_path / "out")), ("data_dir", str(tmp_path / "data")),
                                   ("epochs", 2), ("subset", 512), ("mixup", 0.8), ("cutmix", 1.0),
                                   ("auto_augment", "ta_wide")])
    real_step, targets = engine.train_step, []

    def step(model, opt, x, y, cfg, lr, *precision_and_scaler):
        targets.append(y.shape)
        return real_step(model, opt, x, y, cfg, lr, *precision_and_scaler)
    monkeypatch.setattr(engine, "train_step", step)
    summary = trainer.train(cfg, log=lambda line: None)
    assert summary["best_val_acc"] > 0.02 and summary["status"] == "finished"
    assert targets == [(64, 100)] * 16


@pytest.mark.parametrize("setting, message", [
    ("mixup=-0.2", "config key 'mixup' must be >= 0, got -0.2"),
    ("cutmix=-1", "config key 'cutmix' must be >= 0, got -1.0"),
    ("mix_prob=1.5", "config key 'mix_prob' must be in [0, 1], got 1.5"),
    ("auto_augment=trivial", "config key 'auto_augment' must be one of \"\", ta_wide, ra, aa_cifar10, got 'trivial'"),
])
def test_a_negative_alpha_or_an_unknown_policy_is_one_error_line(tmp_path, setting, message, monkeypatch, capsys):
    assert message in main_error(run_train, ["--exp", "smoke", "--out", tmp_path, "--set", setting], monkeypatch, capsys)
