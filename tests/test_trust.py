"""Numbers a reader can trust: a training loss comparable with the validation loss, accuracy with and without TTA,
means over seeds, a run started from a checkpoint's weights, no earlier run ever deleted."""
import copy
import datetime
import json
import os
import re
import statistics
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
import optim
import run_eval
import run_grid
import run_report
import run_train
import stops
import trainer
from fault_helpers import SMALL, csv_rows, main_error, quiet, small, snapshot, synthetic_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


# ----------------------------------------------------------------------------
# 1. train_loss is the plain cross-entropy, as val_loss is

def test_train_loss_is_the_plain_cross_entropy_of_the_batches_and_the_smoothed_loss_is_train_objective(
        data_dir, tmp_path, monkeypatch):
    real_step, steps = engine.train_step, []

    def recording_step(model, opt, x, y, cfg, lr, *precision_and_scaler):
        with torch.no_grad():       # the step's own forward (train mode, same weights), on a copy
            logits = copy.deepcopy(model)(devices.to_model_format(x))
        steps.append([F.cross_entropy(logits, y, label_smoothing=s, reduction="sum") for s in (0.0, 0.3)] + [len(y)])
        return real_step(model, opt, x, y, cfg, lr, *precision_and_scaler)
    monkeypatch.setattr(engine, "train_step", recording_step)
    # fp32: the recording forward runs without autocast (auto is bf16 on a CPU with AMX or AVX512-BF16)
    quiet(small(tmp_path, data_dir, ("label_smoothing", 0.3), ("precision", "fp32"), epochs=2))
    rows = csv_rows(tmp_path / "smoke.csv")
    assert len(steps) == 16 and len(rows) == 2          # 8 steps an epoch
    for row, epoch in zip(rows, (steps[:8], steps[8:])):
        plain, smoothed, n = torch.tensor(epoch).sum(0)
        assert float(row["train_loss"]) == pytest.approx(float(plain / n), abs=2e-5)
        assert float(row["train_objective"]) == pytest.approx(float(smoothed / n), abs=2e-5)
        assert abs(float(row["train_objective"]) - float(row["train_loss"])) > 1e-3     # not the same figure


def test_without_label_smoothing_train_loss_and_train_objective_are_the_same_figure(data_dir, tmp_path):
    quiet(small(tmp_path, data_dir))
    assert all(r["train_loss"] == r["train_objective"] for r in csv_rows(tmp_path / "smoke.csv"))


def test_a_last_checkpoint_from_before_train_objective_resumes(data_dir, tmp_path):
    cfg = small(tmp_path, data_dir)
    stops.stop_requested.append("test")          # stops after the first step
    try:
        with pytest.raises(stops.Preempted):
            quiet(cfg)
    finally:
        stops.stop_requested.clear()
    last = files.load_checkpoint(tmp_path / "smoke.last.ckpt")
    files.save_checkpoint({**last, "epoch_sums": last["epoch_sums"][:3]}, tmp_path / "smoke.last.ckpt")  # loss, correct, seen
    assert quiet(cfg, resume=True)["status"] == "finished"
    [row] = csv_rows(tmp_path / "smoke.csv")
    assert row["train_loss"] == row["train_objective"]


# ----------------------------------------------------------------------------
# 2. top-1 with and without TTA, recorded apart

def top1(model, x, y, flip):
    """Top-1 of model on uint8 images x, computed here without the engine: plain, or averaged with the flip."""
    model.eval()
    with torch.no_grad():
        xb = devices.to_model_format(data.normalize(x))
        logits = model(xb) if not flip else (model(xb) + model(xb.flip(3))) / 2
    return (logits.argmax(1) == y).float().mean().item()


@pytest.mark.slow
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
    assert row["val_acc_plain"] == f"{s['best_val_acc_plain']:.5f}"
    assert row["val_acc"] == row["val_acc_tta" if tta else "val_acc_plain"]
    # a validation runs the TTA passes only where tta is on; the final test runs both
    assert row["val_acc_tta"] == (f"{s['best_val_acc_tta']:.5f}" if tta else "") and (s["best_val_acc_tta"] is None) != tta
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
    monkeypatch.setattr(stops, "install_stop_handlers", lambda: None)
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
    earlier_run({"started": "not a time"})     # a spoilt record, or one from before "started": the oldest file's time
    t = datetime.datetime(2026, 11, 29, 8, 0, 1).timestamp()
    os.utime(tmp_path / "smoke.csv", (t, t))
    assert files.retire_earlier_run(cfg) == tmp_path / "old" / "smoke-20261129-080001"
    assert files.retire_earlier_run(cfg) is None and not list(tmp_path.glob("smoke.*"))
    assert sorted(p.name for p in (tmp_path / "old" / "smoke-20261129-080001").iterdir()) == ["smoke.csv", "smoke.json"]


# ----------------------------------------------------------------------------
# 4. init=PATH: a fresh run from a checkpoint's weights

class FirstStep(Exception):
    """Raised by the patched step once it has seen what the run starts from."""


def first_step_of(cfg, monkeypatch):
    """The weights, optimizer state size and LR the first training step of cfg meets (the run stops there)."""
    def recording_step(model, opt, x, y, cfg, lr, *precision_and_scaler):
        raise FirstStep({k: v.clone() for k, v in model.state_dict().items()}, len(opt.state), lr)
    monkeypatch.setattr(engine, "train_step", recording_step)
    with pytest.raises(FirstStep) as e:
        quiet(cfg)
    monkeypatch.undo()
    return e.value.args


