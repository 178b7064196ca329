"""slurm.sh against a real SLURM (`bash ../shared/slurm/start-slurm.sh` starts one); skipped where none answers."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import data

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"epoch_s", "img_per_s", "elapsed_s"}
SMALL = ["--set", "subset=640", "--epochs", "4"]      # ~10 steps an epoch: a run takes seconds


def slurm_answers():
    """True when sbatch exists and the controller reports a node that can run jobs."""
    if not shutil.which("sbatch"):
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return any(s.strip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states.split())


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not slurm_answers(), reason="no SLURM answers (bash ../shared/slurm/start-slurm.sh)")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A fresh clone of the working tree to submit from, generated data, and a submit function whose jobs are
    cancelled at the end, whatever happened."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell what a fresh clone holds")
    clone = tmp_path_factory.mktemp("clone")
    for name in filter(None, listed.stdout.split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    data_dir = tmp_path_factory.mktemp("data")
    data.write_synthetic(data_dir / "synthetic" / "cifar-100-python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "GRID", "EXP")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"     # the job's `python` is ours
    jobs = []

    def submit(*args, **variables):
        r = subprocess.run(["sbatch", "--parsable", *args, "--data-dir", str(data_dir)], cwd=clone,
                           env={**env, **variables}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        jobs.append(r.stdout.strip().split(";")[0])
        return jobs[-1]
    yield clone, submit
    for job in jobs:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)


def wait_for(job, timeout=240):
    """Wait until the job (all tasks of an array) left the queue; then its `scontrol show job` records."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True, timeout=60)
        if (r.returncode == 0 and not r.stdout.strip()) or "Invalid job id" in r.stderr:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"job {job} still queued after {timeout}s")
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60).stdout
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in out.splitlines()]


def log(clone, job):
    return (clone / "out" / f"slurm-cifar100-{job}.log").read_text()


def rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def plain(cluster):
    """`EXP=smoke sbatch slurm.sh` run to the end from the fresh clone: the uninterrupted reference."""
    clone, submit = cluster
    job = submit("slurm.sh", *SMALL, EXP="smoke")
    return job, wait_for(job)[0]


def test_sbatch_from_a_fresh_clone_trains_and_leaves_the_checkpoint(cluster, plain):
    clone, _ = cluster
    job, info = plain
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), info.get("Reason")    # no log folder: no log
    text = log(clone, job)
    assert re.search(r"^== .* on \S+\n== gpu: .*\n== git: ", text, re.M)
    assert "run_train.py --exp smoke --resume" in text and "done smoke" in text
    assert (clone / "out" / "smoke.ckpt").is_file() and (clone / "out" / "smoke.last.ckpt").is_file()


def test_finished_run_submitted_again_does_nothing(cluster, plain):
    clone, submit = cluster
    files = {p: p.stat().st_mtime_ns for p in (clone / "out").glob("smoke.*")}
    job = submit("slurm.sh", *SMALL, EXP="smoke")
    assert wait_for(job)[0]["JobState"] == "COMPLETED"
    assert "already finished" in log(clone, job) and "ep 1/" not in log(clone, job)
    assert {p: p.stat().st_mtime_ns for p in files} == files


def usr1_after_epoch_1(job, csv_path):
    """USR1 to the job's batch shell once its epoch 1 is in the CSV: a stop in the middle of the run."""
    t0 = time.time()
    while not (csv_path.exists() and len(rows(csv_path)) >= 1):
        assert time.time() - t0 < 180, "the job wrote no epoch in 180 s"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=60)


def test_usr1_mid_run_saves_requeues_and_resumes_to_the_uninterrupted_result(cluster, plain):
    clone, submit = cluster
    job = submit("slurm.sh", *SMALL, "--out", "out/sig", EXP="smoke")
    csv_path = clone / "out" / "sig" / "smoke.csv"
    usr1_after_epoch_1(job, csv_path)
    info = wait_for(job)[0]
    text = log(clone, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text
    assert "got SIGUSR1" in text and "== requeued" in text and re.search(r"resuming smoke at epoch [234] step \d+", text)
    assert [r["epoch"] for r in rows(csv_path)] == ["1", "2", "3", "4"]
    assert rows(csv_path) == rows(clone / "out" / "smoke.csv")
    resumed, whole = (json.loads((clone / d / "smoke.json").read_text()) for d in ("out/sig", "out"))
    for key in ("best_val_acc", "best_epoch", "test_acc", "test_loss"):
        assert resumed[key] == whole[key], key


def test_grid_array_runs_one_config_per_task_and_fills_the_summary(cluster):
    clone, submit = cluster
    job = submit("--array=0-3", "slurm.sh", "--set", "subset=320", "--out", "out/array", GRID="smoke_grid")
    tasks = wait_for(job)
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2", "3"]
    assert {t["JobState"] for t in tasks} == {"COMPLETED"}
    summary = list(csv.DictReader(open(clone / "out" / "array" / "smoke_grid.csv", newline="")))
    assert [(r["index"], r["status"]) for r in summary] == [("0", "done"), ("1", "done"), ("2", "done"), ("3", "done")]
    for r in summary:
        assert (clone / "out" / "array" / "smoke_grid" / f"{r['run']}.ckpt").is_file()
    logs = "".join(log(clone, t["JobId"]) for t in tasks)
    assert all(f"run_grid.py --grid smoke_grid --index {i}" in logs for i in range(4))


def test_two_task_job_runs_under_srun_and_usr1_requeues_and_resumes_to_the_uninterrupted_result(cluster):
    clone, submit = cluster
    two = ("--ntasks=2", "--cpus-per-task=1", "slurm.sh", *SMALL)     # one rank per task, both on this node's CPUs
    whole = submit(*two, "--out", "out/ddp", EXP="smoke")
    assert wait_for(whole)[0]["JobState"] == "COMPLETED", log(clone, whole)
    assert "== srun " in log(clone, whole) and log(clone, whole).count("on 2 processes (gloo)") == 1
    job = submit(*two, "--out", "out/ddpsig", EXP="smoke")
    csv_path = clone / "out" / "ddpsig" / "smoke.csv"
    usr1_after_epoch_1(job, csv_path)
    info = wait_for(job)[0]
    text = log(clone, job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), text
    assert "== requeued" in text and text.count("stopped by SIGUSR1: saved") == 1, text   # rank 0's line alone
    assert [r["epoch"] for r in rows(csv_path)] == ["1", "2", "3", "4"]
    assert rows(csv_path) == rows(clone / "out" / "ddp" / "smoke.csv")
    resumed, uninterrupted = (json.loads((clone / d / "smoke.json").read_text()) for d in ("out/ddpsig", "out/ddp"))
    for key in ("best_val_acc", "best_epoch", "test_acc", "test_loss"):
        assert resumed[key] == uninterrupted[key], key
