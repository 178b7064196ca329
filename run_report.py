"""Write the study's report from what the runs left in out/: one Markdown file, PNG figures beside it.

    python run_report.py --exp smoke --grid smoke_grid              # -> out/report.md (+ out/report_*.png)
    python run_report.py --exp report best --compare report,best --grid report_grid -o out/study.md

Figures need matplotlib (`pip install matplotlib`); without it the report keeps its tables.
"""
import argparse
import csv
import json
import math
import os
import sys
from pathlib import Path

import console
import files
from report_figures import plot_compare, plot_curves, plot_grid, plot_lrfind, pyplot, validated


def read_csv(path):
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_json(path):
    return json.loads(path.read_text()) if path.is_file() else None


def pct(x):
    return f"{100 * float(x):.2f}%"


def pct_or_dash(x):
    """pct, or '-' where a file from before that figure was recorded lacks it."""
    return "-" if x in (None, "") else pct(x)


def spread(row, key):
    """'63.08% ± 0.21 (n=3)' from a grid's mean row; no std where one seed is done."""
    std = f" ± {100 * float(row[key + '_std']):.2f}" if row[key + "_std"] else ""
    return f"{pct(row[key])}{std} (n={row['n']})"


def tta_name(evaluation):
    """The TTA of a run_eval.py record: 'no TTA', 'flip TTA' or 'flip + 1 px translate TTA'."""
    return console.tta_name(evaluation.get("tta_translate", 0)) if evaluation["tta"] else "no TTA"


def table(headers, rows):
    return [f"| {' | '.join(headers)} |", f"|{' --- |' * len(headers)}"] + \
           [f"| {' | '.join(str(v) for v in row)} |" for row in rows] + [""]


def not_run(what, command):
    return [f"Not run yet: {what}. Make it with `{command}`.", ""]


# ----------------------------------------------------------------------------
# sections: each function returns the Markdown lines of one section or of a group of them, headings included

def data_section(out, dataset, fig_dir):
    md = ["## 1. Data", ""]
    stats = read_json(out / f"{dataset}.data.json")
    if not stats:
        return md + not_run("data statistics", f"python data.py --dataset {dataset} --out {out}")
    md += table(["split", "images", "per class (min-max)"],
                [[s, stats[s], "-".join(map(str, stats[f"{s}_per_class"]))] for s in ("train", "val", "test")])
    md += [f"Training split mean {stats['mean']}, std {stats['std']} (from `{out}/{dataset}.data.json`).", ""]
    samples = out / Path(stats["samples_png"]).name      # beside the JSON, also once the folder was moved
    if samples.is_file():
        md += [f"![augmented training images]({os.path.relpath(samples, fig_dir)})", "",
               f"*Augmented training images* (from `{samples}`)", ""]
    return md


def baselines_section(out, evals, done, first):
    md = ["## 2. Baselines", ""]
    if not done:
        return md + not_run("baselines", f"python run_eval.py {out}/{first}.ckpt")
    b = evals[done[0]]["baselines"]
    md += table(["predictor", f"{evals[done[0]]['split']} accuracy"],
                [[f"majority class ({b['majority_class']['class']})", pct(b["majority_class"]["acc"])],
                 ["uniform random", pct(b["uniform_random"]["acc"])]] +
                [[f"model `{e}` ({tta_name(evals[e])})", pct(evals[e]["acc"])] for e in done])
    return md + [f"(from `{out}/{done[0]}.eval.json`)", ""]


def check_sections(out, summaries, first, figure):
    """3. Model, 4. First-batch loss (from the runs' JSON summaries) and 5. Overfitting 64 images."""
    md = ["## 3. Model", ""]
    rows = [[e, s["config"]["blocks"], s["config"]["channels"], f"{s['params']:,}"] for e, s in summaries.items() if s]
    md += table(["run", "blocks", "channels", "parameters"], rows) + [f"(from `{out}/<run>.json`)", ""] if rows else \
        not_run("training", f"python run_train.py --exp {first}")
    md += ["## 4. First-batch loss", ""]
    rows = [[e, f"{s['first_batch_loss']:.4f}", f"{math.log(100):.4f}"] for e, s in summaries.items() if s]
    md += table(["run", "loss of the first batch, before any update", "ln 100"], rows) if rows else \
        not_run("training", f"python run_train.py --exp {first}")
    md += ["## 5. Overfitting 64 images", ""]
    overfit = read_csv(out / "overfit64.csv")
    if not overfit:
        return md + not_run("the overfit check", "python run_train.py --exp overfit64")
    last = overfit[-1]
    md += [f"After {last['epoch']} epochs on 64 training images without augmentation: training loss "
           f"{float(last['train_loss']):.4f}, training accuracy {pct(last['train_acc'])} (from `{out}/overfit64.csv`).", ""]
    return md + figure("overfit64", "overfit64: loss and accuracy", f"{out}/overfit64.csv", plot_curves, overfit,
                       "overfit64")


