"""What this machine can do, as the device choice asks it (devices.py): its physical cores, its matrix products' speed
in fp32 and bf16, the bf16 and fp16 units of its CPU or Intel GPU, and a C++ compiler that Inductor can build with.

    python -c "import hardware, torch; print(hardware.physical_cores(), hardware.cpu_matmul_tflops(1))"
"""
import functools
import os
import platform
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch._inductor.cpp_builder

SYSFS_CPU = Path("/sys/devices/system/cpu")     # Linux: each logical CPU's package and core
TORCH_THREADS = torch.get_num_threads()         # torch's default, one per physical core: read before setup sets it


# ----------------------------------------------------------------------------
# cores

def physical_cores():
    """The physical cores this process may run on: on Linux those of the CPUs in its affinity mask, on macOS the
    performance cores (its efficiency cores would hold back every step they share); else, or where the topology is
    hidden (some containers), torch's default."""
    if hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
        cores = {core_of(cpu) for cpu in cpus}
        return len(cores) if None not in cores else min(len(cpus), TORCH_THREADS)
    if platform.system() == "Darwin":       # note: an Intel Mac has no hw.perflevel0
        return sysctl_count("hw.perflevel0.physicalcpu") or sysctl_count("hw.physicalcpu") or TORCH_THREADS
    return TORCH_THREADS


def core_of(cpu):
    """(package, core) of a logical CPU, as Linux's sysfs says; None where it cannot be read."""
    topology = SYSFS_CPU / f"cpu{cpu}" / "topology"
    try:
        return (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
    except OSError:
        return None


def sysctl_count(name):
    """A count from macOS's sysctl; 0 where it has no such name."""
    try:
        text = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return 0
    return int(text) if text.isdigit() else 0


# ----------------------------------------------------------------------------
# matrix products, bf16 and fp16 units

def matmul_tflops(device, dtype, seconds=2.0, largest=2048):
    """TFLOP/s of an n x n matrix product in dtype, n doubled from 256 while the next size takes under seconds / 4 (a CPU
    without native bf16 takes minutes for one 2048 product), then repeated for about `seconds`."""
    def sync():
        if device.type != "cpu":
            torch.get_device_module(device.type).synchronize()

    def product_s(n, reps=1):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        return (time.perf_counter() - t0) / reps

    n, one_s = 256, product_s(256)
    while n < largest and one_s * 8 * 4 < seconds:     # the next size takes 8x longer
        n *= 2
        one_s = product_s(n)
    reps = max(2, min(1000, int(seconds / one_s)))
    return 2 * n ** 3 / product_s(n, reps) / 1e12


def cpu_units(probes):
    """The names of {name: torch.cpu probe} that this CPU has; a probe this torch lacks finds nothing."""
    return [name for name, probe in probes.items() if getattr(torch.cpu, probe, lambda: False)()]


def cpu_bf16(threads):
    """(native bf16?, why), as torch sees this CPU: its kernels run at AVX512 (ATEN_CPU_CAPABILITY may lower that),
    the CPU has AMX or AVX512-BF16, oneDNN runs bf16 (ONEDNN_MAX_CPU_ISA may forbid it), and its bf16 matrix product
    is faster than its fp32 one at the run's threads. Without those units bf16 is emulated, about ten times slower
    than fp32."""
    level = torch.backends.cpu.get_cpu_capability()
    limit = os.environ.get("ATEN_CPU_CAPABILITY")
    level_text = f"{level} (ATEN_CPU_CAPABILITY={limit})" if limit else level
    units = cpu_units({"AMX": "_is_amx_tile_supported", "AVX512-BF16": "_is_avx512_bf16_supported"})
    if not units:
        return False, f"{level_text} CPU without AMX or AVX512-BF16"
    if level != "AVX512":
        return False, f"torch runs this CPU at {level_text}, without its {' and '.join(units)}"
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
        return False, "oneDNN runs no bf16 here" + (f" (ONEDNN_MAX_CPU_ISA={isa})" if isa else "")
    fp32, bf16 = cpu_matmul_tflops(threads)
    text = f"{level} CPU with {' and '.join(units)}, bf16 matrix product {bf16:.2f} TFLOP/s, fp32 {fp32:.2f}"
    return bf16 > fp32, text + ("" if bf16 > fp32 else ": fp32 is faster here")


@functools.cache
def cpu_matmul_tflops(threads):
    """(fp32, bf16) TFLOP/s of this CPU's matrix product at `threads` threads (the run's: run_grid.py asks before setup
    sets them), measured once per process and thread count in under a second: the best of 3 interleaved readings
    each, as a busy host only slows a reading down. A CPU whose bf16 units the guest hides (a Xeon's AMX) or that runs
    them no faster than its fp32 FMAs trains slower in bf16, whatever its flags say."""
    before, readings = torch.get_num_threads(), {torch.float32: [], torch.bfloat16: []}
    torch.set_num_threads(threads)
    try:
        for _ in range(3):
            for dtype, seen in readings.items():
                seen.append(matmul_tflops(torch.device("cpu"), dtype, seconds=0.1, largest=1024))
    finally:
        torch.set_num_threads(before)
    return max(readings[torch.float32]), max(readings[torch.bfloat16])


def xpu_bf16():
    """(native bf16?, why) on an Intel GPU, emulation not counted. A torch before 2.8 cannot be asked that: its
    is_bf16_supported() says True of every XPU."""
    try:
        native = torch.xpu.is_bf16_supported(including_emulation=False)
    except TypeError:
        return False, f"torch {torch.__version__} cannot tell native bf16 on XPU from emulated"
    return native, "torch.xpu: " + ("native bf16" if native else "bf16 only emulated")


def cpu_fp16():
    """(native fp16?, why) on this CPU: only AMX-FP16 or AVX512-FP16 run it; elsewhere it is emulated, many times
    slower than fp32 (smoke ran 25 s in fp32, and had not done 4 epochs in fp16 after 300 s)."""
    units = cpu_units({"AMX-FP16": "_is_amx_fp16_supported", "AVX512-FP16": "_is_avx512_fp16_supported"})
    return bool(units), f"CPU with {' and '.join(units)}" if units else \
        "emulated on a CPU without AVX512-FP16 or AMX-FP16"


# ----------------------------------------------------------------------------
# a C++ compiler for Inductor's CPU kernels

@functools.cache
def cpp_compiler_problem():
    """Why Inductor cannot build kernels for a CPU here, in words; "" where it can. Asked once per process: the C++
    compiler torch would use (torch._inductor.config.cpp.cxx, from CXX) checks a one-line file that includes
    <Python.h>, as every CPU kernel Inductor builds does (a Python without its -dev headers fails there). That takes
    about 0.2 s; building a real kernel would take 5 s or more at every start."""
    try:
        cxx = torch._inductor.cpp_builder.get_cpp_compiler()
    except RuntimeError as e:       # InvalidCxxCompiler, and on Windows a missing cl
        return str(e)
    if sys.platform == "win32":     # note: cl takes other flags; torch has found it, which is all we ask there
        return ""
    try:
        checked = subprocess.run([cxx, "-fsyntax-only", "-x", "c++", "-", "-I", sysconfig.get_path("include")],
                                 input="#include <Python.h>\n", capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cxx} does not run ({e})"
    error = next((line.strip() for line in checked.stderr.splitlines() if "error" in line), checked.stderr.strip())
    return f"{cxx} cannot build against Python's headers ({error})" if checked.returncode else ""
