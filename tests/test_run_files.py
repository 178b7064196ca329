"""Run files that never lie: a fresh run over a finished one, a last checkpoint evaluated, Ctrl-C, a lock that cannot
be taken, a failing grid config, the timing of a resumed epoch."""
import errno
import fcntl
import json
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch

import config
import data
import engine
import files
import run_eval
import run_grid
import run_train
import stops
import trainer
from fault_helpers import SMALL, csv_rows, main_error, popen, quiet, run, small, snapshot, synthetic_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the engine runs after it."""


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A finished 1-epoch run, evaluated with run_eval.py: the folder to copy."""
    out = tmp_path_factory.mktemp("finished")
    quiet(small(out, data_dir))
    assert run("run_eval.py", out / "smoke.ckpt", "--data-dir", data_dir).returncode == 0
    return out


# ----------------------------------------------------------------------------
# 1. a fresh run over a finished one

@pytest.mark.slow
def test_fresh_run_over_a_finished_one_retires_its_files_at_once(finished_run, data_dir, tmp_path, monkeypatch):
    shutil.copytree(finished_run, tmp_path / "out")
    out = tmp_path / "out"
    real_step = engine.train_step

    def killed_at_step_3(*args):
        if killed_at_step_3.calls == 2:
            raise Killed
        killed_at_step_3.calls += 1
        return real_step(*args)
    killed_at_step_3.calls = 0
    monkeypatch.setattr(engine, "train_step", killed_at_step_3)
    with pytest.raises(Killed):
        quiet(small(out, data_dir))
    assert csv_rows(out / "smoke.csv") == []
    assert json.loads((out / "smoke.json").read_text())["status"] == "started"       # the new run's record
    assert sorted(p.name for p in out.iterdir()) == ["old", "smoke.csv", "smoke.json", "smoke.lock"]
    [old] = (out / "old").iterdir()
    assert snapshot(old) == {name: kept for name, kept in snapshot(finished_run).items()}    # whole, untouched
    monkeypatch.setattr(engine, "train_step", real_step)
    lines = []
    summary = trainer.train(small(out, data_dir), resume=True, log=lines.append)
    assert lines[0].startswith(f"smoke from scratch (no {out / 'smoke.last.ckpt'} to resume from")   # not finished
    assert [r["epoch"] for r in csv_rows(out / "smoke.csv")] == ["1"] and summary["status"] == "finished"


def test_resume_without_a_last_checkpoint_moves_the_earlier_files_under_old(finished_run, data_dir, tmp_path):
    shutil.copytree(finished_run, tmp_path / "out")
    out = tmp_path / "out"
    (out / "smoke.last.ckpt").rename(tmp_path / "elsewhere.ckpt")
    before = snapshot(out)
    lines = []
    trainer.train(small(out, data_dir), resume=True, log=lines.append)
    [old] = (out / "old").iterdir()
    assert f"; the files found there moved to {old}/)" in lines[0]
    assert snapshot(old) == before


# ----------------------------------------------------------------------------
# 2. run_eval.py on a last checkpoint

