"""Where a run runs, chosen once and said on its first line: the device, the precision (autocast; a GradScaler for
fp16), torch.compile and the CPU threads; and the versions stored with each run. With the config's "auto":

    device                                   precision           compile
    CUDA, capability >= 8.0 (A100, H100)     bf16                on where Triton works, else off
    CUDA, capability 7.x (V100, T4)          fp16 + GradScaler   on where Triton works, else off
    CUDA, capability < 7.0 (P100)            fp16 + GradScaler   off: Triton needs 7.0
    Intel GPU (xpu)                          bf16 where torch.xpu says it is native, else fp32
                                                                 off: not yet run by us
    Apple GPU (mps)                          fp32                off: not yet run by us
    CPU with AMX or AVX512-BF16, where bf16  bf16                on where a C++ compiler builds against Python's
      matrix products outrun fp32's                                headers (asked once, about 0.2 s), else off
    any other CPU                            fp32                as above

Where compile is off the run goes on eager and its first line says why; compile "on" (or a mode) where torch.compile
cannot run is one error line. fp16 as set on a CPU says it is emulated there, unless the CPU has AVX512-FP16 or
AMX-FP16. The CPU threads: one per physical core this process may run on.

    python -c "import devices, config; print(devices.setup(config.resolve('smoke')))"
"""
import contextlib
import functools
import logging
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch._inductor.config
import torch._inductor.cpp_builder
import torch.utils._triton

import hardware
from config import UserError

ACCELERATORS = {"cuda": "NVIDIA GPU (CUDA)", "xpu": "Intel GPU (XPU)", "mps": "Apple GPU (MPS)"}   # auto's order
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------
# the device and its threads

def available(kind):
    """Whether this torch has the backend `kind` and sees a device of it."""
    if kind == "mps":
        return torch.backends.mps.is_available()        # note: torch.mps.is_available only exists in recent torch
    return kind == "cpu" or torch.get_device_module(kind).is_available()


def pick_device(cfg):
    """cfg.device; auto takes the first accelerator visible, else the CPU. An absent device is one error line."""
    if cfg.device == "auto":
        return torch.device(next((kind for kind in ACCELERATORS if available(kind)), "cpu"))
    if not available(cfg.device):
        here = [kind for kind in ACCELERATORS if available(kind)] + ["cpu"]
        raise UserError(f"--device {cfg.device} was asked for, but torch {torch.__version__} sees no "
                        f"{ACCELERATORS[cfg.device]} here; what there is: {', '.join(here)}")
    return torch.device(cfg.device)


def env_count(name):
    """A positive count from the environment (of a list such as OMP_NUM_THREADS=4,2 the first), else 0."""
    text = os.environ.get(name, "").split(",")[0].strip()
    return int(text) if text.isdigit() else 0


def cpu_threads(cfg):
    """cfg.threads, else OMP_NUM_THREADS where set, else one per physical core this process may run on (taskset;
    SLURM's cpuset), under SLURM no more than --cpus-per-task (a cluster that binds no CPUs leaves all of them to each
    job). A core's second hardware thread shares its vector units: it adds little to convolutions."""
    cores = hardware.physical_cores()
    return cfg.threads or env_count("OMP_NUM_THREADS") or min(cores, env_count("SLURM_CPUS_PER_TASK") or cores)


def setup(cfg):
    """Seed everything, pick the device, set the CPU threads or the cuDNN/TF32 flags; returns the torch.device."""
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic:      # note: slower; needed for bit-identical reruns on CUDA only
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    return device


def synchronize(device):
    """Wait for the work queued on an accelerator (a timing reads between two of these); nothing to wait for on a CPU."""
    if device.type != "cpu":
        torch.get_device_module(device.type).synchronize()


# ----------------------------------------------------------------------------
# precision and compile

