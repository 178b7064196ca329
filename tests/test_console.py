"""What a run prints: the first line, step lines with an ETA, the CPU estimate, the device and why."""
import itertools
import json
import re

import pytest
import torch

import config
import console
import stops
import trainer
from fault_helpers import synthetic_data
from resnet import ResNet


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def train_lines(out, data_dir, *sets, resume=False):
    """The lines a tiny in-process run logs (256 images, batches of 32: 8 steps an epoch, 1 epoch, CPU)."""
    lines = []
    pairs = [("subset", 256), ("batch_size", 32), ("epochs", 1), ("device", "cpu"), ("data_dir", str(data_dir)),
             ("out_dir", str(out)), *sets]
    trainer.train(config.resolve("smoke", pairs), resume=resume, log=lines.append)
    return lines


def fake_clock(step_s, first_step_s=None):
    """A clock that moves step_s seconds at each reading, or first_step_s at its second (the first step's end)."""
    now, moves = [1000.0], itertools.chain([step_s, step_s if first_step_s is None else first_step_s],
                                           itertools.repeat(step_s))

    def clock():
        now[0] += next(moves)
        return now[0]
    return clock


def test_first_line_names_experiment_model_device_work_and_files(data_dir, tmp_path):
    lines = train_lines(tmp_path, data_dir)
    params = ResNet([1, 1], [16, 32]).num_params()
    threads = torch.get_num_threads()
    assert re.fullmatch(rf"smoke \| ResNet blocks \[1,1\] channels \[16,32\], {params:,} params \| "
                        rf"cpu \({threads} threads?, auto (fp32|bf16): [^|]*\) \| 1 epochs x 8 steps of batch 32 \| "
                        rf"files {re.escape(str(tmp_path / 'smoke'))}\.\*", lines[0]), lines[0]
    assert lines[1].startswith("first-batch loss") and not any(line.startswith("{") for line in lines)
    assert json.loads((tmp_path / "smoke.json").read_text())["config"]["batch_size"] == 32     # the config is there


def test_first_line_names_a_patch_stem_and_bf16_on_cpu(data_dir, tmp_path):
    line = train_lines(tmp_path, data_dir, ("stem_stride", 2), ("precision", "bf16"))[0]
    assert "channels [16,32] patch stem 2, " in line and re.search(r"\| cpu \(\d threads?, bf16 as set", line), line


def test_resumed_run_says_from_where_on_its_first_line(data_dir, tmp_path):
    stops.stop_requested.append("test")          # stops after the first step
    try:
        with pytest.raises(stops.Preempted):
            train_lines(tmp_path, data_dir)
    finally:
        stops.stop_requested.clear()
    lines = train_lines(tmp_path, data_dir, resume=True)
    assert lines[0].startswith(f"resuming smoke at epoch 1 step 1 from {tmp_path / 'smoke.last.ckpt'} | ResNet")


def test_slow_steps_get_a_step_line_every_interval_with_the_runs_eta():
    cfg = config.Config(progress_s=30.0, batch_size=100)
    lines = []
    tick = console.progress(cfg, torch.device("cuda"), total=100, done=0, log=lines.append, clock=fake_clock(10.0))
    due = {step: tick(step, step) for step in range(1, 11)}
    assert [s for s, eta in due.items() if eta is not None] == [3, 6, 9]     # 10 s a step: every third step
    assert due[3] == pytest.approx(97 * 10.0) and not lines                   # no estimate line off the CPU


def test_a_tiny_interval_prints_a_step_line_after_every_step_with_loss_rate_and_eta(data_dir, tmp_path):
    lines = train_lines(tmp_path, data_dir, ("progress_s", 1e-9))
    steps = [line for line in lines if line.startswith("  ep 1/1 step ")]
    assert [int(re.search(r"step (\d+)/8", line)[1]) for line in steps] == list(range(1, 9))
    assert all(re.search(r"\| loss \d\.\d{3} \| [\d,]+ img/s \| elapsed \d+:\d\d:\d\d \| eta \d+:\d\d:\d\d$", line)
               for line in steps), steps
    assert not any("\r" in line for line in lines)


def test_default_interval_prints_no_step_line_on_a_fast_epoch_and_no_estimate_on_a_short_run(data_dir, tmp_path):
    lines = train_lines(tmp_path, data_dir)
    assert not [line for line in lines if line.startswith("  ") or line.startswith("estimate")], lines


def test_a_cpu_run_over_an_hour_gets_one_estimate_line_naming_a_cpu_recipe_and_cuda():
    cfg = config.resolve("report")
    lines = []
    tick = console.progress(cfg, torch.device("cpu"), total=7020, done=0, log=lines.append, clock=fake_clock(3.4))
    for step in range(1, 50):
        tick(step, step)
    assert len(lines) == 1 and lines[0].startswith("estimate: report takes about 6.6 h on this CPU (38 img/s)")
    assert console.cpu_recipe() in lines[0] and lines[0].endswith("--device cuda on a GPU machine")
    short = []
    tick = console.progress(cfg, torch.device("cpu"), total=500, done=0, log=short.append, clock=fake_clock(3.4))
    for step in range(1, 50):
        tick(step, step)
    assert short == []


def test_a_long_cpu_run_gets_its_estimate_after_its_second_step():
    lines = []
    tick = console.progress(config.resolve("best"), torch.device("cpu"), total=2610, done=0, log=lines.append,
                            clock=fake_clock(40.0))     # best on a 2-core CPU: 40 s a step
    tick(1, 1)
    tick(2, 2)
    assert len(lines) == 1 and lines[0].startswith("estimate: best takes about 29.0 h on this CPU (13 img/s)")


def test_a_slow_first_step_after_compiling_is_not_taken_for_the_runs_speed():
    lines = []          # cpu on 2 Zen 5 cores: the first compiled step takes 4x longer than the others
    tick = console.progress(config.resolve("cpu"), torch.device("cpu"), total=4375, done=0, log=lines.append,
                            clock=fake_clock(0.36, first_step_s=1.4))
    for step in range(1, 10):
        tick(step, step)
    assert lines == []                            # 4375 x 0.36 s is 26 min, not the 1.7 h of the first step


def test_cpu_recipe_is_the_cpu_experiment_else_the_smallest_on_cifar100(monkeypatch):
    experiments = {"big": {"channels": [64, 128]}, "small": {"blocks": [1, 1], "channels": [8, 16], "epochs": 2},
                   "generated": {"dataset": "synthetic", "channels": [4, 4]}}
    defaults = {"blocks": [2, 2], "channels": [32, 64]}
    doc = {"defaults": defaults, "experiments": experiments}
    monkeypatch.setattr(config, "read_experiments", lambda path=None: doc)
    assert console.cpu_recipe() == "--exp small"
    experiments["cpu"] = {}
    assert console.cpu_recipe() == "--exp cpu"


def test_device_auto_without_a_gpu_says_why(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    text = console.device_text(config.Config(device="auto"), cpu)
    assert "auto found no GPU although torch has CUDA 12.4 (CUDA_VISIBLE_DEVICES='')" in text
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert "(no NVIDIA driver or GPU visible)" in console.device_text(config.Config(device="auto"), cpu)
    text = console.device_text(config.Config(device="cpu"), cpu)
    assert re.fullmatch(r"cpu \(\d+ threads?, auto (fp32|bf16): [^|]*\)", text), text
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in console.device_text(config.Config(device="auto"), cpu)
