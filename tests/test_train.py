import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import data
import devices
import engine
import files
import hardware
import optim
import stops
import trainer
from resnet import ResNet

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"epoch_s", "img_per_s", "elapsed_s"}


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def smoke_cfg(tmp_path, **kw):
    overrides = {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"), "epochs": 3, **kw}
    return config.resolve("smoke", overrides.items())


def csv_rows(path, drop=TIMING):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One `run_train.py --exp smoke` through the command line, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("smoke")
    r = run("run_train.py", "--exp", "smoke", "--out", str(tmp / "out"), "--data-dir", str(tmp / "data"))
    assert r.returncode == 0, r.stderr
    return tmp, r, json.loads((tmp / "out" / "smoke.json").read_text())


@pytest.mark.slow
def test_smoke_run_writes_csv_checkpoints_and_summary(smoke_run):
    tmp, r, summary = smoke_run
    rows = csv_rows(tmp / "out" / "smoke.csv", drop=())
    assert list(rows[0]) == files.CSV_COLUMNS and [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert all((tmp / "out" / f"smoke{s}").is_file() for s in (".ckpt", ".last.ckpt", ".json"))
    assert r.stdout.startswith("smoke | ResNet blocks [1,1] channels [16,32]")     # a summary line, not a JSON dump
    assert r.stdout.splitlines()[-2].startswith("done smoke | best val")


def test_first_batch_loss_is_near_ln_100(smoke_run):
    assert abs(smoke_run[2]["first_batch_loss"] - math.log(100)) < 0.5


def test_a_few_epochs_lift_validation_accuracy_far_above_chance(smoke_run):
    assert smoke_run[2]["best_val_acc"] > 0.30            # chance is 0.01


@pytest.mark.slow
def test_checkpoint_alone_reproduces_the_runs_accuracy(smoke_run):
    tmp, _, summary = smoke_run
    ckpt = tmp / "out" / "smoke.ckpt"
    val = run("run_eval.py", str(ckpt), "--split", "val", "--data-dir", str(tmp / "data"))
    assert val.returncode == 0, val.stderr
    test = run("run_eval.py", str(ckpt), "--data-dir", str(tmp / "data"))
    result = json.loads((tmp / "out" / "smoke.eval.json").read_text())
    assert f"top-1 {100 * summary['best_val_acc']:.2f}%" in val.stdout
    assert result["acc"] == pytest.approx(summary["test_acc"], abs=1e-9)
    assert f"top-1 {100 * summary['test_acc']:.2f}%" in test.stdout
    assert "majority class" in test.stdout and (tmp / "out" / "smoke.per_class.csv").is_file()


def test_git_revision_is_asked_once_per_process_not_at_every_save(tmp_path, monkeypatch):
    real_run, asked = subprocess.run, []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: asked.append(args) or real_run(args, **kw))
    summary = trainer.train(smoke_cfg(tmp_path, epochs=2, subset=128), log=lambda s: None)     # checkpoints each epoch
    assert len([a for a in asked if a[:2] == ["git", "rev-parse"]]) <= 1
    assert summary["versions"] == devices.versions()


def test_predict_batches_the_images_alone_and_gives_the_models_logits():
    real, calls = data.eval_batches, []
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    model = ResNet([1], [4]).eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "eval_batches", lambda *args, **kw: calls.append(args) or real(*args, **kw))
        plain, _ = engine.predict(model, x, batch_size=4)
    assert [sum(isinstance(a, torch.Tensor) for a in args) for args in calls] == [1]      # no labels: none exist
    assert torch.allclose(plain, model(data.normalize(x)), atol=1e-5)