def search_sections(out, exps, grid, figure):
    """6. LR finder, each run's LR range test, and 7. Grid search, the grid's runs ranked."""
    md = ["## 6. LR finder", ""]
    for e in exps:
        rows, info = read_csv(out / f"{e}.lrfind.csv"), read_json(out / f"{e}.lrfind.json")
        if not (rows and info):
            md += not_run(f"the LR finder for {e}", f"python run_lrfind.py --exp {e}")
            continue
        if not info["suggested_lr"]:
            md += [f"`{e}`: the loss never fell over {info['iters']} steps: widen --start/--end "
                   f"(from `{out}/{e}.lrfind.json`).", ""]
        else:
            lo, hi = info["falling_range"]
            md += [f"`{e}`: suggested LR (steepest descent) {info['suggested_lr']:.2e}; min-loss LR / 10 "
                   f"{info['min_div10_lr']:.2e}; loss falls from {lo:.1e} to {hi:.1e} (from `{out}/{e}.lrfind.json`).", ""]
        md += figure(f"lrfind_{e}", f"LR range test of {e}", f"{out}/{e}.lrfind.csv", plot_lrfind, rows, info)
    md += ["## 7. Grid search", ""]
    grid_rows = read_csv(out / f"{grid}.csv") if grid else None
    if not grid_rows:
        return md + not_run("a grid", f"python run_grid.py --grid {grid or 'smoke_grid'}")
    ranked = sorted((r for r in grid_rows if r["best_val_acc"] and r["status"] != "mean"),
                    key=lambda r: -float(r["best_val_acc"]))
    md += table(["rank", "run", "best val acc", "epoch", "params", "train s", "status"],
                [[i + 1, r["run"], pct(r["best_val_acc"]), r["best_epoch"], r["params"], r["train_s"], r["status"]]
                 for i, r in enumerate(ranked)]) + [f"(from `{out}/{grid}.csv`)", ""]
    means = [r for r in grid_rows if r["status"] == "mean"]       # a grid over seeds: its configs' spread
    if means:
        md += ["The configs that differ only by seed, by mean best validation accuracy (mean ± std over the "
               "seeds done, n of them):", ""]
        md += table(["rank", "config", "best val acc", "test acc", "seeds", "mean train s"],
                    [[i + 1, r["group"], spread(r, "best_val_acc"), spread(r, "test_acc"), r["seed"], r["train_s"]]
                     for i, r in enumerate(means)]) + [f"(from `{out}/{grid}.csv`)", ""]
    return md + figure(f"grid_{grid}", f"grid {grid} ranked", f"{out}/{grid}.csv", plot_grid, ranked, grid)


