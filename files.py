"""The run's files: atomic writes (a crash or a full disk leaves the old file or the new one, never half of one),
the lock that keeps two runs from writing the same files, checkpoints read with weights_only=True, the epoch CSV.

    python -c "import files; print(files.load_checkpoint('out/smoke.ckpt')['metrics'])"
"""
import contextlib
import csv
import dataclasses
import datetime
import errno
import json
import os
import pickle
import re
import time
import warnings
from pathlib import Path

try:
    import fcntl
except ImportError:         # Windows: a byte-range lock through msvcrt instead of flock
    fcntl = None
    import msvcrt

import torch

import resnet
from config import Config, UserError, check_value, validate

FORMAT_VERSION = 1
CSV_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "train_objective", "val_loss", "val_acc", "val_top5",
               "val_acc_plain", "val_acc_tta", "epoch_s", "img_per_s", "elapsed_s"]
# the settings a --resume may change; any other is refused (the run would not be the one its last.ckpt began)
RESUMABLE_CHANGES = {"data_dir", "download", "device", "compile", "threads", "log_every", "progress_s", "out_dir",
                     "note", "deterministic", "lrfind_start", "lrfind_end", "lrfind_iters", "lrfind_diverge", "lrfind_stop"}


def run_paths(cfg):
    out = Path(cfg.out_dir)
    return {k: out / f"{cfg.name}{suffix}" for k, suffix in
            [("csv", ".csv"), ("best", ".ckpt"), ("last", ".last.ckpt"), ("summary", ".json"), ("lock", ".lock")]}


def eval_paths(checkpoint, split="test"):
    """run_eval.py's result files, beside the checkpoint and named after its file: out/best_v1.ckpt ->
    out/best_v1[.val].eval.json and the matching .per_class.csv (out/best.last.ckpt -> out/best.last.eval.json)."""
    checkpoint = Path(checkpoint)
    stem = checkpoint.name.removesuffix(".ckpt") + ("" if split == "test" else f".{split}")
    return checkpoint.with_name(f"{stem}.eval.json"), checkpoint.with_name(f"{stem}.per_class.csv")


def earlier_run(cfg):
    """The files an earlier run of this name left: epoch CSV, checkpoints, record, and run_eval.py's results."""
    paths = run_paths(cfg)
    evals = [p for split in ("test", "val") for kind in ("best", "last") for p in eval_paths(paths[kind], split)]
    return [p for p in [paths[k] for k in ("csv", "best", "last", "summary")] + evals if p.exists()]


def now():
    """The time a run starts, as <exp>.json records it: local, to the second, with its UTC offset."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def start_time(summary_path):
    """The "started" time a run's record holds, or None (no record, or one written before it was kept)."""
    try:
        record = json.loads(Path(summary_path).read_text())
    except (OSError, ValueError):
        return None
    return record.get("started") if isinstance(record, dict) else None


def retire_earlier_run(cfg):
    """Move the files an earlier run of this name left, whole, into <out>/old/<name>-<its start time>/ (a folder
    never reused: -2, -3, ... where it exists); returns that folder, or None where there were none. Nothing is
    deleted. The start time is the record's, else the oldest file's modification time."""
    earlier, summary = earlier_run(cfg), run_paths(cfg)["summary"]
    if not earlier:
        return None
    try:
        when = datetime.datetime.fromisoformat(start_time(summary))
    except (TypeError, ValueError):     # no record, one from before "started" was kept, or a spoilt one
        when = datetime.datetime.fromtimestamp(min(p.stat().st_mtime for p in earlier))
    base = Path(cfg.out_dir) / "old" / f"{cfg.name}-{when:%Y%m%d-%H%M%S}"
    folder, n = base, 1
    while True:
        try:
            folder.mkdir(parents=True)     # claims the folder: it did not exist
            break
        except FileExistsError:
            n += 1
            folder = base.with_name(f"{base.name}-{n}")
    for path in sorted(earlier, key=lambda p: p == summary):       # the record last: a move cut short keeps its time
        path.replace(folder / path.name)
    return folder


def os_error_line(e, out):
    """An OSError of a run as one line: a failed write of the run's own files (a full disk, a folder gone read-only)
    names its folder out; any other OS error names its own file."""
    inside = e.filename is None or Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(out))
    return f"cannot write to {out}: {e.strerror or e}" if inside else f"{e.strerror or e}: {e.filename}"


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Write to a temp file beside path, fsync it, rename it over path; the temp file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def write_csv(path, columns, rows):
    """A CSV with a header and rows (dicts; keys outside columns are left out, missing ones left empty)."""
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)


