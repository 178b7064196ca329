"""A run's life: a fresh start or a resume, the time budget, the first line, the checkpoints, a stop (stops.py) and the
summary at the end. engine.py trains each epoch's steps and evaluates.

    import config, trainer; trainer.train(config.resolve("smoke"))     # what run_train.py does
"""
import contextlib
import copy
import csv
import dataclasses
import os
import time
from dataclasses import asdict

import torch

import console
import data
import devices
import distributed
import engine
import files
import optim
import roofline
import stops
from config import UserError
from resnet import whiten_

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)    # any device's (older torch: CUDA's)

# ----------------------------------------------------------------------------
# a run, start to end

@dataclasses.dataclass
class Run:
    """Where a run stands: its config, files, data, what trains (engine.Training), and its position and record."""
    paths: dict
    d: dict
    t: engine.Training
    epoch: int = 0
    first_step: int = 0
    epoch_s0: float = 0.0            # training seconds of the epoch before a stop
    elapsed0: float = 0.0            # the run's seconds before this process (a resumed run's)
    best: dict = dataclasses.field(default_factory=lambda: {"val_acc": -1.0, "epoch": 0})
    budget: dict = dataclasses.field(default_factory=dict)
    first_batch_loss: float = 0.0
    compile_s: float = 0.0

    @property
    def cfg(self):
        return self.t.cfg       # one config: the budget's epochs replace it there


def train(cfg, resume=False, log=print):
    """Train cfg to the end (or to a stop signal); returns the summary dict also written to <name>.json (None on a
    rank but 0 of several processes: rank 0 alone prints, takes the lock and writes files)."""
    device = distributed.init(devices.setup(cfg), cfg)
    paths, main = files.run_paths(cfg), distributed.is_main()
    try:
        paths["csv"].parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output folder {paths['csv'].parent}: {e.strerror}")
    with files.run_lock(paths["lock"]) if main else contextlib.nullcontext():
        for key in ("csv", "best", "last", "summary") if main else ():    # half-written files of a run killed mid-write
            for stale in paths[key].parent.glob(f"{paths[key].name}.*.tmp"):
                stale.unlink()
        try:
            return train_locked(cfg, device, paths, resume, log if main else lambda line: None)
        except OUT_OF_MEMORY:
            raise UserError(f"out of memory on {device.type} at batch_size {cfg.batch_size}: try --set batch_size="
                            f"{max(1, cfg.batch_size // 2)}, a fresh start, which keeps this run's files under "
                            f"{paths['csv'].parent / 'old'}/")
        except OSError as e:   # a full disk or a folder gone read-only: the files written before are kept
            raise UserError(files.os_error_line(e, paths["csv"].parent))


def train_locked(cfg, device, paths, resume, log):
    state, asked_epochs, main = None, cfg.epochs, distributed.is_main()
    if resume and paths["last"].exists():
        cfg, state, summary = files.resume_state(cfg, paths)
        if summary:
            log(f"{cfg.name} already finished ({paths['last']}); nothing to do")
            return summary if main else None
    init = files.init_weights(cfg) if cfg.init and not state else None      # checked before anything is moved or read
    kept = state and state.get("precision")     # the precision chosen at the start, whatever auto says now
    run, first_batch = prepare(cfg, paths, device, init, kept)
    size_budget(run, state, log)
    if state and run.budget and asked_epochs != run.cfg.epochs:
        log(f"budget_s {cfg.budget_s:g} as at its start: its {run.cfg.epochs} epochs kept, not the {asked_epochs} "
            f"asked for")
    if state:
        head, started = restore(run, state), files.start_time(paths["summary"]) or files.now()
    else:       # a fresh start: the files of an earlier run of this name move, whole, under <out>/old/ (by rank 0)
        head, started = fresh_start(run.cfg, resume) if main else "", files.now()
    cfg, steps = run.cfg, data.steps_per_epoch(len(run.d["train"][0]), run.cfg.batch_size)
    ranks = f" on {distributed.world()} processes ({distributed.backend()})" if distributed.world() > 1 else ""
    shown = dataclasses.replace(cfg, precision=kept) if kept else cfg
    log(console.run_line(head, shown, run.t.model, device, f"{cfg.epochs} epochs x {steps} steps of batch "
                         f"{cfg.batch_size}{ranks}" + (f", in {kept} as chosen at its start" if kept else ""),
                         console.files_of(cfg)))
    if not state and main:
        run.first_batch_loss = engine.check_first_batch(run.t.model, *first_batch, run.t.precision, log, cfg.init)
    if run.compile_s:
        log(f"compiled in {run.compile_s:.1f}s (kept apart from training time)")
    if main:
        files.write_json({"name": cfg.name, "status": "started", "started": started,
                          "params": run.t.model.num_params(), "first_batch_loss": run.first_batch_loss,
                          "device": str(device), "precision": run.t.precision, "config": asdict(cfg), **run.budget,
                          "versions": devices.versions()},
                         paths["summary"])
    train_epochs(run, log)
    summary = finish(run, device) if main else None
    distributed.barrier()       # the others wait for rank 0's test
    return summary


