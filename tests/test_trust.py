"""Numbers a reader can trust: a training loss comparable with the validation loss, accuracy with and without TTA,
means over seeds, a run started from a checkpoint's weights, no earlier run ever deleted."""
import copy
import datetime
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import config
import console
import data
import devices
import engine
import files
import run_eval
import run_train
from fault_helpers import SMALL, csv_rows, snapshot, synthetic_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def small(out, data_dir, *sets, epochs=1):
    """The tiny smoke config on the CPU: 256 training images, batches of 32 (8 steps an epoch)."""
    return config.resolve("smoke", [("subset", 256), ("batch_size", 32), ("epochs", epochs), ("device", "cpu"),
                                     ("data_dir", str(data_dir)), ("out_dir", str(out)), *sets])


def quiet(cfg, resume=False):
    return engine.train(cfg, resume=resume, log=lambda line: None)


# ----------------------------------------------------------------------------
# 1. train_loss is the plain cross-entropy, as val_loss is

def test_train_loss_is_the_plain_cross_entropy_of_the_batches_and_the_smoothed_loss_is_train_objective(
        data_dir, tmp_path, monkeypatch):
    real_step, steps = engine.train_step, []

    def recording_step(model, opt, x, y, cfg, lr):
        with torch.no_grad():       # the step's own forward (train mode, same weights), on a copy
            logits = copy.deepcopy(model)(devices.to_model_format(x))
        steps.append([F.cross_entropy(logits, y, label_smoothing=s, reduction="sum") for s in (0.0, 0.3)] + [len(y)])
        return real_step(model, opt, x, y, cfg, lr)
    monkeypatch.setattr(engine, "train_step", recording_step)
    quiet(small(tmp_path, data_dir, ("label_smoothing", 0.3), epochs=2))
    rows = csv_rows(tmp_path / "smoke.csv")
    assert len(steps) == 16 and len(rows) == 2          # 8 steps an epoch
    for row, epoch in zip(rows, (steps[:8], steps[8:])):
        plain, smoothed, n = torch.tensor(epoch).sum(0)
        assert float(row["train_loss"]) == pytest.approx(plain / n, abs=2e-5)
        assert float(row["train_objective"]) == pytest.approx(smoothed / n, abs=2e-5)
        assert abs(float(row["train_objective"]) - float(row["train_loss"])) > 1e-3     # not the same figure


def test_without_label_smoothing_train_loss_and_train_objective_are_the_same_figure(data_dir, tmp_path):
    quiet(small(tmp_path, data_dir))
    assert all(r["train_loss"] == r["train_objective"] for r in csv_rows(tmp_path / "smoke.csv"))


# ----------------------------------------------------------------------------
# 2. top-1 with and without TTA, recorded apart

def top1(model, x, y, flip):
    """Top-1 of model on uint8 images x, computed here without the engine: plain, or averaged with the flip."""
    model.eval()
    with torch.no_grad():
        xb = devices.to_model_format(data.normalize(x))
        logits = model(xb) if not flip else (model(xb) + model(xb.flip(3))) / 2
    return (logits.argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("tta", [True, False])
def test_every_evaluation_records_top1_without_and_with_flip_tta(data_dir, tmp_path, monkeypatch, capsys, tta):
    cfg = small(tmp_path, data_dir, ("tta", tta))
    s = quiet(cfg)
    model = engine.model_from(files.load_checkpoint(tmp_path / "smoke.ckpt"))
    d = data.load(cfg, torch.device("cpu"))
    test = {"plain": top1(model, *d["test"], flip=False), "tta": top1(model, *d["test"], flip=True)}
    assert (s["test_acc_plain"], s["test_acc_tta"]) == (pytest.approx(test["plain"]), pytest.approx(test["tta"]))
    assert s["test_acc"] == s["test_acc_tta" if tta else "test_acc_plain"]
    row = csv_rows(tmp_path / "smoke.csv")[0]
    assert s["best_val_acc_plain"] == pytest.approx(top1(model, *d["val"], flip=False))
    assert (row["val_acc_plain"], row["val_acc_tta"]) == (f"{s['best_val_acc_plain']:.5f}", f"{s['best_val_acc_tta']:.5f}")
    assert row["val_acc"] == row["val_acc_tta" if tta else "val_acc_plain"]
    which = f"(flip TTA; {100 * test['plain']:.2f}% without)" if tta else f"(no TTA; {100 * test['tta']:.2f}% with"
    assert f"test {100 * s['test_acc']:.2f}% {which}" in console.done_line(s)

    monkeypatch.setattr(sys, "argv", ["run_eval.py", str(tmp_path / "smoke.ckpt"), "--data-dir", str(data_dir)])
    run_eval.main()
    printed = capsys.readouterr().out.splitlines()[0]
    result = json.loads((tmp_path / "smoke.eval.json").read_text())
    assert (result["acc_plain"], result["acc_tta"], result["acc"]) == (s["test_acc_plain"], s["test_acc_tta"], s["test_acc"])
    assert printed.endswith(f"top-1 without TTA {100 * test['plain']:.2f}%, with flip TTA {100 * test['tta']:.2f}%")


# ----------------------------------------------------------------------------
# 5. no run deleted: a fresh start moves the earlier run's files under <out>/old/

def test_the_same_command_twice_leaves_the_first_runs_files_whole_under_old(data_dir, tmp_path, monkeypatch, capsys):
    argv = ["run_train.py", *SMALL, "--epochs", "1", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(engine, "install_stop_handlers", lambda: None)
    run_train.main()
    first = snapshot(tmp_path)
    started = json.loads((tmp_path / "smoke.json").read_text())["started"]
    capsys.readouterr()
    run_train.main()
    folder = tmp_path / "old" / f"smoke-{datetime.datetime.fromisoformat(started):%Y%m%d-%H%M%S}"
    assert capsys.readouterr().out.startswith(f"smoke (the earlier run's files moved to {folder}/) | ResNet")
    assert snapshot(folder) == first and list((tmp_path / "old").iterdir()) == [folder]
    assert json.loads((tmp_path / "smoke.json").read_text())["status"] == "finished"       # the second run's


def test_an_earlier_runs_folder_is_named_by_its_start_time_and_never_reused(tmp_path):
    cfg = config.resolve("smoke", [("out_dir", str(tmp_path))])

    def earlier_run(record):
        (tmp_path / "smoke.csv").write_text("epoch\n")
        (tmp_path / "smoke.json").write_text(json.dumps(record))
    earlier_run({"started": "2026-12-01T19:27:05+01:00"})
    assert files.retire_earlier_run(cfg) == tmp_path / "old" / "smoke-20261201-192705"
    earlier_run({"started": "2026-12-01T19:27:05+01:00"})
    assert files.retire_earlier_run(cfg) == tmp_path / "old" / "smoke-20261201-192705-2"
    earlier_run({"status": "started"})       # a record from before "started" was kept: the oldest file's time
    t = datetime.datetime(2026, 11, 29, 8, 0, 1).timestamp()
    os.utime(tmp_path / "smoke.csv", (t, t))
    assert files.retire_earlier_run(cfg) == tmp_path / "old" / "smoke-20261129-080001"
    assert files.retire_earlier_run(cfg) is None and not list(tmp_path.glob("smoke.*"))
    assert sorted(p.name for p in (tmp_path / "old" / "smoke-20261129-080001").iterdir()) == ["smoke.csv", "smoke.json"]
