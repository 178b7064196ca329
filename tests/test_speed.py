import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import config
import devices
import engine
import trainer
from resnet import ResNet

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with dynamo's 'eager' backend: the same graph capture and guards, no code generation (fast)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend="eager", dynamic=False))
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def tiny_cfg(tmp_path, **kw):
    overrides = {"out_dir": str(tmp_path / "out"), "data_dir": str(tmp_path / "data"), "epochs": 1, "subset": 64,
                 "blocks": [1], "channels": [8], "batch_size": 32, "compile": "on", **kw}
    return config.resolve("smoke", overrides.items())


def test_runs_of_the_same_shapes_compile_once_per_process(tmp_path, eager_compile):
    first = trainer.train(tiny_cfg(tmp_path, name="a"), log=lambda *_: None)
    trainer.train(tiny_cfg(tmp_path, name="b", lr=0.001, label_smoothing=0.1), log=lambda *_: None)
    assert counters["stats"]["unique_graphs"] == 1          # the warm-ups, run a and run b share one graph
    trainer.train(tiny_cfg(tmp_path, name="c", batch_size=16), log=lambda *_: None)
    assert counters["stats"]["unique_graphs"] == 2          # a new batch shape compiles once more
    assert first["compile_s"] > 0 and first["train_s"] > 0
    ckpt = torch.load(tmp_path / "out" / "a.ckpt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])


def test_cuda_graph_mode_warms_up_three_steps_on_the_model_itself_and_leaves_training_unchanged(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)        # the steps, not the code generation
    real_step, calls = engine.train_step, []
    monkeypatch.setattr(engine, "train_step", lambda model, *a, **kw: calls.append(model) or real_step(model, *a, **kw))
    runs = {}
    for mode in ("off", "on", "reduce-overhead"):
        calls.clear()
        trainer.train(tiny_cfg(tmp_path, name=mode, compile=mode), log=lambda *_: None)
        assert all(model is calls[-1] for model in calls)       # the graphs are recorded on the trained parameters
        runs[mode] = (len(calls), (tmp_path / "out" / f"{mode}.csv").read_text().splitlines())
    steps = runs["off"][0]
    assert [runs[m][0] - steps for m in ("on", "reduce-overhead")] == [1, 3]
    strip = lambda lines: [line.split(",")[:7] for line in lines]       # without the timing columns
    assert strip(runs["reduce-overhead"][1]) == strip(runs["on"][1]) == strip(runs["off"][1])


def test_compile_modes_are_config_choices_and_off_means_eager():
    cpu = torch.device("cpu")
    for mode in ("on", "reduce-overhead", "max-autotune-no-cudagraphs"):
        assert devices.use_compile(config.resolve("report", [("compile", mode)]), cpu)
    assert not devices.use_compile(config.resolve("report", [("compile", "off")]), torch.device("cuda"))
    with pytest.raises(config.UserError, match="'compile' must be one of"):
        config.resolve("report", [("compile", "fast")])


def test_deterministic_compiled_runs_use_inductors_deterministic_mode(monkeypatch):
    import torch._inductor.config as inductor
    monkeypatch.setattr(torch, "compile", lambda model, **kw: model)
    with inductor.patch(deterministic=False), torch._dynamo.config.patch(recompile_limit=8):  # note: monkeypatch
        devices.compile_model(ResNet([1], [4]), config.resolve("smoke"))                # would delete the options
        assert inductor.deterministic is False and torch._dynamo.config.recompile_limit == 64
        devices.compile_model(ResNet([1], [4]), config.resolve("smoke", [("deterministic", True)]))
        assert inductor.deterministic is True


def test_ema_update_averages_weights_and_bn_statistics():
    torch.manual_seed(0)
    model = ResNet([1], [4], num_classes=3)
    averaged = copy.deepcopy(model)
    before = {k: v.clone() for k, v in averaged.state_dict().items()}
    model(torch.randn(8, 3, 32, 32))                 # moves BN statistics and num_batches_tracked
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    engine.update_ema(averaged, model, decay=0.9)
    for k, v in averaged.state_dict().items():
        current = model.state_dict()[k]
        expected = 0.9 * before[k] + 0.1 * current if v.is_floating_point() else current
        assert torch.allclose(v, expected, atol=1e-6), k


@pytest.mark.slow
def test_bench_prints_a_table_and_writes_pipeline_speedup_mode_throughputs_roofline_and_profile(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--exp", "smoke", "--device", "cpu",
                        "--batch-size", "16", "--steps", "1", "--warmup", "1", "--images", "512",
                        "--report-images", "256", "--workers", "0", "--json", "--profile", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["pipeline_speedup"] > 0 and result["pipeline"]["report_img_per_s"] > 0
    assert result["throughput"]["fp32"] > 0 and result["throughput"]["channels_last"] > 0
    modes = {m["key"]: m for m in result["modes"]}
    assert result["throughput"]["bf16"] > 0 and modes["bf16"]["precision"] == "bf16"     # bf16 autocast on CPU too
    assert modes["cudagraphs"]["status"].startswith("n/a")
    assert "pipeline_speedup" in r.stdout and "eager fp32" in r.stdout and "1.00x" in r.stdout
    roof = result["roofline"]
    assert roof["matmul_tflops"]["fp32"] > 0 and roof["matmul_tflops"]["bf16"] > 0
    assert roof["achieved_tflops"]["fp32"] == pytest.approx(roof["gflop_per_train_image"] * 1e9 * result["throughput"]["fp32"] / 1e12, rel=0.01)
    assert "roofline | matmul" in r.stdout
    profile = (tmp_path / "profile_smoke.txt").read_text()
    assert "aten::convolution_backward" in profile and "augmentation: data.train_batches" in profile


def test_step_flops_count_forward_and_backward_of_every_conv_and_the_classifier():
    import roofline
    stem, conv, fc = 2 * 3 * 8 * 9 * 32 * 32, 2 * 8 * 8 * 9 * 32 * 32, 2 * 8 * 100
    forward = stem + 2 * conv + fc
    # backward: a weight gradient for every layer, an input gradient for all but the stem (its input needs none)
    cfg = config.Config(blocks=[1], channels=[8], batch_size=4, optimizer="sgd")
    assert roofline.step_flops(engine.build_model(cfg), cfg) == 4 * (3 * forward - stem)


def test_step_flops_add_muons_newton_schulz_products():
    import roofline
    sgd = config.Config(blocks=[1], channels=[8], batch_size=4, optimizer="sgd")
    muon = config.Config(blocks=[1], channels=[8], batch_size=4, optimizer="muon", ns_steps=5)
    # filters 8 x 27 (the stem) and 8 x 72 (two convs): per Newton-Schulz step X X^T, (b G + c G G) and that times X
    ns = sum(5 * (2 * 8 * 8 * n + 2 * 8 ** 3 + 2 * 8 * 8 * n) for n in (27, 72, 72))
    model = engine.build_model(sgd)
    assert roofline.step_flops(model, muon) - roofline.step_flops(model, sgd) == ns


def test_gpu_check_script_is_valid_bash():
    r = subprocess.run(["bash", "-n", str(ROOT / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
def test_bench_times_each_augmentation_against_crop_and_flip(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--exp", "smoke", "--device", "cpu", "--modes", "fp32",
                        "--batch-size", "16", "--steps", "1", "--images", "256", "--report-images", "64",
                        "--workers", "0", "--aug-images", "256", "--augmentations", "crop_flip,cutmix,ta_wide,ra",
                        "--policy-groups", "4", "--json", "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["augmentation"]
    assert [(a["key"], a["group"]) for a in rows] == [("crop_flip", None), ("cutmix", None), ("ta_wide", 4),
                                                      ("ta_wide", 16), ("ra", 16)]
    assert rows[0]["ratio"] == 1.0 and all(a["img_per_s"] > 0 and a["ratio"] > 0 for a in rows)
    assert "| + ta_wide, groups of 4 |" in r.stdout and "vs crop + flip" in r.stdout
