"""Where it runs (devices.py): the precision and compile auto picks per GPU capability and CPU, fp16 with its
GradScaler (skipped steps, resume), devices asked for but absent, threads, and a simulated Windows."""
import ast
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import torch.utils._triton

import config
import console
import devices
import engine
import files
import hardware
import run_lrfind
import run_train
import stops
import trainer
from fault_helpers import ENV, REPO, SMALL, csv_rows, main_error, popen, results, run, synthetic_data
from resnet import ResNet

CPU = torch.device("cpu")
# fp16 on a CPU without AVX512-FP16 is about 5x slower than fp32: a smaller run (4 steps an epoch, 3 epochs), eager
# (these tests count its steps, and compile's warm-up would be one more)
FP16 = {"subset": 128, "batch_size": 32, "channels": [8, 16], "stem_stride": 2, "epochs": 3, "precision": "fp16",
        "device": "cpu", "compile": "off"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data(tmp_path_factory.mktemp("data"))


def cuda_gpu(monkeypatch, capability, name="Tesla T4", triton=True):
    """A CUDA GPU of this capability, where Triton works or not (torch.utils._triton.has_triton)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: triton)


def cpu_with(monkeypatch, level, amx=False, avx512_bf16=False, onednn_bf16=True, matmul_tflops=(0.29, 1.81)):
    """A CPU as torch would see it: the level its kernels run at, its bf16 units, whether oneDNN runs bf16, and its
    (fp32, bf16) matrix products' TFLOP/s (by default the AMX Xeon's); a working C++ compiler beside it."""
    monkeypatch.setattr(hardware, "cpp_compiler_problem", lambda: "")
    monkeypatch.setattr(hardware, "cpu_matmul_tflops", lambda threads: matmul_tflops)
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


@pytest.fixture
def compiler_check():
    """The C++ compiler check asked afresh, and again after the test (it is asked once per process)."""
    hardware.cpp_compiler_problem.cache_clear()
    yield
    hardware.cpp_compiler_problem.cache_clear()


def test_auto_on_cuda_without_triton_runs_eager_and_says_why_and_compile_on_there_is_one_error_line(monkeypatch):
    cuda_gpu(monkeypatch, (8, 0), triton=False)
    assert devices.pick_compile(config.Config(), torch.device("cuda")) == \
        (False, "no compile: no working Triton here (pip install triton)")
    for capability, triton in [((8, 0), False), ((6, 0), True)]:
        cuda_gpu(monkeypatch, capability, triton=triton)
        with pytest.raises(config.UserError, match=r"^torch.compile failed its check here \((no working Triton|"
                                                   r"Triton needs capability 7.0).*\), and compile on was asked for: "
                                                   r"run eager with --no-compile$"):
            devices.use_compile(config.Config(compile="on"), torch.device("cuda"))


@pytest.mark.parametrize("kind", ["mps", "xpu"])
def test_auto_runs_eager_on_an_apple_or_intel_gpu_and_says_why_and_compile_on_there_is_one_error_line(kind):
    device = torch.device(kind)
    assert devices.pick_compile(config.Config(), device) == (False, f"no compile: not yet run by us on {kind}")
    with pytest.raises(config.UserError, match=f"not yet run by us on {kind}.*--no-compile$"):
        devices.use_compile(config.Config(compile="reduce-overhead"), device)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="needs a C++ compiler")
def test_auto_compiles_on_a_cpu_whose_cpp_compiler_builds_against_pythons_headers_asked_once(compiler_check,
                                                                                              monkeypatch):
    assert devices.pick_compile(config.Config(), CPU) == (True, "compile on")
    assert "fp32 as set, compile on)" in console.device_text(config.Config(precision="fp32"), CPU)
    assert devices.pick_compile(config.resolve("cpu5"), CPU) == (True, "compile on")    # the recipes leave it to auto
    monkeypatch.setattr(hardware.subprocess, "run", lambda *args, **kwargs: pytest.fail("asked twice"))
    assert devices.use_compile(config.resolve("cpu"), CPU)


def test_a_cpu_without_a_working_cpp_compiler_runs_eager_and_says_why_and_compile_on_is_one_error_line(
        compiler_check, tmp_path):
    with torch._inductor.config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):    # as CXX=... would
        compile, why = devices.pick_compile(config.Config(), CPU)
    assert not compile and why.startswith("no compile: No working C++ compiler found") and "no-such-g++" in why
    assert why in console.device_text(config.Config(precision="fp32"), CPU)
    with pytest.raises(config.UserError, match=r"^torch.compile failed its check here \(No working C\+\+ compiler "
                                               r".*no-such-g\+\+.*\), and compile on was asked for: run eager with "
                                               r"--no-compile$"):
        devices.use_compile(config.Config(compile="on"), CPU)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("clang++")), reason="needs a C++ compiler")
def test_a_python_without_its_headers_runs_eager_on_a_cpu_and_says_why(compiler_check, monkeypatch, tmp_path):
    """A system Python without its -dev package: Inductor's CPU kernels include <Python.h>."""
    monkeypatch.setattr(hardware.sysconfig, "get_path", lambda name: str(tmp_path))
    compile, why = devices.pick_compile(config.Config(), CPU)
    assert not compile and re.fullmatch(r"no compile: \S+ cannot build against Python's headers \(.*Python\.h.*\)", why)


