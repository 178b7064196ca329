"""Training throughput and input-pipeline speed, measured side by side: one command, one table.

    python bench.py                                     # the report's model at batch 512 on the GPU
    python bench.py --exp c70 --batch-size 1024 --json  # another recipe's model; also writes out/bench.json
    python bench.py --device cpu                        # short CPU run (1-3 minutes on 2 cores)
    python bench.py --modes fp32,compile                # only these modes (compile is skipped on CPU unless named)
    python bench.py --exp cpu --device cpu --profile    # also out/profile_cpu.txt: torch.profiler table of one step

Training: images/s of forward + backward + optimizer step (the recipe's optimizer) on one fixed batch, after
warm-up, timed between device synchronisations, for eager fp32; autocast (bf16, or fp16 with a GradScaler on a
CUDA GPU below capability 8.0); + channels-last; + torch.compile; + CUDA graphs (compile mode reduce-overhead);
+ compile mode max-autotune-no-cudagraphs. Each mode is a ratio to eager fp32; a compiled mode's first step, less
one ordinary step, is its compile time, reported apart. The engine trains like "+ torch.compile" on CUDA (config
compile=auto; other modes via --set compile=...); on CPU like "+ channels-last" where the CPU has native bf16
(precision auto, devices.py), else like eager fp32.
Roofline (roofline.py): the device's matrix throughput (an n x n product, n up to 2048, fp32 and bf16, TFLOP/s)
beside each mode's achieved FLOP/s (the model's training FLOPs per image, counted by torch.utils.flop_counter,
times its img/s).
Input pipeline (bench_pipeline.py): our batched crop + flip + normalise on the device (data.train_batches) against the report's
torchvision transforms per PIL image through a DataLoader (then copied to the device), in images/s: the best of
5 epochs against the best of 5 passes (other processes on a small machine make single passes noisy).
Augmentation cost: images/s of data.train_batches with each option on top of crop + flip (cutout, MixUp, CutMix,
TrivialAugmentWide, RandAugment, AutoAugment's CIFAR-10 policy), the policies at the default auto_augment_group and
TrivialAugmentWide at each of --policy-groups (torchvision draws one operation per call: smaller groups give more
variety and cost more calls); the best of 2 epochs after one of warm-up.
Random uint8 images by default, so no dataset is needed; --data-dir uses the real training split instead.
"""
import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bench_pipeline
import config
import data
import devices
import files
import optim
import resnet
import roofline

# key, label, autocast, channels-last, engine compile setting (None: eager)
MODES = [("fp32", "eager fp32", False, False, None),
         ("bf16", "autocast", True, False, None),        # note: key "bf16" also under fp16, for bench.json readers
         ("channels_last", "+ channels-last", True, True, None),
         ("compile", "+ torch.compile", True, True, "on"),
         ("cudagraphs", "+ CUDA graphs (reduce-overhead)", True, True, "reduce-overhead"),
         ("autotune", "+ max-autotune-no-cudagraphs", True, True, "max-autotune-no-cudagraphs")]


def skip_reason(key, compile_setting, device, asked):
    """Why a mode is not measured on this device, or '' when it is."""
    if device.type == "cpu" and key in ("cudagraphs", "autotune"):
        return "n/a on CPU: CUDA only"
    if asked is None and device.type == "cpu" and compile_setting:
        return "skipped on CPU: compiling takes minutes on few cores (--modes fp32,compile runs it)"
    if asked is not None and key not in asked:
        return "not asked (--modes)"
    return ""


def make_step(cfg, device, precision, channels_last, compile_setting=None):
    """A training step of cfg's model on one fixed random batch: engine.train_step with precision and memory format
    as switches."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = resnet.from_config(cfg).to(device, memory_format=fmt)
    opt = optim.make_optimizer(model, cfg)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (cfg.batch_size,), device=device)
    run = model
    if compile_setting:
        torch._dynamo.reset()       # each mode compiles from scratch, as a fresh process would
        run = devices.compile_model(model, dataclasses.replace(cfg, compile=compile_setting))

    scaler = devices.grad_scaler(device, precision)

    def step():     # engine.train_step with precision and memory format as switches
        with devices.autocast(device, precision):
            logits = run(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        devices.backward_step(loss, opt, scaler)
    return step


def time_training(cfg, device, precision, channels_last, compile_setting, steps, warmup):
    """(images/s, compile seconds or None) of training steps of cfg's model on one fixed random batch."""
    step = make_step(cfg, device, precision, channels_last, compile_setting)
    t0 = time.perf_counter()
    step()
    devices.synchronize(device)
    first_s = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    devices.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    devices.synchronize(device)
    step_s = (time.perf_counter() - t0) / steps
    return cfg.batch_size / step_s, max(0.0, first_s - step_s) if compile_setting else None


