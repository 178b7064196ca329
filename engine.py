"""The training engine: one step, one epoch of steps, EMA, evaluation and prediction (trainer.py runs a whole run:
its start or resume, checkpoints, budget, first and last lines).

    import config, engine; cfg = config.resolve("smoke")
    model = engine.build_model(cfg); print(engine.evaluate(model, *data.load(cfg)["val"]))
"""
import copy
import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import console
import data
import devices
import distributed
import files
import optim
import resnet
from config import UserError


class Diverged(UserError):
    """The training loss became NaN or infinite."""


@dataclass
class Training:
    """What the steps of a run work on: the model (whose state_dict is saved), what runs the steps (the model, or its
    torch.compile), the optimizer, fp16's GradScaler, the EMA copy, the precision, the epoch's running sums (loss,
    correct, seen, objective) as a device tensor, and the clock's reading when the run's training would have begun
    had it never stopped (a resumed run's earlier seconds before now)."""
    cfg: object
    model: torch.nn.Module
    compiled: torch.nn.Module
    opt: object
    scaler: object
    ema: object
    precision: str
    sums: torch.Tensor
    origin: float = 0.0

    def elapsed(self):
        return time.time() - self.origin


# ----------------------------------------------------------------------------
# compile warm-up

def warm_up(model, compiled, cfg, x, y, precision):
    """Compile the training step before training; returns its seconds, so that training time excludes them. The steps
    run on the model itself (CUDA graphs are recorded on its own parameters), at lr 0 with a throwaway optimizer, and
    its weights and BN statistics are put back after: training starts as if they had not run."""
    saved = copy.deepcopy(model.state_dict())
    t0 = time.time()
    with devices.compile_errors():
        for _ in range(3 if cfg.compile == "reduce-overhead" else 1):    # CUDA graphs: warm-up, recording, a replay
            train_step(compiled, optim.make_optimizer(model, cfg, precision), x, y, cfg, 0.0, precision,
                       devices.grad_scaler(x.device, precision))
    devices.synchronize(x.device)
    model.load_state_dict(saved)        # in place: the parameters keep the addresses the graphs were recorded on
    return time.time() - t0


# ----------------------------------------------------------------------------
# a time budget (budget_s)

def measure_speed(model, compiled, cfg, x, y, precision, ema=None, num_classes=100):
    """Training images per second here: an epoch's augmentation, timed, then its batches trained (one untimed step, then
    timed ones for budget_s / 40 seconds within 1..5 s, at least 2: a shared host's speed swings within seconds) at lr 0
    with a throwaway optimizer and EMA copy; the weights and BN statistics are put back after, as in warm_up."""
    saved, ema = copy.deepcopy(model.state_dict()), copy.deepcopy(ema)
    opt, scaler = optim.make_optimizer(model, cfg, precision), devices.grad_scaler(x.device, precision)
    t0 = time.time()
    batches = (batch for _ in itertools.count() for batch in data.train_batches(x, y, cfg, 0, num_classes=num_classes))
    xb, yb = next(batches)
    devices.synchronize(x.device)
    augment_s, timed, window_s = time.time() - t0, -1, min(5.0, max(1.0, cfg.budget_s / 40))
    while timed < 2 or time.time() - t0 < window_s:
        train_step(compiled, opt, xb, yb, cfg, 0.0, precision, scaler)
        if ema:
            update_ema(ema, model, cfg.ema)
        xb, yb = next(batches)
        timed += 1
        if timed == 0:      # the untimed first step
            devices.synchronize(x.device)
            t0 = time.time()
    devices.synchronize(x.device)
    step_s = (time.time() - t0) / timed
    model.load_state_dict(saved)
    steps = data.steps_per_epoch(len(x), cfg.batch_size)
    return steps * cfg.batch_size / (augment_s + steps * step_s)


# ----------------------------------------------------------------------------
# model and training step (optim.py: optimizer and schedule)

def build_model(cfg, num_classes=100, device="cpu"):
    return resnet.from_config(cfg, num_classes).to(device, memory_format=torch.channels_last)