@pytest.mark.slow
def test_resume_from_last_checkpoint_matches_an_uninterrupted_run(tmp_path):
    whole = trainer.train(smoke_cfg(tmp_path / "a"), log=lambda s: None)

    def stop_after_epoch_2(line):
        if line.startswith("ep 2/"):
            stops.stop_requested.append("test")
    cfg = smoke_cfg(tmp_path / "b")
    try:
        with pytest.raises(stops.Preempted):
            trainer.train(cfg, log=stop_after_epoch_2)    # stops at the first step of epoch 3
    finally:
        stops.stop_requested.clear()
    assert len(csv_rows(tmp_path / "b" / "out" / "smoke.csv")) == 2
    resumed = trainer.train(cfg, resume=True, log=lambda s: None)
    assert csv_rows(tmp_path / "a" / "out" / "smoke.csv") == csv_rows(tmp_path / "b" / "out" / "smoke.csv")
    assert (resumed["best_val_acc"], resumed["test_acc"], resumed["test_loss"]) == \
        (whole["best_val_acc"], whole["test_acc"], whole["test_loss"])


@pytest.mark.slow
def test_val_every_validates_every_nth_and_the_last_epoch_picks_the_best_among_them_and_resumes(tmp_path):
    kw = {"epochs": 5, "val_every": 2, "subset": 640, "channels": [8, 16]}
    whole = trainer.train(smoke_cfg(tmp_path / "a", **kw), log=lambda s: None)
    rows = csv_rows(tmp_path / "a" / "out" / "smoke.csv")
    assert [r["epoch"] for r in rows if r["val_acc"]] == ["2", "4", "5"]
    assert all(r["val_loss"] == r["val_top5"] == "" for r in rows if r["epoch"] in ("1", "3"))
    best = max((r for r in rows if r["val_acc"]), key=lambda r: float(r["val_acc"]))
    assert whole["best_epoch"] == int(best["epoch"]) and f"{whole['best_val_acc']:.5f}" == best["val_acc"]
    assert files.load_checkpoint(tmp_path / "a" / "out" / "smoke.ckpt")["epoch"] == whole["best_epoch"]

    def stop_after_epoch_3(line):
        if line.startswith("ep 3/"):
            assert "| val - |" in line
            stops.stop_requested.append("test")
    cfg = smoke_cfg(tmp_path / "b", **kw)
    try:
        with pytest.raises(stops.Preempted):
            trainer.train(cfg, log=stop_after_epoch_3)
    finally:
        stops.stop_requested.clear()
    resumed = trainer.train(cfg, resume=True, log=lambda s: None)
    assert csv_rows(tmp_path / "b" / "out" / "smoke.csv") == rows
    assert (resumed["best_epoch"], resumed["test_loss"]) == (whole["best_epoch"], whole["test_loss"])


def test_lr_schedules_warm_up_and_decay_per_step():
    cfg = config.Config(lr=1.0, schedule="onecycle", warmup=0.1, final_lr=0.0)
    assert optim.lr_at(0, 100, cfg) == pytest.approx(0.1) and optim.lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert optim.lr_at(55, 100, cfg) == pytest.approx(0.5) and optim.lr_at(99, 100, cfg) < 0.02
    cos = config.Config(lr=1.0, schedule="cosine")
    assert optim.lr_at(0, 100, cos) == 1.0 and optim.lr_at(50, 100, cos) == pytest.approx(0.5)
    assert optim.lr_at(77, 100, config.Config(lr=0.002)) == 0.002


