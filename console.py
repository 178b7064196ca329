"""What a run prints: its first line, step lines with the run's ETA, the CPU estimate, a time budget's
epochs, epoch and done lines.

Plain lines, `|`-separated, no carriage returns: they read the same in a terminal and in a SLURM log.

    python -c "import console; print(console.duration(4000))"      # 1:06:40
"""
import math
import os
import time
from pathlib import Path

import torch

import config
import devices
import resnet

LONG_RUN_S = 3600        # a CPU run longer than this gets the estimate line
ESTIMATE_AFTER = 2       # steps before that estimate (the first, a warm-up, not timed): a slow CPU is told at once


def duration(seconds):
    """Seconds as H:MM:SS."""
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def compact(values):
    return "[" + ",".join(map(str, values)) + "]"


def device_text(cfg, device):
    """The device in words with the precision and compile chosen and why (devices.py); for a CPU under device=auto,
    also why no GPU was taken."""
    text = f"{device.type} ({devices.choice_text(cfg, device)})"
    if device.type != "cpu":
        return text
    if cfg.device == "auto" and torch.version.cuda:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "no NVIDIA driver or GPU visible"
        text += f": auto found no GPU although torch has CUDA {torch.version.cuda} ({why})"
    elif cfg.device == "auto":
        text += ": auto, and this torch is a CPU-only build"
    return text


def run_line(head, cfg, model, device, work, files):
    """The first line: what runs, the model, the device, how much work, where the files go."""
    stem = (f" patch stem {cfg.stem_stride}" if cfg.stem_stride > 1 else "") + \
        " avgpool shortcuts" * (cfg.shortcut == "avgpool")
    return (f"{head} | ResNet blocks {compact(cfg.blocks)} channels {compact(cfg.channels)}{stem}, "
            f"{model.num_params():,} params | {device_text(cfg, device)} | {work} | files {files}")


def budget_line(budget_s, epochs, img_per_s):
    """The line of a budgeted run: 'budget 20 min: 14 epochs at 930 img/s' (seconds unless whole minutes)."""
    budget = f"{budget_s / 60:g} min" if budget_s % 60 == 0 else f"{budget_s:g} s"
    return f"budget {budget}: {epochs} epochs at {img_per_s:,.0f} img/s"


def budget_epochs(budget_s, img_per_s, n_images):
    """The epochs of n_images that fit in budget_s seconds of training at img_per_s; a UserError where not one does."""
    epochs = math.floor(0.95 * budget_s * img_per_s / n_images)    # a 5% margin: the loop's own small costs, and noise
    if epochs < 1:
        epoch_s = n_images / img_per_s
        raise config.UserError(f"budget_s {budget_s:g} is shorter than one epoch here: an epoch of {n_images:,} images "
                               f"takes about {epoch_s:.{0 if epoch_s >= 10 else 2}f} s at {img_per_s:,.0f} img/s "
                               f"(with the 5% margin kept, give budget_s {math.ceil(epoch_s / 0.95)} or more)")
    return epochs


def cpu_recipe():
    """'--exp cpu' where experiments.json has it, else the CIFAR-100 recipe with the fewest parameter-epochs."""
    try:
        names = config.read_experiments()["experiments"]
        if "cpu" in names:
            return "--exp cpu"
        cfgs = [config.resolve(name) for name in names]
    except config.UserError:
        return None
    cost = {c.name: resnet.from_config(c).num_params() * c.epochs
            for c in cfgs if c.dataset == "cifar100" and not c.subset}
    return f"--exp {min(cost, key=cost.get)}" if cost else None


def estimate_line(cfg, total_s, rate):
    """The one line a CPU run longer than LONG_RUN_S gets: how long, and what to run instead."""
    recipe = cpu_recipe()
    instead = f"for a CPU run try {recipe}, or " if recipe and recipe != f"--exp {cfg.name}" else ""
    return (f"estimate: {cfg.name} takes about {total_s / 3600:.1f} h on this CPU ({rate:,.0f} img/s); "
            f"{instead}--device cuda on a GPU machine")


