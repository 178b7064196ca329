import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data
import devices
import engine
import run_lrfind

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def sweep(model, cfg, x, y, start, end, iters, **kw):
    cfg = dataclasses.replace(cfg, lrfind_start=start, lrfind_end=end, lrfind_iters=iters, **kw)
    return run_lrfind.lr_sweep(model, cfg, x, y)


def smoke(data_dir, *pairs):
    """A small smoke config, a fresh model of it and its training split."""
    cfg = config.resolve("smoke", [("data_dir", str(data_dir)), ("subset", 640), ("channels", [8, 16]), *pairs])
    d = data.load(cfg)
    devices.setup(cfg)
    return cfg, engine.build_model(cfg, len(d["classes"])), d["train"]


def test_suggestion_lies_inside_the_sweep_where_the_smoothed_loss_falls(data_dir):
    cfg, model, (x, y) = smoke(data_dir)
    rows, stop = sweep(model, cfg, x, y, start=1e-4, end=10.0, iters=50)
    s = run_lrfind.suggest(rows)
    lo, hi = s["falling_range"]
    assert 1e-4 <= lo <= s["suggested_lr"] <= hi <= s["min_loss_lr"] <= 10.0
    assert s["min_div10_lr"] == s["min_loss_lr"] / 10
    at = next(r for r in rows if r["lr"] == s["suggested_lr"])
    assert at["smooth_loss"] < rows[0]["smooth_loss"] - 0.1
    assert rows[at["iter"] + 1]["smooth_loss"] < rows[at["iter"] - 1]["smooth_loss"]


def test_sweep_stops_early_on_divergence_and_on_a_non_finite_loss(data_dir):
    cfg, model, (x, y) = smoke(data_dir, ("optimizer", "sgd"), ("momentum", 0.0), ("weight_decay", 0.0))
    rows, stop = sweep(model, cfg, x, y, start=1e-3, end=1e6, iters=60)
    assert stop and len(rows) < 60
    assert all(torch.isfinite(torch.tensor(r["smooth_loss"])) for r in rows)
    rows, stop = sweep(model, cfg, x, y, start=1e30, end=1e31, iters=20)
    assert stop.startswith("loss nan") or stop.startswith("loss inf")
    assert run_lrfind.suggest(rows)["suggested_lr"] is None


def test_raw_stop_rule_ends_at_the_first_loss_past_4x_the_lowest_raw_loss_as_the_report_did(data_dir, monkeypatch):
    cfg, model, (x, y) = smoke(data_dir, ("optimizer", "sgd"))
    losses = iter([4.6, 3.0, 1.0, 3.9, 4.1, 2.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    monkeypatch.setattr(run_lrfind.engine, "train_step", lambda *args: (torch.tensor(next(losses), dtype=torch.float64), None))
    rows, stop = sweep(model, cfg, x, y, 1e-6, 1.0, 12, lrfind_stop="raw")
    assert [r["loss"] for r in rows] == [4.6, 3.0, 1.0, 3.9, 4.1] and stop.startswith("raw loss 4.1 > 4 x its minimum 1 ")
    assert rows[-1]["lr"] == pytest.approx(1e-6 * 1e6 ** (4 / 11))
    losses = iter([4.6, 3.0, 1.0, 3.9, 4.1, 2.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0])
    assert len(sweep(model, cfg, x, y, 1e-6, 1.0, 12)[0]) > 5        # the smoothed loss reads the same steps calmly


@pytest.mark.slow
def test_report_sweeps_1e6_to_1_in_100_steps_unless_flags_say_otherwise(tmp_path, data_dir):
    args = ["--exp", "report", "--set", "dataset=synthetic", "--set", "subset=128", "--set", "blocks=[1]", "--set",
            "channels=[8]", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    r = subprocess.run([sys.executable, str(ROOT / "run_lrfind.py"), *args, "--iters", "12"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert ("12 steps of batch 128, sgd momentum 0.9 wd 0.0001 lr 1.0e-06 .. 1.0e+00, stop at 4x the raw loss's minimum"
            in r.stdout.splitlines()[0])
    result = json.loads((tmp_path / "report.lrfind.json").read_text())
    assert (result["start"], result["end"], result["diverge"], result["stop_on"], result["config"]["lrfind_iters"]) == \
        (1e-6, 1.0, 4.0, "raw", 12)


def test_sweep_leaves_the_given_model_unchanged(data_dir):
    cfg, model, (x, y) = smoke(data_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sweep(model, cfg, x, y, start=1e-4, end=1.0, iters=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_command_writes_csv_and_json_and_touches_no_checkpoint(tmp_path, data_dir):
    out = tmp_path / "out"
    out.mkdir()
    kept = {out / "smoke.ckpt": b"best", out / "smoke.last.ckpt": b"last", out / "smoke.csv": b"epoch\n"}
    for path, content in kept.items():
        path.write_bytes(content)
    experiments = config.EXPERIMENTS_FILE.read_bytes()
    r = subprocess.run([sys.executable, str(ROOT / "run_lrfind.py"), "--exp", "smoke", "--iters", "30", "--start", "1e-5",
                        "--end", "1", "--out", str(out), "--data-dir", str(data_dir), "--set", "subset=640",
                        "--set", "progress_s=1e-9"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("lr sweep smoke | ResNet blocks [1,1] channels [16,32]")
    assert r.stdout.count("eta 0:00:") == 30          # a step line after each step, with the sweep's ETA
    with open(out / "smoke.lrfind.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["iter", "lr", "loss", "smooth_loss"] and len(rows) == 30
    result = json.loads((out / "smoke.lrfind.json").read_text())
    assert {"exp", "suggested_lr", "min_loss_lr", "min_div10_lr", "falling_range", "stopped_early", "iters"} <= result.keys()
    assert f"--set lr={result['suggested_lr']:.1e}" in r.stdout and "suggested lr (steepest)" in r.stdout
    assert all(path.read_bytes() == content for path, content in kept.items())
    assert config.EXPERIMENTS_FILE.read_bytes() == experiments
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in kept), "smoke.lrfind.csv", "smoke.lrfind.json"])


def test_bad_sweep_range_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "run_lrfind.py"), "--exp", "smoke", "--start", "1", "--end", "0.1",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ctrl_c_ends_the_sweep_with_one_line_and_status_130(tmp_path, data_dir):
    p = subprocess.Popen([sys.executable, str(ROOT / "run_lrfind.py"), "--exp", "smoke", "--iters", "1000",
                          "--out", str(tmp_path), "--data-dir", str(data_dir), "--set", "progress_s=1e-9"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})     # each step line as it is printed
    for line in p.stdout:
        if line.startswith("  step 2/"):
            p.send_signal(signal.SIGINT)
            break
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and err == "interrupted (Ctrl-C): the sweep stopped, no file written\n"
