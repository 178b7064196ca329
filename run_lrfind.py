"""LR range test: one exponentially growing LR per step on a fresh model, through the engine's train step.

    python run_lrfind.py --exp smoke                        # generated data, seconds on CPU
    python run_lrfind.py --exp report --data-dir ~/data     # the report's sweep: SGD, 1e-6..1, 100 steps, raw-loss stop
    python run_lrfind.py --exp best --start 1e-4 --end 10 --iters 300

The sweep's range, steps and stop rule are the experiment's lrfind_* keys (config.py); the flags override them.
Writes out/<exp>.lrfind.csv (iter, lr, loss, smooth_loss) and out/<exp>.lrfind.json (the suggestions).
The sweep's model is thrown away: no checkpoint or experiment is read or changed.
"""
import argparse
import copy
import itertools
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

import config
import console
import data
import devices
import engine
import files
import optim
import run_train
import stops


def lr_sweep(model, cfg, x, y, beta=0.9, log=lambda line: None):
    """Train a copy of model for cfg.lrfind_iters steps, the LR growing exponentially from cfg.lrfind_start to
    cfg.lrfind_end; returns (rows, why it stopped early). Step lines with the sweep's ETA go to log every
    cfg.progress_s seconds."""
    model = copy.deepcopy(model)        # the caller's model keeps its weights
    opt = optim.make_optimizer(model, cfg)
    precision = devices.pick_precision(cfg, x.device)[0]
    scaler = devices.grad_scaler(x.device, precision)
    step_model = devices.compile_model(model, cfg) if devices.use_compile(cfg, x.device) else model
    batches = (b for epoch in itertools.count() for b in data.train_batches(x, y, cfg, epoch))
    start, end, iters = cfg.lrfind_start, cfg.lrfind_end, cfg.lrfind_iters
    rows, avg, lowest, stop = [], 0.0, math.inf, ""
    tick, t0 = console.progress(cfg, x.device, iters, 0, log), time.time()
    for i, (xb, yb) in zip(range(iters), batches):
        lr = start * (end / start) ** (i / max(1, iters - 1))
        loss = engine.train_step(step_model, opt, xb, yb, cfg, lr, precision, scaler)[0].item()   # note: a host sync
        if not math.isfinite(loss):
            stop = f"loss {loss} at lr {lr:.2e}"
            break
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta ** (i + 1))       # bias-corrected, so the first steps are not pulled to 0
        rows.append({"iter": i, "lr": lr, "loss": loss, "smooth_loss": smooth})
        watched = loss if cfg.lrfind_stop == "raw" else smooth
        lowest = min(lowest, watched)
        eta = tick(i + 1, i + 1)
        if eta is not None:
            log(console.step_line(f"step {i + 1}/{iters} lr {lr:.1e}", smooth, (i + 1) * cfg.batch_size /
                                  (time.time() - t0), time.time() - t0, eta))
        if watched > cfg.lrfind_diverge * lowest:
            stop = f"{cfg.lrfind_stop} loss {watched:.3g} > {cfg.lrfind_diverge:g} x its minimum {lowest:.3g} at lr {lr:.2e}"
            break
    return rows, stop


def suggest(rows, skip=0.1):
    """Steepest-descent LR, min-loss LR and the LR range where the smoothed loss falls (10% to 90% of its drop)."""
    lr = np.array([r["lr"] for r in rows])
    s = np.array([r["smooth_loss"] for r in rows])
    first = max(1, int(skip * len(rows)))       # the first steps are noisy: skip them
    if len(rows) < first + 3:
        return {"suggested_lr": None, "min_loss_lr": None, "min_div10_lr": None, "falling_range": None}
    low = first + int(np.argmin(s[first:]))
    out = {"min_loss_lr": float(lr[low]), "min_div10_lr": float(lr[low] / 10)}
    if low - first < 2:                         # no falling stretch before the minimum
        return {"suggested_lr": None, **out, "falling_range": None}
    fall = s[first:low + 1]
    steepest = first + int(np.argmin(np.gradient(fall, np.log10(lr[first:low + 1]))[:-1]))   # before the minimum
    top = first + int(np.argmax(fall))
    drop = s[top] - s[low]
    lo = top + int(np.argmax(s[top:low + 1] <= s[top] - 0.1 * drop))
    hi = top + int(np.argmax(s[top:low + 1] <= s[top] - 0.9 * drop))
    return {"suggested_lr": float(lr[steepest]), **out, "falling_range": [float(lr[lo]), float(lr[hi])]}


