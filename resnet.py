"""The report's custom ResNet for 32x32 images.

    python -c "from resnet import ResNet; print(ResNet([3,3,3], [64,128,256]).num_params())"
"""
import torch
from torch import nn


@torch.no_grad()
def whiten_(conv, images, eps=5e-4):
    """Set conv's first filters to the whitening of the images' k x k patches, as in airbench: the eigenvectors of the
    patch covariance scaled by 1/sqrt(eigenvalue + eps), largest first, each also negated (2 x 3k^2 filters); any
    filters beyond those keep their random init."""
    k = conv.kernel_size[0]
    patches = images.float().unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
    covariance = (patches.T @ patches / len(patches)).cpu()     # 3k^2 x 3k^2, decomposed on the CPU wherever the
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)   # model is: no eigh on MPS before mid-2026 (#151874)
    filters = (eigenvectors.T / (eigenvalues[:, None] + eps).sqrt()).flip(0).reshape(-1, 3, k, k)
    filters = torch.cat([filters, -filters])[:conv.out_channels]
    conv.weight[:len(filters)] = filters.to(conv.weight.device, conv.weight.dtype)


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with an identity shortcut, or where the shape changes a 1x1 conv + BN projection:
    strided ("conv"), or after a stride x stride average pool ("avgpool": ResNet-D's, which reads every pixel)."""

    def __init__(self, c_in, c_out, stride, shortcut="conv"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            pool = [nn.AvgPool2d(stride, ceil_mode=True, count_include_pad=False)] * (shortcut == "avgpool" and stride > 1)
            self.shortcut = nn.Sequential(*pool, nn.Conv2d(c_in, c_out, 1, 1 if pool else stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv, len(blocks) stages of BasicBlocks (stride 2 from the second stage), GAP, linear.
    stem_stride 1 is the report's 3x3 stem; s > 1 makes it an s x s patch conv of stride s."""

    def __init__(self, blocks, channels, num_classes=100, stem_stride=1, shortcut="conv"):
        super().__init__()
        if len(blocks) != len(channels) or not blocks:
            raise ValueError(f"blocks {blocks} and channels {channels} must be non-empty and of equal length")
        stem = nn.Conv2d(3, channels[0], 3, 1, 1, bias=False) if stem_stride == 1 else \
            nn.Conv2d(3, channels[0], stem_stride, stem_stride, bias=False)
        self.stem = nn.Sequential(stem,
                                  nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        layers, c_in = [], channels[0]
        for stage, (n, c) in enumerate(zip(blocks, channels)):
            for i in range(n):
                layers.append(BasicBlock(c_in, c, stride=2 if stage > 0 and i == 0 else 1, shortcut=shortcut))
                c_in = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))  # global average pooling (deterministic on CUDA)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())


ARCHITECTURE = ("blocks", "channels", "stem_stride", "shortcut")     # the config keys that shape the weights


def architecture(cfg):
    """What shapes a config's weights, as text: two configs whose texts differ hold weights of another shape."""
    return " ".join(f"{k} {getattr(cfg, k)}" for k in ARCHITECTURE)


def from_config(cfg, num_classes=100):
    """The ResNet that a Config (or a checkpoint's config) describes."""
    return ResNet(cfg.blocks, cfg.channels, num_classes, cfg.stem_stride, cfg.shortcut)
