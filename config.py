"""One Config dataclass for every setting, and experiments.json read into it.

Precedence: dataclass defaults < experiments.json "defaults" < the experiment its "base" names (if any: its keys
but its note, bases of bases too) < the experiment's entry < command line.

    python config.py best          # print the resolved config of an experiment
"""
import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

EXPERIMENTS_FILE = Path(__file__).resolve().parent / "experiments.json"


class UserError(Exception):
    """A mistake the user can fix (bad config, missing data, bad checkpoint): shown as one line."""


@dataclass
class Config:
    # data
    dataset: str = "cifar100"      # "cifar100" or "synthetic" (generated, needs no download)
    data_dir: str = ""             # "" -> env CIFAR100_ROOT, else ./data
    download: bool = True          # fetch CIFAR-100 when missing and the network is there
    subset: int = 0                # training images kept (stratified); 0 = all
    augment: bool = True           # RandomCrop(32, padding=crop_pad) + horizontal flip
    crop_pad: int = 4              # the random crop's zero padding each side: translations up to this many pixels
    flip: str = "random"           # "random" (each image, each epoch) or "alternate" (random in the first epoch, then
                                   # each image's flip inverted every epoch: airbench's derandomised flip)
    cutout: int = 0                # side of the square set to the mean per training image; 0 = off
    auto_augment: str = ""         # "" (off), "ta_wide" (TrivialAugmentWide), "ra" (RandAugment), "aa_cifar10" (AutoAugment)
    auto_augment_group: int = 16   # images that share one draw of the policy (one torchvision call per group)
    mixup: float = 0.0             # Beta alpha of MixUp; 0 = off
    cutmix: float = 0.0            # Beta alpha of CutMix; 0 = off
    mix_prob: float = 1.0          # probability that a batch is mixed, when mixup or cutmix is on
    mix_switch: float = 0.5        # probability that a mixed batch uses CutMix rather than MixUp, when both are on
    # model
    blocks: list = field(default_factory=lambda: [3, 3, 3])
    channels: list = field(default_factory=lambda: [64, 128, 256])
    stem_stride: int = 1           # 1: the report's 3x3 conv stem; s > 1: an s x s patch conv of stride s (s^2 x fewer pixels)
    shortcut: str = "conv"         # a stage's first block's projection: "conv" (1x1, strided) or "avgpool" (ResNet-D:
                                   # 2x2 average pool, then 1x1: the same weights and convolution FLOPs)
    stem_init: str = ""            # "whiten": the stem's filters from the whitening of training patches (airbench), as
                                   # +/- pairs of eigenvectors (2 x 3k^2 of them for a k x k stem); "" = random
    init: str = ""                 # a checkpoint (.ckpt or .last.ckpt) of the same architecture whose weights start
                                   # a fresh run (fine-tuning); the optimizer and schedule start afresh; "" = random
    # optim
    optimizer: str = "adam"        # "sgd" (momentum, nesterov), "adam", "adamw", or "muon": Muon for the convolution
                                   # filters, Nesterov SGD (lr, momentum, weight_decay) for BatchNorm and the head
    lr: float = 0.002              # peak LR
    momentum: float = 0.9          # SGD momentum, Adam beta1
    nesterov: bool = True
    weight_decay: float = 1e-4
    muon_lr: float = 0.05          # muon: Muon's peak LR (the schedule scales it as it scales lr)
    muon_momentum: float = 0.95    # muon: Nesterov momentum of the filters' updates
    muon_weight_decay: float = 0.0  # muon: decoupled weight decay of the filters (x Muon's LR each step)
    ns_steps: int = 5              # muon: Newton-Schulz iterations that orthogonalise each update
    muon_normalize: bool = False   # muon: each filter bank rescaled to norm sqrt(out channels) before its step
                                   # (airbench94_muon; BN follows every conv): the step's size relative to the filters
                                   # stays what the schedule says instead of shrinking as they grow
    bn_bias_lr: float = 1.0        # LR multiplier of the BatchNorm biases (their weight decay per step unchanged)
    label_smoothing: float = 0.0
    batch_size: int = 128
    epochs: int = 20
    budget_s: float = 0.0          # seconds of training: sets epochs from the speed measured at the start; 0 = off
    # schedule (stepped per iteration)
    schedule: str = "constant"     # "constant", "cosine", "onecycle", "wsd" (warm-up, stable, linear decay) or "multistep"
    warmup: float = 0.0            # fraction of all steps spent warming up linearly from 0
    cooldown: float = 0.4          # wsd: fraction of all steps, at the end, decaying linearly to final_lr
    final_lr: float = 0.0          # fraction of lr reached at the end (cosine, onecycle)
    milestones: list = field(default_factory=lambda: [0.5, 0.75])   # multistep: lr x gamma from each; fractions of
                                   # the run if all < 1, else epochs (the first step of the epoch after it)
    gamma: float = 0.1             # multistep: the factor at each milestone
    # evaluation
    val_every: int = 1             # validate every N epochs, and always after the last; best chosen among those
    ema: float = 0.0               # decay of an exponential moving average of weights; 0 = off
    tta: bool = False              # average logits over the image and its horizontal flip
    tta_translate: int = 0         # TTA also averages the flip pair of the image shifted by this many pixels up-left
                                   # and down-right (airbench's multi-crop: weights 1/2, 1/4, 1/4); 0 = flip only
    # LR finder (run_lrfind.py; its --start, --end, --iters, --diverge and --stop override these)
    lrfind_start: float = 1e-7     # first LR of the sweep, growing exponentially to lrfind_end
    lrfind_end: float = 10.0
    lrfind_iters: int = 200        # steps, one batch and one LR each
    lrfind_diverge: float = 4.0    # stop once the loss passes this x its minimum so far
    lrfind_stop: str = "smooth"    # the loss that rule reads: "smooth" (moving average) or "raw" (the report's)
    # system
    device: str = "auto"           # "auto" (the first of cuda, xpu, mps that is there, else cpu), "cuda", "xpu", "mps", "cpu"
    precision: str = "auto"        # "auto" (what the device runs natively: devices.py), "bf16", "fp16" (+ GradScaler), "fp32"
    compile: str = "auto"          # "auto" (on where devices.py finds it can run), "on", "off", or a torch.compile mode:
                                   # "reduce-overhead" (CUDA graphs), "max-autotune-no-cudagraphs" (see bench.py)
    sync_bn: bool = False          # several CUDA processes: BatchNorm over the global batch (else rank 0's slice's)
    threads: int = 0               # CPU threads; 0 = OMP_NUM_THREADS if set, else one per physical core it may run on
    seed: int = 0
    deterministic: bool = False    # cudnn.deterministic + torch deterministic algorithms (slower)
    log_every: int = 0             # also a step line every N steps; 0 = off
    progress_s: float = 30.0       # a step line with the run's ETA every this many seconds of an epoch; 0 = off
    # io
    out_dir: str = "out"
    name: str = ""                 # run name: files are <out_dir>/<name>.*
    note: str = ""                 # measured result of the recipe (experiments.json only)


