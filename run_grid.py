"""Run a grid of configs from experiments.json one after another; resumable; a ranked table at the end.

    python run_grid.py --grid smoke_grid                      # 4 tiny configs on generated data (CPU)
    python run_grid.py --grid report_grid --data-dir ~/data   # the report's 24-run grid
    python run_grid.py --grid report_grid --list              # the configs with their indices
    python run_grid.py --grid report_grid --index 5           # config 5 only (one SLURM array task)
    for i in 0 1 2 3; do CUDA_VISIBLE_DEVICES=$i python run_grid.py --grid report_grid --shard $i/4 & done; wait
                                                              # four GPUs, no SLURM: configs i, i + 4, i + 8, ...
    python run_grid.py --grid report_grid --epochs 5          # every config for 5 epochs (use another --out)
    python run_grid.py --grid cpu_seeds --data-dir ~/data     # the cpu recipe over seeds 0, 1, 2: mean +- std

A grid in experiments.json is a base experiment plus a list of values per key; its configs are the
product of the lists (a one-value list just sets the key). Each run writes out/<grid>/<run>.{csv,ckpt,
last.ckpt,json}; out/<grid>.csv holds one row per config, updated as each run ends (a grid that varies `seed`
also gets a "mean" row per config but its seed: mean and std (n) of best val and test accuracy). Running the grid
again skips finished configs and resumes an interrupted one from its last.ckpt. A config that fails for any
reason gets a `failed` row with the reason and the grid goes on; it then exits with status 1. Shards of one grid
run at the same time (several GPUs, SLURM array tasks) share out/<grid>.csv: each row is written under a lock.
"""
import argparse
import csv
import itertools
import json
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import config
import console
import devices
import distributed
import files
import resnet
import run_train
import stops
import trainer

SHORT = {"lr": "lr", "weight_decay": "wd", "blocks": "b", "channels": "c", "batch_size": "bs",
         "label_smoothing": "ls", "optimizer": "", "schedule": ""}     # key prefixes in run names
RESULTS = ["params", "best_val_acc", "best_epoch", "test_acc", "train_s", "status", "reason"]
SPREAD = ["n", "best_val_acc_std", "test_acc_std"]      # the columns of a grid that varies the seed: its mean rows


def run_name(varied):
    """A readable file name from the varied values, e.g. lr0.002_wd0.0001_b2-2-2_c48-96-192."""
    parts = []
    for key, value in varied.items():
        text = "-".join(map(str, value)) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)
        parts.append(SHORT.get(key, key) + text)
    return "_".join(parts) or "base"


def grid_configs(grid, cli=()):
    """(axes {key: values}, [(run name, {key: value}, Config)]) of a grid; cli (key, value) pairs apply to every run."""
    grids = config.read_experiments().get("grids", {})
    if grid not in grids:
        raise config.UserError(f"unknown grid '{grid}'{config.suggest(grid, grids)}; known: {', '.join(grids) or 'none'}")
    spec = {k: v for k, v in grids[grid].items() if k not in ("base", "note")}
    if "base" not in grids[grid]:
        raise config.UserError(f"grid '{grid}' names no \"base\" experiment")
    for key, values in spec.items():
        if not isinstance(values, list) or not values:
            raise config.UserError(f"grid '{grid}': '{key}' must be a non-empty list of values, got {values!r}")
    axes = {k: v for k, v in spec.items() if len(v) > 1}
    fixed = [(k, v[0]) for k, v in spec.items() if len(v) == 1]
    clash = sorted(axes.keys() & {k for k, _ in cli})
    if clash:
        raise config.UserError(f"grid '{grid}' varies {', '.join(clash)}: it cannot also be set on the command line")
    runs = []
    for values in itertools.product(*axes.values()):
        varied = dict(zip(axes, values))
        cfg = config.resolve(grids[grid]["base"], fixed + list(varied.items()) + list(cli))
        name = run_name(varied)
        runs.append((name, varied, replace(cfg, out_dir=str(Path(cfg.out_dir) / grid), name=name)))
    if len({name for name, _, _ in runs}) < len(runs):
        raise config.UserError(f"grid '{grid}' gives two configs the same run name: make its values differ more")
    return axes, runs


def shard_indices(n, shard):
    """The indices i < n of the configs of shard "I/N": those with i mod N == I."""
    i, sep, count = shard.partition("/")
    if not (sep and i.isdigit() and count.isdigit() and int(i) < int(count)):
        raise config.UserError(f"--shard expects I/N with 0 <= I < N, e.g. 0/4, got '{shard}'")
    return list(range(int(i), n, int(count)))


