"""The training engine: one Config in, a trained model, an epoch CSV, checkpoints and a summary out.

    from config import resolve; from engine import train
    summary = train(resolve("smoke"))          # what run_train.py does
"""
import copy
import csv
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
from config import UserError
from resnet import ResNet

PREEMPTED_EXIT = 75         # exit code after a stop signal: last.ckpt is saved, requeue and --resume
INTERRUPTED_EXIT = 130      # after Ctrl-C (128 + SIGINT, as shells expect); last.ckpt is saved as well
STOPPED_AT_ONCE = ("stopped at once by a second Ctrl-C: nothing saved since the last checkpoint; "
                   "--resume goes on from it")
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)    # any device's (older torch: CUDA's)
RESUMABLE_CHANGES = {"data_dir", "download", "device", "compile", "log_every", "progress_s", "out_dir", "note",
                     "deterministic", "lrfind_start", "lrfind_end", "lrfind_iters", "lrfind_diverge", "lrfind_stop"}


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

def warm_up(model, compiled, cfg, x, y):
    """Compile the training step before training; returns its seconds, so that training time excludes them. The steps
    run on the model itself (CUDA graphs are recorded on its own parameters), at lr 0 with a throwaway optimizer, and
    its weights and BN statistics are put back after: training starts as if they had not run."""
    saved = copy.deepcopy(model.state_dict())
    t0 = time.time()
    with devices.compile_errors():
        for _ in range(3 if cfg.compile == "reduce-overhead" else 1):    # CUDA graphs: warm-up, recording, a replay
            train_step(compiled, optim.make_optimizer(model, cfg), x, y, cfg, lr=0.0)
    if x.is_cuda:
        torch.cuda.synchronize()
    model.load_state_dict(saved)        # in place: the parameters keep the addresses the graphs were recorded on
    return time.time() - t0


# ----------------------------------------------------------------------------
# model and training step (optim.py: optimizer and schedule)

def build_model(cfg, num_classes=100, device="cpu"):
    return ResNet(cfg.blocks, cfg.channels, num_classes, cfg.stem_stride).to(device, memory_format=torch.channels_last)


def train_step(model, opt, x, y, cfg, lr):
    """One forward/backward/update; returns (loss, correct) as device tensors, no host sync."""
    for group in opt.param_groups:
        group["lr"] = lr
    with devices.autocast(x.device, cfg.precision):
        logits = model(devices.to_model_format(x))
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


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
def predict(model, x, tta=False, precision="auto", batch_size=1000):
    """Logits (float32) of every image in uint8 x, optionally averaged with the flipped image's."""
    was_training = model.training
    model.eval()
    out = []
    for xb in data.eval_batches(x, batch_size):
        xb = devices.to_model_format(xb)
        with devices.autocast(xb.device, precision):
            logits = model(xb).float()
            if tta:
                logits = (logits + model(xb.flip(3)).float()) / 2
        out.append(logits)
    model.train(was_training)
    return torch.cat(out)


def metrics(logits, y):
    """loss, top-1 and top-5 accuracy (fractions) of logits against labels."""
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    return {"loss": F.cross_entropy(logits, y).item(), "acc": (top5[:, 0] == y).float().mean().item(),
            "top5": (top5 == y[:, None]).any(1).float().mean().item()}


def evaluate(model, x, y, tta=False, precision="auto"):
    return metrics(predict(model, x, tta, precision), y)


# ----------------------------------------------------------------------------
# a model from a checkpoint (files.load_checkpoint reads it)