CHOICES = {"dataset": ("cifar100", "synthetic"), "optimizer": ("sgd", "adam", "adamw", "muon"), "lrfind_stop": ("smooth", "raw"),
           "schedule": ("constant", "cosine", "onecycle", "wsd", "multistep"), "device": ("auto", "cuda", "xpu", "mps", "cpu"),
           "precision": ("auto", "bf16", "fp16", "fp32"),
           "flip": ("random", "alternate"), "stem_init": ("", "whiten"), "shortcut": ("conv", "avgpool"),
           "auto_augment": ("", "ta_wide", "ra", "aa_cifar10"),
           "compile": ("auto", "on", "off", "reduce-overhead", "max-autotune-no-cudagraphs")}
FIELD_TYPES = {f.name: type(f.default) if f.default is not dataclasses.MISSING else list
               for f in dataclasses.fields(Config)}
NUMBER_LISTS = {"milestones"}      # list keys whose items may be floats; the other list keys hold integers


def suggest(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_value(key, value):
    """Return value converted to the field's type, or raise UserError naming the key."""
    if key not in FIELD_TYPES:
        raise UserError(f"unknown config key '{key}'{suggest(key, FIELD_TYPES)}")
    want = FIELD_TYPES[key]
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list:
        item, what = ((int, float), "numbers") if key in NUMBER_LISTS else (int, "integers")
        ok = isinstance(value, list) and value and all(isinstance(v, item) and not isinstance(v, bool) and
                                                       math.isfinite(v) for v in value)
        if not ok:
            raise UserError(f"config key '{key}' must be a non-empty list of {what}, got {value!r}")
    elif type(value) is not want:
        raise UserError(f"config key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):
        raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        known = ", ".join(c or '""' for c in CHOICES[key])      # "" is auto_augment's off
        raise UserError(f"config key '{key}' must be one of {known}, got {value!r}")
    return value


def validate(cfg):
    """Reject impossible combinations and out-of-range values."""
    positive = ["lr", "batch_size", "epochs", "stem_stride", "val_every", "lrfind_start", "auto_augment_group", "gamma",
                "bn_bias_lr", "muon_lr", "ns_steps"]
    non_negative = ["weight_decay", "subset", "cutout", "momentum", "warmup", "final_lr", "log_every", "progress_s",
                    "mixup", "cutmix", "threads", "budget_s", "muon_weight_decay"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise UserError(f"config key '{key}' must be > 0, got {getattr(cfg, key)}")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise UserError(f"config key '{key}' must be >= 0, got {getattr(cfg, key)}")
    for key in ["label_smoothing", "ema", "momentum", "warmup", "muon_momentum"]:
        if not 0 <= getattr(cfg, key) < 1:
            raise UserError(f"config key '{key}' must be in [0, 1), got {getattr(cfg, key)}")
    for key in ["crop_pad", "tta_translate"]:      # pixels: a shift within a quarter of the 32-pixel side
        if not 0 <= getattr(cfg, key) <= 8:
            raise UserError(f"config key '{key}' must be in [0, 8] pixels, got {getattr(cfg, key)}")
    for key in ["mix_prob", "mix_switch", "cooldown"]:
        if not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"config key '{key}' must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.warmup + cfg.cooldown > 1:
        raise UserError(f"config keys 'warmup' {cfg.warmup} and 'cooldown' {cfg.cooldown} must add up to at most 1")
    m = cfg.milestones
    if not (all(0 < v < 1 for v in m) or all(isinstance(v, int) and v >= 1 for v in m)) or m != sorted(set(m)):
        raise UserError(f"config key 'milestones' must be increasing fractions of the run (all < 1) or epochs "
                        f"(integers >= 1), got {m}")
    if not (cfg.lrfind_start < cfg.lrfind_end and cfg.lrfind_iters >= 10 and cfg.lrfind_diverge > 1):
        raise UserError(f"LR finder: need lrfind_start < lrfind_end, lrfind_iters >= 10 and lrfind_diverge > 1, got "
                        f"{cfg.lrfind_start:g}, {cfg.lrfind_end:g}, {cfg.lrfind_iters}, {cfg.lrfind_diverge:g}")
    if len(cfg.blocks) != len(cfg.channels):
        raise UserError(f"config keys 'blocks' {cfg.blocks} and 'channels' {cfg.channels} must have the same length")
    if min(cfg.blocks) < 1 or min(cfg.channels) < 1:
        raise UserError("config keys 'blocks' and 'channels' must hold positive integers")
    return cfg


def read_experiments(path=EXPERIMENTS_FILE):
    """experiments.json as a dict; malformed JSON is reported with its line and column."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}")
    if not isinstance(doc, dict) or not isinstance(doc.get("experiments"), dict) or not all(
            isinstance(v, dict) for v in [doc.get("defaults", {}), *doc["experiments"].values()]):
        raise UserError(f"{path}: expected {{\"defaults\": {{...}}, \"experiments\": {{\"<name>\": {{...}}}}}}")
    return doc


def parse_set(item):
    """'key=value' from --set; the value is read as JSON where it parses (numbers, lists, true), else text."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects key=value, got '{item}'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    if FIELD_TYPES.get(key.strip()) is str:
        value = raw
    return key.strip(), value


def experiment_entry(experiments, exp, chain=()):
    """The keys of experiment `exp`: those of the experiment its "base" names (all but its note), then its own."""
    if exp not in experiments:
        what = f"experiment '{chain[-1]}' names base '{exp}', which is no experiment" if chain else \
            f"unknown experiment '{exp}'"
        raise UserError(f"{what}{suggest(exp, experiments)}; known: {', '.join(experiments)}")
    if exp in chain:
        raise UserError(f"experiments' bases go round in a circle: {' -> '.join([*chain, exp])}")
    entry = dict(experiments[exp])
    base = entry.pop("base", None)
    if base is None:
        return entry
    if not isinstance(base, str):
        raise UserError(f"experiment '{exp}': \"base\" must name an experiment, got {base!r}")
    inherited = {k: v for k, v in experiment_entry(experiments, base, (*chain, exp)).items() if k != "note"}
    return {**inherited, **entry}


def resolve(exp, overrides=(), path=EXPERIMENTS_FILE):
    """The Config of experiment `exp` from experiments.json with `overrides` (key, value) pairs applied."""
    doc = read_experiments(path)
    values = {}
    for source in (doc.get("defaults", {}), experiment_entry(doc["experiments"], exp), dict(overrides)):
        for key, value in source.items():
            values[key] = check_value(key, value)
    values.setdefault("name", exp)
    return validate(Config(**values))


if __name__ == "__main__":
    try:
        print(json.dumps(dataclasses.asdict(resolve(sys.argv[1] if len(sys.argv) > 1 else "best")), indent=2))
    except UserError as e:
        sys.exit(f"error: {e}")
