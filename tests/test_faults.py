"""Faults: SIGKILL at any moment, determinism, NaN loss, unsafe checkpoints, two runs at once, out of memory."""
import errno
import json
import os
import pickle
import signal
import threading
from pathlib import Path

import pytest
import torch

import config
import data
import engine
import files
import run_train
import stops
import trainer
from fault_helpers import (
    SMALL,
    assert_one_error_line,
    csv_rows,
    main_error,
    popen,
    results,
    run,
    snapshot,
    synthetic_data,
)

EPOCHS = ["--epochs", "3"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """An uninterrupted 3-epoch run as a subprocess: (CSV rows without timing, final results)."""
    out = tmp_path_factory.mktemp("reference")
    proc = run("run_train.py", *SMALL, *EPOCHS, "--data-dir", data_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    return csv_rows(out / "smoke.csv"), results(json.loads((out / "smoke.json").read_text()))


def watchdog(proc, seconds=120):
    """Kill proc if it still runs after `seconds`: a test never hangs the suite."""
    timer = threading.Timer(seconds, proc.kill)
    timer.daemon = True
    timer.start()


def train_here(out, data_dir, *sets, epochs=2, log=lambda *a: None):
    """trainer.train in this process on the tiny smoke run, on the CPU unless `sets` say otherwise; the summary."""
    pairs = [("subset", 256), ("batch_size", 32), ("epochs", epochs), ("device", "cpu"), ("data_dir", str(data_dir)),
             ("out_dir", str(out)), *sets]
    return trainer.train(config.resolve("smoke", pairs), log=log)


def assert_resume_matches(reference, out, data_dir):
    """--resume finishes the run with the reference's CSV (each epoch once) and final results."""
    proc = run("run_train.py", *SMALL, *EPOCHS, "--data-dir", data_dir, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert (csv_rows(out / "smoke.csv"), results(json.loads((out / "smoke.json").read_text()))) == reference
    assert not list(out.glob("*.tmp"))


# ----------------------------------------------------------------------------
# 1. SIGKILL during an epoch and during a checkpoint write

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR1], ids=["SIGKILL", "SIGUSR1"])
def test_kill_or_stop_signal_during_an_epoch_loses_at_most_that_epoch_and_resume_matches_an_uninterrupted_run(
        reference, data_dir, tmp_path, sig):
    proc = popen("run_train.py", *SMALL, *EPOCHS, "--set", "log_every=1", "--data-dir", data_dir, "--out", tmp_path)
    watchdog(proc)
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):     # inside epoch 2
            proc.send_signal(sig)
            break
    proc.stdout.read()
    assert proc.wait() == (-signal.SIGKILL if sig == signal.SIGKILL else stops.PREEMPTED_EXIT)
    assert len(csv_rows(tmp_path / "smoke.csv")) == 1
    last = files.load_checkpoint(tmp_path / "smoke.last.ckpt")
    assert last["epoch"] == 1 and (last["step_in_epoch"] == 0) == (sig == signal.SIGKILL)   # SIGUSR1 saves mid-epoch
    engine.model_from(files.load_checkpoint(tmp_path / "smoke.ckpt"))
    assert_resume_matches(reference, tmp_path, data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["smoke.ckpt", "smoke.last.ckpt"])
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint_and_resume_matches(
        reference, data_dir, tmp_path, target):
    proc = popen("tests/stall_save.py", target, 2, *SMALL, *EPOCHS, "--data-dir", data_dir, "--out", tmp_path)
    watchdog(proc)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("stalled writing "):
            break
    half_written = Path(line.split()[-1])
    assert half_written.name.startswith(target) and half_written.stat().st_size, "".join(lines)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    epochs_logged = len(csv_rows(tmp_path / "smoke.csv"))
    last = files.load_checkpoint(tmp_path / "smoke.last.ckpt")
    assert last["epoch"] == epochs_logged - 1          # the epoch being saved is the one lost
    best = files.load_checkpoint(tmp_path / "smoke.ckpt")
    assert best["epoch"] < epochs_logged if target == "smoke.ckpt" else best["epoch"] <= epochs_logged
    engine.model_from(best)
    assert_resume_matches(reference, tmp_path, data_dir)


# ----------------------------------------------------------------------------
# 2. determinism

