"""The input pipelines' speed, for bench.py: ours (data.train_batches: batched crop + flip + normalise on the
device) against the report's torchvision transforms per PIL image through a DataLoader, and the cost of each
augmentation on top of crop + flip. bench.py runs them and prints their tables:

    python bench.py --device cpu --modes fp32 --augmentations cutout,ta_wide
"""
import time

import torch
from PIL import Image

import config
import data
import devices

# key, label, the config keys that switch the augmentation on (crop + flip always on)
AUGMENTATIONS = [("crop_flip", "crop + flip", {}), ("cutout", "+ cutout 8", {"cutout": 8}),
                 ("mixup", "+ mixup 0.8", {"mixup": 0.8}), ("cutmix", "+ cutmix 1.0", {"cutmix": 1.0}),
                 ("ta_wide", "+ ta_wide", {"auto_augment": "ta_wide"}), ("ra", "+ ra", {"auto_augment": "ra"}),
                 ("aa_cifar10", "+ aa_cifar10", {"auto_augment": "aa_cifar10"})]


def time_ours(x, y, batch_size, epochs, **settings):
    """Best images/s over `epochs` timed epochs of data.train_batches (shuffle, crop, flip, normalise on x's device, and
    the augmentations that the config settings switch on)."""
    cfg = config.Config(batch_size=batch_size, **settings)
    rates = []
    for epoch in range(epochs + 1):         # epoch 0 warms up
        devices.synchronize(x.device)
        n, t0 = 0, time.perf_counter()
        for xb, _ in data.train_batches(x, y, cfg, epoch):
            n += len(xb)
        devices.synchronize(x.device)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates[1:])


class PILImages(torch.utils.data.Dataset):
    """Like torchvision's CIFAR100 dataset: HWC uint8 arrays, each made a PIL image and transformed on access."""

    def __init__(self, x, y, transform):
        self.images, self.labels, self.transform = x.permute(0, 2, 3, 1).numpy(), y.tolist(), transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def time_report(x, y, batch_size, workers, device, repeats):
    """Best images/s over `repeats` passes of the report's pipeline, each timed after its first batch (workers
    started) and including the copy to the device."""
    from torchvision import transforms as T
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(data.MEAN, data.STD)])
    loader = torch.utils.data.DataLoader(PILImages(x, y, transform), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.type == "cuda")
    rates = []
    for _ in range(repeats):
        batches = iter(loader)
        next(batches)
        n, t0 = 0, time.perf_counter()
        for xb, yb in batches:
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            n += len(xb)
        devices.synchronize(device)
        rates.append(n / (time.perf_counter() - t0))
    return max(rates)


def time_augmentations(x, y, batch_size, keys, groups):
    """Rows {key, label, group, img_per_s, ratio} of data.train_batches with each augmentation of keys, the ratio to
    crop + flip alone (best of 2 epochs); the policies at the default group, ta_wide at each of groups as well."""
    default, rows, base = config.Config().auto_augment_group, [], None
    for key, label, settings in AUGMENTATIONS:
        if key not in keys:
            continue
        sizes = [None] if "auto_augment" not in settings else sorted({default, *groups}) if key == "ta_wide" else [default]
        for group in sizes:
            rate = time_ours(x, y, batch_size, epochs=2, **settings, **({"auto_augment_group": group} if group else {}))
            base = rate if key == "crop_flip" else base
            rows.append({"key": key, "label": label + (f", groups of {group}" if group else ""), "group": group,
                         "img_per_s": round(rate), "ratio": round(rate / base, 3) if base else None})
            print(f"augmentation | {rows[-1]['label']} | {rate:,.0f} img/s", flush=True)
    return rows


def table_lines(result):
    """bench.json's pipeline and augmentation figures as Markdown table lines (none where they were not timed)."""
    lines, p = [], result["pipeline"]
    if p:
        lines += ["", "| input pipeline | img/s | ratio |", "| --- | --: | --: |",
                  f"| ours: data.train_batches, crop + flip + normalise batched on {result['device']} | "
                  f"{p['ours_img_per_s']:,.0f} | {result['pipeline_speedup']:.1f}x |",
                  f"| report: torchvision transforms per PIL image, DataLoader with {p['workers']} workers | "
                  f"{p['report_img_per_s']:,.0f} | 1.0x |"]
    if result["augmentation"]:
        lines += ["", f"| augmentation (data.train_batches on {result['device']}, batch {result['batch_size']}) "
                  f"| img/s | vs crop + flip |", "| --- | --: | --: |"]
        for a in result["augmentation"]:
            ratio = f"{a['ratio']:.2f}x" if a["ratio"] else "-"
            lines.append(f"| {a['label']} | {a['img_per_s']:,} | {ratio} |")
    return lines


def measure(args, cfg, device, x, y):
    """Our input pipeline against the report's, then each augmentation's cost, as bench.py's arguments ask: the
    "pipeline", "pipeline_speedup" and "augmentation" figures of bench.json."""
    n_ours, n_report, n_aug = args.images, args.report_images, args.aug_images
    ours = time_ours(x[:n_ours].to(device), y[:n_ours].to(device), cfg.batch_size, epochs=5)
    report = time_report(x[:n_report], y[:n_report], cfg.batch_size, args.workers, device, repeats=5)
    result = {"pipeline": {"ours_img_per_s": round(ours), "report_img_per_s": round(report), "workers": args.workers,
                           "ours_images": min(n_ours, len(x)), "report_images": min(n_report, len(x))},
              "pipeline_speedup": round(ours / report, 2)}
    print(f"pipeline | ours {ours:,.0f} img/s | report {report:,.0f} img/s | "
          f"pipeline_speedup {result['pipeline_speedup']:.1f}x", flush=True)
    if args.augmentations:
        result["augmentation"] = time_augmentations(x[:n_aug].to(device), y[:n_aug].to(device), cfg.batch_size,
                                                    args.augmentations, args.policy_groups)
    return result