def train_step(model, opt, x, y, cfg, lr, precision="fp32", scaler=None):
    """One forward/backward/update in that precision (fp16 through the GradScaler); returns (loss, correct, objective)
    as device tensors, no host sync: loss is the plain cross-entropy of the batch (what val_loss is), objective the
    loss minimised (with label smoothing)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)       # bn_bias_lr (optim.make_optimizer)
    with devices.autocast(x.device, precision):
        logits = model(devices.to_model_format(x))
    objective = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    devices.backward_step(objective, opt, scaler)
    objective = objective.detach()
    loss = objective if cfg.label_smoothing == 0 else F.cross_entropy(logits.detach().float(), y)  # same logits
    hard = y.argmax(1) if y.ndim == 2 else y        # soft (mixed) targets: accuracy against the dominant label
    return loss, (logits.argmax(1) == hard).sum(), objective


@torch.no_grad()
def update_ema(averaged, model, decay):
    """averaged = decay * averaged + (1 - decay) * model, weights and BN statistics, with no host sync."""
    pairs = list(zip(averaged.state_dict().values(), model.state_dict().values()))
    floats = [(a, m) for a, m in pairs if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in floats], [m for _, m in floats], 1 - decay)
    for a, m in pairs:
        if not a.is_floating_point():
            a.copy_(m)       # BN's num_batches_tracked


def train_one_epoch(t, x, y, epoch, first_step, num_classes, tick, log, stop, kept):
    """The epoch's training steps from first_step on (this rank's slice of each batch), added to t.sums; returns (steps
    done, last lr, stopped?): it stops after the step where stop() is true (stop() already says whether any rank was
    asked to). kept: where the last good checkpoints are, for a divergence's line."""
    cfg, device, t0 = t.cfg, x.device, time.time()
    steps = data.steps_per_epoch(len(x), cfg.batch_size)
    total_steps = steps * cfg.epochs
    lr = optim.lr_at(max(0, epoch * steps + first_step - 1), total_steps, cfg)   # stopped after an epoch's last step
    for i, (xb, yb) in enumerate(data.train_batches(x, y, cfg, epoch, first_step, num_classes), first_step):
        xb, yb = distributed.my_slice(xb, yb)     # every rank draws the same global batch and trains on its rows
        lr = optim.lr_at(epoch * steps + i, total_steps, cfg)
        loss, correct, objective = train_step(t.compiled, t.opt, xb, yb, cfg, lr, t.precision, t.scaler)
        t.sums[0] += loss * len(yb)
        t.sums[1] += correct
        t.sums[2] += len(yb)
        t.sums[3] += objective * len(yb)
        if t.ema:
            update_ema(t.ema, t.model, cfg.ema)
        if device.type == "cpu" or (i + 1) % 100 == 0 or i + 1 == steps:
            check_finite(t.sums[0], epoch, i, lr, kept)  # note: a host sync on CUDA, hence every 100 steps
        eta = tick(epoch * steps + i + 1, i + 1)
        if eta is not None:     # note: a host sync, hence time-based (every progress_s seconds)
            rate = (i + 1 - first_step) * cfg.batch_size / (time.time() - t0)
            log(console.step_line(f"ep {epoch + 1}/{cfg.epochs} step {i + 1}/{steps}",
                                  (t.sums[0] / t.sums[2]).item(), rate, t.elapsed(), eta))
        if stop():
            check_finite(t.sums[0], epoch, i, lr, kept)  # never save weights a NaN has spoilt
            return i + 1, lr, True
    return steps, lr, False


def check_finite(loss, epoch, step, lr, kept):
    if not torch.isfinite(loss):
        raise Diverged(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (lr {lr:.2e}): the learning rate "
                       f"is likely too high; {kept}")


def check_first_batch(model, xb, yb, precision, log, init=""):
    """Loss of the first training batch before any update, on a copy (about ln(classes) when all is well, unless the
    weights come from checkpoint init)."""
    probe = copy.deepcopy(model)
    with torch.no_grad(), devices.autocast(xb.device, precision):
        loss = F.cross_entropy(probe(devices.to_model_format(xb)).float(), yb).item()
    n_classes = model.fc.out_features
    expected = f"from the weights of {init}" if init else f"expected about ln {n_classes} = {math.log(n_classes):.3f}"
    log(f"first-batch loss {loss:.3f} ({expected})")
    return loss


# ----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def predict(model, x, precision="fp32", batch_size=1000, translate=0, tta=True):
    """Logits (float32) of every image in uint8 x, in one pass: plain, and with tta also TTA's (else None): averaged
    with the flipped image's, and with translate > 0 also with the flip pairs of the image shifted (reflect padding)
    by translate pixels up-left and down-right, weighted 1/2, 1/4, 1/4 (airbench's multi-crop)."""
    was_training = model.training
    model.eval()
    plain, averaged = [], []

    def flip_pair(xb):
        return (model(devices.to_model_format(xb)).float() + model(devices.to_model_format(xb.flip(3))).float()) / 2

    with devices.autocast(x.device, precision):
        for xb in data.eval_batches(x, batch_size):
            logits = model(devices.to_model_format(xb)).float()
            plain.append(logits)
            if not tta:
                continue
            mirrored = (logits + model(devices.to_model_format(xb.flip(3))).float()) / 2
            if translate:
                (h, w), t = xb.shape[-2:], translate
                padded = F.pad(xb, (t, t, t, t), mode="reflect")
                mirrored = mirrored / 2 + (flip_pair(padded[..., :h, :w]) + flip_pair(padded[..., 2 * t:, 2 * t:])) / 4
            averaged.append(mirrored)
    model.train(was_training)
    return torch.cat(plain), torch.cat(averaged) if tta else None


def metrics(logits, y):
    """loss, top-1 and top-5 accuracy (fractions) of logits against labels."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (top5[:, 0] == y).float().mean().item(),
            "top5": (top5 == y[:, None]).any(1).float().mean().item()}


def scores(plain, averaged, y, tta):
    """metrics() of the logits the run's tta setting picks, plus top-1 without TTA (acc_plain) and with it (acc_tta,
    left out where the TTA passes were not run)."""
    with_tta = {"acc_tta": metrics(averaged, y)["acc"]} if averaged is not None else {}
    return {**metrics(averaged if tta else plain, y), "acc_plain": metrics(plain, y)["acc"], **with_tta}


def evaluate(model, x, y, tta=False, precision="fp32", translate=0, both=False):
    """scores() of the model on x, y; the TTA passes run only where tta is on, or both figures are asked for (the
    final test)."""
    return scores(*predict(model, x, precision, translate=translate, tta=tta or both), y, tta)


# ----------------------------------------------------------------------------
# a model from a checkpoint (files.load_checkpoint reads it)

def model_from(ckpt, device="cpu"):
    """The model a checkpoint (as files.load_checkpoint reads it) describes, with its weights loaded."""
    cfg = files.config_from(ckpt)
    model = build_model(cfg, len(ckpt.get("classes") or []) or 100, device)
    load_weights(model, ckpt["model"], cfg)
    return model


def load_weights(model, state_dict, cfg):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit blocks={cfg.blocks} channels={cfg.channels}: "
                        f"{str(e).splitlines()[0]}")


