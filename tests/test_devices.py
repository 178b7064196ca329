"""Where it runs (devices.py): the precision and compile auto picks per GPU capability and CPU, fp16 with its
GradScaler (skipped steps, resume), devices asked for but absent, threads, and a simulated Windows."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import config
import console
import devices
import engine
import files
import run_lrfind
import run_train
from fault_helpers import ENV, REPO, SMALL, csv_rows, main_error, popen, results, run, synthetic_data

CPU = torch.device("cpu")
# fp16 on a CPU without AVX512-FP16 is about 5x slower than fp32: a smaller run (4 steps an epoch, 3 epochs)
FP16 = {"subset": 128, "batch_size": 32, "channels": [8, 16], "stem_stride": 2, "epochs": 3, "precision": "fp16",
        "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def cuda_gpu(monkeypatch, capability, name="Tesla T4"):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def cpu_with(monkeypatch, level, amx=False, avx512_bf16=False, onednn_bf16=True, matmul_tflops=(0.29, 1.81)):
    """A CPU as torch would see it: the level its kernels run at, its bf16 units, whether oneDNN runs bf16, and its
    (fp32, bf16) matrix products' TFLOP/s (by default the AMX Xeon's)."""
    monkeypatch.setattr(devices, "cpu_matmul_tflops", lambda: matmul_tflops)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: level)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn_bf16)


def choice(device, **sets):
    cfg = config.Config(**sets)
    precision = devices.pick_precision(cfg, device)[0]
    return precision, devices.use_compile(cfg, device), devices.grad_scaler(CPU, precision) is not None


# ----------------------------------------------------------------------------
# 1. precision and compile, chosen once per device

@pytest.mark.parametrize("capability, precision, compiled", [((6, 0), "fp16", False), ((7, 0), "fp16", True),
                                                               ((7, 5), "fp16", True), ((8, 0), "bf16", True),
                                                               ((9, 0), "bf16", True)])
def test_auto_on_cuda_is_bf16_from_capability_8_0_else_fp16_with_a_scaler_and_compiles_from_7_0(
        monkeypatch, capability, precision, compiled):
    cuda_gpu(monkeypatch, capability)
    assert choice(torch.device("cuda")) == (precision, compiled, precision == "fp16")
    text = console.device_text(config.Config(), torch.device("cuda"))
    assert text.startswith(f"cuda (Tesla T4, auto {precision}{' + GradScaler' * (precision == 'fp16')}: capability "
                           f"{capability[0]}.{capability[1]}"), text
    assert ("compile on" if compiled else "no compile: Triton needs capability 7.0") in text


def test_bf16_asked_for_below_capability_8_0_runs_eager_and_says_it_is_slow(monkeypatch):
    cuda_gpu(monkeypatch, (7, 5))
    assert choice(torch.device("cuda"), precision="bf16") == ("bf16", False, False)
    assert "bf16 as set, slow: capability 7.5 has no bf16, no compile: Triton has no bf16 below capability 8.0" in \
        console.device_text(config.Config(precision="bf16"), torch.device("cuda"))
    assert choice(torch.device("cuda"), precision="bf16", compile="on") == ("bf16", True, False)


def test_auto_on_a_cpu_is_bf16_only_where_torch_runs_it_natively_and_faster_than_fp32(monkeypatch):
    cpu_with(monkeypatch, "AVX512", amx=True, avx512_bf16=True)            # Sapphire Rapids and later
    assert choice(CPU) == ("bf16", False, False)
    assert "auto bf16: AVX512 CPU with AMX and AVX512-BF16, bf16 matrix product 1.81 TFLOP/s, fp32 0.29" in \
        console.device_text(config.resolve("cpu"), CPU)
    cpu_with(monkeypatch, "AVX512", avx512_bf16=True, matmul_tflops=(0.15, 0.38))     # Zen 4
    assert choice(CPU)[0] == "bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")                       # oneDNN held to AVX2
    cpu_with(monkeypatch, "AVX512", avx512_bf16=True, onednn_bf16=False)
    assert choice(CPU)[0] == "fp32"
    assert "auto fp32: oneDNN runs no bf16 here (ONEDNN_MAX_CPU_ISA=AVX2)" in console.device_text(config.Config(), CPU)
    cpu_with(monkeypatch, "AVX512", avx512_bf16=True, matmul_tflops=(0.23, 0.12))     # a Xeon whose AMX the VM hides
    assert choice(CPU)[0] == "fp32"
    assert "auto fp32: AVX512 CPU with AVX512-BF16, bf16 matrix product 0.12 TFLOP/s, fp32 0.23: fp32 is faster here" \
        in console.device_text(config.resolve("cpu"), CPU)
    assert "bf16 as set, slow: " in console.device_text(config.Config(precision="bf16"), CPU)
    cpu_with(monkeypatch, "AVX512")                                        # Skylake-X: bf16 emulated
    assert choice(CPU)[0] == "fp32"
    cpu_with(monkeypatch, "AVX2")                                          # most laptops, the Zen 3 here
    assert choice(CPU)[0] == "fp32"
    assert "auto fp32: AVX2 CPU without AMX or AVX512-BF16" in console.device_text(config.resolve("cpu"), CPU)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")                      # a bf16 CPU held to AVX2
    cpu_with(monkeypatch, "AVX2", amx=True, avx512_bf16=True)
    assert choice(CPU)[0] == "fp32"
    assert "torch runs this CPU at AVX2 (ATEN_CPU_CAPABILITY=avx2), without its AMX and AVX512-BF16" in \
        console.device_text(config.Config(), CPU)
    assert "bf16 as set, slow: " in console.device_text(config.Config(precision="bf16"), CPU)
    assert choice(CPU, precision="fp16") == ("fp16", False, True)


def test_fp32_or_fp16_as_set_times_no_matrix_products(monkeypatch):
    cpu_with(monkeypatch, "AVX512", avx512_bf16=True)
    monkeypatch.setattr(devices, "cpu_matmul_tflops", lambda: pytest.fail("timed the matrix products"))
    assert choice(CPU, precision="fp32") == ("fp32", False, False)
    assert choice(CPU, precision="fp16") == ("fp16", False, True)


def test_the_cpus_matrix_products_are_measured_once_per_process():
    devices.cpu_matmul_tflops.cache_clear()
    fp32, bf16 = first = devices.cpu_matmul_tflops()
    assert fp32 > 0 and bf16 > 0 and devices.cpu_matmul_tflops() is first


def test_the_cpu_recipe_is_fp32_on_a_cpu_held_to_avx2_and_leaves_precision_to_auto():
    env = {**ENV, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import config, console, torch; print(console.device_text(config.resolve('cpu'), torch.device('cpu')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and ", auto fp32: " in proc.stdout, proc.stderr
    recipes = config.read_experiments()["experiments"]
    assert not [name for name, recipe in recipes.items() if "precision" in recipe]


def test_autocast_runs_the_convolutions_in_the_precision_chosen():
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    for precision, dtype in [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]:
        with devices.autocast(CPU, precision):
            assert conv(x).dtype == dtype


# ----------------------------------------------------------------------------
# 2. devices: auto takes what is there; one asked for but absent is one line

def no_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_takes_an_intel_or_apple_gpu_where_there_is_one_with_a_precision_it_runs(monkeypatch):
    no_accelerator(monkeypatch)
    assert devices.pick_device(config.Config()) == CPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = devices.pick_device(config.Config())
    assert mps == torch.device("mps") and choice(mps) == ("fp32", False, False)
    assert console.device_text(config.Config(), mps) == "mps (auto fp32: autocast on MPS is not yet run by us)"
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: "Intel Arc A770")
    xpu = devices.pick_device(config.Config())
    assert xpu == torch.device("xpu") and choice(xpu) == ("bf16", False, False)
    assert console.device_text(config.Config(), xpu).startswith("xpu (Intel Arc A770, auto bf16: ")


@pytest.mark.parametrize("device", ["mps", "xpu", "cuda"])
def test_a_device_asked_for_but_absent_is_one_error_line_naming_what_there_is(monkeypatch, capsys, tmp_path, device):
    no_accelerator(monkeypatch)
    for script in (run_train, run_lrfind):
        message = main_error(script, ["--exp", "smoke", "--device", device, "--out", tmp_path], monkeypatch, capsys)
        assert message.startswith(f"error: --device {device} was asked for, but torch ") and \
            message.endswith("here; what there is: cpu"), message
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------
# 3. threads

def test_threads_are_the_key_else_omp_num_threads_else_the_cpus_this_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert devices.cpu_threads(config.Config()) == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")                 # a cluster that binds no CPUs to the job
    assert devices.cpu_threads(config.Config()) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "4,2")
    assert devices.cpu_threads(config.Config()) == 4
    assert devices.cpu_threads(config.Config(threads=5)) == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delattr(os, "sched_getaffinity")                   # Windows, macOS
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert devices.cpu_threads(config.Config()) == 6
    before = torch.get_num_threads()
    try:
        devices.setup(config.Config(device="cpu", threads=1))
        assert torch.get_num_threads() == 1
        with pytest.raises(config.UserError, match="'threads' must be >= 0"):
            config.resolve("smoke", [("threads", -1)])
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs os.sched_setaffinity (Linux)")
def test_a_run_held_to_one_cpu_says_one_thread_on_its_first_line(data_dir, tmp_path):
    """As `taskset -c 0 python run_train.py --exp smoke`."""
    one_cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    args = ["run_train.py", "--exp", "smoke", "--device", "cpu", "--data-dir", data_dir, "--out", tmp_path]
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, {one_cpu}))
    first = proc.stdout.readline()
    proc.kill()
    proc.wait()
    assert " | cpu (1 thread, auto " in first, first


# ----------------------------------------------------------------------------
# 4. fp16: the GradScaler's state is resumed; a step it skips is no divergence, a NaN loss is

def fp16_run(out, data_dir, log=lambda line: None, resume=False):
    pairs = [*FP16.items(), ("data_dir", str(data_dir)), ("out_dir", str(out))]
    return engine.train(config.resolve("smoke", pairs), resume=resume, log=log)


def test_fp16_trains_on_the_cpu_and_a_sigterm_then_resume_ends_as_the_uninterrupted_run(data_dir, tmp_path):
    lines = []
    reference = fp16_run(tmp_path / "reference", data_dir, log=lines.append)
    assert "fp16 + GradScaler as set" in lines[0] and reference["precision"] == "fp16"
    out = tmp_path / "stopped"
    sets = [("--set", f"{k}={v if isinstance(v, str) else json.dumps(v)}") for k, v in FP16.items()]
    args = ["--exp", "smoke", *[a for pair in sets for a in pair], "--data-dir", data_dir, "--out", out]
    proc = popen("run_train.py", *args, "--set", "log_every=1")
    for line in proc.stdout:
        if line.startswith("  ep 2/3 step "):
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait() == engine.PREEMPTED_EXIT
    assert files.load_checkpoint(out / "smoke.last.ckpt")["scaler"]["scale"] > 0
    resumed = run("run_train.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert csv_rows(out / "smoke.csv") == csv_rows(tmp_path / "reference" / "smoke.csv")
    assert results(json.loads((out / "smoke.json").read_text())) == results(reference)


def test_steps_the_scaler_skips_are_no_divergence_and_resume_keeps_its_scale(data_dir, tmp_path, monkeypatch):
    """A loss scale of 2^24 overflows fp16 gradients: the scaler skips steps and halves its scale until they fit."""
    monkeypatch.setattr(devices, "grad_scaler", lambda device, precision: torch.amp.GradScaler(device.type,
                                                                                               init_scale=2.0 ** 24))
    reference = fp16_run(tmp_path / "reference", data_dir)
    scale = files.load_checkpoint(tmp_path / "reference" / "smoke.last.ckpt")["scaler"]["scale"]
    assert scale < 2.0 ** 24 and math.isfinite(reference["test_loss"])
    monkeypatch.setattr(engine, "stop_requested", [])
    with pytest.raises(engine.Preempted):          # stopped in epoch 2, where steps were skipped before
        fp16_run(tmp_path / "stopped", data_dir,
                 log=lambda line: line.startswith("ep 1/") and engine.stop_requested.append(signal.SIGTERM))
    monkeypatch.setattr(engine, "stop_requested", [])
    resumed = fp16_run(tmp_path / "stopped", data_dir, resume=True)
    assert results(resumed) == results(reference)
    assert csv_rows(tmp_path / "stopped" / "smoke.csv") == csv_rows(tmp_path / "reference" / "smoke.csv")


def test_a_nan_loss_in_fp16_still_stops_the_run(data_dir, tmp_path, monkeypatch):
    real_step, calls = engine.train_step, []

    def nan_at_step_3(model, opt, x, *rest):
        calls.append(1)
        return real_step(model, opt, x * float("nan") if len(calls) == 3 else x, *rest)

    monkeypatch.setattr(engine, "train_step", nan_at_step_3)
    with pytest.raises(engine.Diverged, match="loss is nan at epoch 1 step 3"):
        fp16_run(tmp_path, data_dir)


# ----------------------------------------------------------------------------
# 5. Windows: no fcntl, no SIGUSR1 (tests/windows/sitecustomize.py)

def test_every_script_starts_trains_evaluates_and_resumes_without_fcntl_and_sigusr1(data_dir, tmp_path):
    env = {**ENV, "PYTHONPATH": str(REPO / "tests" / "windows")}

    def windows(*args, **kwargs):
        return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, env=env, text=True, capture_output=True,
                              timeout=180, **kwargs)

    probe = windows("-c", "import signal; assert not hasattr(signal, 'SIGUSR1'); import fcntl")
    assert "import of fcntl halted" in probe.stderr          # the simulation holds
    out = tmp_path / "out"
    train = [*SMALL, "--epochs", "2", "--data-dir", data_dir, "--out", out]
    proc = subprocess.Popen([sys.executable, "run_train.py", *map(str, train), "--set", "log_every=1"], cwd=REPO,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if line.startswith("  ep 2/2 step "):
            proc.send_signal(signal.SIGINT)       # Ctrl-C, as on Windows
            break
    proc.stdout.read()
    assert proc.wait() == engine.INTERRUPTED_EXIT
    resumed = windows("run_train.py", *train, "--resume")
    assert resumed.returncode == 0 and "resuming smoke at epoch 2" in resumed.stdout, resumed.stderr
    assert [r["epoch"] for r in csv_rows(out / "smoke.csv")] == ["1", "2"]
    for args in [("run_eval.py", out / "smoke.ckpt", "--device", "cpu"),
                 ("run_lrfind.py", *SMALL, "--iters", "10", "--data-dir", data_dir, "--out", out),
                 ("run_grid.py", "--grid", "smoke_grid", "--index", "0", "--epochs", "1", "--set", "subset=256",
                  "--device", "cpu", "--data-dir", data_dir, "--out", out)]:
        proc = windows(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert [r["status"] for r in csv_rows(out / "smoke_grid.csv")] == ["done"]


def test_the_windows_lock_refuses_a_second_run_and_waits_when_asked(tmp_path, monkeypatch):
    """files.run_lock through msvcrt.locking (faked: byte 0 held by another process)."""
    held = []

    def locking(fd, mode, nbytes):
        if mode == 2 and len(held) < 3:
            held.append(1)
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "fcntl", None)
    monkeypatch.setattr(files, "msvcrt", type("msvcrt", (), {"LK_UNLCK": 0, "LK_LOCK": 1, "LK_NBLCK": 2,
                                                             "locking": staticmethod(locking)}), raising=False)
    monkeypatch.setattr(files.time, "sleep", lambda s: None)
    with pytest.raises(config.UserError, match="another run is writing"):
        with files.run_lock(tmp_path / "x.lock"):
            pass
    with files.run_lock(tmp_path / "x.lock", wait=True):
        assert len(held) == 3
