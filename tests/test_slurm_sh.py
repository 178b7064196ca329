"""slurm.sh without SLURM: a fake `python` records the command the job would run."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import run_train
from fault_helpers import SMALL, main_error, run, synthetic_data

ROOT = Path(__file__).resolve().parent.parent


def job_command(tmp_path, **variables):
    """The command line slurm.sh runs, submitted from tmp_path with these environment variables."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    (tmp_path / "bin" / "python").write_text('#!/bin/sh\necho "$@" > "$ARGS"\n')
    (tmp_path / "bin" / "python").chmod(0o755)
    shutil.copy(ROOT / "slurm.sh", tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("EXP", "GRID", "FRESH") and not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path / 'bin'}:{env['PATH']}", ARGS=str(tmp_path / "args"), SLURM_SUBMIT_DIR=str(tmp_path),
               SLURM_JOB_ID="17", **variables)
    r = subprocess.run(["bash", "slurm.sh", "--epochs", "5"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "args").read_text().split()


@pytest.mark.parametrize("variables, resumes", [({}, True), ({"FRESH": "1"}, False),
                                                ({"FRESH": "1", "SLURM_RESTART_COUNT": "1"}, True)],
                         ids=["plain", "FRESH=1", "FRESH=1 requeued"])
def test_fresh_1_starts_without_resume_and_its_requeued_job_resumes(tmp_path, variables, resumes):
    args = job_command(tmp_path, **variables)
    assert args[:3] == ["run_train.py", "--exp", "best"] and args[-2:] == ["--epochs", "5"]
    assert ("--resume" in args) == resumes


@pytest.mark.slow
def test_other_settings_under_slurm_name_fresh_1(tmp_path, monkeypatch, capsys):
    argv = [*SMALL, "--epochs", "1", "--data-dir", synthetic_data(tmp_path / "data"), "--out", tmp_path / "out"]
    assert run("run_train.py", *argv).returncode == 0
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    message = main_error(run_train, [*argv, "--set", "lr=0.1", "--resume"], monkeypatch, capsys)
    assert "was made with other settings (lr)" in message and "or FRESH=1 sbatch slurm.sh" in message
