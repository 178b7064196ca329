import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

import run_report

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ["1. Data", "2. Baselines", "3. Model", "4. First-batch loss", "5. Overfitting 64 images",
            "6. LR finder", "7. Grid search", "8. Training", "9. Comparisons", "10. Test"]


def run(script, *args):
    r = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """out/ after smoke runs of every tool, as a user makes them."""
    tmp = tmp_path_factory.mktemp("study")
    out = tmp / "out"
    dirs = ["--out", str(out), "--data-dir", str(tmp / "data"), "--set", "subset=800"]     # small: only files matter
    run("run_train.py", "--exp", "smoke", "--epochs", "3", *dirs)
    run("run_train.py", "--exp", "smoke", "--epochs", "3", "--set", "name=smoke_sgd", "--set", "optimizer=sgd",
        "--set", "val_every=2", *dirs)                                               # validates epochs 2 and 3
    run("run_lrfind.py", "--exp", "smoke", "--iters", "30", *dirs)
    run("run_grid.py", "--grid", "smoke_grid", *dirs)
    run("run_eval.py", str(out / "smoke.ckpt"), "--data-dir", str(tmp / "data"))
    run("data.py", "--dataset", "synthetic", "--out", str(out), "--data-dir", str(tmp / "data"))
    return out


def sections(text):
    parts = text.split("\n## ")[1:]
    return {p.split("\n", 1)[0]: p for p in parts}


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_report_has_every_section_with_the_numbers_of_the_run_files(study):
    run_report.main(["--out", str(study), "--exp", "smoke", "smoke_sgd", "--grid", "smoke_grid"])
    got = sections((study / "report.md").read_text())
    assert list(got) == SECTIONS
    best_val = max(float(r["val_acc"]) for r in rows(study / "smoke.csv"))
    assert f"best validation accuracy {100 * best_val:.2f}%" in got["8. Training"]
    test = json.loads((study / "smoke.eval.json").read_text())
    assert f"{100 * test['acc']:.2f}%" in got["10. Test"] and f"{100 * test['acc']:.2f}%" in got["2. Baselines"]
    lrfind = json.loads((study / "smoke.lrfind.json").read_text())
    assert f"{lrfind['suggested_lr']:.2e}" in got["6. LR finder"]
    for r in rows(study / "smoke_grid.csv"):
        assert f"| {r['run']} | {100 * float(r['best_val_acc']):.2f}% |" in got["7. Grid search"]
    summary = json.loads((study / "smoke.json").read_text())
    assert f"{summary['first_batch_loss']:.4f}" in got["4. First-batch loss"]
    assert "Not run yet: the overfit check" in got["5. Overfitting 64 images"]
    assert "python run_train.py --exp overfit64" in got["5. Overfitting 64 images"]


def test_report_reads_a_run_validated_every_other_epoch(study):
    run_report.main(["--out", str(study), "--exp", "smoke", "smoke_sgd", "--grid", "smoke_grid"])
    got = sections((study / "report.md").read_text())
    sgd = rows(study / "smoke_sgd.csv")
    assert [bool(r["val_acc"]) for r in sgd] == [False, True, True]
    best = max(sgd[1:], key=lambda r: float(r["val_acc"]))
    assert f"`smoke_sgd`: 3 epochs, best validation accuracy {100 * float(best['val_acc']):.2f}% at epoch " \
           f"{best['epoch']}," in got["8. Training"]
    assert f"| smoke_sgd | {100 * float(best['val_acc']):.2f}% | {float(sgd[-1]['val_loss']):.4f} |" in got["9. Comparisons"]


def test_report_figures_are_valid_pngs(study):
    pytest.importorskip("matplotlib")
    run_report.main(["--out", str(study), "--exp", "smoke", "smoke_sgd", "--grid", "smoke_grid"])
    figures = sorted(study.glob("report_*.png"))
    names = {f.name for f in figures}
    assert {"report_curves_smoke.png", "report_compare.png", "report_lrfind_smoke.png",
            "report_grid_smoke_grid.png"} <= names
    for f in figures:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f.stat().st_size > 5000
        assert f"]({f.name})" in (study / "report.md").read_text()


def test_report_without_matplotlib_keeps_its_tables(study, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib now raises ImportError
    report = tmp_path / "plain.md"
    run_report.main(["--out", str(study), "--exp", "smoke", "-o", str(report)])
    text = report.read_text()
    assert "matplotlib is not installed (`pip install matplotlib`" in text
    assert list(sections(text)) == SECTIONS and "![smoke" not in text and not list(tmp_path.glob("*.png"))
