"""Augmentation of whole batches on the training device: random crop + flip, cutout, the automatic policies
(TrivialAugmentWide, RandAugment, AutoAugment) and MixUp / CutMix. The random draws are made on the generator's own
device (the CPU, see data.train_batches), then moved to the images': every device, same batches.

    python -c "import augment, torch; print(augment.crop_flip(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.Generator()).shape)"

Every random draw comes from the epoch's generator g (data.train_batches), drawn up front for the whole epoch, so
a resumed epoch gets the same batches. torchvision's policies and MixUp / CutMix draw from torch's global CPU
generator instead: they run here under a seed drawn from g (`seeded`), which leaves the global state as it was.
"""
import functools

import torch
import torch.nn.functional as F


def crop_flip(x, g, order=None, pad=4, flip=None):
    """RandomCrop(32, padding=pad) + RandomHorizontalFlip of the images x[order] (default: all of x), one draw per
    image: one indexed copy (which also does the shuffle) and one select. flip (bool per image of x[order]) replaces
    the flips drawn (which are drawn all the same: the same crops either way)."""
    _, _, h, w = x.shape
    order = torch.arange(len(x), device=x.device) if order is None else order
    n = len(order)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    drawn = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
    flip = drawn if flip is None else flip
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)    # (N, c, 2pad+1, 2pad+1, h, w) view
    out = windows[order, :, dy, dx]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def alternating_flips(n, seed, epoch):
    """airbench's derandomised flip: each of n images flipped at random (seeded) in epoch 0, then the other way
    round each epoch after: every image is seen both ways in any two epochs in a row."""
    first = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003 + 77)) < 0.5
    return first ^ bool(epoch % 2)


def cutout_(x, centres, size):
    """Fill one size x size square per image with 0, the dataset mean once normalised (DeVries & Taylor 2017); the
    centres (2, N) are uniform over the image, so a square at the border is clipped."""
    _, _, h, w = x.shape
    top, left = (centres - size // 2).view(2, -1, 1, 1).unbind()
    ys = torch.arange(h, device=x.device).view(1, h, 1) - top
    xs = torch.arange(w, device=x.device).view(1, 1, w) - left
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return x.masked_fill_(inside[:, None], 0.0)


# ----------------------------------------------------------------------------
# torchvision's random transforms, seeded from the epoch's generator

def seeds(n, g):
    """n seeds drawn from g (on its own device), as Python ints: one host sync for all of them."""
    return torch.randint(0, 2**62, (n,), generator=g, device=g.device).tolist()


def seeded(seed, transform, *args):
    """transform(*args) with torch's CPU generator, which torchvision draws from, seeded; its state is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(*args)


@functools.cache
def policy(name):
    """The torchvision.transforms.v2 policy of an auto_augment name."""
    from torchvision.transforms import v2
    return {"ta_wide": v2.TrivialAugmentWide, "ra": v2.RandAugment,
            "aa_cifar10": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)}[name]()


def auto_augment(images, name, group_seeds, group, first=0):
    """The policy on uint8 images (n, 3, H, W), images first.. of the epoch: torchvision draws one operation per call,
    so each run of `group` images of the epoch shares one draw, seeded by group_seeds[its index]; a group split
    between two calls gets the same draw in both."""
    transform, out = policy(name), torch.empty_like(images)
    for k in range(first // group, -(-(first + len(images)) // group)):
        lo, hi = max(k * group, first) - first, min((k + 1) * group, first + len(images)) - first
        out[lo:hi] = seeded(group_seeds[k], transform, images[lo:hi])
    return out


@functools.cache
def mixer(kind, alpha, num_classes):
    from torchvision.transforms import v2
    return (v2.CutMix if kind == "cutmix" else v2.MixUp)(alpha=alpha, num_classes=num_classes)


def mix_plan(cfg, steps, g):
    """Per batch of the epoch, drawn up front from g: (None, "mixup" or "cutmix"; the seed of its draws). A batch is
    mixed with probability mix_prob; with both on, it is CutMix with probability mix_switch (timm's choice)."""
    mixed = (torch.rand(steps, generator=g, device=g.device) < cfg.mix_prob).tolist()
    cut = (torch.rand(steps, generator=g, device=g.device) < cfg.mix_switch).tolist()
    kinds = [None if not m else "cutmix" if cfg.cutmix and (c or not cfg.mixup) else "mixup" for m, c in zip(mixed, cut)]
    return list(zip(kinds, seeds(steps, g)))


def mix(x, y, kind, seed, cfg, num_classes):
    """(images, soft targets (B, num_classes) summing to one): torchvision's MixUp or CutMix of the batch with itself
    rolled by one (lambda from Beta(alpha, alpha); CutMix weighs the labels by the box's area), or the one-hot
    targets of a batch left unmixed."""
    if kind is None:
        return x, F.one_hot(y, num_classes).float()
    return seeded(seed, mixer(kind, cfg.cutmix if kind == "cutmix" else cfg.mixup, num_classes), x, y)