def progress(cfg, device, total, done, log, elapsed0=0.0, clock=time.time):
    """tick(step, step_in_epoch) to call after each training step (step counts from 1 over the whole run): returns the
    run's ETA in seconds when a step line is due (every cfg.progress_s seconds, and every cfg.log_every steps), else
    None. On a CPU, after the second step, it logs the estimate line once if the whole run will take over an hour,
    timing the steps after the first, which may be several times slower (a compiled graph's first real step)."""
    start = last = clock()
    first_done = None           # the clock after the first step
    estimated = device.type != "cpu"

    def tick(step, step_in_epoch):
        nonlocal last, estimated, first_done
        now = clock()
        per_step = (now - start) / max(1, step - done)
        eta = per_step * (total - step)
        first_done = now if first_done is None else first_done
        if not estimated and step - done >= min(ESTIMATE_AFTER, total - done):
            estimated = True
            warm_step = (now - first_done) / (step - done - 1) if step - done > 1 else per_step
            total_s = elapsed0 + now - start + warm_step * (total - step)
            if total_s > LONG_RUN_S:
                log(estimate_line(cfg, total_s, cfg.batch_size / warm_step))
        if (cfg.progress_s and now - last >= cfg.progress_s) or (cfg.log_every and step_in_epoch % cfg.log_every == 0):
            last = now
            return eta
        return None
    return tick


def step_line(where, loss, rate, elapsed, eta):
    return f"  {where} | loss {loss:.3f} | {rate:,.0f} img/s | elapsed {duration(elapsed)} | eta {duration(eta)}"


def epoch_line(row, epochs, best_acc):
    """The line of a finished epoch, from its CSV row."""
    f = {k: float(v) for k, v in row.items() if v != ""}       # val_* are empty on an epoch not validated
    val = f"{f['val_loss']:.3f} {100 * f['val_acc']:.1f}% (best {100 * best_acc:.1f}%)" if "val_acc" in f else "-"
    return (f"ep {row['epoch']}/{epochs} | train {f['train_loss']:.3f} {100 * f['train_acc']:.1f}% | "
            f"val {val} | lr {f['lr']:.1e} | {f['epoch_s']:.1f}s {f['img_per_s']:,.0f} img/s")


def tta_name(translate=0):
    """What TTA averages: 'flip TTA', or with tta_translate 'flip + 1 px translate TTA'."""
    return f"flip + {translate} px translate TTA" if translate else "flip TTA"


def tta_text(with_tta, plain, tta, translate=0):
    """Which top-1 a headline figure is, and the other one: '(flip TTA; 63.10% without)'."""
    if plain is None or tta is None:       # a summary from before both were recorded
        return ""
    name = tta_name(translate)
    return f" ({name}; {100 * plain:.2f}% without)" if with_tta else f" (no TTA; {100 * tta:.2f}% with {name})"


def flops_text(flops):
    """Training compute in words: '0.353 PFLOP', '27.9 TFLOP'."""
    return f"{flops / 1e15:.3g} PFLOP" if flops >= 1e14 else f"{flops / 1e12:.3g} TFLOP"


def done_line(s):
    """The run's last line, from its summary."""
    tta, translate = s.get("config", {}).get("tta"), s.get("config", {}).get("tta_translate", 0)
    return (f"done {s['name']} | best val {100 * s['best_val_acc']:.2f}% (epoch {s['best_epoch']}) | "
            f"test {100 * s['test_acc']:.2f}%{tta_text(tta, s.get('test_acc_plain'), s.get('test_acc_tta'), translate)} "
            f"top5 {100 * s['test_top5']:.2f}% | params {s['params'] / 1e6:.2f}M" +
            (f" | {flops_text(s['train_flops'])} | " if "train_flops" in s else " | ") +
            f"train {s['train_s']:.1f}s (compile {s.get('compile_s', 0):.1f}s apart) wall {s['wall_s']:.1f}s")


def files_of(cfg):
    return f"{Path(cfg.out_dir) / cfg.name}.*"
