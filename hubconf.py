"""torch.hub entries: the CPU recipes' models, with the trained weights shipped under results/ where pretrained=True.

    import torch          # torch.hub.list("OWNER/cifar100-resnet") names the entries of a GitHub copy
    model = torch.hub.load(".", "cpu5", source="local", pretrained=True)           # eval mode, on the CPU
    model = torch.hub.load(".", "cpu", source="local", pretrained=True, weights="out/cpu.ckpt")     # your own run

The model takes normalised images (data.normalize of uint8 (B, 3, 32, 32)) and returns 100 logits.
"""
import pathlib as _pathlib

import config as _config
import engine as _engine
import files as _files
import resnet as _resnet

dependencies = ["torch", "numpy"]

_ROOT = _pathlib.Path(__file__).resolve().parent
_WEIGHTS = {"cpu": "results/2026-12-06-epyc-zen4-accuracy-per-flop/cpu-momentum90/cpu.ckpt",
            "cpu5": "results/2026-12-05-epyc-zen4-accuracy-per-flop/cpu5/cpu5.ckpt"}


def _model(exp, pretrained, weights):
    """The recipe's model: random weights, or the checkpoint's (the shipped one unless weights names another)."""
    cfg = _config.resolve(exp)
    if not pretrained:
        return _engine.build_model(cfg).eval()
    path = _pathlib.Path(weights) if weights else _ROOT / _WEIGHTS[exp]
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights for {exp} at {path}: train them with `python run_train.py "
                                f"--exp {exp}` and pass weights='out/{exp}.ckpt'")
    ckpt = _files.load_checkpoint(path)
    theirs = _files.config_from(ckpt)
    mine, its = _resnet.architecture(cfg), _resnet.architecture(theirs)
    if mine != its:
        raise ValueError(f"{path} holds another architecture ({its}) than the {exp} recipe ({mine})")
    return _engine.model_from({**ckpt, "model": _files.trained_weights(ckpt)}).eval()


def cpu(pretrained=False, weights=None):
    """The `cpu` recipe's ResNet (blocks [2,2,2], channels [48,96,192], 2x2 patch stem, ResNet-D shortcuts)."""
    return _model("cpu", pretrained, weights)


def cpu5(pretrained=False, weights=None):
    """The `cpu5` recipe's ResNet, 5 minutes of training on a 2-core CPU."""
    return _model("cpu5", pretrained, weights)
