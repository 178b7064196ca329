"""Data-parallel training (distributed.py): 2 gloo processes on the CPU match a one-process reference, torchrun runs
write one set of files and resume after SIGTERM, a killed rank ends the job; the environment's ranks and the error
lines."""
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import config
import devices
import distributed
import engine
import files
import run_grid
import run_train
from fault_helpers import ENV, REPO, csv_rows, main_error, run, synthetic_data

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch has no torch.distributed with gloo")
SMALL = ["--exp", "smoke", "--set", "subset=256", "--set", "batch_size=32", "--device", "cpu", "--epochs", "3"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "run_train.py"]
TORCH_ENV = {**ENV, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def torchrun(*args, **kwargs):
    """torchrun with 2 processes of run_train.py, stdout and stderr merged into one text pipe."""
    return subprocess.Popen([*TORCHRUN, *map(str, args)], cwd=REPO, env=TORCH_ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


def finish(proc, timeout=90):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def worker(proc, rank):
    """The pid of torchrun proc's worker of that rank."""
    kids = subprocess.run(["pgrep", "-P", str(proc.pid)], check=True, capture_output=True, text=True).stdout.split()
    return int(next(k for k in kids if f"\0RANK={rank}\0".encode() in b"\0" + Path(f"/proc/{k}/environ").read_bytes()))


def weights(path):
    return files.load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """A 3-epoch run under torchrun: (its folder, its console output)."""
    out = tmp_path_factory.mktemp("torchrun")
    rc, text = finish(torchrun(*SMALL, "--data-dir", data_dir, "--out", out))
    assert rc == 0, text
    return out, text


# ----------------------------------------------------------------------------
# a. two gloo processes against one process

WORKER = """
import sys, torch
import config, distributed, engine
cfg = config.resolve("smoke", [("device", "cpu"), ("precision", "fp32"), ("compile", "off")])
device = distributed.init(torch.device("cpu"), cfg)
torch.manual_seed(0)
model = engine.build_model(cfg, 10)
ddp = distributed.wrap(model, cfg, device)
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
for _ in range(3):
    engine.train_step(ddp, opt, *distributed.my_slice(x, y), cfg, 0.1)
torch.save(model.state_dict(), sys.argv[1] + f"/rank{distributed.rank()}.pt")
distributed.cleanup()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_as_one_process_averaging_the_losses_of_the_two_half_batches(tmp_path):
    env = {**TORCH_ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path)], cwd=REPO, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE)
             for r in range(2)]
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    cfg = config.resolve("smoke", [("device", "cpu"), ("precision", "fp32"), ("compile", "off")])
    torch.manual_seed(0)
    model = engine.build_model(cfg, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
    for _ in range(3):      # each half with its own BatchNorm statistics, as each rank computes it
        opt.zero_grad()
        halves = [F.cross_entropy(model(devices.to_model_format(x[s])), y[s], label_smoothing=cfg.label_smoothing)
                  for s in (slice(0, 8), slice(8, 16))]
        (sum(halves) / 2).backward()
        opt.step()
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], p.detach(), rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------
# b. torchrun: one set of files, identical reruns, a stop and resume

@pytest.mark.slow
def test_torchrun_prints_each_line_once_writes_one_set_of_files_and_reruns_identically(uninterrupted, data_dir,
                                                                                     tmp_path):
    out, text = uninterrupted
    lines = text.splitlines()
    assert "on 2 processes (gloo)" in lines[0]
    for start in ("smoke |", "first-batch loss", "ep 1/3 |", "ep 2/3 |", "ep 3/3 |", "done smoke", "files: "):
        assert sum(line.startswith(start) for line in lines) == 1, (start, text)
    assert sorted(p.name for p in out.iterdir()) == ["smoke.ckpt", "smoke.csv", "smoke.json", "smoke.last.ckpt",
                                                     "smoke.lock"]
    assert len(csv_rows(out / "smoke.csv")) == 3
    rc, again = finish(torchrun(*SMALL, "--data-dir", data_dir, "--out", tmp_path))
    assert rc == 0, again
    done = [line for line in text.splitlines() if line.startswith("done ")]
    assert done[0].split("| test ")[1].split(" top5")[0] in again
    assert json.loads((out / "smoke.json").read_text())["test_acc"] == \
        json.loads((tmp_path / "smoke.json").read_text())["test_acc"]
    rc, again = finish(torchrun(*SMALL, "--data-dir", data_dir, "--out", tmp_path, "--resume"))
    assert rc == 0 and again.count("already finished") == 1 and again.count("done smoke") == 1, again


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_both_ranks_at_one_step_and_resume_matches_the_uninterrupted_run(
        uninterrupted, data_dir, tmp_path):
    out, _ = uninterrupted
    stopped = tmp_path / "stopped"
    proc = torchrun(*SMALL, "--set", "log_every=1", "--data-dir", data_dir, "--out", stopped)
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):      # inside epoch 2
            proc.send_signal(signal.SIGTERM)     # to torchrun alone: it passes SIGTERM on to its workers
            break
    rc, text = finish(proc)
    assert rc != 0 and text.count("stopped by SIGTERM: saved") == 1, text
    last = files.load_checkpoint(stopped / "smoke.last.ckpt")
    assert last["epoch"] == 1 and last["step_in_epoch"] > 0
    alone = tmp_path / "alone"
    shutil.copytree(stopped, alone)

    rc, text = finish(torchrun(*SMALL, "--data-dir", data_dir, "--out", stopped, "--resume"))
    assert rc == 0, text
    assert csv_rows(stopped / "smoke.csv") == csv_rows(out / "smoke.csv")
    for name, w in weights(out / "smoke.last.ckpt").items():
        assert torch.equal(weights(stopped / "smoke.last.ckpt")[name], w), name

    proc = run("run_train.py", *SMALL, "--data-dir", data_dir, "--out", alone, "--resume")   # one process resumes it
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in csv_rows(alone / "smoke.csv")] == ["1", "2", "3"]


@pytest.mark.slow
def test_usr1_to_one_worker_stops_both_at_the_same_step_and_rank_0_saves(data_dir, tmp_path):
    proc = torchrun(*SMALL, "--set", "log_every=1", "--data-dir", data_dir, "--out", tmp_path)
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):
            os.kill(worker(proc, rank=1), signal.SIGUSR1)      # torchrun would not pass USR1 on (#154849)
            break
    rc, text = finish(proc)
    assert rc != 0 and text.count("stopped (by another process): saved") == 1, text    # rank 0 got no signal
    assert files.load_checkpoint(tmp_path / "smoke.last.ckpt")["step_in_epoch"] > 0


@pytest.mark.slow
def test_ctrl_c_in_the_terminal_saves_once_and_is_not_taken_for_a_second_ctrl_c(data_dir, tmp_path):
    proc = torchrun(*SMALL, "--set", "log_every=1", "--data-dir", data_dir, "--out", tmp_path, process_group=0)
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):
            os.killpg(proc.pid, signal.SIGINT)     # as a terminal does: torchrun and its workers, then torchrun's own
            break
    rc, text = finish(proc)
    assert rc != 0 and text.count("interrupted (Ctrl-C): saved") == 1 and "stopped at once" not in text, text
    assert files.load_checkpoint(tmp_path / "smoke.last.ckpt")["step_in_epoch"] > 0


# ----------------------------------------------------------------------------
# c. a rank killed

@pytest.mark.slow
def test_a_rank_killed_with_sigkill_ends_the_job_within_60s_with_one_error_line_and_keeps_the_files(
        data_dir, tmp_path):
    proc = torchrun(*SMALL, "--set", "log_every=1", "--data-dir", data_dir, "--out", tmp_path)
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):
            break
    os.kill(worker(proc, rank=1), signal.SIGKILL)
    t0 = time.time()
    rc, text = finish(proc, timeout=60)
    assert time.time() - t0 < 60 and rc != 0
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another process of this run died" in errors[0], text
    assert "FAILED" in text        # torchrun's own summary follows, naming rank 1's SIGKILL
    assert len(csv_rows(tmp_path / "smoke.csv")) == 1
    assert files.load_checkpoint(tmp_path / "smoke.last.ckpt")["epoch"] == 1
    engine.model_from(files.load_checkpoint(tmp_path / "smoke.ckpt"))


# ----------------------------------------------------------------------------
# d. the environment's ranks, the error lines

def test_ranks_come_from_torchrun_else_from_srun_with_several_tasks_else_one_process():
    assert distributed.env_ranks({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "SLURM_PROCID": "0",
                                  "SLURM_NTASKS": "2"}) == (3, 8, 1)
    assert distributed.env_ranks({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}) == (5, 8, 1)
    assert distributed.env_ranks({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}) == (0, 1, 0)
    assert distributed.env_ranks({}) == (0, 1, 0)


def test_the_rendezvous_is_the_jobs_first_node_and_a_port_from_its_id(monkeypatch):
    asked = []

    def scontrol(argv, **kwargs):
        asked.append(argv)
        return subprocess.CompletedProcess(argv, 0, stdout="gpu-a07\ngpu-a08\n")
    monkeypatch.setattr(distributed.subprocess, "run", scontrol)
    slurm = {"SLURM_JOB_NODELIST": "gpu-a[07-08]", "SLURM_JOB_ID": "123456"}
    assert distributed.rendezvous(slurm) == ("gpu-a07", str(20000 + 123456 % 20000))
    assert asked == [["scontrol", "show", "hostnames", "gpu-a[07-08]"]]
    assert distributed.rendezvous({**slurm, "MASTER_ADDR": "h", "MASTER_PORT": "1234"}) == ("h", "1234")
    assert distributed.rendezvous({})[0] == "127.0.0.1"


def test_a_global_batch_the_processes_do_not_divide_is_one_error_line_before_anything_is_written(
        data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = main_error(run_train, [*SMALL, "--data-dir", data_dir, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert "batch_size 32" in line and "3 processes" in line
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert not dist.is_initialized()


def test_sync_bn_on_a_cpu_is_one_error_line(data_dir, tmp_path, monkeypatch, capsys):
    line = main_error(run_train, [*SMALL, "--set", "sync_bn=true", "--data-dir", data_dir, "--out", tmp_path],
                      monkeypatch, capsys)
    assert "sync_bn needs CUDA" in line
    assert not list(tmp_path.iterdir())


def test_run_grid_under_several_processes_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    main_error(run_grid, ["--grid", "smoke_grid"], monkeypatch, capsys)


def test_processes_that_never_join_are_one_error_line_after_the_timeout(data_dir, tmp_path, monkeypatch, capsys):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port()}.items():
        monkeypatch.setenv(key, str(value))
    monkeypatch.setattr(distributed, "TIMEOUT", datetime.timedelta(seconds=2))
    line = main_error(run_train, [*SMALL, "--data-dir", data_dir, "--out", tmp_path / "out"], monkeypatch, capsys)
    assert "not all 2 processes joined" in line and "torchrun or srun" in line
    assert not dist.is_initialized()