def profile_step(cfg, device, precision, x, y, rows=25):
    """torch.profiler's table (self time per op) of one epoch's first augmented batch and one training step after a
    warm-up step, channels-last, as the engine trains."""
    step = make_step(cfg, device, precision, channels_last=True)
    step()
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda")
    with torch.profiler.profile(activities=activities) as prof:
        with torch.profiler.record_function("augmentation: data.train_batches, first batch"):
            next(data.train_batches(x, y, cfg, epoch=0))
        with torch.profiler.record_function("training step: forward, backward, optimizer"):
            step()
        devices.synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


# ----------------------------------------------------------------------------

def table(result):
    """The result as Markdown tables: training modes, then input pipelines and augmentations (bench_pipeline's)."""
    lines = ["| mode | precision | img/s | vs eager fp32 | compile s | note |",
             "| --- | --- | --: | --: | --: | --- |"]
    for m in result["modes"]:
        rate = f"{m['img_per_s']:,.0f}" if m["img_per_s"] else "-"
        ratio = f"{m['ratio']:.2f}x" if m["ratio"] else "-"
        compile_s = f"{m['compile_s']:.1f}" if m["compile_s"] is not None else ""
        precision = m["precision"] if m["img_per_s"] else "-"
        lines.append(f"| {m['label']} | {precision} | {rate} | {ratio} | {compile_s} | {m['status']} |")
    return "\n".join(lines + bench_pipeline.table_lines(result))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exp", default="report", help="whose model and optimizer to time (default: report)")
    p.add_argument("--batch-size", type=int,
                   help="default 512 on CUDA; on CPU the report's 128, as a step at 512 takes minutes there")
    p.add_argument("--device", default="auto", choices=config.CHOICES["device"])
    p.add_argument("--modes", help=f"comma list of {','.join(m[0] for m in MODES)} (default: all that apply)")
    p.add_argument("--steps", type=int, help="timed training steps per mode (default 50 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first, the first one compiles (default 10 / 1)")
    p.add_argument("--images", type=int,
                   help="images per epoch of our pipeline, best of 5 epochs (default 45000 / 10000)")
    p.add_argument("--report-images", type=int, help="images per pass of the report's pipeline, best of 5 passes "
                   "(default 20000 / 4000)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="report DataLoader workers")
    p.add_argument("--augmentations", default=",".join(a[0] for a in bench_pipeline.AUGMENTATIONS),
                   help="comma list of the augmentations to time (default: all; '' times none)")
    p.add_argument("--policy-groups", default="4,16,64",
                   help="auto_augment_group sizes to time ta_wide at, besides the default 16 (default 4,16,64; 1 is "
                        "one torchvision call per image: slow)")
    p.add_argument("--aug-images", type=int, help="images per epoch of the augmentation timings (default 10000 / 2000)")
    p.add_argument("--data-dir",
                   help="time the real training split (cifar-100-python/ in this folder) instead of random images")
    p.add_argument("--json", action="store_true", help="write the figures to <out>/bench.json (also after each mode)")
    p.add_argument("--profile", action="store_true",
                   help="also write <out>/profile_<exp>.txt: torch.profiler's table of one step as the engine trains")
    p.add_argument("--out", default="out")
    return p.parse_args()


def resolve(args):
    """(cfg, device, autocast precision) for args; fills in args' defaults for the device (steps, warmup, images) and
    turns --modes (None: all that apply), --augmentations and --policy-groups into sets and a list. Bad values exit."""
    try:
        cfg = config.resolve(args.exp, [("device", args.device)])
        device = devices.setup(cfg)
    except config.UserError as e:
        sys.exit(f"error: {e}")
    cuda = device.type == "cuda"
    amp = devices.pick_precision(cfg, device)[0]       # the engine's autocast precision here; bf16 where that is fp32
    amp = "bf16" if amp == "fp32" else amp
    cfg.batch_size = args.batch_size or (512 if cuda else 128)
    args.steps, args.warmup = args.steps or (50 if cuda else 2), max(1, args.warmup or (10 if cuda else 1))
    args.images = args.images or (45_000 if cuda else 10_000)
    args.report_images = args.report_images or (20_000 if cuda else 4_000)
    args.aug_images = args.aug_images or (10_000 if cuda else 2_000)
    args.modes = set(args.modes.split(",")) if args.modes else None
    if args.modes and args.modes - {m[0] for m in MODES}:
        sys.exit(f"error: unknown mode(s) {', '.join(sorted(args.modes - {m[0] for m in MODES}))}; known: "
                 f"{', '.join(m[0] for m in MODES)}")
    args.augmentations = set(filter(None, args.augmentations.split(",")))
    known = [a[0] for a in bench_pipeline.AUGMENTATIONS]
    if args.augmentations - set(known):
        sys.exit(f"error: unknown augmentation(s) {', '.join(sorted(args.augmentations - set(known)))}; "
                 f"known: {', '.join(known)}")
    groups = [int(g) for g in args.policy_groups.split(",") if g.isdigit() and int(g) > 0]
    if len(groups) != len([g for g in args.policy_groups.split(",") if g]):
        sys.exit(f"error: --policy-groups expects a comma list of positive integers, got '{args.policy_groups}'")
    args.policy_groups = groups
    return cfg, device, amp


def load_images(args, cfg):
    """(images, labels): the training split of --data-dir, else random uint8 images, as many as the largest timing."""
    if args.data_dir:
        try:
            return data.load(dataclasses.replace(cfg, data_dir=args.data_dir, download=False))["train"]
        except config.UserError as e:
            sys.exit(f"error: {e}")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (max(args.images, args.report_images, args.aug_images), 3, 32, 32), dtype=torch.uint8,
                      generator=g)
    return x, torch.randint(0, 100, (len(x),), generator=g)


