"""A run's life as a user meets it: what a validation costs, an init checkpoint a fresh start would move, the
precision a resumed run keeps, the budget's timing, and what a resume says of the epochs it keeps."""
import signal

import pytest
import torch

import config
import data
import devices
import engine
import stops
import trainer
from fault_helpers import csv_rows, quiet, small, synthetic_data


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def counting_forwards(model):
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_a_validation_without_tta_runs_one_forward_pass_per_batch():
    model = engine.build_model(config.Config(blocks=[1], channels=[8]))
    x, y = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (30,))
    calls = counting_forwards(model)
    plain = engine.evaluate(model, x, y, tta=False, translate=1)
    assert len(calls) == 1 and "acc_tta" not in plain
    calls.clear()
    both = engine.evaluate(model, x, y, tta=False, translate=1, both=True)
    assert len(calls) == 6 and both["acc"] == plain["acc"] == both["acc_plain"]


def test_an_init_checkpoint_that_the_fresh_start_would_move_is_refused(data_dir, tmp_path):
    quiet(small(tmp_path, data_dir))
    before = (tmp_path / "smoke.ckpt").read_bytes()
    cfg = small(tmp_path, data_dir, ("init", str(tmp_path / "smoke.ckpt")))
    with pytest.raises(config.UserError, match="a fresh start of smoke moves it"):
        quiet(cfg)
    assert (tmp_path / "smoke.ckpt").read_bytes() == before and not (tmp_path / "old").exists()


def test_the_budgets_timing_draws_new_batches_instead_of_keeping_each_one(monkeypatch):
    cfg = config.Config(blocks=[1], channels=[8], batch_size=8, budget_s=1.0)
    x, y = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 100, (8,))
    epochs, real = [], data.train_batches
    monkeypatch.setattr(data, "train_batches", lambda *a, **kw: epochs.append(1) or real(*a, **kw))
    model = engine.build_model(cfg)
    engine.measure_speed(model, model, cfg, x, y, "fp32")
    assert len(epochs) > 3          # one batch an epoch: drawn again each step, not replayed from a cache


def test_a_resume_under_the_same_budget_says_which_epochs_it_keeps(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "measure_speed", lambda *args: 1000.0)      # 3 epochs of 256 images in 0.9 s
    monkeypatch.setattr(stops, "stop_requested", [])
    with pytest.raises(stops.Preempted):
        trainer.train(small(tmp_path, data_dir, ("budget_s", 0.9)),
                      log=lambda line: line.startswith("ep 1/") and stops.stop_requested.append(signal.SIGUSR1))
    monkeypatch.setattr(stops, "stop_requested", [])
    lines = []
    trainer.train(small(tmp_path, data_dir, ("budget_s", 0.9), epochs=5), resume=True, log=lines.append)
    assert "budget_s 0.9 as at its start: its 3 epochs kept, not the 5 asked for" in lines
    assert len(csv_rows(tmp_path / "smoke.csv")) == 3


def test_a_resumed_run_keeps_the_precision_chosen_at_its_start(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(stops, "stop_requested", [])
    monkeypatch.setattr(devices, "pick_precision", lambda cfg, device: ("fp32", "auto fp32: the first node"))
    with pytest.raises(stops.Preempted):
        trainer.train(small(tmp_path, data_dir, ("precision", "auto"), epochs=2),
                      log=lambda line: line.startswith("ep 1/") and stops.stop_requested.append(signal.SIGUSR1))
    monkeypatch.setattr(stops, "stop_requested", [])
    monkeypatch.setattr(devices, "pick_precision", lambda cfg, device: ("bf16", "auto bf16: a busier node"))
    lines = []
    s = trainer.train(small(tmp_path, data_dir, ("precision", "auto"), epochs=2), resume=True, log=lines.append)
    assert s["precision"] == "fp32" and "as chosen at its start" in lines[0]
