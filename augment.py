"""Augmentation of whole batches on the training device: random crop + flip, cutout. The random draws are made on
the generator's own device (the CPU, see data.train_batches), then moved to the images': every device, same batches.

    python -c "import augment, torch; print(augment.crop_flip(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.Generator()).shape)"
"""
import torch
import torch.nn.functional as F


def crop_flip(x, g, order=None, pad=4):
    """RandomCrop(32, padding=pad) + RandomHorizontalFlip of the images x[order] (default: all of x), one draw per
    image: one indexed copy (which also does the shuffle) and one select."""
    _, _, h, w = x.shape
    order = torch.arange(len(x), device=x.device) if order is None else order
    n = len(order)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    flip = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
    windows = F.pad(x, (pad, pad, pad, pad)).unfold(2, h, 1).unfold(3, w, 1)    # (N, c, 2pad+1, 2pad+1, h, w) view
    out = windows[order, :, dy, dx]
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def cutout_(x, centres, size):
    """Fill one size x size square per image with 0, the dataset mean once normalised (DeVries & Taylor 2017); the
    centres (2, N) are uniform over the image, so a square at the border is clipped."""
    _, _, h, w = x.shape
    top, left = (centres - size // 2).view(2, -1, 1, 1).unbind()
    ys = torch.arange(h, device=x.device).view(1, h, 1) - top
    xs = torch.arange(w, device=x.device).view(1, 1, w) - left
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return x.masked_fill_(inside[:, None], 0.0)
