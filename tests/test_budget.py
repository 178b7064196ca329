"""A time budget (budget_s): the epochs sized to the speed measured on the first steps, kept on --resume, and a
budget too short for one epoch refused before anything in out/ moves."""
import json
import math
import signal
import time

import pytest
import torch

import config
import console
import engine
import run_train
import stops
import trainer
from fault_helpers import SMALL, csv_rows, main_error, quiet, small, snapshot, synthetic_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def measured_at(monkeypatch, img_per_s):
    """The speed measurement returns img_per_s; returns the list of its calls."""
    calls = []
    monkeypatch.setattr(engine, "measure_speed", lambda *args: calls.append(1) or img_per_s)
    return calls


def test_budget_line_says_minutes_when_whole_else_seconds():
    assert console.budget_line(1200, 14, 930.4) == "budget 20 min: 14 epochs at 930 img/s"
    assert console.budget_line(90, 3, 12345.6) == "budget 90 s: 3 epochs at 12,346 img/s"


def test_a_budgeted_run_takes_its_epochs_from_the_measured_speed(data_dir, tmp_path, monkeypatch):
    measured_at(monkeypatch, 1000.0)        # 0.95 x 0.6 s x 1000 img/s / 256 images = 2.2 -> 2 epochs
    lines = []
    s = trainer.train(small(tmp_path, data_dir, ("budget_s", 0.6), epochs=7), log=lines.append)
    assert lines[0] == "budget 0.6 s: 2 epochs at 1,000 img/s"
    assert "2 epochs x 8 steps" in lines[1]
    assert len(csv_rows(tmp_path / "smoke.csv")) == 2
    assert (s["config"]["epochs"], s["budget_epochs"], s["budget_img_per_s"]) == (2, 2, 1000.0)


@pytest.mark.slow
def test_a_real_tiny_budget_trains_the_epochs_that_fit_at_the_speed_it_measured(data_dir, tmp_path):
    """Real timing, nothing patched. train_s may pass 2 s by a little on a loaded machine (epochs of 0.2 s against
    a 5% margin), so it is held to 1.5x: a budget ignored or sized wrongly misses by far more. Ending within the
    budget itself is measured by full runs (results/, the README's time budget)."""
    s = quiet(small(tmp_path, data_dir, ("budget_s", 2.0)))
    assert s["budget_epochs"] == math.floor(0.95 * 2.0 * s["budget_img_per_s"] / 256) >= 2
    assert len(csv_rows(tmp_path / "smoke.csv")) == s["budget_epochs"]
    assert s["train_s"] <= 1.5 * 2.0, s


def test_the_speed_is_timed_for_a_fortieth_of_the_budget(data_dir, tmp_path):
    cfg = small(tmp_path, data_dir, ("budget_s", 80.0))        # 2 s of timed steps, not the 1 s minimum
    model = engine.build_model(cfg)
    x, y = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (256,))
    t0 = time.time()
    assert engine.measure_speed(model, model, cfg, x, y, "fp32") > 0
    assert time.time() - t0 >= 2.0


def test_resume_keeps_the_chosen_epochs_and_does_not_measure_again(data_dir, tmp_path, monkeypatch):
    measured_at(monkeypatch, 1000.0)        # 3 epochs of 256 images in 0.9 s
    cfg = small(tmp_path, data_dir, ("budget_s", 0.9))
    monkeypatch.setattr(stops, "stop_requested", [])
    with pytest.raises(stops.Preempted):
        trainer.train(cfg, log=lambda line: line.startswith("ep 1/") and stops.stop_requested.append(signal.SIGUSR1))
    monkeypatch.setattr(stops, "stop_requested", [])
    calls, lines = measured_at(monkeypatch, 1.0), []
    s = trainer.train(cfg, resume=True, log=lines.append)
    assert calls == [] and lines[0] == "budget 0.9 s: 3 epochs at 1,000 img/s"
    assert [r["epoch"] for r in csv_rows(tmp_path / "smoke.csv")] == ["1", "2", "3"]
    assert (s["config"]["epochs"], s["budget_epochs"], s["budget_img_per_s"]) == (3, 3, 1000.0)


def test_a_budget_shorter_than_one_epoch_is_one_line_and_keeps_the_earlier_run(data_dir, tmp_path, monkeypatch,
                                                                                 capsys):
    quiet(small(tmp_path, data_dir))
    before = snapshot(tmp_path)
    message = main_error(run_train, [*SMALL, "--data-dir", data_dir, "--out", tmp_path, "--set", "budget_s=0.001"],
                         monkeypatch, capsys)
    assert message.startswith("error: budget_s 0.001 is shorter than one epoch here: an epoch of 256 images takes "
                              "about "), message
    assert " img/s" in message
    assert snapshot(tmp_path) == before
    assert json.loads((tmp_path / "smoke.json").read_text())["status"] == "finished"


def test_a_negative_budget_is_refused_naming_the_key():
    with pytest.raises(config.UserError, match="config key 'budget_s' must be >= 0"):
        config.resolve("smoke", [("budget_s", -1)])