def test_no_recipe_forces_compile_past_autos_checks():
    recipes = config.read_experiments()["experiments"]
    assert not [name for name in recipes if config.experiment_entry(recipes, name).get("compile", "auto")
                not in ("auto", "off")]


def test_auto_on_a_cpu_is_bf16_only_where_torch_runs_it_natively_and_faster_than_fp32(monkeypatch):
    cpu_with(monkeypatch, "AVX512", amx=True, avx512_bf16=True)            # Sapphire Rapids and later
    assert choice(CPU) == ("bf16", True, False)
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
    assert choice(CPU, precision="fp16") == ("fp16", True, True)


def test_fp32_or_fp16_as_set_times_no_matrix_products(monkeypatch):
    cpu_with(monkeypatch, "AVX512", avx512_bf16=True)
    monkeypatch.setattr(hardware, "cpu_matmul_tflops", lambda threads: pytest.fail("timed the matrix products"))
    assert choice(CPU, precision="fp32") == ("fp32", True, False)
    assert choice(CPU, precision="fp16") == ("fp16", True, True)


def test_the_cpus_matrix_products_are_measured_once_per_process_and_thread_count():
    hardware.cpu_matmul_tflops.cache_clear()
    before = torch.get_num_threads()
    fp32, bf16 = first = hardware.cpu_matmul_tflops(1)
    assert fp32 > 0 and bf16 > 0 and hardware.cpu_matmul_tflops(1) is first and torch.get_num_threads() == before


