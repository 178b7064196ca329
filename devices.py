"""Where a run runs: the device, the precision (autocast), torch.compile, and the versions stored with each run.

    python -c "import devices, config; print(devices.setup(config.resolve('smoke')))"
"""
import contextlib
import functools
import os
import platform
import subprocess
from pathlib import Path

import torch
import torch._inductor.config

from config import UserError


def pick_device(cfg):
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is visible")
    return torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")


def setup(cfg):
    """Seed everything, pick the device, set the cuDNN/TF32 flags; returns the torch.device."""
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cfg.deterministic:      # note: slower; needed for bit-identical reruns on CUDA only
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    return device


def use_compile(cfg, device):
    return cfg.compile not in ("auto", "off") or (cfg.compile == "auto" and device.type == "cuda")


def compile_model(model, cfg):
    """torch.compile for static shapes. Dynamo keys its graphs on the code, not the model object, so every later
    model of the same shapes in this process (the next config of a grid) reuses them."""
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)       # note: past this many shapes dynamo silently runs eager (default 8)
    if cfg.deterministic and hasattr(torch._inductor.config, "deterministic"):
        torch._inductor.config.deterministic = True    # no on-device benchmarking of kernels: it changes numerics
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


def autocast(device, precision="auto"):
    """bf16 autocast (no GradScaler needed) on CUDA, or anywhere with precision "bf16"; else plain fp32."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


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