# ----------------------------------------------------------------------------
# the summary CSV, one row per config

def read_rows(path):
    """Every row of out/<grid>.csv, the configs' and the mean rows; empty if it does not exist yet."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(path):
    """{run name: row} of the configs in out/<grid>.csv (not its mean rows); empty if it does not exist yet."""
    return {r["run"]: r for r in read_rows(path) if r["status"] != "mean"}


def update_summary(path, row, columns):
    """Replace this run's row under a lock (the tasks of a SLURM array write the same file at once); a grid that
    varies the seed also gets its mean rows, recomputed."""
    with files.run_lock(Path(f"{path}.lock"), wait=True):
        rows = read_summary(path)
        rows[row["run"]] = row
        rows = sorted(rows.values(), key=lambda r: int(r["index"]))
        files.write_csv(path, columns, rows + (seed_means(rows) if "group" in columns else []))


def mean_std(values):
    """'mean', 'std' of fractions as the CSV writes them; std (n - 1) is empty for a single value."""
    return f"{statistics.mean(values):.5f}", f"{statistics.stdev(values):.5f}" if len(values) > 1 else ""


def seed_means(rows):
    """One "mean" row per group of configs that differ only by seed: mean and std (n) of best val and test
    accuracy over the group's configs done."""
    groups = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(r["group"], []).append(r)
    means = []
    for group, done in groups.items():
        (val, val_std), (test, test_std) = (mean_std([float(r[k]) for r in done]) for k in ("best_val_acc", "test_acc"))
        means.append({**done[0], "index": "", "run": f"{group} (mean)", "seed": json.dumps([int(r["seed"]) for r in done]),
                      "best_val_acc": val, "best_val_acc_std": val_std, "test_acc": test, "test_acc_std": test_std,
                      "n": len(done), "best_epoch": "", "train_s": f"{statistics.mean(float(r['train_s']) for r in done):.1f}",
                      "status": "mean", "reason": ""})
    return sorted(means, key=lambda r: -float(r["best_val_acc"]))


def result_row(index, name, varied, cfg, status, s=None, reason=""):
    row = {"index": index, "run": name, **{k: json.dumps(v) if isinstance(v, list) else v for k, v in varied.items()},
           "params": s["params"] if s else resnet.from_config(cfg).num_params(),
           "status": status, "reason": reason}
    if "seed" in varied:        # the configs that differ only by seed make one group
        row["group"] = run_name({k: v for k, v in varied.items() if k != "seed"})
    if s:
        row.update(best_val_acc=f"{s['best_val_acc']:.5f}", best_epoch=s["best_epoch"],
                   test_acc=f"{s['test_acc']:.5f}", train_s=f"{s['train_s']:.1f}")
    return row


def print_ranked(path):
    """Every config of the summary, the best validation accuracy first; then, where the grid varies the seed, its
    groups by mean validation accuracy, with mean +- std (n) of best val and test accuracy."""
    rows = sorted(read_summary(path).values(), key=lambda r: (r["status"] != "done", -float(r["best_val_acc"] or 0)))
    width = max([len(r["run"]) for r in rows] + [3])
    print(f"{'rank':>4}  {'run':{width}}  {'val %':>6}  {'epoch':>5}  {'test %':>6}  {'params':>7}  {'train s':>7}  status")
    for rank, r in enumerate(rows, 1):
        pct = {k: f"{100 * float(r[k]):.2f}" if r[k] else "-" for k in ("best_val_acc", "test_acc")}
        print(f"{rank:4d}  {r['run']:{width}}  {pct['best_val_acc']:>6}  {r['best_epoch'] or '-':>5}  "
              f"{pct['test_acc']:>6}  {int(r['params']) / 1e6:6.2f}M  {r['train_s'] or '-':>7}  {r['status']}")
    means = [r for r in read_rows(path) if r["status"] == "mean"]
    if means:
        width = max(len(r["group"]) for r in means + [{"group": "group"}])
        print(f"{'rank':>4}  {'group':{width}}  {'val % (mean +- std, n)':>22}  {'test % (mean +- std, n)':>23}  seeds")
        for rank, r in enumerate(means, 1):
            print(f"{rank:4d}  {r['group']:{width}}  {spread(r, 'best_val_acc'):>22}  {spread(r, 'test_acc'):>23}  "
                  f"{r['seed']}")
    print(f"summary: {path}")


def spread(row, key):
    """'63.08 +- 0.21 (3)' from a mean row: percent, std left out where one seed is done."""
    std = f" +- {100 * float(row[key + '_std']):.2f}" if row[key + "_std"] else ""
    return f"{100 * float(row[key]):.2f}{std} ({row['n']})"