def training_sections(out, exps, compare, figure):
    """8. Training, each run's epoch log, and 9. Comparisons, the validation curves of compare (else of exps)."""
    md = ["## 8. Training", ""]
    for e, rows in {e: read_csv(out / f"{e}.csv") for e in exps}.items():
        if not rows:
            md += not_run(f"training of {e}", f"python run_train.py --exp {e}")
            continue
        best = max(validated(rows), key=lambda r: float(r["val_acc"]), default=None)
        val = f"best validation accuracy {pct(best['val_acc'])} at epoch {best['epoch']}" if best else "none validated yet"
        md += [f"`{e}`: {len(rows)} epochs, {val}, "
               f"final training loss {float(rows[-1]['train_loss']):.4f}, {float(rows[-1]['elapsed_s']):.1f} s in all "
               f"(from `{out}/{e}.csv`).", ""]
        md += figure(f"curves_{e}", f"{e}: loss and accuracy", f"{out}/{e}.csv", plot_curves, rows, e)
    md += ["## 9. Comparisons", ""]
    runs = {n: validated(read_csv(out / f"{n}.csv") or []) for n in compare or (exps if len(exps) > 1 else [])}
    runs = {n: r for n, r in runs.items() if r}
    if len(runs) < 2:
        return md + not_run("two runs to compare", "python run_report.py --exp A B --compare A,B")
    md += table(["run", "best val acc", "final val loss"],
                [[n, pct(max(float(x["val_acc"]) for x in r)), f"{float(r[-1]['val_loss']):.4f}"] for n, r in runs.items()])
    return md + figure("compare", f"validation curves of {', '.join(runs)}", ", ".join(f"{out}/{n}.csv" for n in runs),
                       plot_compare, runs)


def test_section(out, evals, done, first):
    rows = [[e, pct(evals[e]["acc"]), pct_or_dash(evals[e].get("acc_plain")), pct_or_dash(evals[e].get("acc_tta")),
             pct(evals[e]["top5"]), f"{evals[e]['loss']:.4f}", tta_name(evals[e]), evals[e]["epoch"]] for e in done]
    return ["## 10. Test", ""] + (table(["run", "test top-1", "top-1 without TTA", "top-1 with TTA", "test top-5",
                                         "test loss", "top-1, top-5 and loss", "epoch"], rows) +
                                  [f"(from `{out}/<run>.eval.json`)", ""] if rows else
                                  not_run("the test evaluation", f"python run_eval.py {out}/{first}.ckpt"))


def build(out, exps, grid, compare, report_path):
    """The report's Markdown lines, in the report's order; figures are written beside report_path."""
    plt = pyplot()

    def figure(name, caption, source, draw, *args):     # draws <stem>_<name>.png; the lines showing it, [] without plt
        if plt is None:
            return []
        path = report_path.parent / f"{report_path.stem}_{name}.png"
        draw(plt, *args, path)
        return [f"![{caption}]({path.name})", "", f"*{caption}* (from `{source}`)", ""]

    summaries = {e: read_json(out / f"{e}.json") for e in exps}
    first = exps[0]
    dataset = (summaries[first] or {}).get("config", {}).get("dataset", "cifar100")
    md = [f"# CIFAR-100 ResNet study: {', '.join(exps)}", "",
          f"Written by `run_report.py` from the files in `{out}/`; every figure names the file it came from.", ""]
    if plt is None:
        md += ["Figures are left out: matplotlib is not installed (`pip install matplotlib`, then run this again).", ""]
    md += data_section(out, dataset, report_path.parent)
    evals = {e: read_json(out / f"{e}.eval.json") for e in exps}
    done = [e for e in exps if evals[e]]
    md += baselines_section(out, evals, done, first)
    md += check_sections(out, summaries, first, figure)
    md += search_sections(out, exps, grid, figure)
    md += training_sections(out, exps, compare, figure)
    return md + test_section(out, evals, done, first)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out", type=Path, help="folder the runs wrote to (default: out)")
    p.add_argument("--exp", nargs="+", default=["best"], help="runs to report on (default: best)")
    p.add_argument("--grid", help="grid whose summary <out>/<grid>.csv to rank")
    p.add_argument("--compare", help="comma-separated runs whose validation curves to overlay")
    p.add_argument("-o", dest="report", type=Path, help="Markdown file to write (default: <out>/report.md)")
    args = p.parse_args(argv)
    report = args.report or args.out / "report.md"
    try:
        report.parent.mkdir(parents=True, exist_ok=True)
        md = build(args.out, args.exp, args.grid, args.compare.split(",") if args.compare else [], report)
        with files.atomic_open(report) as f:
            f.write("\n".join(md))
    except OSError as e:
        sys.exit(f"error: cannot write {report}: {e.strerror}")
    except (KeyError, ValueError, json.JSONDecodeError) as e:
        sys.exit(f"error: a file in {args.out} is not in the expected format ({type(e).__name__}: {e})")
    print(f"wrote {report} ({sum(line.startswith('## ') for line in md)} sections)")


if __name__ == "__main__":
    main()
