"""Training-step speed of a recipe's model in fp32 and bf16, eager and compiled (channels-last, as the engine trains),
on one random batch: engine.train_step, best of 3 x 5 timed steps after one warm-up step.

    PYTHONPATH=. python results/2026-12-02-xeon-noamx-cpu-frontier/probes/precision.py cpu5 cpu   # from the repo root
"""
import sys
import time

import torch

import config
import devices
import engine
import roofline

for exp in sys.argv[1:]:
    cfg = config.resolve(exp)
    for compiled in (False, True):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = engine.build_model(cfg)
            run = devices.compile_model(model, cfg) if compiled else model
            opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9, nesterov=True)
            x = torch.rand(cfg.batch_size, 3, 32, 32)
            y = torch.randint(0, 100, (cfg.batch_size,))
            t0 = time.perf_counter()
            engine.train_step(run, opt, x, y, cfg, 0.0, precision)
            first_s = time.perf_counter() - t0
            rates = []
            for rep in range(3):
                t0 = time.perf_counter()
                for _ in range(5):
                    engine.train_step(run, opt, x, y, cfg, 0.0, precision)
                rates.append(5 * cfg.batch_size / (time.perf_counter() - t0))
            tflops = max(rates) * roofline.training_flops_per_image(cfg) / 1e12
            print(f"{exp:5s} {'compiled' if compiled else 'eager':8s} {precision}  first step {first_s:5.1f} s  "
                  f"{' '.join(f'{r:5.0f}' for r in rates)} img/s  best {max(rates):5.0f} = {tflops:.3f} TFLOP/s",
                  flush=True)
            torch._dynamo.reset()