def native_bf16(cfg, device):
    """(native bf16?, why) on this device; a CPU times its matrix products at the threads the run will use."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = (major, minor) >= (8, 0)
        return native, f"capability {major}.{minor}" + ("" if native else " has no bf16")
    if device.type == "xpu":
        return hardware.xpu_bf16()
    if device.type == "mps":
        return False, "autocast on MPS is not yet run by us"
    return hardware.cpu_bf16(cpu_threads(cfg))


def pick_precision(cfg, device):
    """(precision, why in words): "bf16", "fp16" or "fp32", as set, or under auto what the device runs natively. fp32
    or fp16 as set asks the device nothing (a CPU would time its matrix products) but whether a CPU runs fp16."""
    native, why = native_bf16(cfg, device) if cfg.precision in ("auto", "bf16") else \
        hardware.cpu_fp16() if cfg.precision == "fp16" and device.type == "cpu" else (None, "")
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if native else "fp16" if device.type == "cuda" else "fp32"
    name = precision + " + GradScaler" * (precision == "fp16")
    if cfg.precision == "auto":
        return precision, f"auto {name}: {why}"
    return precision, f"{name} as set" + (f", slow: {why}" if why and not native else "")


def pick_compile(cfg, device, precision=None):
    """(compile?, why): "off" runs eager; auto compiles where nothing stands in the way (compile_blocker), else runs
    eager and says why; "on" or a mode compiles where it can (use_compile refuses it where not)."""
    if cfg.compile == "off":
        return False, "compile off"
    blocker = compile_blocker(cfg, device, precision)
    if cfg.compile == "auto":
        return not blocker, f"no compile: {blocker}" if blocker else "compile on"
    return not blocker, f"compile {cfg.compile}" + (f", which cannot run here: {blocker}" if blocker else "")


def compile_blocker(cfg, device, precision=None):
    """What keeps torch.compile from running on this device, in words; "" where nothing does."""
    if device.type == "cpu":
        return hardware.cpp_compiler_problem()
    if device.type != "cuda":
        return f"not yet run by us on {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < (7, 0):
        return f"Triton needs capability 7.0, this GPU has {capability[0]}.{capability[1]}"
    if not torch.utils._triton.has_triton():
        return "no working Triton here (pip install triton)"
    bf16 = cfg.compile == "auto" and (precision or pick_precision(cfg, device)[0]) == "bf16"
    return "Triton has no bf16 below capability 8.0" if bf16 and capability < (8, 0) else ""


def use_compile(cfg, device):
    """Whether the run compiles. compile "on" or a mode where torch.compile cannot run is one error line before the
    run starts, not a traceback at its first step."""
    if cfg.compile in ("auto", "off"):
        return pick_compile(cfg, device)[0]
    blocker = compile_blocker(cfg, device)
    if blocker:
        raise UserError(f"torch.compile failed its check here ({blocker}), and compile {cfg.compile} was asked for: "
                        f"run eager with --no-compile")
    return True


def choice_text(cfg, device):
    """What the first line says of the device: its name or threads, the precision and compile chosen, and why."""
    precision, precision_text = pick_precision(cfg, device)
    compile_text = pick_compile(cfg, device, precision)[1]
    if device.type == "cpu":
        threads = cpu_threads(cfg)      # what setup sets (run_grid.py says it before setup)
        name = f"{threads} thread{'s' * (threads != 1)}"
    else:       # note: torch.mps has no get_device_name
        name = "" if device.type == "mps" else torch.get_device_module(device.type).get_device_name(device)
    return ", ".join(part for part in (name, precision_text, compile_text) if part)


def compile_model(model, cfg):
    """torch.compile for static shapes. Dynamo keys its graphs on the code, not the model object, so every later
    model of the same shapes in this process (the next config of a grid) reuses them."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)       # note: past this many shapes dynamo silently runs eager (default 8)
    if cfg.deterministic and hasattr(torch._inductor.config, "deterministic"):
        torch._inductor.config.deterministic = True    # no on-device benchmarking of kernels: it changes numerics
    if next(model.parameters()).device.type == "cpu":    # torch's C++ builder warns of CUDA_HOME as it loads: no news
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)     # to a CPU user; errors still show
    mode = cfg.compile if cfg.compile in ("reduce-overhead", "max-autotune-no-cudagraphs") else None
    return torch.compile(model, dynamic=False, mode=mode)


@contextlib.contextmanager
def compile_errors():
    """A torch.compile that fails at its first call (Inductor needs a working C/C++ compiler, and Triton on CUDA) as
    one UserError line naming the cause, instead of pages of traceback."""
    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as e:   # wraps what failed (a missing compiler, Triton)
        cause = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UserError(f"torch.compile failed: {cause[:300]}; Inductor needs a working C/C++ compiler (and Triton on "
                        f"CUDA): install one, or run eager with --no-compile") from None


# ----------------------------------------------------------------------------
# one step in that precision

def autocast(device, precision="fp32"):
    """bf16 or fp16 autocast on the device; plain fp32 for "fp32"."""
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def grad_scaler(device, precision):
    """A torch.amp.GradScaler for fp16, whose small gradients would underflow without it; None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def backward_step(loss, opt, scaler=None):
    """loss.backward() and opt.step(), through the scaler under fp16: it skips a step whose gradients hold inf/NaN and
    lowers its scale. Such a step is no divergence; a non-finite loss is (the engine checks the loss)."""
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def to_model_format(x):
    return x.contiguous(memory_format=torch.channels_last)


@functools.cache
def git_revision():
    """The short git revision of this code, or None; asked once per process (versions() goes into every save)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions():
    """torch/CUDA versions, GPU name and git revision, stored with every run."""
    return {"torch": str(torch.__version__), "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "git": git_revision()}
