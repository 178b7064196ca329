"""Helpers for the fault and bad-input tests: run the scripts as subprocesses or in-process, compare runs."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import config
import data
import stops
import trainer

REPO = Path(__file__).resolve().parent.parent
# a tiny run on the CPU (bit-identical reruns): 256 training images, batches of 32 -> 8 steps per epoch
SMALL = ["--exp", "smoke", "--set", "subset=256", "--set", "batch_size=32", "--device", "cpu"]
TIMING = {"epoch_s", "img_per_s", "elapsed_s"}
RESULT_KEYS = ("best_epoch", "best_val_acc", "test_loss", "test_acc", "test_top5", "first_batch_loss")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}     # step lines arrive as they are printed


def synthetic_data(folder):
    """A --data-dir holding generated data for dataset=synthetic."""
    data.write_synthetic(Path(folder) / "synthetic" / "cifar-100-python")
    return Path(folder)


def small(out, data_dir, *sets, epochs=1):
    """The tiny smoke config on the CPU: 256 training images, batches of 32 (8 steps an epoch)."""
    return config.resolve("smoke", [("subset", 256), ("batch_size", 32), ("epochs", epochs), ("device", "cpu"),
                                     ("data_dir", str(data_dir)), ("out_dir", str(out)), *sets])


def quiet(cfg, resume=False):
    return trainer.train(cfg, resume=resume, log=lambda line: None)


def popen(*args):
    """Start `python <args>` in the repository, stdout and stderr merged into one text pipe."""
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run(*args, timeout=120):
    """Run `python <args>` in the repository to the end; the CompletedProcess (stdout, stderr apart)."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=ENV, text=True,
                          capture_output=True, timeout=timeout)


def assert_one_error_line(proc):
    """A user mistake: non-zero exit, and stderr is exactly one line starting with 'error:'."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def main_error(module, argv, monkeypatch, capsys):
    """Run module.main() in-process with argv; return its error line, asserting nothing else reached stderr."""
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *map(str, argv)])
    monkeypatch.setattr(stops, "install_stop_handlers", lambda: None)    # keep pytest's own signal handlers
    with pytest.raises(SystemExit) as e:
        module.main()
    message = e.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    assert capsys.readouterr().err == ""
    return message


def csv_rows(path, timing=False):
    """The epoch CSV as a list of dicts, without the timing columns unless asked."""
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if timing or k not in TIMING} for r in csv.DictReader(f)]


def results(summary):
    return {k: summary[k] for k in RESULT_KEYS}


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under folder but the empty lock files: proves files were
    left untouched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".lock"}