@pytest.fixture(scope="module")
def seed_0_run(data_dir, tmp_path_factory):
    """An in-process run with seed 0: (CSV rows without timing, summary)."""
    out = tmp_path_factory.mktemp("seed_0")
    summary = train_here(out, data_dir)
    return csv_rows(out / "smoke.csv"), summary


def test_same_seed_gives_identical_csv_and_results_on_cpu(seed_0_run, data_dir, tmp_path):
    rows, summary = seed_0_run
    again = train_here(tmp_path, data_dir)
    assert csv_rows(tmp_path / "smoke.csv") == rows
    assert results(again) == results(summary)


def test_another_seed_changes_the_run_but_not_the_validation_split(seed_0_run, data_dir, tmp_path):
    rows, _ = seed_0_run
    train_here(tmp_path, data_dir, ("seed", 1))
    assert [r["train_loss"] for r in csv_rows(tmp_path / "smoke.csv")] != [r["train_loss"] for r in rows]
    val = [data.load(config.resolve("smoke", [("seed", s), ("data_dir", str(data_dir))]))["val"] for s in (0, 1)]
    assert torch.equal(val[0][0], val[1][0]) and torch.equal(val[0][1], val[1][1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_deterministic_flag_gives_identical_runs_on_cuda(data_dir, tmp_path):
    for name in ("a", "b"):
        proc = run("run_train.py", *SMALL, *EPOCHS, "--device", "cuda", "--deterministic", "--no-compile",
                   "--data-dir", data_dir, "--out", tmp_path / name, timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert csv_rows(tmp_path / "a" / "smoke.csv") == csv_rows(tmp_path / "b" / "smoke.csv")


# ----------------------------------------------------------------------------
# 3. non-finite loss

def test_nan_loss_stops_at_the_first_bad_step_names_it_and_keeps_the_good_checkpoints(
        data_dir, tmp_path, monkeypatch, capsys):
    real_step, calls, before = engine.train_step, [], {}

    def poisoned_step(model, opt, x, *rest):
        calls.append(1)
        if len(calls) == 8 + 2:                       # epoch 2, step 2: a NaN batch makes a NaN loss
            before.update(snapshot(tmp_path / "out"))
            x = x * float("nan")
        return real_step(model, opt, x, *rest)

    monkeypatch.setattr(engine, "train_step", poisoned_step)
    message = main_error(run_train, [*SMALL, "--epochs", "2", "--data-dir", data_dir, "--out", tmp_path / "out"],
                         monkeypatch, capsys)
    assert "loss is nan at epoch 2 step 2" in message and "learning rate is likely too high" in message
    assert len(calls) == 8 + 2                        # stopped at once
    assert snapshot(tmp_path / "out") == before       # epoch 1's checkpoints and CSV, byte for byte
    assert files.load_checkpoint(tmp_path / "out" / "smoke.last.ckpt")["epoch"] == 1


def test_a_stop_signal_after_an_unchecked_nan_does_not_save_spoilt_weights(data_dir, tmp_path, monkeypatch):
    """On CUDA the loss is looked at every 100 steps only: a stop signal in between must not save NaN weights."""
    real_step, calls, before = engine.train_step, [], {}

    def nan_then_stop(model, opt, x, *rest):
        calls.append(1)
        if len(calls) == 8 + 2:                       # epoch 2, step 2: NaN; the stop comes at step 4
            before.update(snapshot(tmp_path))
            x = x * float("nan")
        if len(calls) == 8 + 4:
            stops.stop_requested.append(signal.SIGUSR1)
        return real_step(model, opt, x, *rest)

    monkeypatch.setattr(engine, "train_step", nan_then_stop)
    monkeypatch.setattr(stops, "stop_requested", [])
    with pytest.raises(engine.Diverged, match="loss is nan at epoch 2 step"):
        train_here(tmp_path, data_dir, ("device", "auto"), ("compile", "off"))
    assert snapshot(tmp_path) == before


def test_a_far_too_high_learning_rate_ends_in_one_error_line_not_a_crash(data_dir, tmp_path, monkeypatch, capsys):
    message = main_error(run_train, [*SMALL, "--set", "optimizer=sgd", "--set", "lr=1e6", "--set", "schedule=constant",
                                     "--epochs", "1", "--data-dir", data_dir, "--out", tmp_path], monkeypatch, capsys)
    assert "at epoch 1 step" in message and "learning rate is likely too high; no checkpoint yet" in message
    assert not (tmp_path / "smoke.ckpt").exists()


# ----------------------------------------------------------------------------
# 5. checkpoints are read with weights_only=True: a crafted one runs no code

class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft(path, marker, kind):
    """A checkpoint-looking file that runs `touch marker` when unpickled without weights_only."""
    evil = {"format_version": 1, "config": {}, "model": RunsCode(marker)}
    if kind == "torch.save":
        torch.save(evil, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(evil, f)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_crafted_checkpoint_is_refused_by_run_eval_and_its_code_never_runs(tmp_path, kind):
    marker = tmp_path / "code_ran"
    craft(tmp_path / "evil.ckpt", marker, kind)
    with open(tmp_path / "evil.ckpt", "rb") as f:     # the control: unsafe loading does run the code
        torch.load(f, weights_only=False) if kind == "torch.save" else pickle.load(f)
    assert marker.exists()
    marker.unlink()
    line = assert_one_error_line(run("run_eval.py", tmp_path / "evil.ckpt"))
    assert "refused" in line and not marker.exists()


def test_crafted_last_checkpoint_is_refused_by_resume_and_its_code_never_runs(data_dir, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "code_ran"
    (tmp_path / "out").mkdir()
    craft(tmp_path / "out" / "smoke.last.ckpt", marker, "torch.save")
    before = snapshot(tmp_path / "out")
    message = main_error(run_train, [*SMALL, "--data-dir", data_dir, "--out", tmp_path / "out", "--resume"],
                         monkeypatch, capsys)
    assert "refused" in message and not marker.exists()
    assert snapshot(tmp_path / "out") == before


# ----------------------------------------------------------------------------
# 6. two runs of the same experiment into the same out/

@pytest.mark.slow
def test_second_run_into_the_same_out_is_refused_and_leaves_the_first_alone(data_dir, tmp_path, monkeypatch, capsys):
    first = popen("run_train.py", *SMALL, *EPOCHS, "--set", "log_every=1", "--data-dir", data_dir, "--out", tmp_path)
    watchdog(first)
    for line in first.stdout:
        if line.startswith("ep 1/3"):
            break
    rows_then = (tmp_path / "smoke.csv").read_text()
    message = main_error(run_train, [*SMALL, *EPOCHS, "--data-dir", data_dir, "--out", tmp_path], monkeypatch, capsys)
    assert "another run is writing" in message
    first.stdout.read()
    assert first.wait() == 0
    assert (tmp_path / "smoke.csv").read_text().startswith(rows_then)
    assert [r["epoch"] for r in csv_rows(tmp_path / "smoke.csv")] == ["1", "2", "3"]


def test_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_files(
        data_dir, tmp_path, monkeypatch, capsys):
    real_save, writes, before = torch.save, [], {}

    def disk_full_in_epoch_2(obj, f, *args, **kwargs):
        writes.append(f.name)
        if len(writes) == 3:                          # best and last of epoch 1 went fine, then the disk is full
            before.update({k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".tmp")})
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_in_epoch_2)
    message = main_error(run_train, [*SMALL, *EPOCHS, "--data-dir", data_dir, "--out", tmp_path], monkeypatch, capsys)
    assert message == f"error: cannot write to {tmp_path}: No space left on device"
    assert snapshot(tmp_path) == before               # no half file left, epoch 1's checkpoints intact


# ----------------------------------------------------------------------------
# 7. out of memory

def test_out_of_memory_suggests_a_smaller_batch_whose_fresh_start_keeps_this_runs_files_under_old(
        data_dir, tmp_path, monkeypatch, capsys):
    real_step, calls, before = engine.train_step, [], {}

    def oom_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 8 + 1:
            before.update(snapshot(tmp_path))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args)

    monkeypatch.setattr(engine, "train_step", oom_in_epoch_2)
    message = main_error(run_train, [*SMALL, *EPOCHS, "--data-dir", data_dir, "--out", tmp_path], monkeypatch, capsys)
    assert message == (f"error: out of memory on cpu at batch_size 32: try --set batch_size=16, a fresh start, "
                       f"which keeps this run's files under {tmp_path / 'old'}/")
    assert snapshot(tmp_path) == before