@contextlib.contextmanager
def run_lock(path, wait=False):
    """Hold an exclusive lock on path: a second run of the same name is refused, or with wait=True waits for it."""
    try:
        f = open(path, "a")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}")
    with f:
        try:
            lock(f, wait)
        except BlockingIOError:
            raise UserError(f"another run is writing {path.with_suffix('')}.* (lock {path} is held); "
                            f"wait for it or use another --out")
        except OSError as e:    # ENOSYS, ENOLCK, EOPNOTSUPP: a filesystem without flock (some Lustre and NFS mounts)
            raise UserError(f"cannot lock files in {path.parent}: {e.strerror}; its filesystem may not support "
                            f"file locks (some Lustre or NFS mounts): use a local --out")
        try:
            yield
        finally:
            if fcntl is None:       # note: Windows may keep a lock a while after its file closes
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)


def lock(f, wait):
    """flock f, or on Windows lock its first byte; BlockingIOError when another process holds it and not wait."""
    if fcntl is not None:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return
    f.seek(0)
    while True:
        try:
            return msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError as e:    # EACCES: held by another process
            if e.errno not in (errno.EACCES, errno.EDEADLOCK):
                raise
            if not wait:
                raise BlockingIOError(e.errno, e.strerror) from e
            time.sleep(0.1)


# ----------------------------------------------------------------------------
# checkpoints and the epoch CSV

def save_checkpoint(obj, path):
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def load_checkpoint(path):
    """A checkpoint dict, read with weights_only=True (no code runs); UserError if it is not a usable one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # torch warns about a pickle protocol before refusing it
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:        # weights_only met more than tensors and plain data
        text = str(e).split("WeightsUnpickler error:")[-1]    # torch's advice to drop weights_only is not ours
        called = re.search(r"GLOBAL (\S+)", text)
        what = (f"unpickling it would call {called[1].rstrip('.')}" if called else "it holds more than tensors and "
                f"plain data ({next((ln.strip() for ln in text.splitlines() if ln.strip()), '')})")
        raise UserError(f"refused {path}: {what}, which could run code; it was not loaded")
    except Exception as e:  # torch raises many types for truncated or foreign files
        reason = str(e).split(". ")[0] if isinstance(e, RuntimeError) else type(e).__name__
        raise UserError(f"{path} is not a readable checkpoint (truncated, or not from torch.save): {reason[:200]}")
    if not isinstance(ckpt, dict) or not {"model", "config", "format_version"} <= ckpt.keys() \
            or not isinstance(ckpt["format_version"], int):
        raise UserError(f"{path} is not a checkpoint of this project (no model/config/format_version)")
    if ckpt["format_version"] > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {ckpt['format_version']}, newer than this code's "
                        f"{FORMAT_VERSION}: update the code")
    return ckpt


def trained_weights(ckpt):
    """The weights a checkpoint is evaluated and fine-tuned with: a best .ckpt's (EMA weights where its run had EMA),
    or those of a .last.ckpt's save (its EMA copy where the run had EMA)."""
    return ckpt["ema"] if "optimizer" in ckpt and ckpt["config"].get("ema") else ckpt["model"]


def config_from(ckpt):
    values = {k: check_value(k, v) for k, v in ckpt["config"].items()}
    return validate(Config(**values))


def open_csv(path, keep_epochs):
    """The epoch CSV opened for appending, holding only the rows of epochs 1..keep_epochs."""
    rows = []
    if keep_epochs and path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("epoch", "").isdigit() and int(r["epoch"]) <= keep_epochs]
    write_csv(path, CSV_COLUMNS, rows)
    return open(path, "a", newline="")


def init_weights(cfg):
    """The weights checkpoint cfg.init holds, to start a run from (as timm's --initial-checkpoint: weights only, the
    optimizer and schedule start afresh): a best .ckpt's, or a .last.ckpt's (its EMA weights where it had EMA)."""
    if any(Path(cfg.init).resolve() == p.resolve() for p in earlier_run(cfg)):
        raise UserError(f"config key 'init': {cfg.init} is a file of this run, and a fresh start of {cfg.name} moves it "
                        f"under {Path(cfg.out_dir) / 'old'}/: copy it elsewhere first, or give the run another name "
                        f"(--set name=...)")
    try:
        ckpt = load_checkpoint(cfg.init)
        theirs = config_from(ckpt)
    except UserError as e:
        raise UserError(f"config key 'init': {e}")
    mine, its = resnet.architecture(cfg), resnet.architecture(theirs)
    if mine != its:
        raise UserError(f"config key 'init': {cfg.init} holds another architecture ({its}) than this run ({mine}): "
                        f"give the run the checkpoint's")
    return trained_weights(ckpt)


def resume_state(cfg, paths):
    """(cfg, the .last.ckpt's state, the summary of a run that already finished or None). A budgeted run keeps the
    epochs chosen at its start; other changed settings are one error line."""
    state = load_checkpoint(paths["last"])
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
    return cfg, state, summary if "test_acc" in summary else None   # not the record of a run that died before its end