def test_multistep_lr_drops_by_gamma_at_each_milestone_given_as_epochs_or_fractions():
    epochs = config.Config(lr=0.1, schedule="multistep", milestones=[60, 120, 160], gamma=0.2, epochs=200)
    steps = 10 * 200        # 10 steps per epoch: epoch 60's milestone is global step 600
    lrs = [optim.lr_at(s, steps, epochs) for s in (0, 599, 600, 1199, 1200, 1599, 1600, 1999)]
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.004, 0.0008, 0.0008])
    fractions = config.Config(lr=1.0, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1, warmup=0.1)
    lrs = [optim.lr_at(s, 100, fractions) for s in (0, 9, 10, 49, 50, 74, 75, 99)]
    assert lrs == pytest.approx([0.1, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    for bad in ([0.5, 60], [120, 60], [60.5], [0.5, 0.5]):
        with pytest.raises(config.UserError, match="config key 'milestones' must be increasing"):
            config.resolve("smoke", [("schedule", "multistep"), ("milestones", bad)])
    with pytest.raises(config.UserError, match="config key 'milestones' must be a non-empty list of numbers"):
        config.resolve("smoke", [("milestones", [])])


def test_ptc100_resnet18_is_the_classic_200_epoch_step_recipe():
    cfg = config.resolve("ptc100_resnet18")
    assert (cfg.blocks, cfg.channels, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size,
            cfg.epochs) == ([2, 2, 2, 2], [64, 128, 256, 512], "sgd", 0.1, 0.9, 5e-4, 128, 200)
    per_epoch = 45_000 // 128
    lr = [optim.lr_at(epoch * per_epoch, 200 * per_epoch, cfg) for epoch in (1, 59, 60, 119, 120, 160, 199)]
    assert lr == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008])     # epochs 61, 121, 161 (1-based)
    assert optim.lr_at(per_epoch // 2, 200 * per_epoch, cfg) == pytest.approx(0.05, rel=0.01)    # one warm-up epoch
    assert "NOT YET MEASURED on a GPU" in cfg.note


def test_report_overfit64_and_report_repo_hold_the_report_repositorys_settings():
    recipe = ("sgd", 0.9, False, 0.002, 1e-4, 128, 20, "constant", True, 0)
    keys = ("optimizer", "momentum", "nesterov", "lr", "weight_decay", "batch_size", "epochs", "schedule", "augment", "subset")
    report, repo, overfit = (config.resolve(e) for e in ("report", "report_repo", "overfit64"))
    assert tuple(getattr(report, k) for k in keys) == recipe
    assert tuple(getattr(repo, k) for k in keys) == recipe[:8] + (False, 0)
    assert tuple(getattr(overfit, k) for k in keys) == ("sgd", 0.9, False, 0.1, 1e-4, 64, 50, "constant", False, 64)
    assert (report.lrfind_start, report.lrfind_end, report.lrfind_iters, report.lrfind_diverge, report.lrfind_stop) == \
        (1e-6, 1.0, 100, 4.0, "raw")
    assert config.resolve("smoke").optimizer == "adam"


def test_config_precedence_and_compile_default():
    cfg = config.resolve("report", [("lr", 0.01)])
    assert (cfg.lr, cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.name) == (0.01, "sgd", 128, 20, "report")
    cpu = engine.torch.device("cpu")      # auto compiles on a CPU where a C++ compiler works; "off" never does
    assert devices.use_compile(cfg, cpu) == (hardware.cpp_compiler_problem() == "")
    assert not devices.use_compile(config.resolve("report", [("compile", "off")]), cpu)


def test_an_experiment_takes_the_keys_of_its_base_but_not_its_note(tmp_path):
    path = tmp_path / "experiments.json"
    path.write_text(json.dumps({"defaults": {"lr": 0.1}, "experiments": {
        "a": {"epochs": 3, "batch_size": 64, "note": "a's result"},
        "b": {"base": "a", "batch_size": 32},
        "c": {"base": "b", "lr": 0.2, "note": "c's result"}}}))
    b, c = config.resolve("b", path=path), config.resolve("c", [("epochs", 5)], path=path)
    assert (b.lr, b.epochs, b.batch_size, b.note, b.name) == (0.1, 3, 32, "", "b")
    assert (c.lr, c.epochs, c.batch_size, c.note, c.name) == (0.2, 5, 32, "c's result", "c")


@pytest.mark.parametrize("args, message", [
    (["--exp", "nope"], "unknown experiment 'nope'.*known: report"),
    (["--exp", "smoke", "--set", "lr=-1"], "'lr' must be > 0"),
    (["--exp", "smoke", "--set", "blocks=[1,1,1]"], "same length"),
    (["--exp", "best", "--data-dir", "{tmp}/empty", "--set", "download=false"], "CIFAR-100 not found.*--data-dir"),
])
@pytest.mark.slow
def test_bad_input_exits_nonzero_with_one_line(tmp_path, args, message):
    r = run("run_train.py", "--out", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in args])
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: ") and re.search(message, r.stderr)


def test_corrupt_checkpoint_exits_nonzero_with_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    r = run("run_eval.py", str(bad))
    assert r.returncode != 0 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