def model_from(ckpt, device="cpu"):
    """The model a checkpoint describes, with its weights loaded."""
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
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)


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

    d = data.load(cfg, device)
    train_x, train_y = d["train"]
    model = build_model(cfg, len(d["classes"]), device)
    opt = optim.make_optimizer(model, cfg)
    ema = copy.deepcopy(model) if cfg.ema else None     # weights and BN statistics, updated by update_ema
    eval_model = ema if ema is not None else model
    steps = data.steps_per_epoch(len(train_x), cfg.batch_size)
    total_steps = steps * cfg.epochs
    epoch, first_step, elapsed0, epoch_s0 = 0, 0, 0.0, 0.0     # epoch_s0: training time of the epoch before a stop
    best = {"val_acc": -1.0, "epoch": 0}
    sums = torch.zeros(3, device=device)        # loss sum, correct, seen of the epoch so far
    if state:
        load_weights(model, state["model"], cfg)
        opt.load_state_dict(state["optimizer"])
        if ema:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        epoch, first_step, elapsed0, best = state["epoch"], state["step_in_epoch"], state["elapsed_s"], state["best"]
        sums, epoch_s0 = state["epoch_sums"].to(device), state.get("epoch_s", 0.0)
        first_batch_loss = state["first_batch_loss"]
        head = f"resuming {cfg.name} at epoch {epoch + 1} step {first_step} from {paths['last']}"
    else:       # a fresh start: the files of an earlier run of this name go at once (kept as *.old on --resume)
        earlier = files.earlier_run(cfg)
        for path in earlier:
            if resume:
                path.replace(path.with_name(path.name + ".old"))
            else:
                path.unlink()
        kept = "; the files found there are kept as *.old" if resume and earlier else ""
        head = f"{cfg.name} from scratch (no {paths['last']} to resume from{kept})" if resume else cfg.name
    log(console.run_line(head, cfg, model, device, f"{cfg.epochs} epochs x {steps} steps of batch {cfg.batch_size}",
                         console.files_of(cfg)))
    first_batch = next(data.train_batches(train_x, train_y, cfg, epoch=0))    # note: augments a whole epoch, so once
    if not state:
        first_batch_loss = check_first_batch(model, *first_batch, cfg.precision, log)
    t_run = time.time()
    compiled, compile_s = model, 0.0
    if devices.use_compile(cfg, device):
        compiled = devices.compile_model(model, cfg)
        compile_s = warm_up(model, compiled, cfg, *first_batch)
        log(f"compiled in {compile_s:.1f}s (kept apart from training time)")
    files.write_json({"name": cfg.name, "status": "started", "params": model.num_params(),
                      "first_batch_loss": first_batch_loss, "device": str(device), "config": asdict(cfg),
                      "versions": devices.versions()}, paths["summary"])
    csv_file = files.open_csv(paths["csv"], epoch)
    writer = csv.DictWriter(csv_file, files.CSV_COLUMNS)
    tick = console.progress(cfg, device, total_steps, epoch * steps + first_step, log, elapsed0)

    def checkpoint(kind, **extra):
        common = {"format_version": files.FORMAT_VERSION, "config": asdict(cfg), "classes": d["classes"],
                  "versions": devices.versions(), "first_batch_loss": first_batch_loss}
        if kind == "best":
            files.save_checkpoint({**common, "model": eval_model.state_dict(), **extra}, paths["best"])
        else:
            files.save_checkpoint({**common, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "ema": ema.state_dict() if ema else None, "best": best,
                         "elapsed_s": elapsed0 + time.time() - t_run, "rng": {"torch": torch.get_rng_state()},
                         **extra}, paths["last"])

    with csv_file:
        while epoch < cfg.epochs:
            t0 = time.time()
            if device.type == "cuda":
                torch.cuda.synchronize()
            lr = optim.lr_at(max(0, epoch * steps + first_step - 1), total_steps, cfg)   # stopped after an epoch's last step
            for i, (x, y) in enumerate(data.train_batches(train_x, train_y, cfg, epoch, first_step), first_step):
                lr = optim.lr_at(epoch * steps + i, total_steps, cfg)
                loss, correct = train_step(compiled, opt, x, y, cfg, lr)
                sums[0] += loss * len(y)
                sums[1] += correct
                sums[2] += len(y)
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
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_s = epoch_s0 + time.time() - t0
            epoch += 1
            validated = epoch % cfg.val_every == 0 or epoch == cfg.epochs
            val = evaluate(eval_model, *d["val"], cfg.tta, cfg.precision) if validated else {}
            train_loss, train_acc = (sums[:2] / sums[2]).tolist()
            row = {"epoch": epoch, "lr": f"{lr:.6g}", "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
                   **{f"val_{k}": f"{v:.5f}" for k, v in val.items()},    # left empty on an epoch not validated
                   "epoch_s": f"{epoch_s:.3f}", "img_per_s": f"{sums[2].item() / epoch_s:.1f}",
                   "elapsed_s": f"{elapsed0 + time.time() - t_run:.3f}"}
            writer.writerow(row)
            csv_file.flush()
            if val and val["acc"] > best["val_acc"]:
                best = {"val_acc": val["acc"], "val_loss": val["loss"], "val_top5": val["top5"], "epoch": epoch}
                checkpoint("best", epoch=epoch, metrics=best)
            first_step, epoch_s0 = 0, 0.0
            sums = torch.zeros(3, device=device)
            checkpoint("last", epoch=epoch, step_in_epoch=0, epoch_sums=sums.cpu(), finished=epoch == cfg.epochs)
            log(console.epoch_line(row, cfg.epochs, best["val_acc"]))
    return finish(cfg, d, paths, device, first_batch_loss, elapsed0 + time.time() - t_run, log, compile_s)


def check_first_batch(model, xb, yb, precision, log):
    """Loss of the first training batch before any update, on a copy (about ln(classes) when all is well)."""
    probe = copy.deepcopy(model)
    with torch.no_grad(), devices.autocast(xb.device, precision):
        loss = F.cross_entropy(probe(devices.to_model_format(xb)).float(), yb).item()
    n_classes = model.fc.out_features
    log(f"first-batch loss {loss:.3f} (expected about ln {n_classes} = {math.log(n_classes):.3f})")
    return loss


def check_finite(loss, epoch, step, lr, paths):
    if not torch.isfinite(loss):
        kept = f"last good checkpoints kept in {paths['last'].parent}" if paths["last"].exists() else "no checkpoint yet"
        raise Diverged(f"loss is {loss.item()} at epoch {epoch + 1} step {step + 1} (lr {lr:.2e}): the learning rate "
                       f"is likely too high; {kept}")


def finish(cfg, d, paths, device, first_batch_loss, wall_s, log, compile_s=0.0):
    """Test the best checkpoint once, write the summary JSON, return it."""
    best_ckpt = files.load_checkpoint(paths["best"])
    best_model = model_from(best_ckpt, device)
    test = evaluate(best_model, *d["test"], cfg.tta, cfg.precision)
    with open(paths["csv"], newline="") as f:
        train_s = sum(float(r["epoch_s"]) for r in csv.DictReader(f))
    summary = {"name": cfg.name, "status": "finished", "best_epoch": best_ckpt["epoch"],
               "best_val_acc": best_ckpt["metrics"]["val_acc"], "test_loss": test["loss"], "test_acc": test["acc"],
               "test_top5": test["top5"],
               "first_batch_loss": first_batch_loss, "params": best_model.num_params(),
               "train_s": round(train_s, 3), "compile_s": round(compile_s, 3), "wall_s": round(wall_s, 3),
               "device": str(device),
               "files": [str(paths[k]) for k in ("csv", "best", "last", "summary")],
               "config": asdict(cfg), "versions": devices.versions()}
    files.write_json(summary, paths["summary"])
    return summary
