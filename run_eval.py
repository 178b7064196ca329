"""Evaluate a checkpoint on its own: loss, top-1, top-5, per-class accuracy and the two baselines.

    python run_eval.py out/best.ckpt                 # test split, TTA as the run was configured
    python run_eval.py out/best.ckpt --split val --no-tta
    python run_eval.py out/smoke.ckpt --data-dir /tmp/data
    python run_eval.py out/best.last.ckpt            # the weights of the last save: out/best.last.eval.json
    python run_eval.py out/best_v1.ckpt              # a renamed copy: out/best_v1.eval.json, named after the file
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch

import console
import data
import devices
import engine
import files
from config import CHOICES, UserError


def eval_data_dir(asked, stored):
    """--data-dir, else $CIFAR100_ROOT, else the training run's folder where it exists on this machine, else ./data."""
    if asked is not None:
        return asked
    if os.environ.get("CIFAR100_ROOT"):
        return os.environ["CIFAR100_ROOT"]
    return stored if stored and Path(stored).expanduser().is_dir() else "data"


def evaluate_checkpoint(path, split="test", tta=None, data_dir=None, device="auto"):
    """Everything run_eval.py prints, as a dict; per-class accuracies under 'per_class'."""
    ckpt = files.load_checkpoint(path)
    cfg = files.config_from(ckpt)
    cfg.device = device
    cfg.data_dir = eval_data_dir(data_dir, cfg.data_dir)
    tta = cfg.tta if tta is None else tta
    device = devices.setup(cfg)
    last = "optimizer" in ckpt          # a .last.ckpt: the weights of its save, not those of the best epoch
    averaged = "EMA" if cfg.ema else "raw"
    if last:
        step = ckpt.get("step_in_epoch", 0)
        when = f"epoch {ckpt['epoch'] + 1} step {step}" if step else f"end of epoch {ckpt['epoch']}"
        weights = f"last checkpoint, {when} ({averaged} weights, not the best epoch's)"
        ckpt = {**ckpt, "model": files.trained_weights(ckpt)}
    else:
        weights = f"best epoch {ckpt.get('epoch')} ({averaged} weights)"
    model = engine.model_from(ckpt, device)
    d = data.load(cfg, device)
    x, y = d[split]
    plain, flipped = engine.predict(model, x, devices.pick_precision(cfg, device)[0], translate=cfg.tta_translate)
    logits = flipped if tta else plain
    result = {"checkpoint": str(path), "name": cfg.name, "weights": weights, "last": last, "split": split, "tta": tta,
              "tta_translate": cfg.tta_translate,
              "n": len(y), **engine.scores(plain, flipped, y, tta), "epoch": ckpt.get("epoch"),
              "val_acc_at_save": ckpt.get("metrics", {}).get("val_acc")}
    n_classes = len(d["classes"])
    majority = torch.bincount(d["train"][1], minlength=n_classes).argmax()
    result["baselines"] = {"majority_class": {"class": d["classes"][majority], "acc": (y == majority).float().mean().item()},
                           "uniform_random": {"acc": 1 / n_classes, "loss": math.log(n_classes)}}
    pred = logits.argmax(1)
    counts = torch.bincount(y, minlength=n_classes)
    hits = torch.bincount(y[pred == y], minlength=n_classes)
    result["per_class"] = [{"class": i, "name": name, "n": int(counts[i]), "acc": (hits[i] / counts[i]).item() if counts[i] else ""}
                           for i, name in enumerate(d["classes"])]
    return result


def write_outputs(result):
    """<checkpoint file>[.val].eval.json and the matching .per_class.csv, beside the checkpoint (files.eval_paths)."""
    json_path, csv_path = files.eval_paths(result["checkpoint"], result["split"])
    try:
        files.write_json({k: v for k, v in result.items() if k != "per_class"}, json_path)
        files.write_csv(csv_path, ["class", "name", "n", "acc"], result["per_class"])
    except OSError as e:       # a read-only or full folder beside the checkpoint
        raise UserError(f"cannot write {e.filename2 or e.filename or json_path.parent}: {e.strerror or e}")
    return json_path, csv_path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="a .ckpt written by run_train.py")
    p.add_argument("--split", default="test", choices=["test", "val"])
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="average with horizontally flipped images (default: as the run was configured)")
    p.add_argument("--data-dir", help="folder holding cifar-100-python/ (default: $CIFAR100_ROOT, else the run's "
                                      "folder if it exists here, else ./data)")
    p.add_argument("--device", default="auto", choices=CHOICES["device"])
    args = p.parse_args()
    try:
        r = evaluate_checkpoint(args.checkpoint, args.split, args.tta, args.data_dir, args.device)
        written = write_outputs(r)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:       # one not of the result files (write_outputs names those)
        sys.exit(f"error: {e.strerror or e}: {e.filename}")
    print(f"{r['name']} {r['weights']} | {r['split']} n={r['n']} tta={r['tta']} | loss {r['loss']:.4f} | "
          f"top-1 {100 * r['acc']:.2f}% | top-5 {100 * r['top5']:.2f}% | "
          f"top-1 without TTA {100 * r['acc_plain']:.2f}%, with {console.tta_name(r['tta_translate'])} {100 * r['acc_tta']:.2f}%")
    b = r["baselines"]
    print(f"baselines | majority class ({b['majority_class']['class']}) {100 * b['majority_class']['acc']:.2f}% | "
          f"uniform random {100 * b['uniform_random']['acc']:.2f}% (loss {b['uniform_random']['loss']:.4f})")
    worst = sorted((c for c in r["per_class"] if c["n"]), key=lambda c: c["acc"])
    print("hardest classes: " + ", ".join(f"{c['name']} {100 * c['acc']:.0f}%" for c in worst[:5]))
    print("files: " + " ".join(map(str, written)))


if __name__ == "__main__":
    main()
