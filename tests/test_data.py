import concurrent.futures
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import augment
import data
from config import Config, UserError


def labels(per_class, classes=100):
    return torch.arange(classes).repeat_interleave(per_class)


def report_split(labels, seed=42, ratio=0.1):
    """The report repository's split (src/data_loading.py), written out plainly: the validation indices as a set."""
    rng = np.random.default_rng(seed)
    val = []
    for c in range(100):
        idx_c = np.where(labels == c)[0]
        rng.shuffle(idx_c)
        n = int(round(len(idx_c) * ratio))
        n = max(1, min(n, len(idx_c) - 1)) if len(idx_c) >= 2 else 0
        val.extend(idx_c[:n].tolist())
    return set(val)


def test_split_is_the_reports_draw_for_draw_and_ignores_the_training_seed():
    y = np.random.default_rng(5).permutation(np.repeat(np.arange(100), 500))    # file order mixes the classes
    torch.manual_seed(123)
    np.random.seed(123)                          # the training seeds must not matter
    train, val = data.stratified_split(torch.from_numpy(y))
    torch.manual_seed(7)
    np.random.seed(7)
    train2, val2 = data.stratified_split(torch.from_numpy(y))
    assert set(val.tolist()) == report_split(y) and torch.equal(val, val2) and torch.equal(train, train2)
    assert (len(train), len(val)) == (45_000, 5_000)
    assert np.bincount(y[val.numpy()]).tolist() == [50] * 100
    assert not set(train.tolist()) & set(val.tolist()) and len(train) + len(val) == len(y)
    assert data.split_md5(val) == data.split_md5(val.flip(0)) != data.split_md5(val[1:])


def test_split_follows_the_reports_rounding_and_guard_for_uneven_classes():
    y = np.random.default_rng(0).permutation(np.concatenate([np.full(n, c) for c, n in enumerate([1, 2, 14, 15, 25, 3])]))
    _, val = data.stratified_split(torch.from_numpy(y))
    assert set(val.tolist()) == report_split(y)
    assert np.bincount(y[val.numpy()], minlength=6).tolist() == [0, 1, 1, 2, 2, 1]    # round(2.5) = 2, as in Python


def test_subset_spreads_images_over_classes():
    y = labels(45)
    subset = data.stratified_subset(torch.arange(len(y)), y, 64)
    assert len(subset) == 64 and len(set(y[subset].tolist())) == 64


