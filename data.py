"""CIFAR-100 on the training device: loading, the fixed 45k/5k split, batched augmentation.

    python data.py --data-dir ~/data            # the report's data section: sizes, balance, mean/std
    python data.py --dataset synthetic --json   # the same on generated data; last line is JSON
"""
import argparse
import functools
import hashlib
import json
import os
import pickle
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import augment
import files
from config import UserError

MEAN = (0.5071, 0.4867, 0.4408)
STD = (0.2675, 0.2565, 0.2761)
SPLIT_SEED = 42                     # the validation split never depends on the training seed
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FILES = ("train", "test", "meta")


def data_root(data_dir=""):
    return Path(data_dir or os.environ.get("CIFAR100_ROOT") or "data").expanduser()


def network_available(host="www.cs.toronto.edu", timeout=3.0):
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def fetch_cifar100(root, download=True):
    """Path of root/cifar-100-python, downloaded (official md5) if missing and possible. One process downloads, under
    a lock; the others (the tasks of a SLURM array) wait for it, then read."""
    folder = root / "cifar-100-python"
    if all((folder / f).is_file() for f in FILES):
        return folder
    if download and network_available():
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the data folder {root}: {e.strerror or e}")
        with files.run_lock(root / "cifar-100-python.lock", wait=True):
            if all((folder / f).is_file() for f in FILES):      # fetched by another process while this one waited
                return folder
            print(f"downloading CIFAR-100 to {root} ...", flush=True)
            try:
                with tempfile.TemporaryDirectory(dir=root) as tmp:
                    download_and_extract_archive(URL, str(root), extract_root=tmp, md5=MD5)
                    folder.mkdir(exist_ok=True)
                    for f in FILES:     # each file whole or absent: a process that did not wait never reads half of one
                        os.replace(Path(tmp) / "cifar-100-python" / f, folder / f)
            except (OSError, RuntimeError) as e:       # a dropped connection, a full disk, a bad md5
                raise UserError(f"downloading CIFAR-100 to {root} failed ({type(e).__name__}: {e}); try again, "
                                f"or put the extracted cifar-100-python/ folder there by hand")
        return folder
    missing = ", ".join(f for f in FILES if not (folder / f).is_file())
    root, folder = root.resolve(), folder.resolve()
    raise UserError(f"CIFAR-100 not found: {folder} lacks {missing}. Put the extracted cifar-100-python/ folder "
                    f"(from {URL}) in {root}, or point --data-dir or CIFAR100_ROOT at the folder holding it")


def read_pickle(path):
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise UserError(f"{path} is unreadable or truncated ({type(e).__name__}: {e}); delete it and fetch the data again")


def read_split(path):
    """(images uint8 (N,3,32,32), fine labels int64 (N,)) from one official pickle."""
    d = read_pickle(path)
    try:
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d["fine_labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path} is not a cifar-100-python pickle ({type(e).__name__}: {e})")
    if len(x) != len(y):
        raise UserError(f"{path} holds {len(x)} images but {len(y)} labels: truncated?")
    return torch.from_numpy(x), torch.from_numpy(y)


def stratified_split(labels, val_fraction=0.1, seed=SPLIT_SEED):
    """(train_idx, val_idx), sorted: the report's split draw for draw (its repository's src/data_loading.py)."""
    rng = np.random.default_rng(seed)       # one generator for all classes, never the training seed
    y = np.asarray(labels)
    train, val = [], []
    for c in range(int(y.max()) + 1):
        idx = np.flatnonzero(y == c)        # the class's indices in file order
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = max(1, min(n_val, len(idx) - 1)) if len(idx) >= 2 else 0    # the report's guard: one image each side
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    # note: the report then shuffles both lists with the same generator; that orders them, it picks no other image
    return torch.from_numpy(np.sort(np.concatenate(train))), torch.from_numpy(np.sort(np.concatenate(val)))


def split_md5(val_idx):
    """md5 of the sorted validation indices as little-endian int64: two users compare splits with it."""
    return hashlib.md5(np.sort(np.asarray(val_idx)).astype("<i8").tobytes()).hexdigest()


