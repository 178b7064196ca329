"""Data-parallel training of one run over several processes (torch.distributed's DistributedDataParallel), one per
GPU, started by torchrun or by SLURM's srun; a run of one process starts no process group and is what it always was.

    torchrun --standalone --nproc_per_node=4 run_train.py --exp best       # one node, 4 GPUs
    sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 slurm.sh             # two nodes: srun starts 8 tasks

Rank 0 alone prints, writes files and evaluates; every rank trains on its slice of each global batch (docs/
distributed.md).
"""
import datetime
import os
import subprocess

import torch
import torch.distributed as dist

from config import UserError

TIMEOUT = datetime.timedelta(seconds=60)    # a collective waits this long for a hung rank, not torch's 10-30 minutes
WAIT = datetime.timedelta(hours=2)           # the others' wait while rank 0 alone validates and tests (a slow CPU's)
_waiting = None                              # the gloo group of that wait


def env_ranks(env=os.environ):
    """(rank, world size, local rank) from torchrun's variables, else from srun's (a job of several tasks), else
    (0, 1, 0): one process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def rendezvous(env=os.environ):
    """(MASTER_ADDR, MASTER_PORT): as set, else the SLURM job's first node and a port from its job id (every task of
    the job computes the same), else this machine."""
    addr = env.get("MASTER_ADDR")
    if not addr and env.get("SLURM_JOB_NODELIST"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], check=False,
                                 capture_output=True, text=True, timeout=30).stdout.split()
            addr = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            addr = None
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID") or 0) % 20000)
    return addr or "127.0.0.1", port


def init(device, cfg):
    """Join the run's process group where there are several processes; returns the device this rank trains on (a
    CUDA rank: cuda:LOCAL_RANK). Raised before anything is written: a global batch the world does not divide, sync_bn
    on a CPU."""
    global _waiting
    me, size, local = env_ranks()
    if cfg.sync_bn and device.type != "cuda":
        raise UserError(f"sync_bn needs CUDA (SyncBatchNorm runs on NVIDIA GPUs only), not {device.type}")
    if size == 1:
        return device
    if device.type not in ("cuda", "cpu"):
        raise UserError(f"several processes run on NVIDIA GPUs (nccl) or CPUs (gloo), not on {device.type}")
    if cfg.budget_s:    # each rank would time its own steps and might choose other epochs
        raise UserError("budget_s is not yet supported with several processes: give --epochs")
    if cfg.batch_size % size:
        raise UserError(f"batch_size {cfg.batch_size} is the global batch: {size} processes need a multiple of {size} "
                        f"(e.g. {cfg.batch_size // size * size or size})")
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    addr, port = rendezvous()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, port      # what init_process_group reads
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=me, world_size=size,
                                timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    except dist.DistError as e:     # e.g. a SLURM job of several tasks whose script runs python without srun
        raise UserError(f"process {me} of {size}: not all {size} processes joined at {addr}:{port} within "
                        f"{TIMEOUT.seconds} s ({str(e).splitlines()[0]}); start them with torchrun or srun")
    _waiting = dist.new_group(backend="gloo", timeout=WAIT)
    return device


def active():
    return dist.is_available() and dist.is_initialized()


def world():
    return dist.get_world_size() if active() else 1


def rank():
    return dist.get_rank() if active() else env_ranks()[0]


def is_main():
    return rank() == 0


def backend():
    return dist.get_backend() if active() else None


def wrap(model, cfg, device):
    """What runs the steps: the model itself, or under several processes its DistributedDataParallel (SyncBatchNorm
    first where sync_bn). Without sync_bn, DDP's broadcast_buffers makes every rank's forward use rank 0's BatchNorm
    statistics: those evaluated and saved are rank 0's."""
    if not active():
        return model
    if cfg.sync_bn:     # in place (its root is no BatchNorm): model stays the module whose state_dict is saved
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def my_slice(xb, yb):
    """This rank's contiguous rows of a global batch: rank r takes rows r*B/N to (r+1)*B/N."""
    n, r, b = world(), rank(), len(yb)
    return xb[r * b // n:(r + 1) * b // n], yb[r * b // n:(r + 1) * b // n]


def any_true(flag):
    """Whether flag is true on any rank (a stop signal that reached one process stops all at the same step)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)], device="cuda" if backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_sum(t):
    """t summed over the ranks, in place (the epoch's loss, correct and seen counts)."""
    if active():
        dist.all_reduce(t)
    return t


def barrier():
    """Wait for every rank, as long as rank 0's validation or test may take."""
    if active():
        dist.barrier(group=_waiting)


def cleanup():
    if active():
        dist.destroy_process_group()


def peer_failure(e):
    """The error line of a collective that failed because another rank died or hung (its own line, if any, is
    above), else None: an error of this process's own."""
    text = str(e)
    if world() == 1 or not (isinstance(e, dist.DistError) or "gloo" in text or "NCCL" in text):
        return None
    return (f"process {rank()} of {world()} stopped: another process of this run died or hung "
            f"({text.splitlines()[0][:200]})")
