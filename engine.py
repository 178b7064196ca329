"""The training engine: one Config in, a trained model, an epoch CSV, checkpoints and a summary out.

    from config import resolve; from engine import train
    summary = train(resolve("smoke"))          # what run_train.py does
"""
import copy
import csv
import dataclasses
import itertools
import json
import math
import os
import signal
import time
from dataclasses import asdict

import torch
import torch.nn.functional as F

import console
import data
import devices
import files
import optim
import roofline
from config import UserError
import resnet
from resnet import whiten_

PREEMPTED_EXIT = 75         # exit code after a stop signal: last.ckpt is saved, requeue and --resume
INTERRUPTED_EXIT = 130      # after Ctrl-C (128 + SIGINT, as shells expect); last.ckpt is saved as well
STOPPED_AT_ONCE = ("stopped at once by a second Ctrl-C: nothing saved since the last checkpoint; "
                   "--resume goes on from it")
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)    # any device's (older torch: CUDA's)
RESUMABLE_CHANGES = {"data_dir", "download", "device", "compile", "threads", "log_every", "progress_s", "out_dir",
                     "note", "deterministic", "lrfind_start", "lrfind_end", "lrfind_iters", "lrfind_diverge", "lrfind_stop"}


class Diverged(UserError):
    """The training loss became NaN or infinite."""


class Preempted(Exception):
    """A stop signal arrived; last.ckpt holds the state to resume from. .status is the exit status to end with."""

    def __init__(self, signum, saved):
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else \
            f"stopped by {signal.Signals(signum).name}" if isinstance(signum, int) else f"stopped ({signum})"
        super().__init__(f"{what}: saved {saved}; rerun with --resume")
        self.status = INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


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
    batches = itertools.cycle(data.train_batches(x, y, cfg, 0, num_classes=num_classes))    # short epochs: again
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


# ----------------------------------------------------------------------------
# evaluation

@torch.no_grad()
def predict(model, x, precision="fp32", batch_size=1000, translate=0):
    """Logits (float32) of every image in uint8 x, in one pass: plain, and TTA's: averaged with the flipped image's,
    and with translate > 0 also with the flip pairs of the image shifted (reflect padding) by translate pixels
    up-left and down-right, weighted 1/2, 1/4, 1/4 (airbench's multi-crop)."""
    was_training = model.training
    model.eval()
    plain, tta = [], []

    def flip_pair(xb):
        return (model(devices.to_model_format(xb)).float() + model(devices.to_model_format(xb.flip(3))).float()) / 2

    with devices.autocast(x.device, precision):
        for xb in data.eval_batches(x, batch_size):
            logits = model(devices.to_model_format(xb)).float()
            plain.append(logits)
            mirrored = (logits + model(devices.to_model_format(xb.flip(3))).float()) / 2
            if translate:
                (h, w), t = xb.shape[-2:], translate
                padded = F.pad(xb, (t, t, t, t), mode="reflect")
                mirrored = mirrored / 2 + (flip_pair(padded[..., :h, :w]) + flip_pair(padded[..., 2 * t:, 2 * t:])) / 4
            tta.append(mirrored)
    model.train(was_training)
    return torch.cat(plain), torch.cat(tta)


def metrics(logits, y):
    """loss, top-1 and top-5 accuracy (fractions) of logits against labels."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (top5[:, 0] == y).float().mean().item(),
            "top5": (top5 == y[:, None]).any(1).float().mean().item()}


def scores(plain, flipped, y, tta):
    """metrics() of the logits the run's tta setting picks, plus top-1 without TTA (acc_plain) and with it (acc_tta)."""
    return {**metrics(flipped if tta else plain, y), "acc_plain": metrics(plain, y)["acc"],
            "acc_tta": metrics(flipped, y)["acc"]}


def evaluate(model, x, y, tta=False, precision="fp32", translate=0):
    return scores(*predict(model, x, precision, translate=translate), y, tta)


# ----------------------------------------------------------------------------
# a model from a checkpoint (files.load_checkpoint reads it)

def model_from(ckpt, device="cpu"):
    """The model a checkpoint describes, with its weights loaded."""
    cfg = files.config_from(ckpt)
    model = build_model(cfg, len(ckpt.get("classes") or []) or 100, device)
    load_weights(model, ckpt["model"], cfg)
    return model


def init_weights(cfg):
    """The weights checkpoint cfg.init holds, to start a run from (as timm's --initial-checkpoint: weights only, the
    optimizer and schedule start afresh): a best .ckpt's, or a .last.ckpt's (its EMA weights where it had EMA)."""
    try:
        ckpt = files.load_checkpoint(cfg.init)
        theirs = files.config_from(ckpt)
    except UserError as e:
        raise UserError(f"config key 'init': {e}")
    arch = ("blocks", "channels", "stem_stride")
    mine, its = (" ".join(f"{k} {getattr(c, k)}" for k in arch) for c in (cfg, theirs))
    if mine != its:
        raise UserError(f"config key 'init': {cfg.init} holds another architecture ({its}) than this run ({mine}): "
                        f"give the run the checkpoint's")
    return files.trained_weights(ckpt)