def stratified_subset(idx, labels, n, seed=SPLIT_SEED):
    """n of the indices idx, spread over the classes as evenly as possible."""
    g = torch.Generator().manual_seed(seed)
    idx = idx[torch.randperm(len(idx), generator=g)]
    y = labels[idx]
    rank = torch.zeros(len(idx), dtype=torch.long)     # position of each image within its class
    for c in torch.unique(y):
        mask = y == c
        rank[mask] = torch.arange(int(mask.sum()))
    order = torch.sort(rank, stable=True).indices
    return idx[order[:n]].sort().values


def load(cfg, device="cpu"):
    """Dict of splits {train, val, test} -> (x uint8 on device, y int64 on device), plus class names and val_idx."""
    root = data_root(cfg.data_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"the data folder {root} is a file: point --data-dir or CIFAR100_ROOT at the folder that holds "
                        f"cifar-100-python/")
    if cfg.dataset == "synthetic":
        folder = root / "synthetic" / "cifar-100-python"
        if not all((folder / f).is_file() for f in FILES):
            try:
                write_synthetic(folder)
            except OSError as e:
                raise UserError(f"cannot generate the synthetic data in {folder}: {e.strerror or e}")
    else:
        folder = fetch_cifar100(root, cfg.download)
    for f in FILES:
        if not (folder / f).is_file():
            raise UserError(f"{folder / f} is missing")
    x, y = read_split(folder / "train")
    train_idx, val_idx = stratified_split(y)
    if cfg.subset:
        train_idx = stratified_subset(train_idx, y, cfg.subset)
    test_x, test_y = read_split(folder / "test")
    classes = list(read_pickle(folder / "meta")["fine_label_names"])
    splits = {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]), "test": (test_x, test_y)}
    out = {k: (a.to(device), b.to(device)) for k, (a, b) in splits.items()}
    out["classes"], out["val_idx"] = classes, val_idx
    return out


# ----------------------------------------------------------------------------
# batches, computed on the device

@functools.cache
def scale_shift(device):
    """(1 / (255 std), -mean / std) on the device, made once: a tensor built per batch would be a host sync on CUDA."""
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (1 / (255 * std)).to(device), (-mean / std).to(device)


def normalize(x):
    """uint8 (B,3,H,W) -> float normalised with the CIFAR-100 mean and std, as one multiply and one add in place."""
    scale, shift = scale_shift(x.device)
    return x.float().mul_(scale).add_(shift)