# ----------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(parents=[run_train.get_args_parser(add_help=False)], description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", required=True, help="grid name in experiments.json (\"grids\")")
    p.add_argument("--index", type=int, help="run only config I (see --list); a SLURM array task id")
    p.add_argument("--shard", metavar="I/N", help="run only the configs whose index is I mod N, e.g. one shard per GPU")
    p.add_argument("--list", action="store_true", help="print the configs with their indices and status, run nothing")
    args = p.parse_args()
    if distributed.env_ranks()[1] > 1:      # each process would run the whole grid into the same files
        sys.exit("error: run_grid.py runs one process per config: start it with python (--shard I/N for several "
                 "GPUs), not torchrun or srun with several tasks" if distributed.is_main() else 1)
    try:
        axes, runs = grid_configs(args.grid, run_train.overrides(args))
        summary = Path(runs[0][2].out_dir + ".csv")
        columns = ["index", "run", *axes, *RESULTS] if "seed" not in axes else \
            ["index", "run", "group", *axes, *RESULTS, *SPREAD]
        if args.index is not None and args.shard:
            raise config.UserError("--index and --shard each choose the configs to run: give one of them")
        if args.index is not None and not 0 <= args.index < len(runs):
            raise config.UserError(f"grid '{args.grid}' has configs 0-{len(runs) - 1}, got --index {args.index}")
        indices = [args.index] if args.index is not None else \
            shard_indices(len(runs), args.shard) if args.shard else list(range(len(runs)))
        if args.list:
            done = read_summary(summary)
            for i in indices:
                name, varied, _ = runs[i]
                values = " ".join(f"{k}={json.dumps(v)}" for k, v in varied.items())
                print(f"{i:3d}  {name}  {values}  {done[name]['status'] if name in done else '-'}")
            return
        if not indices:
            print(f"grid {args.grid}: shard {args.shard} holds none of its {len(runs)} configs; nothing to run")
            return
        for i in indices:       # a compile asked for where it cannot run: one error line before any run starts
            devices.use_compile(runs[i][2], devices.pick_device(runs[i][2]))
        first = runs[indices[0]][2]
        epochs = "epochs varied" if "epochs" in axes else f"{first.epochs} epochs each"
        shard = f" (shard {args.shard})" if args.shard else ""
        print(f"grid {args.grid} | {len(indices)} of {len(runs)} configs{shard} of {' x '.join(axes) or 'one'} | "
              f"{console.device_text(first, devices.pick_device(first))} | {epochs} | "
              f"files {first.out_dir}/, {summary}", flush=True)
        stops.install_stop_handlers()
        done = {r["run"] for r in read_summary(summary).values() if r["status"] == "done"}
        spent, failed = [], []       # seconds per config done (a finished config's own wall time); failed runs
        for n, i in enumerate(indices):
            name, varied, cfg = runs[i]
            left = sum(runs[j][0] not in done for j in indices[n:])
            eta = f" | grid eta {console.duration(sum(spent) / len(spent) * left)}" if spent else ""
            print(f"== {args.grid} [{i}/{len(runs) - 1}] {name} | config {n + 1} of {len(indices)}{eta}", flush=True)
            t0 = time.time()
            try:
                s = trainer.train(cfg, resume=files.run_paths(cfg)["last"].exists())
                row = result_row(i, name, varied, cfg, "done", s)
                spent.append(s["wall_s"])
            except (stops.Preempted, KeyboardInterrupt) as e:      # a stop signal, or a second Ctrl-C
                update_summary(summary, result_row(i, name, varied, cfg, "interrupted"), columns)
                print(e if isinstance(e, stops.Preempted) else stops.STOPPED_AT_ONCE, file=sys.stderr)
                sys.exit(getattr(e, "status", stops.INTERRUPTED_EXIT))
            except Exception as e:          # any other failure (divergence, out of memory, other settings, a bug)
                if not isinstance(e, config.UserError):
                    traceback.print_exc()
                reason = (str(e).splitlines() or [""])[0]
                reason = reason if isinstance(e, config.UserError) else f"{type(e).__name__}: {reason}"
                print(f"failed: {reason}", flush=True)
                row = result_row(i, name, varied, cfg, "failed", reason=reason)
                failed.append(name)
                spent.append(time.time() - t0)
            update_summary(summary, row, columns)
    except config.UserError as e:
        sys.exit(f"error: {e}")
    print_ranked(summary)
    if failed:
        sys.exit(f"error: {len(failed)} of {len(indices)} configs failed ({', '.join(failed)}): "
                 f"see the status and reason columns of {summary}")


if __name__ == "__main__":
    main()
