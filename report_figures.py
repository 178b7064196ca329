"""The report's figures (run_report.py writes them beside its Markdown): training curves, runs compared, the LR range
test, a grid ranked. matplotlib only, imported when a report is written; without it the report keeps its tables."""


def validated(rows):
    """The epochs that were validated (with val_every > 1 the others leave their val_* cells empty)."""
    return [r for r in rows if r["val_acc"]]


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(plt, rows, title, path):
    """Loss and accuracy per epoch, train and validation, side by side."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, label in ((ax_loss, "loss", "loss"), (ax_acc, "acc", "accuracy (%)")):
        scale = 100 if metric == "acc" else 1
        for split, part in (("train", rows), ("val", validated(rows))):
            ax.plot([int(r["epoch"]) for r in part], [scale * float(r[f"{split}_{metric}"]) for r in part],
                    marker="o" if len(part) < len(rows) else None, label="train" if split == "train" else "validation")
        style(ax, "epoch", label, f"{title}: {label}")
    save(plt, fig, path)


def plot_compare(plt, runs, path):
    """Validation loss and accuracy of several runs overlaid (their validated epochs)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in runs.items():
        epochs = [int(r["epoch"]) for r in rows]
        ax_loss.plot(epochs, [float(r["val_loss"]) for r in rows], label=name)
        ax_acc.plot(epochs, [100 * float(r["val_acc"]) for r in rows], label=name)
    style(ax_loss, "epoch", "validation loss", "validation loss")
    style(ax_acc, "epoch", "validation accuracy (%)", "validation accuracy")
    save(plt, fig, path)


def plot_lrfind(plt, rows, info, path):
    fig, ax = plt.subplots(figsize=(7, 4))
    lrs = [float(r["lr"]) for r in rows]
    ax.plot(lrs, [float(r["loss"]) for r in rows], alpha=0.3, label="loss")
    ax.plot(lrs, [float(r["smooth_loss"]) for r in rows], label="smoothed loss")
    if info["suggested_lr"]:
        ax.axvspan(*info["falling_range"], color="green", alpha=0.1, label="range where the loss falls")
        ax.axvline(info["suggested_lr"], color="red", linestyle="--", label=f"suggested {info['suggested_lr']:.1e}")
    ax.set_xscale("log")
    style(ax, "learning rate (log scale)", "training loss", f"LR range test: {info['exp']}")
    save(plt, fig, path)


def plot_grid(plt, ranked, grid, path):
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(ranked) + 1.5))
    bars = ax.barh([r["run"] for r in ranked][::-1], [100 * float(r["best_val_acc"]) for r in ranked][::-1])
    ax.bar_label(bars, fmt="%.1f", padding=3)
    ax.set(xlabel="best validation accuracy (%)", title=f"grid {grid}, ranked by validation accuracy")
    ax.grid(axis="x", alpha=0.3)
    save(plt, fig, path)


def style(ax, xlabel, ylabel, title):
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if xlabel == "epoch":
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()


def save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