def train_batches(x, y, cfg, epoch, start=0, num_classes=100):
    """Yield the epoch's shuffled, augmented (x, y) batches from batch `start` on; the same for the same seed and epoch.
    With mixup or cutmix on, y is soft targets (B, num_classes) of float probabilities."""
    g = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)    # on the CPU: a run resumed on a GPU, same batches
    order = torch.randperm(len(x), generator=g, device=g.device)
    perm = order.to(x.device)
    flip = augment.alternating_flips(len(x), cfg.seed, epoch)[order].to(x.device) if cfg.flip == "alternate" else None
    images = augment.crop_flip(x, g, perm, cfg.crop_pad, flip) if cfg.augment else x[perm]
    if cfg.cutout:      # square centres for the whole epoch, drawn up front: a resumed epoch gets the same squares
        centres = torch.randint(0, x.shape[-1], (2, len(x)), generator=g, device=g.device).to(x.device)  # square images
    labels, bs, steps = y[perm], cfg.batch_size, steps_per_epoch(len(x), cfg.batch_size)
    # likewise drawn up front for the epoch: a policy seed per group of images, the mixing draws per batch
    policy_seeds = augment.seeds(-(-len(x) // cfg.auto_augment_group), g) if cfg.auto_augment else None
    plan = augment.mix_plan(cfg, steps, g) if cfg.mixup or cfg.cutmix else None
    per = max(1, 2048 // bs)    # batches normalised together: ops large enough to run well, small enough to reuse memory
    for first in range(start, steps, per):
        s = slice(first * bs, min(first + per, steps) * bs)
        chunk = images[s]
        if cfg.auto_augment:
            chunk = augment.auto_augment(chunk, cfg.auto_augment, policy_seeds, cfg.auto_augment_group, s.start)
        batch = normalize(chunk)
        if cfg.cutout:
            augment.cutout_(batch, centres[:, s], cfg.cutout)
        batches = zip(batch.split(bs), labels[s].split(bs))
        if plan:
            batches = (augment.mix(xb, yb, *plan[i], cfg, num_classes) for i, (xb, yb) in enumerate(batches, first))
        yield from batches


def steps_per_epoch(n, batch_size):
    """Batches per epoch: partial last batch dropped, unless the split is smaller than one batch."""
    return max(1, n // batch_size)


def eval_batches(x, batch_size=1000):
    """The images x, normalised, batch_size at a time, in order."""
    for i in range(0, len(x), batch_size):
        yield normalize(x[i:i + batch_size])


# ----------------------------------------------------------------------------
# generated data in the official layout, for tests and the offline demo

def write_synthetic(folder, per_class_train=30, per_class_test=10, num_classes=100, seed=0):
    """Write train/test/meta pickles in the cifar-100-python layout; each class is a noisy colour pattern."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(40, 215, (num_classes, 3, 1, 1))
    freqs = rng.integers(1, 4, (num_classes, 2))
    yy, xx = np.mgrid[0:32, 0:32] / 32

    def images(n):
        labels = np.repeat(np.arange(num_classes), n)
        wave = np.sin(2 * np.pi * (freqs[labels, 0, None, None] * yy + freqs[labels, 1, None, None] * xx))
        img = colours[labels] + 35 * wave[:, None] + rng.normal(0, 25, (len(labels), 3, 32, 32))
        return np.clip(img, 0, 255).astype(np.uint8).reshape(len(labels), 3072), labels

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fine_names = [f"class_{i:02d}" for i in range(num_classes)]
    coarse_names = [f"superclass_{i:02d}" for i in range(20)]
    for split, n in (("train", per_class_train), ("test", per_class_test)):
        x, y = images(n)
        d = {"filenames": [f"synthetic_{split}_{i}.png" for i in range(len(y))], "batch_label": f"synthetic {split}",
             "fine_labels": y.tolist(), "coarse_labels": (y % 20).tolist(), "data": x}
        with files.atomic_open(folder / split, "wb") as f:
            pickle.dump(d, f)
    with files.atomic_open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, f)
    return folder


# ----------------------------------------------------------------------------
# the report's data section as a command

def describe(cfg, out_dir):
    """Split sizes, class balance, train mean/std, and a PNG grid of augmented training images."""
    from torchvision.utils import save_image
    d = load(cfg)
    stats = {}
    for split in ("train", "val", "test"):
        counts = torch.bincount(d[split][1], minlength=len(d["classes"]))
        stats[split] = len(d[split][1])
        stats[f"{split}_per_class"] = [int(counts.min()), int(counts.max())]
    stats["val_md5"] = split_md5(d["val_idx"])
    train = d["train"][0].float() / 255
    stats["mean"] = [round(v, 4) for v in train.mean(dim=(0, 2, 3)).tolist()]
    stats["std"] = [round(v, 4) for v in train.std(dim=(0, 2, 3)).tolist()]
    x, _ = next(train_batches(*d["train"], cfg, epoch=0))
    out_dir.mkdir(parents=True, exist_ok=True)
    stats["samples_png"] = str(out_dir / f"{cfg.dataset}_samples.png")
    save_image(x[:64] * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1), stats["samples_png"])
    stats["json"] = str(out_dir / f"{cfg.dataset}.data.json")
    files.write_json(stats, stats["json"])
    return stats


def main():
    from config import Config
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="", help="folder holding cifar-100-python/ (default: $CIFAR100_ROOT or ./data)")
    p.add_argument("--dataset", default="cifar100", choices=["cifar100", "synthetic"])
    p.add_argument("--out", default="out", help="where the sample grid PNG goes")
    p.add_argument("--json", action="store_true", help="end with one line of JSON holding the figures")
    args = p.parse_args()
    cfg = Config(dataset=args.dataset, data_dir=args.data_dir, batch_size=64)
    try:
        stats = describe(cfg, Path(args.out))
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"split sizes     train {stats['train']} | val {stats['val']} | test {stats['test']}")
    for split in ("train", "val", "test"):
        lo, hi = stats[f"{split}_per_class"]
        print(f"images/class    {split:5s} min {lo} max {hi}")
    print(f"val_md5         {stats['val_md5']} (md5 of the sorted validation indices as int64)")
    print(f"train mean      {stats['mean']}\ntrain std       {stats['std']}")
    print(f"files           {stats['samples_png']} {stats['json']}")
    if args.json:
        print(json.dumps(stats))


if __name__ == "__main__":
    main()
