"""Training-step speed of cpu5-sized models on one random batch (bf16, eager, channels-last), best of 3 x 5 steps.

    PYTHONPATH=. python results/2026-12-02-epyc-zen4-cpu-frontier/probes/probe_speed.py     # from the repository root
"""
import dataclasses
import time

import torch

import config
import engine
import roofline

base = dataclasses.replace(config.resolve("cpu5"), channels=[64, 128, 256])    # cpu5 before this session
variants = {"warm": {}, "cpu5": {}, "c48": {"channels": [48, 96, 192]}, "s1w48": {"channels": [48, 128, 256]},
            "c64-128-192": {"channels": [64, 128, 192]}, "bs512": {"batch_size": 512}, "cpu5 again": {}}
for name, over in variants.items():
    cfg = dataclasses.replace(base, **over)
    model = engine.build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True)
    x = torch.randint(0, 255, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8).float().div(255)
    y = torch.randint(0, 100, (cfg.batch_size,))
    best = 0
    for rep in range(3):
        for i in range(6):
            if i == 1:
                t0 = time.perf_counter()
            engine.train_step(model, opt, x, y, cfg, 0.0, "bf16")
        best = max(best, 5 * cfg.batch_size / (time.perf_counter() - t0))
    print(f"{name:14s} {model.num_params() / 1e6:.2f}M {roofline.training_flops_per_image(cfg) / 1e9:.3f} GFLOP/img  "
          f"{best:.0f} img/s", flush=True)