def prepare(cfg, paths, device, init, precision=None):
    """The Run before its first step: data, model (from init, or its stem whitened), optimizer, EMA, compile and its
    warm-up, the budget's epochs; and the first training batch."""
    d = data.load(cfg, device)
    train_x, train_y = d["train"]
    model = engine.build_model(cfg, len(d["classes"]), device)
    if init:
        engine.load_weights(model, init, cfg)
    elif cfg.stem_init == "whiten":     # from 5,000 training images spread over the split (a resumed run's are loaded)
        whiten_(model.stem[0], data.normalize(train_x[::max(1, len(train_x) // 5000)]))
    precision = precision or devices.pick_precision(cfg, device)[0]   # a resumed run's: chosen once, at its start
    t = engine.Training(cfg, model, distributed.wrap(model, cfg, device), optim.make_optimizer(model, cfg, precision),
                        devices.grad_scaler(device, precision), copy.deepcopy(model) if cfg.ema else None, precision,
                        torch.zeros(4, device=device))    # EMA: weights and BN statistics, updated by update_ema
    first_batch = next(data.train_batches(train_x, train_y, cfg, 0, num_classes=len(d["classes"])))    # note: augments a whole epoch, so once
    t.origin = time.time()
    run = Run(paths, d, t)
    if devices.use_compile(cfg, device):     # before an earlier run's files move: the budget's timing needs it
        t.compiled = devices.compile_model(t.compiled, cfg)     # of the DDP module where several processes
        run.compile_s = engine.warm_up(model, t.compiled, cfg, *distributed.my_slice(*first_batch), precision)
    return run, first_batch


def size_budget(run, state, log):
    """A budgeted run's epochs: measured at a fresh start (too short for one epoch: a UserError, and nothing in out/
    has moved), kept from the checkpoint on a resume; said in one line."""
    cfg, t = run.cfg, run.t
    run.budget = state.get("budget", {}) if state else {}
    if cfg.budget_s and not state:
        img_per_s = engine.measure_speed(t.model, t.compiled, cfg, *run.d["train"], t.precision, t.ema,
                                         len(run.d["classes"]))
        t.cfg = dataclasses.replace(cfg, epochs=console.budget_epochs(cfg.budget_s, img_per_s, len(run.d["train"][0])))
        run.budget = {"budget_img_per_s": round(img_per_s, 1), "budget_epochs": run.cfg.epochs}
    if run.budget:
        log(console.budget_line(cfg.budget_s, run.budget["budget_epochs"], run.budget["budget_img_per_s"]))


def restore(run, state):
    """Load a .last.ckpt's weights, optimizer, EMA, RNG, position and record into the run; returns the head line."""
    t = run.t
    engine.load_weights(t.model, state["model"], run.cfg)
    t.opt.load_state_dict(state["optimizer"])
    if t.scaler and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema:
        t.ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"]["torch"])
    run.epoch, run.first_step, run.best = state["epoch"], state["step_in_epoch"], state["best"]
    run.elapsed0 = state["elapsed_s"]
    t.origin -= run.elapsed0
    t.sums, run.epoch_s0 = state["epoch_sums"].to(t.sums.device), state.get("epoch_s", 0.0)
    t.sums *= distributed.is_main()     # the saved sums are all the ranks': counted once, on rank 0
    if len(t.sums) == 3:      # a last.ckpt from before train_objective, whose loss sum was the objective's
        t.sums = torch.cat([t.sums, t.sums[:1]])
    run.first_batch_loss = state["first_batch_loss"]
    return f"resuming {run.cfg.name} at epoch {run.epoch + 1} step {run.first_step} from {run.paths['last']}"


def fresh_start(cfg, resume):
    """Move an earlier run's files of this name under <out>/old/; returns the head line that says so."""
    old, last = files.retire_earlier_run(cfg), files.run_paths(cfg)["last"]
    start = f" from the weights of {cfg.init}" if cfg.init else " from scratch" if resume else ""
    if resume:
        moved = f"; the files found there moved to {old}/" if old else ""
        return f"{cfg.name}{start} (no {last} to resume from{moved})"
    return f"{cfg.name}{start}" + (f" (the earlier run's files moved to {old}/)" if old else "")


def train_epochs(run, log):
    """The epochs from where the run stands to its end: each one's steps (engine), validation, CSV row, checkpoints and
    line. A stop signal saves last.ckpt at the step reached and raises Preempted."""
    cfg, t, paths, d, main = run.cfg, run.t, run.paths, run.d, distributed.is_main()
    steps = data.steps_per_epoch(len(d["train"][0]), cfg.batch_size)
    csv_file = files.open_csv(paths["csv"], run.epoch) if main else open(os.devnull, "w")
    writer = csv.DictWriter(csv_file, files.CSV_COLUMNS)
    tick = console.progress(cfg, t.sums.device, steps * cfg.epochs, run.epoch * steps + run.first_step, log,
                            run.elapsed0)
    with csv_file:
        while run.epoch < cfg.epochs:
            devices.synchronize(t.sums.device)      # the clock is read once the queued work is done
            t0 = time.time()
            kept = f"last good checkpoints kept in {paths['last'].parent}" if paths["last"].exists() else \
                "no checkpoint yet"
            step, lr, stopped = engine.train_one_epoch(     # a stop signal to any rank stops every rank
                t, *d["train"], run.epoch, run.first_step, len(d["classes"]), tick, log,
                lambda: distributed.any_true(bool(stops.stop_requested)), kept)
            distributed.all_sum(t.sums)     # the epoch's train loss, accuracy and images: every rank's slice
            if stopped:     # every rank at the same step (the flag is all-reduced each step); rank 0 saves
                if main:
                    save_last(run, step_in_epoch=step, epoch_sums=t.sums.cpu(), epoch_s=run.epoch_s0 + time.time() - t0)
                distributed.barrier()
                raise stops.Preempted(stops.stop_requested[0] if stops.stop_requested else "by another process",
                                      f"{paths['last']} at epoch {run.epoch + 1} step {step}")
            devices.synchronize(t.sums.device)
            epoch_s = run.epoch_s0 + time.time() - t0
            run.epoch += 1
            row, val = end_of_epoch(run, lr, epoch_s)
            writer.writerow(row)
            csv_file.flush()
            if val and val["acc"] > run.best["val_acc"]:        # rank 0's decision (the others validate nothing)
                run.best = {**{f"val_{k}": v for k, v in val.items()}, "epoch": run.epoch}
                eval_model = t.ema if t.ema is not None else t.model
                files.save_checkpoint({**checkpoint_common(run), "model": eval_model.state_dict(), "epoch": run.epoch,
                                       "metrics": run.best}, paths["best"])
            run.first_step, run.epoch_s0 = 0, 0.0
            t.sums = torch.zeros(4, device=t.sums.device)
            if main:
                save_last(run, step_in_epoch=0, epoch_sums=t.sums.cpu(), finished=run.epoch == cfg.epochs)
            distributed.barrier()       # the others wait for rank 0's validation and checkpoints
            log(console.epoch_line(row, cfg.epochs, run.best["val_acc"]))


def end_of_epoch(run, lr, epoch_s):
    """Validate where due; returns the epoch's CSV row and the validation's metrics ({} where not due)."""
    cfg, t = run.cfg, run.t
    validated = (run.epoch % cfg.val_every == 0 or run.epoch == cfg.epochs) and distributed.is_main()  # each image once
    eval_model = t.ema if t.ema is not None else t.model
    val = engine.evaluate(eval_model, *run.d["val"], cfg.tta, t.precision, cfg.tta_translate) if validated else {}
    train_loss, train_acc, _, objective = (t.sums / t.sums[2]).tolist()
    row = {"epoch": run.epoch, "lr": f"{lr:.6g}", "train_loss": f"{train_loss:.5f}", "train_acc": f"{train_acc:.5f}",
           "train_objective": f"{objective:.5f}",
           **{f"val_{k}": f"{v:.5f}" for k, v in val.items()},    # left empty on an epoch not validated
           "epoch_s": f"{epoch_s:.3f}", "img_per_s": f"{t.sums[2].item() / epoch_s:.1f}",
           "elapsed_s": f"{t.elapsed():.3f}"}
    return row, val


def checkpoint_common(run):
    return {"format_version": files.FORMAT_VERSION, "config": asdict(run.cfg), "classes": run.d["classes"],
            "versions": devices.versions(), "first_batch_loss": run.first_batch_loss, "budget": run.budget,
            "precision": run.t.precision}


def save_last(run, **position):
    """last.ckpt: everything a resume needs, at the epoch and step given."""
    t = run.t
    files.save_checkpoint({**checkpoint_common(run), "model": t.model.state_dict(), "optimizer": t.opt.state_dict(),
                           "ema": t.ema.state_dict() if t.ema else None, "best": run.best,
                           "scaler": t.scaler.state_dict() if t.scaler else None,     # fp16's loss scale
                           "elapsed_s": t.elapsed(), "rng": {"torch": torch.get_rng_state()},
                           "epoch": run.epoch, **position}, run.paths["last"])


# ----------------------------------------------------------------------------
# the last line

def finish(run, device):
    """Test the best checkpoint once, write the summary JSON, return it."""
    cfg, paths, d, wall_s = run.cfg, run.paths, run.d, run.t.elapsed()
    best_ckpt = files.load_checkpoint(paths["best"])
    best_model = engine.model_from(best_ckpt, device)
    test = engine.evaluate(best_model, *d["test"], cfg.tta, run.t.precision, cfg.tta_translate, both=True)
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
               "first_batch_loss": run.first_batch_loss, "params": best_model.num_params(),
               "train_flops": roofline.step_flops(best_model, cfg) * steps,    # whatever the device or precision
               "train_s": round(train_s, 3), "compile_s": round(run.compile_s, 3), "wall_s": round(wall_s, 3),
               "device": str(device), "precision": run.t.precision, **best_ckpt.get("budget", {}),
               "files": [str(paths[k]) for k in ("csv", "best", "last", "summary")],
               "config": asdict(cfg), "versions": devices.versions()}
    files.write_json(summary, paths["summary"])
    return summary