@pytest.fixture(scope="module")
def ema_run(data_dir, tmp_path_factory):
    """A finished 1-epoch smoke run with weight EMA: its best .ckpt holds EMA weights, its .last.ckpt both."""
    out = tmp_path_factory.mktemp("ema")
    quiet(small(out, data_dir, ("ema", 0.9)))
    return out


@pytest.mark.parametrize("ckpt, weights", [("smoke.ckpt", "model"), ("smoke.last.ckpt", "ema")])
def test_init_starts_from_the_checkpoints_weights_with_a_fresh_optimizer_and_schedule(
        ema_run, data_dir, tmp_path, monkeypatch, ckpt, weights):
    cfg = small(tmp_path, data_dir, ("name", "tuned"), ("lr", 0.001), ("init", str(ema_run / ckpt)), epochs=2)
    state, optimizer_state, lr = first_step_of(cfg, monkeypatch)
    saved = files.load_checkpoint(ema_run / ckpt)[weights]
    assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
    assert optimizer_state == 0 and lr == optim.lr_at(0, 16, cfg)          # step 0 of this run's own schedule
    lines = []
    trainer.train(cfg, log=lines.append)      # to the end, over the files of the run stopped above
    assert lines[0].startswith(f"tuned from the weights of {ema_run / ckpt} (the earlier run's files moved to "
                               f"{tmp_path / 'old'}/tuned-")
    assert lines[1].endswith(f"(from the weights of {ema_run / ckpt})")
    assert json.loads((tmp_path / "tuned.json").read_text())["config"]["init"] == str(ema_run / ckpt)


@pytest.mark.parametrize("sets, message", [
    ([("channels", [8, 16])], "config key 'init': {ckpt} holds another architecture (blocks [1, 1] channels [16, 32] "
                              "stem_stride 1 shortcut conv) than this run (blocks [1, 1] channels [8, 16] stem_stride 1 "
                              "shortcut conv)"),
    ([("stem_stride", 2)], "holds another architecture (blocks [1, 1] channels [16, 32] stem_stride 1 shortcut conv)"),
    ([("shortcut", "avgpool")], "than this run (blocks [1, 1] channels [16, 32] stem_stride 1 shortcut avgpool)"),
    ([("init", "{out}/missing.ckpt")], "config key 'init': checkpoint {out}/missing.ckpt not found"),
])
def test_init_from_another_architecture_or_no_file_is_one_error_line_and_moves_nothing(
        ema_run, data_dir, tmp_path, monkeypatch, capsys, sets, message):
    ckpt = ema_run / "smoke.ckpt"
    quiet(small(tmp_path, data_dir))
    before = snapshot(tmp_path)
    args = [f"{k}={json.dumps(v) if isinstance(v, list) else v}".format(out=tmp_path) for k, v in sets]
    argv = [*SMALL, "--epochs", "1", "--data-dir", data_dir, "--out", tmp_path, "--set", f"init={ckpt}",
            *[a for arg in args for a in ("--set", arg)]]
    assert message.format(ckpt=ckpt, out=tmp_path) in main_error(run_train, argv, monkeypatch, capsys)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------
# 3. a grid over seeds: mean +- std (n)

@pytest.mark.slow
def test_a_grid_over_seeds_gives_mean_and_std_rows_in_its_csv_its_table_and_the_report(
        data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run_grid.py", "--grid", "smoke_seeds", "--set", "subset=256", "--set",
                                      "batch_size=32", "--device", "cpu", "--data-dir", str(data_dir), "--out", str(tmp_path)])
    monkeypatch.setattr(stops, "install_stop_handlers", lambda: None)
    run_grid.main()
    printed = capsys.readouterr().out
    rows = csv_rows(tmp_path / "smoke_seeds.csv")
    configs, means = rows[:6], rows[6:]
    assert [(r["group"], r["seed"], r["status"]) for r in configs] == \
        [(f"lr{lr}", str(seed), "done") for lr in (0.002, 0.004) for seed in (0, 1, 2)]
    assert sorted(m["group"] for m in means) == ["lr0.002", "lr0.004"]
    assert float(means[0]["best_val_acc"]) >= float(means[1]["best_val_acc"])          # ranked
    report = "\n".join(run_report.build(tmp_path, ["smoke"], "smoke_seeds", [], tmp_path / "report.md"))
    for m in means:
        seeds = [r for r in configs if r["group"] == m["group"]]
        text = {}
        for key in ("best_val_acc", "test_acc"):
            values = [float(r[key]) for r in seeds]
            assert len(set(values)) > 1 or key == "test_acc"              # the seeds make other runs
            assert (float(m[key]), float(m[f"{key}_std"])) == (pytest.approx(statistics.mean(values), abs=1e-5),
                                                                pytest.approx(statistics.stdev(values), abs=1e-5))
            text[key] = f"{100 * float(m[key]):.2f}", f"{100 * float(m[f'{key}_std']):.2f}"
        assert (m["status"], m["n"], m["seed"], m["lr"]) == ("mean", "3", "[0, 1, 2]", seeds[0]["lr"])
        (val, val_std), (test, test_std) = text.values()
        assert re.search(rf"\n +\d  {m['group']}  +{val} \+- {val_std} \(3\)  +{test} \+- {test_std} \(3\)  \[0, 1, 2\]\n",
                         printed), printed
        assert f"| {m['group']} | {val}% ± {val_std} (n=3) | {test}% ± {test_std} (n=3) | [0, 1, 2] |" in report