def save(result, args):
    """The figures so far to <out>/bench.json, where --json asks for them."""
    if args.json:
        out = Path(args.out) / "bench.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_json(result, out)


def time_modes(result, args, cfg, device, amp):
    """Training images/s of each mode of MODES that applies, and its ratio to eager fp32, into result."""
    cuda = device.type == "cuda"
    baseline = None
    for key, label, autocast, channels_last, compile_setting in MODES:
        precision = amp if autocast else "fp32"
        row = {"key": key, "label": f"{amp} {label}" if key == "bf16" else label,
               "precision": precision if autocast or not cuda else "tf32",
               "img_per_s": None, "ratio": None, "compile_s": None,
               "status": skip_reason(key, compile_setting, device, args.modes)}
        if not row["status"]:
            try:
                rate, compile_s = time_training(cfg, device, precision, channels_last, compile_setting, args.steps,
                                                args.warmup)
                baseline = baseline or (rate if key == "fp32" else None)
                row.update(img_per_s=round(rate, 1), compile_s=compile_s and round(compile_s, 1),
                           ratio=round(rate / baseline, 3) if baseline else None, status="measured")
                result["throughput"][key] = row["img_per_s"]
            except Exception as e:      # one mode failing (a compiler missing, out of memory) must not end the table
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            if cuda:
                torch.cuda.empty_cache()
            print(f"{label} | {row['status']} | {row['img_per_s'] or '-'} img/s", flush=True)
        result["modes"].append(row)
        save(result, args)


def finish(result, args, cfg, device, x, y):
    """The roofline beside the modes, the tables, the profile where --profile asks for it, and the closing line."""
    result["roofline"] = roofline.measure(resnet.from_config(cfg), cfg, device, result["throughput"])
    save(result, args)
    print()
    print(table(result))
    print(roofline.line(result["roofline"]))
    if args.profile:
        precision = devices.pick_precision(cfg, device)[0]      # as the engine trains here
        path = Path(args.out) / f"profile_{args.exp}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.atomic_open(path) as f:
            f.write(f"{args.exp} | batch {cfg.batch_size} | {result['device']} | {precision}, channels-last (the epoch's "
                    f"crop + flip runs at its first batch) | torch {result['versions']['torch']}\n"
                    + profile_step(cfg, device, precision, x[:args.images].to(device), y[:args.images].to(device)) + "\n")
        print(f"profile | written {path}")
    print(f"\npipeline_speedup {result['pipeline_speedup']:.1f}x (ours over the report's DataLoader, images/s)"
          + (f" | written {Path(args.out) / 'bench.json'}" if args.json else ""))


def main():
    args = parse_args()
    cfg, device, amp = resolve(args)
    x, y = load_images(args, cfg)
    v = devices.versions()
    params = resnet.from_config(cfg).num_params()
    result = {"exp": args.exp, "blocks": cfg.blocks, "channels": cfg.channels, "params": params,
              "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "steps": args.steps, "warmup": args.warmup,
              "device": v["gpu"] or f"cpu, {torch.get_num_threads()} threads", "versions": v,
              "data": args.data_dir or "random uint8", "modes": [], "throughput": {}, "pipeline": {},
              "augmentation": []}
    print(f"bench | {args.exp} model: blocks {cfg.blocks} channels {cfg.channels}, {params / 1e6:.2f}M params, "
          f"{cfg.optimizer} | batch {cfg.batch_size} | {result['device']} | torch {v['torch']} cuda {v['cuda']}",
          flush=True)
    result.update(bench_pipeline.measure(args, cfg, device, x, y))
    save(result, args)
    time_modes(result, args, cfg, device, amp)
    finish(result, args, cfg, device, x, y)


if __name__ == "__main__":
    main()