def test_load_reads_official_pickle_layout_into_uint8_tensors(tmp_path):
    cfg = Config(dataset="synthetic", data_dir=str(tmp_path))
    d = data.load(cfg)
    x, y = d["train"]
    assert x.dtype == torch.uint8 and x.shape == (2700, 3, 32, 32) and y.dtype == torch.int64
    assert len(d["val"][1]) == 300 and len(d["test"][1]) == 1000 and len(d["classes"]) == 100
    with open(tmp_path / "synthetic" / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert {"data", "fine_labels", "coarse_labels", "filenames", "batch_label"} <= raw.keys()
    assert raw["data"].shape == (3000, 3072)


def is_crop_or_flipped_crop(img, source):
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))
    windows = [padded[:, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
    return any(torch.equal(img, w) or torch.equal(img, w.flip(2)) for w in windows)


def test_crop_flip_takes_a_window_of_the_zero_padded_image():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = augment.crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert all(is_crop_or_flipped_crop(out[i], x[i]) for i in range(len(x)))
    assert not torch.equal(out, x)


def test_train_batches_vary_per_epoch_and_repeat_per_seed():
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(256)
    cfg = Config(batch_size=64)
    (a, ya), (b, yb) = next(data.train_batches(x, y, cfg, 0)), next(data.train_batches(x, y, cfg, 0))
    c, yc = next(data.train_batches(x, y, cfg, 1))
    assert torch.equal(a, b) and torch.equal(ya, yb)
    assert not torch.equal(ya, yc)
    assert a.dtype == torch.float32 and a.shape == (64, 3, 32, 32)
    mean, std = torch.tensor(data.MEAN).view(3, 1, 1), torch.tensor(data.STD).view(3, 1, 1)
    pixels = ((a * std + mean) * 255).round().to(torch.uint8)     # y = arange: each label names its source image
    assert all(is_crop_or_flipped_crop(pixels[i], x[ya[i]]) for i in range(8))
    assert len(list(data.train_batches(x, y, cfg, 0))) == 4


def test_batches_are_drawn_on_the_cpu_so_a_run_on_another_device_sees_the_same_ones(monkeypatch):
    """The meta device stands for a GPU: its tensors have no values, but every draw that makes the batches must be
    the CPU's, value for value."""
    x, y = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8), torch.arange(256)
    draws = []
    for name in ("randperm", "randint", "rand"):
        def recorded(*args, real=getattr(torch, name), **kwargs):
            out = real(*args, **kwargs)
            draws.append(out)
            return out
        monkeypatch.setattr(torch, name, recorded)
    cfg = Config(batch_size=64, cutout=8)
    cpu_batches = list(data.train_batches(x, y, cfg, epoch=3))
    cpu_draws, draws[:] = draws[:], []
    meta_batches = list(data.train_batches(x.to("meta"), y.to("meta"), cfg, epoch=3))
    assert len(cpu_draws) == 5 and len(draws) == 5      # permutation, crop offsets (2), flips, cutout centres
    assert all(d.device.type == "cpu" and torch.equal(c, d) for c, d in zip(cpu_draws, draws))
    assert [b.shape for b, _ in meta_batches] == [b.shape for b, _ in cpu_batches]


def test_missing_data_names_the_folder_and_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match="cifar-100-python.*lacks train, test, meta.*--data-dir"):
        data.load(Config(data_dir=str(tmp_path), download=False))


def test_tasks_started_together_download_once_and_the_others_wait_then_read(tmp_path, monkeypatch):
    import torchvision.datasets.utils
    downloads = []

    def slow_download(url, download_root, extract_root=None, md5=None):
        downloads.append(url)
        time.sleep(1.0)                 # long enough for the other task to arrive meanwhile
        data.write_synthetic(Path(extract_root or download_root) / "cifar-100-python", per_class_train=2,
                             per_class_test=1)
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", slow_download)
    monkeypatch.setattr(data, "network_available", lambda: True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: data.fetch_cifar100(tmp_path), range(2)))
    assert downloads == [data.URL] and folders == [tmp_path / "cifar-100-python"] * 2
    assert len(data.read_split(folders[0] / "train")[1]) == 200


def test_truncated_pickle_is_a_clear_error(tmp_path):
    folder = data.write_synthetic(tmp_path / "cifar-100-python", per_class_train=2, per_class_test=1)
    (folder / "train").write_bytes((folder / "train").read_bytes()[:500])
    with pytest.raises(UserError, match="truncated"):
        data.load(Config(data_dir=str(tmp_path), download=False))


def test_cutout_fills_one_exact_size_square_with_the_mean_and_a_resumed_epoch_gets_the_same_squares():
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    cfg = Config(batch_size=64, augment=False, cutout=8)
    batches = list(data.train_batches(x, torch.arange(512), cfg, 0))
    images = torch.cat([b for b, _ in batches])
    filled = (images == 0).all(1)               # (N, H, W): pixels at the mean in every channel (0 once normalised)
    inside = 0
    for square in filled:
        assert square.any()
        rows, cols = square.any(1).nonzero().flatten(), square.any(0).nonzero().flatten()
        assert square.sum() == len(rows) * len(cols) and len(rows) <= 8 and len(cols) <= 8     # one square, clipped
        whole = 0 < rows.min() and rows.max() < 31 and 0 < cols.min() and cols.max() < 31
        inside += bool(whole)
        assert not whole or (len(rows), len(cols)) == (8, 8)                  # away from the border: exactly 8 x 8
    assert inside > 100
    resumed = list(data.train_batches(x, torch.arange(512), cfg, 0, start=3))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches[3:], resumed)) and len(resumed) == 5