def load_weights(model, state_dict, cfg):
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not fit blocks={cfg.blocks} channels={cfg.channels}: "
                        f"{str(e).splitlines()[0]}")


# ----------------------------------------------------------------------------
# stop signals (SLURM preemption, time limits)

stop_requested = []


def request_stop(signum, frame):
    """Only set a flag: the loop finishes its step, saves last.ckpt and raises Preempted. A second Ctrl-C stops at
    once (KeyboardInterrupt)."""
    if signum == signal.SIGINT and signal.SIGINT in stop_requested:
        raise KeyboardInterrupt
    stop_requested.append(signum)


def install_stop_handlers():
    for name in ("SIGUSR1", "SIGTERM", "SIGINT"):      # note: Windows has no SIGUSR1
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), request_stop)


# ----------------------------------------------------------------------------
# training

def train(cfg, resume=False, log=print):
    """Train cfg to the end (or to a stop signal); returns the summary dict also written to <name>.json."""
    device = devices.setup(cfg)
    paths = files.run_paths(cfg)
    try:
        paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {paths['csv'].parent}: {e.strerror}")
    with files.run_lock(paths["lock"]):
        for key in ("csv", "best", "last", "summary"):    # half-written files of a run killed mid-write
            for stale in paths[key].parent.glob(f"{paths[key].name}.*.tmp"):
                stale.unlink()
        try:
            return train_locked(cfg, device, paths, resume, log)
        except OUT_OF_MEMORY:
            raise UserError(f"out of memory on {device.type} at batch_size {cfg.batch_size}: try --set batch_size="
                            f"{max(1, cfg.batch_size // 2)}, a fresh start, which keeps this run's files under "
                            f"{paths['csv'].parent / 'old'}/")
        except OSError as e:   # a full disk or a folder gone read-only: the files written before are kept
            raise UserError(files.os_error_line(e, paths["csv"].parent))