def test_devices_imports_nothing_of_roofline_which_imports_it():
    tree = ast.parse((REPO / "devices.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert "roofline" not in imported | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}


def test_fp16_as_set_on_a_cpu_says_it_is_emulated_and_slow_unless_the_cpu_has_fp16_units(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_fp16_supported", lambda: False, raising=False)   # where torch has it
    assert devices.pick_precision(config.Config(precision="fp16"), CPU) == \
        ("fp16", "fp16 + GradScaler as set, slow: emulated on a CPU without AVX512-FP16 or AMX-FP16")
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: True)          # Granite Rapids
    assert devices.pick_precision(config.Config(precision="fp16"), CPU) == ("fp16", "fp16 + GradScaler as set")
    assert devices.pick_precision(config.Config(precision="fp16"), torch.device("cuda"))[1] == \
        "fp16 + GradScaler as set"


def test_compiling_for_a_cpu_keeps_torchs_cuda_home_warning_off_the_console(monkeypatch):
    """torch's C++ builder logs 'No CUDA runtime is found, using CUDA_HOME=...' as it loads: a CPU user's first line."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    before = logger.level
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    with torch._dynamo.config.patch(recompile_limit=8):      # not monkeypatch: its undo deletes a torch config option
        try:
            logger.setLevel(logging.NOTSET)
            devices.compile_model(ResNet([1], [4]).to("meta"), config.Config())      # not a CPU: its warnings stay
            assert logger.level == logging.NOTSET
            devices.compile_model(ResNet([1], [4]), config.Config())
            assert logger.isEnabledFor(logging.ERROR) and not logger.isEnabledFor(logging.WARNING)
        finally:
            logger.setLevel(before)


def test_requirements_floor_is_the_torch_the_tests_ran_on_and_claims_no_device_unmeasured():
    text = (REPO / "requirements.txt").read_text()
    floors = dict(re.findall(r"^(torch|torchvision)>=(\d+\.\d+)$", text, re.MULTILINE))
    assert floors == {"torch": "2.14", "torchvision": "0.29"}
    import torchvision
    installed = [tuple(map(int, re.findall(r"\d+", v)[:2])) for v in (torch.__version__, torchvision.__version__)]
    assert installed >= [(2, 14), (0, 29)] and "CUDA, MPS and XPU are not yet measured" in " ".join(text.split())


def test_the_cpu_recipe_is_fp32_on_a_cpu_held_to_avx2_and_leaves_precision_to_auto():
    env = {**ENV, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "import config, console, torch; print(console.device_text(config.resolve('cpu'), torch.device('cpu')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and ", auto fp32: " in proc.stdout, proc.stderr
    recipes = config.read_experiments()["experiments"]
    assert not [name for name in recipes if "precision" in config.experiment_entry(recipes, name)]


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
    assert console.device_text(config.Config(), mps) == \
        "mps (auto fp32: autocast on MPS is not yet run by us, no compile: not yet run by us on mps)"
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.xpu, "get_device_name", lambda device=None: "Intel Arc A770")
    xpu = devices.pick_device(config.Config())
    assert xpu == torch.device("xpu") and choice(xpu) == ("bf16", False, False)
    assert console.device_text(config.Config(), xpu).startswith("xpu (Intel Arc A770, auto bf16: ")


def test_an_intel_gpu_whose_bf16_is_emulated_runs_fp32(monkeypatch):
    xpu = torch.device("xpu")
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert devices.pick_precision(config.Config(), xpu) == ("fp32", "auto fp32: torch.xpu: bf16 only emulated")
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda: True)      # torch before 2.8: True for every XPU
    precision, why = devices.pick_precision(config.Config(), xpu)
    assert precision == "fp32" and why.endswith("cannot tell native bf16 on XPU from emulated")


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

def cpu_topology(root, cores):
    """A sysfs cpu folder under root in which logical CPU i sits on (package, core) cores[i]."""
    for cpu, (package, core) in enumerate(cores):
        (root / f"cpu{cpu}" / "topology").mkdir(parents=True)
        (root / f"cpu{cpu}" / "topology" / "physical_package_id").write_text(f"{package}\n")
        (root / f"cpu{cpu}" / "topology" / "core_id").write_text(f"{core}\n")
    return root


def sysctl(counts):
    """subprocess.run as macOS's `sysctl -n NAME` answers for these counts (an unknown name fails)."""
    def run(args, **kwargs):
        count = counts.get(args[-1])
        return subprocess.CompletedProcess(args, 1 if count is None else 0, f"{count}\n" if count else "", "")
    return run


def test_threads_are_one_per_physical_core_of_the_cpus_this_process_may_run_on(monkeypatch, tmp_path):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(hardware, "SYSFS_CPU", cpu_topology(tmp_path / "smt", [(0, i % 8) for i in range(16)]))
    for cpus, threads in [(range(16), 8), ({0, 8}, 1), ({0, 1, 8, 9}, 2), ({0, 1, 2}, 3)]:   # CPUs i, i + 8: one core
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, cpus=cpus: set(cpus), raising=False)
        assert devices.cpu_threads(config.Config()) == threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "4")                               # a cluster that binds no CPUs
    assert devices.cpu_threads(config.Config()) == 4
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr(hardware, "SYSFS_CPU", cpu_topology(tmp_path / "two", [(0, 0), (0, 1), (1, 0), (1, 1)]))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert devices.cpu_threads(config.Config()) == 4                              # two sockets, core ids alike
    monkeypatch.setattr(hardware, "SYSFS_CPU", tmp_path / "none")                   # a container hiding the topology
    monkeypatch.setattr(hardware, "TORCH_THREADS", 2)
    assert devices.cpu_threads(config.Config()) == 2
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(hardware.platform, "system", lambda: "Darwin")
    monkeypatch.setattr(hardware.subprocess, "run", sysctl({"hw.perflevel0.physicalcpu": 4, "hw.physicalcpu": 10}))
    assert devices.cpu_threads(config.Config()) == 4                              # an M4: its 4 performance cores
    monkeypatch.setattr(hardware.subprocess, "run", sysctl({"hw.physicalcpu": 6}))
    assert devices.cpu_threads(config.Config()) == 6                              # an Intel Mac
    monkeypatch.setattr(hardware.platform, "system", lambda: "Windows")
    assert devices.cpu_threads(config.Config()) == 2                              # torch's own count


def test_threads_are_the_key_else_omp_num_threads_else_the_cpus_this_process_may_run_on(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "SYSFS_CPU", cpu_topology(tmp_path, [(0, i) for i in range(6)]))
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
    monkeypatch.delattr(os, "sched_getaffinity")                   # Windows
    monkeypatch.setattr(hardware.platform, "system", lambda: "Windows")
    monkeypatch.setattr(hardware, "TORCH_THREADS", 6)
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
    return trainer.train(config.resolve("smoke", pairs), resume=resume, log=log)


@pytest.mark.slow
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
    assert proc.wait() == stops.PREEMPTED_EXIT
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
    monkeypatch.setattr(stops, "stop_requested", [])
    with pytest.raises(stops.Preempted):          # stopped in epoch 2, where steps were skipped before
        fp16_run(tmp_path / "stopped", data_dir,
                 log=lambda line: line.startswith("ep 1/") and stops.stop_requested.append(signal.SIGTERM))
    monkeypatch.setattr(stops, "stop_requested", [])
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

@pytest.mark.slow
def test_every_script_starts_trains_evaluates_and_resumes_without_fcntl_and_sigusr1(data_dir, tmp_path):
    env = {**ENV, "PYTHONPATH": str(REPO / "tests" / "windows"), "CXX": "cl"}   # no Visual Studio: auto runs eager

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
    assert proc.wait() == stops.INTERRUPTED_EXIT
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
