"""The roofline: how close a model's training runs to this device's matrix throughput (bench.py prints it last).

    python -c "import roofline, config, resnet; cfg = config.resolve('cpu'); print(roofline.step_flops(resnet.from_config(cfg), cfg) / 1e12)"
"""
import copy

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import hardware
import optim


def step_flops(model, cfg):
    """FLOPs of one training step of the model at cfg.batch_size as torch.utils.flop_counter counts them: the forward's
    and backward's convolutions and matrix products, and the optimizer's (Muon's Newton-Schulz). Counted on a copy on
    the meta device: no arithmetic runs, whatever the model's device."""
    model = copy.deepcopy(model).to("meta").train()
    x = torch.empty(cfg.batch_size, 3, 32, 32, device="meta").contiguous(memory_format=torch.channels_last)
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device="meta")
    opt = optim.make_optimizer(model, cfg)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return counter.get_total_flops()


def measure(model, cfg, device, throughput):
    """Matrix TFLOP/s in fp32 and bf16 beside the FLOP/s each measured mode achieves."""
    peak = {p: round(hardware.matmul_tflops(device, dtype), 4)
            for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    per_image = step_flops(model, cfg) / cfg.batch_size
    achieved = {k: round(per_image * rate / 1e12, 4) for k, rate in throughput.items()}
    return {"matmul_tflops": peak, "gflop_per_train_image": round(per_image / 1e9, 3), "achieved_tflops": achieved}


def line(r):
    peak, done = r["matmul_tflops"], r["achieved_tflops"]
    modes = ", ".join(f"{k} {v:.3f}" for k, v in done.items())
    return (f"roofline | matmul {peak['fp32']:.3f} TFLOP/s fp32, {peak['bf16']:.3f} bf16 | model "
            f"{r['gflop_per_train_image']:.2f} GFLOP per training image x img/s = {modes} TFLOP/s achieved")