def train_locked(cfg, device, paths, resume, log):
    state = None
    if resume and paths["last"].exists():
        state = files.load_checkpoint(paths["last"])
        if not {"optimizer", "rng", "epoch_sums"} <= state.keys():
            raise UserError(f"{paths['last']} holds no training state (optimizer, RNG): it is not a .last.ckpt")
        if cfg.budget_s and state["config"].get("budget_s") == cfg.budget_s:    # the epochs chosen at its start
            cfg = dataclasses.replace(cfg, epochs=state["config"]["epochs"])
        changed = {k for k, v in state["config"].items() if getattr(cfg, k, None) != v} - RESUMABLE_CHANGES
        if changed:
            again = "FRESH=1 sbatch slurm.sh (a grid: another --out)" if os.environ.get("SLURM_JOB_ID") else \
                "run without --resume"
            raise UserError(f"{paths['last']} was made with other settings ({', '.join(sorted(changed))}); "
                            f"resume with the same config, or {again} to start again")
        finished = state.get("finished") and paths["summary"].exists()
        summary = json.loads(paths["summary"].read_text()) if finished else {}
        if "test_acc" in summary:       # not the record written at the start of a run that died before its end
            log(f"{cfg.name} already finished ({paths['last']}); nothing to do")
            return summary

    init = init_weights(cfg) if cfg.init and not state else None      # checked before anything is moved or read
    d = data.load(cfg, device)
    train_x, train_y = d["train"]
    model = build_model(cfg, len(d["classes"]), device)
    if init:
        load_weights(model, init, cfg)
    elif cfg.stem_init == "whiten":     # from 5,000 training images spread over the split (a resumed run's are loaded)
        whiten_(model.stem[0], data.normalize(train_x[::max(1, len(train_x) // 5000)]))
    precision = devices.pick_precision(cfg, device)[0]      # cfg.precision (auto) is what checkpoints keep
    opt = optim.make_optimizer(model, cfg, precision)
    scaler = devices.grad_scaler(device, precision)
    ema = copy.deepcopy(model) if cfg.ema else None     # weights and BN statistics, updated by update_ema
    eval_model = ema if ema is not None else model
    steps = data.steps_per_epoch(len(train_x), cfg.batch_size)
    first_batch = next(data.train_batches(train_x, train_y, cfg, 0, num_classes=len(d["classes"])))    # note: augments a whole epoch, so once
    t_run = time.time()
    compiled, compile_s = model, 0.0
    if devices.use_compile(cfg, device):     # before an earlier run's files move: the budget's timing needs it
        compiled = devices.compile_model(model, cfg)
        compile_s = warm_up(model, compiled, cfg, *first_batch, precision)
    budget = state.get("budget", {}) if state else {}
    if cfg.budget_s and not state:     # too short for one epoch: a UserError, and nothing in out/ has moved
        img_per_s = measure_speed(model, compiled, cfg, train_x, train_y, precision, ema, len(d["classes"]))
        cfg = dataclasses.replace(cfg, epochs=console.budget_epochs(cfg.budget_s, img_per_s, len(train_x)))
        budget = {"budget_img_per_s": round(img_per_s, 1), "budget_epochs": cfg.epochs}
    if budget:
        log(console.budget_line(cfg.budget_s, budget["budget_epochs"], budget["budget_img_per_s"]))
    total_steps = steps * cfg.epochs
    epoch, first_step, elapsed0, epoch_s0 = 0, 0, 0.0, 0.0     # epoch_s0: training time of the epoch before a stop
    best = {"val_acc": -1.0, "epoch": 0}
    sums = torch.zeros(4, device=device)        # loss sum, correct, seen, objective sum of the epoch so far
    if state:
        load_weights(model, state["model"], cfg)
        opt.load_state_dict(state["optimizer"])
        if scaler and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        epoch, first_step, elapsed0, best = state["epoch"], state["step_in_epoch"], state["elapsed_s"], state["best"]
        sums, epoch_s0 = state["epoch_sums"].to(device), state.get("epoch_s", 0.0)
        if len(sums) == 3:      # a last.ckpt from before train_objective, whose loss sum was the objective's
            sums = torch.cat([sums, sums[:1]])
        first_batch_loss = state["first_batch_loss"]
        started = files.start_time(paths["summary"]) or files.now()
        head = f"resuming {cfg.name} at epoch {epoch + 1} step {first_step} from {paths['last']}"
    else:       # a fresh start: the files of an earlier run of this name move, whole, under <out>/old/
        old, started = files.retire_earlier_run(cfg), files.now()
        start = f" from the weights of {cfg.init}" if cfg.init else " from scratch" if resume else ""
        if resume:
            moved = f"; the files found there moved to {old}/" if old else ""
            head = f"{cfg.name}{start} (no {paths['last']} to resume from{moved})"
        else:
            head = f"{cfg.name}{start}" + (f" (the earlier run's files moved to {old}/)" if old else "")
    log(console.run_line(head, cfg, model, device, f"{cfg.epochs} epochs x {steps} steps of batch {cfg.batch_size}",
                         console.files_of(cfg)))
    if not state:
        first_batch_loss = check_first_batch(model, *first_batch, precision, log, cfg.init)
    if compiled is not model:
        log(f"compiled in {compile_s:.1f}s (kept apart from training time)")
    files.write_json({"name": cfg.name, "status": "started", "started": started, "params": model.num_params(),
                      "first_batch_loss": first_batch_loss, "device": str(device), "config": asdict(cfg), **budget,
                      "versions": devices.versions()}, paths["summary"])
    csv_file = files.open_csv(paths["csv"], epoch)
    writer = csv.DictWriter(csv_file, files.CSV_COLUMNS)
    tick = console.progress(cfg, device, total_steps, epoch * steps + first_step, log, elapsed0)

    def checkpoint(kind, **extra):
        common = {"format_version": files.FORMAT_VERSION, "config": asdict(cfg), "classes": d["classes"],
                  "versions": devices.versions(), "first_batch_loss": first_batch_loss, "budget": budget}
        if kind == "best":
            files.save_checkpoint({**common, "model": eval_model.state_dict(), **extra}, paths["best"])
        else:
            files.save_checkpoint({**common, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "ema": ema.state_dict() if ema else None, "best": best,
                         "scaler": scaler.state_dict() if scaler else None,     # fp16's loss scale
                         "elapsed_s": elapsed0 + time.time() - t_run, "rng": {"torch": torch.get_rng_state()},
                         **extra}, paths["last"])

    with csv_file:
        while epoch < cfg.epochs:
            t0 = time.time()
            devices.synchronize(device)
            lr = optim.lr_at(max(0, epoch * steps + first_step - 1), total_steps, cfg)   # stopped after an epoch's last step
            batches = data.train_batches(train_x, train_y, cfg, epoch, first_step, len(d["classes"]))
            for i, (x, y) in enumerate(batches, first_step):
                lr = optim.lr_at(epoch * steps + i, total_steps, cfg)
                loss, correct, objective = train_step(compiled, opt, x, y, cfg, lr, precision, scaler)
                sums[0] += loss * len(y)
                sums[1] += correct
                sums[2] += len(y)
                sums[3] += objective * len(y)
                if ema:
                    update_ema(ema, model, cfg.ema)
                if device.type == "cpu" or (i + 1) % 100 == 0 or i + 1 == steps:
                    check_finite(sums[0], epoch, i, lr, paths)  # note: a host sync on CUDA, hence every 100 steps
                eta = tick(epoch * steps + i + 1, i + 1)
                if eta is not None:     # note: a host sync, hence time-based (every progress_s seconds)
                    rate = (i + 1 - first_step) * cfg.batch_size / (time.time() - t0)
                    log(console.step_line(f"ep {epoch + 1}/{cfg.epochs} step {i + 1}/{steps}",
                                          (sums[0] / sums[2]).item(), rate, elapsed0 + time.time() - t_run, eta))
                if stop_requested:
                    check_finite(sums[0], epoch, i, lr, paths)  # never save weights a NaN has spoilt
                    checkpoint("last", epoch=epoch, step_in_epoch=i + 1, epoch_sums=sums.cpu(),
                               epoch_s=epoch_s0 + time.time() - t0)
                    raise Preempted(stop_requested[0], f"{paths['last']} at epoch {epoch + 1} step {i + 1}")
            devices.synchronize(device)
            epoch_s = epoch_s0 + time.time() - t0
            epoch += 1
            validated = epoch % cfg.val_every == 0 or epoch == cfg.epochs
            val = evaluate(eval_model, *d["val"], cfg.tta, precision, cfg.tta_translate) if validated else {}
            train_loss, train_acc, _, objective = (sums / sums[2]).tolist()
            row = {"epoch": epoch, "lr": f"{lr:.6g}", "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
                   "train_objective": f"{objective:.5f}",
                   **{f"val_{k}": f"{v:.5f}" for k, v in val.items()},    # left empty on an epoch not validated
                   "epoch_s": f"{epoch_s:.3f}", "img_per_s": f"{sums[2].item() / epoch_s:.1f}",
                   "elapsed_s": f"{elapsed0 + time.time() - t_run:.3f}"}
            writer.writerow(row)
            csv_file.flush()
            if val and val["acc"] > best["val_acc"]:
                best = {**{f"val_{k}": v for k, v in val.items()}, "epoch": epoch}
                checkpoint("best", epoch=epoch, metrics=best)
            first_step, epoch_s0 = 0, 0.0
            sums = torch.zeros(4, device=device)
            checkpoint("last", epoch=epoch, step_in_epoch=0, epoch_sums=sums.cpu(), finished=epoch == cfg.epochs)
            log(console.epoch_line(row, cfg.epochs, best["val_acc"]))
    return finish(cfg, d, paths, device, first_batch_loss, elapsed0 + time.time() - t_run, log, compile_s, precision)


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


def check_finite(loss, epoch, step, lr, paths):
    if not torch.isfinite(loss):
        kept = f"last good checkpoints kept in {paths['last'].parent}" if paths["last"].exists() else "no checkpoint yet"
        raise Diverged(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (lr {lr:.2e}): the learning rate "
                       f"is likely too high; {kept}")


def finish(cfg, d, paths, device, first_batch_loss, wall_s, log, compile_s=0.0, precision="fp32"):
    """Test the best checkpoint once, write the summary JSON, return it."""
    best_ckpt = files.load_checkpoint(paths["best"])
    best_model = model_from(best_ckpt, device)
    test = evaluate(best_model, *d["test"], cfg.tta, precision, cfg.tta_translate)
    steps = data.steps_per_epoch(len(d["train"][0]), cfg.batch_size) * cfg.epochs
    with open(paths["csv"], newline="") as f:
        train_s = sum(float(r["epoch_s"]) for r in csv.DictReader(f))
    summary = {"name": cfg.name, "status": "finished", "started": files.start_time(paths["summary"]),
               "best_epoch": best_ckpt["epoch"],
               "best_val_acc": best_ckpt["metrics"]["val_acc"], "test_loss": test["loss"], "test_acc": test["acc"],
               "test_top5": test["top5"],      # test_acc, best_val_acc: with flip TTA where tta is on; *_plain, *_tta: both
               "best_val_acc_plain": best_ckpt["metrics"].get("val_acc_plain"),
               "best_val_acc_tta": best_ckpt["metrics"].get("val_acc_tta"),
               "test_acc_plain": test["acc_plain"], "test_acc_tta": test["acc_tta"],
               "first_batch_loss": first_batch_loss, "params": best_model.num_params(),
               "train_flops": roofline.step_flops(best_model, cfg) * steps,    # whatever the device or precision
               "train_s": round(train_s, 3), "compile_s": round(compile_s, 3), "wall_s": round(wall_s, 3),
               "device": str(device), "precision": precision, **best_ckpt.get("budget", {}),
               "files": [str(paths[k]) for k in ("csv", "best", "last", "summary")],
               "config": asdict(cfg), "versions": devices.versions()}
    files.write_json(summary, paths["summary"])
    return summary