def main():
    p = argparse.ArgumentParser(parents=[run_train.get_args_parser(add_help=False)], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="best", help="experiment whose model, optimizer and data are swept (default: best)")
    p.add_argument("--start", type=float, help="first LR (default: the experiment's lrfind_start, 1e-7; report 1e-6)")
    p.add_argument("--end", type=float, help="last LR (default: the experiment's lrfind_end, 10; report 1)")
    p.add_argument("--iters", type=int, help="steps, one LR each (default: the experiment's lrfind_iters, 200; report 100)")
    p.add_argument("--smooth", type=float, default=0.9, help="beta of the loss's moving average; 0 = raw (default: 0.9)")
    p.add_argument("--diverge", type=float, help="stop once the loss exceeds this x its minimum (default: lrfind_diverge, 4)")
    p.add_argument("--stop", choices=["smooth", "raw"],
                   help="which loss --diverge reads (default: the experiment's lrfind_stop: smooth; report raw)")
    args = p.parse_args()
    flags = [(f"lrfind_{k}", getattr(args, k)) for k in ("start", "end", "iters", "diverge", "stop")]
    try:
        if not 0 <= args.smooth < 1:
            raise config.UserError(f"need 0 <= --smooth < 1, got {args.smooth}")
        cfg = config.resolve(args.exp, run_train.overrides(args) + [(k, v) for k, v in flags if v is not None])
        device = devices.setup(cfg)
        d = data.load(cfg, device)
        model = engine.build_model(cfg, len(d["classes"]), device)
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
    except config.UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: cannot create output folder {cfg.out_dir}: {e.strerror}")

    print(console.run_line(f"lr sweep {cfg.name}", cfg, model, device,
                           f"{cfg.lrfind_iters} steps of batch {cfg.batch_size}, {cfg.optimizer} momentum {cfg.momentum:g} "
                           f"wd {cfg.weight_decay:g} lr {cfg.lrfind_start:.1e} .. {cfg.lrfind_end:.1e}, stop at "
                           f"{cfg.lrfind_diverge:g}x the {cfg.lrfind_stop} loss's minimum", out / f"{cfg.name}.lrfind.*"),
          flush=True)
    try:
        with devices.compile_errors():
            rows, stop = lr_sweep(model, cfg, *d["train"], args.smooth, log=lambda line: print(line, flush=True))
    except config.UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): the sweep stopped, no file written", file=sys.stderr)
        sys.exit(stops.INTERRUPTED_EXIT)
    result = {"exp": args.exp, **suggest(rows), "stopped_early": bool(stop), "stop_reason": stop, "iters": len(rows),
              "start": cfg.lrfind_start, "end": cfg.lrfind_end, "smooth": args.smooth, "diverge": cfg.lrfind_diverge,
              "stop_on": cfg.lrfind_stop,
              "device": str(device), "config": asdict(cfg), "versions": devices.versions()}
    paths = [out / f"{cfg.name}.lrfind.csv", out / f"{cfg.name}.lrfind.json"]
    files.write_csv(paths[0], ["iter", "lr", "loss", "smooth_loss"],
                    ({"iter": r["iter"], "lr": f"{r['lr']:.6g}", "loss": f"{r['loss']:.5f}",
                      "smooth_loss": f"{r['smooth_loss']:.5f}"} for r in rows))
    files.write_json(result, paths[1])

    print(f"stopped early after {len(rows)} steps: {stop}" if stop else f"swept all {len(rows)} steps")
    if result["suggested_lr"] is None:
        print("no falling stretch of the loss found: widen --start/--end or raise --iters")
    else:
        lo, hi = result["falling_range"]
        print(f"suggested lr (steepest) {result['suggested_lr']:.1e} | min/10 {result['min_div10_lr']:.1e} | "
              f"loss falls from {lo:.1e} to {hi:.1e} | min loss at {result['min_loss_lr']:.1e}")
        print(f"try: python run_train.py --exp {args.exp} --set lr={result['suggested_lr']:.1e}")
    print("files: " + " ".join(map(str, paths)))


if __name__ == "__main__":
    main()