@pytest.mark.slow
def test_evaluating_a_last_checkpoint_writes_its_own_files_and_says_which_weights(finished_run, data_dir, tmp_path):
    shutil.copytree(finished_run, tmp_path / "out")
    out = tmp_path / "out"
    best_eval = (out / "smoke.eval.json").read_bytes()
    r = run("run_eval.py", out / "smoke.last.ckpt", "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr
    assert (out / "smoke.eval.json").read_bytes() == best_eval
    result = json.loads((out / "smoke.last.eval.json").read_text())
    assert result["weights"] == "last checkpoint, end of epoch 1 (raw weights, not the best epoch's)"
    assert r.stdout.startswith("smoke last checkpoint, end of epoch 1") and (out / "smoke.last.per_class.csv").exists()
    best = json.loads(best_eval)
    assert best["weights"] == "best epoch 1 (raw weights)"


@pytest.mark.slow
def test_evaluating_a_renamed_copy_names_its_files_after_the_copy_and_leaves_the_runs_alone(
        finished_run, data_dir, tmp_path):
    shutil.copytree(finished_run, tmp_path / "out")
    out = tmp_path / "out"
    shutil.copy(out / "smoke.ckpt", out / "smoke_v1.ckpt")
    before = snapshot(out)
    r = run("run_eval.py", out / "smoke_v1.ckpt", "--data-dir", data_dir)
    assert r.returncode == 0, r.stderr
    assert {k: v for k, v in snapshot(out).items() if k in before} == before     # smoke.eval.json among them
    assert json.loads((out / "smoke_v1.eval.json").read_text())["checkpoint"] == str(out / "smoke_v1.ckpt")
    assert (out / "smoke_v1.per_class.csv").exists()


@pytest.mark.parametrize("flag, env, stored_exists, expected", [
    ("flag", "env", True, "flag"), (None, "env", True, "env"), (None, "", True, "stored"), (None, "", False, "data")])
def test_run_eval_reads_data_from_the_flag_then_cifar100_root_then_the_runs_folder_if_it_exists_then_data(
        finished_run, data_dir, tmp_path, monkeypatch, flag, env, stored_exists, expected):
    ckpt = torch.load(finished_run / "smoke.ckpt", weights_only=True)
    stored = str(data_dir if stored_exists else tmp_path / "on-the-training-machine")
    torch.save({**ckpt, "config": {**ckpt["config"], "data_dir": stored}}, tmp_path / "smoke.ckpt")
    if env:
        monkeypatch.setenv("CIFAR100_ROOT", str(tmp_path / "env"))
    else:
        monkeypatch.delenv("CIFAR100_ROOT", raising=False)
    read_from = []

    def load(cfg, device):
        read_from.append(cfg.data_dir)
        raise config.UserError("enough")
    monkeypatch.setattr(data, "load", load)
    with pytest.raises(config.UserError, match="enough"):
        run_eval.evaluate_checkpoint(tmp_path / "smoke.ckpt", data_dir=flag and str(tmp_path / "flag"))
    assert read_from == [{"flag": str(tmp_path / "flag"), "env": str(tmp_path / "env"), "stored": stored,
                          "data": "data"}[expected]]


# ----------------------------------------------------------------------------
# 3. Ctrl-C

@pytest.mark.slow
def test_ctrl_c_saves_last_checkpoint_and_exits_130_with_one_line(data_dir, tmp_path):
    proc = popen("run_train.py", *SMALL, "--epochs", "2", "--set", "log_every=1", "--data-dir", data_dir,
                 "--out", tmp_path)
    for line in proc.stdout:
        if line.startswith("  ep 2/2 step 3/8"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stdout.read().splitlines()
    assert proc.wait(timeout=60) == 130
    assert "Traceback" not in "".join(rest) and rest[-1].startswith("interrupted (Ctrl-C): saved ")
    last = files.load_checkpoint(tmp_path / "smoke.last.ckpt")
    assert last["epoch"] == 1 and 3 <= last["step_in_epoch"] < 8          # saved mid-epoch 2


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(data_dir, tmp_path):
    proc = popen("tests/stall_save.py", "smoke.ckpt", 2, *SMALL, "--epochs", "3", "--data-dir", data_dir,
                 "--out", tmp_path)
    for line in proc.stdout:
        if line.startswith("stalled writing "):
            break
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):      # the first Ctrl-C asks for a stop: the stalled write goes on
        proc.wait(timeout=2)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    rest = proc.stdout.read().splitlines()
    assert rest == [stops.STOPPED_AT_ONCE]
    assert not list(tmp_path.glob("*.tmp"))
    assert files.load_checkpoint(tmp_path / "smoke.ckpt")["epoch"] == 1


# ----------------------------------------------------------------------------
# 4. a lock on a filesystem without flock

def no_flock(f, how):
    raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.mark.parametrize("script", [run_train, run_grid])
def test_a_filesystem_without_flock_is_one_line_naming_the_folder(data_dir, tmp_path, monkeypatch, capsys, script):
    monkeypatch.setattr(fcntl, "flock", no_flock)
    args = [*SMALL, "--epochs", "1"] if script is run_train else ["--grid", "smoke_grid", "--set", "subset=256"]
    message = main_error(script, [*args, "--data-dir", data_dir, "--out", tmp_path], monkeypatch, capsys)
    assert f"cannot lock files in {tmp_path}: Function not implemented" in message and "a local --out" in message


# ----------------------------------------------------------------------------
# 5. one config's failure in a grid

def test_a_failing_grid_config_gets_a_failed_row_with_the_reason_and_the_grid_goes_on(
        data_dir, tmp_path, monkeypatch, capsys):
    argv = ["run_grid.py", "--grid", "smoke_grid", "--set", "subset=256", "--epochs", "1", "--data-dir", data_dir,
            "--out", tmp_path]
    _, runs = run_grid.grid_configs("smoke_grid", [("epochs", 2), ("subset", 256), ("data_dir", str(data_dir)),
                                                   ("out_dir", str(tmp_path))])
    quiet(runs[0][2])       # config 0 made with 2 epochs: "other settings" for the grid's 1 epoch
    real_train = trainer.train

    def broken_for_config_2(cfg, **kw):
        if cfg.name == runs[2][0]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real_train(cfg, **kw)
    monkeypatch.setattr(trainer, "train", broken_for_config_2)
    monkeypatch.setattr(sys, "argv", list(map(str, argv)))
    monkeypatch.setattr(stops, "install_stop_handlers", lambda: None)
    with pytest.raises(SystemExit) as e:
        run_grid.main()
    assert e.value.code == (f"error: 2 of 4 configs failed ({runs[0][0]}, {runs[2][0]}): "
                            f"see the status and reason columns of {tmp_path / 'smoke_grid.csv'}")
    rows = {r["run"]: r for r in csv_rows(tmp_path / "smoke_grid.csv")}
    assert [rows[name]["status"] for name, _, _ in runs] == ["failed", "done", "failed", "done"]
    assert "was made with other settings (epochs)" in rows[runs[0][0]]["reason"]
    assert rows[runs[2][0]]["reason"] == "RuntimeError: CUDA error: an illegal memory access was encountered"


# ----------------------------------------------------------------------------
# 6. the timing of an epoch stopped and resumed

def test_a_resumed_epoch_counts_the_time_before_the_stop(data_dir, tmp_path, monkeypatch):
    now = [0.0]
    real_step = engine.train_step

    def one_second_step(*args):                 # each step takes exactly 1 s of a fake clock; the stop comes at 4
        now[0] += 1.0
        if now[0] == 4.0:
            stops.stop_requested.append(signal.SIGTERM)
        return real_step(*args)
    monkeypatch.setattr(engine, "train_step", one_second_step)
    for module in (engine, trainer):            # the step's clock, and the epoch's
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=lambda: now[0]))
    monkeypatch.setattr(stops, "stop_requested", [])
    cfg = small(tmp_path, data_dir, epochs=2)
    with pytest.raises(stops.Preempted):
        quiet(cfg)
    stops.stop_requested.clear()
    summary = quiet(cfg, resume=True)
    rows = csv_rows(tmp_path / "smoke.csv", timing=True)
    assert [(r["epoch_s"], r["img_per_s"]) for r in rows] == [("8.000", "32.0"), ("8.000", "32.0")]
    assert summary["train_s"] == 16.0
