import csv
import itertools
import json
import multiprocessing
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import config
import engine
import hardware
import run_grid
import stops
import trainer

ROOT = Path(__file__).resolve().parent.parent
TIMING = {"epoch_s", "img_per_s", "elapsed_s"}


def grid(*args, **kw):
    return subprocess.Popen([sys.executable, str(ROOT / "run_grid.py"), "--grid", "smoke_grid", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def small(out, data_dir):
    """Flags that keep a smoke_grid run to a few seconds (eager: compiling for the CPU would take longer than the run)."""
    return ["--out", str(out), "--data-dir", str(data_dir), "--set", "subset=320", "--no-compile"]


def rows(path, drop=()):
    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """smoke_grid run once to the end: (out folder, data folder, output)."""
    tmp = tmp_path_factory.mktemp("grid")
    p = grid(*small(tmp / "out", tmp / "data"))
    output = p.communicate()[0]
    assert p.returncode == 0, output
    return tmp / "out", tmp / "data", output


def test_report_grid_is_the_24_config_product_with_unique_readable_names():
    axes, runs = run_grid.grid_configs("report_grid")
    assert axes == {"lr": [0.0005, 0.001, 0.002], "weight_decay": [1e-5, 1e-4],
                    "blocks": [[2, 2, 2], [3, 3, 3]], "channels": [[48, 96, 192], [64, 128, 256]]}
    combos = [tuple(json.dumps(getattr(cfg, k)) for k in axes) for _, _, cfg in runs]
    assert sorted(combos) == sorted(tuple(json.dumps(v) for v in c) for c in itertools.product(*axes.values()))
    assert len({name for name, _, _ in runs}) == 24 and runs[0][0] == "lr0.0005_wd1e-05_b2-2-2_c48-96-192"
    assert all(cfg.out_dir == str(Path("out") / "report_grid") and cfg.name == name and cfg.epochs == 20
               for name, _, cfg in runs)


def test_grid_settings_apply_and_command_line_flags_win_except_on_varied_keys():
    axes, runs = run_grid.grid_configs("smoke_grid", [("epochs", 1), ("out_dir", "elsewhere")])
    assert list(axes) == ["lr", "channels"] and len(runs) == 4
    assert all(cfg.epochs == 1 and cfg.dataset == "synthetic" and cfg.out_dir == str(Path("elsewhere") / "smoke_grid")
               for _, _, cfg in runs)
    assert run_grid.grid_configs("smoke_grid")[1][0][2].epochs == 2
    with pytest.raises(config.UserError, match="varies lr"):
        run_grid.grid_configs("smoke_grid", [("lr", 0.1)])


@pytest.mark.slow
def test_list_and_index_agree(tmp_path):
    listed = grid("--list", *small(tmp_path / "out", tmp_path / "data")).communicate()[0].splitlines()
    assert [line.split()[0] for line in listed] == ["0", "1", "2", "3"]
    index, name = listed[2].split()[:2]
    p = grid("--index", index, *small(tmp_path / "out", tmp_path / "data"))
    output = p.communicate()[0]
    assert p.returncode == 0, output
    assert [p.name for p in (tmp_path / "out" / "smoke_grid").glob("*.json")] == [f"{name}.json"]
    summary = rows(tmp_path / "out" / "smoke_grid.csv")
    assert [(r["index"], r["run"], r["status"]) for r in summary] == [(index, name, "done")]
    relisted = grid("--list", *small(tmp_path / "out", tmp_path / "data")).communicate()[0].splitlines()
    assert relisted[2].endswith("done") and relisted[1].endswith("-")


@pytest.mark.slow
def test_grid_says_which_config_of_how_many_with_the_grids_eta(finished):
    lines = finished[2].splitlines()
    assert lines[0].startswith("grid smoke_grid | 4 of 4 configs of lr x channels | cpu")
    heads = [line for line in lines if line.startswith("== smoke_grid")]
    assert heads[0] == "== smoke_grid [0/3] lr0.002_c8-16 | config 1 of 4"
    assert re.fullmatch(r"== smoke_grid \[3/3\] lr0.004_c16-32 \| config 4 of 4 \| grid eta 0:00:\d\d", heads[3])


def test_grid_writes_one_summary_row_per_config_and_a_ranked_table(finished):
    out, _, output = finished
    summary = rows(out / "smoke_grid.csv")
    assert list(summary[0]) == ["index", "run", "lr", "channels", "params", "best_val_acc", "best_epoch", "test_acc",
                                "train_s", "status", "reason"]
    assert [r["index"] for r in summary] == ["0", "1", "2", "3"] and {r["status"] for r in summary} == {"done"}
    for r in summary:
        assert (out / "smoke_grid" / f"{r['run']}.ckpt").is_file() and float(r["best_val_acc"]) > 0
    ranked = [line.split()[1] for line in output.split("status\n")[-1].splitlines()[:4]]
    assert ranked == [r["run"] for r in sorted(summary, key=lambda r: -float(r["best_val_acc"]))]


@pytest.mark.slow
def test_second_run_skips_finished_configs(finished):
    out, data_dir, _ = finished
    ckpts = {p: p.stat().st_mtime_ns for p in (out / "smoke_grid").glob("*.ckpt")}
    before = rows(out / "smoke_grid.csv")
    p = grid(*small(out, data_dir))
    output = p.communicate()[0]
    assert p.returncode == 0, output
    assert output.count("already finished") == 4 and "ep 1/" not in output
    assert rows(out / "smoke_grid.csv") == before
    assert {p: p.stat().st_mtime_ns for p in ckpts} == ckpts


@pytest.mark.slow
def test_killed_grid_resumes_the_interrupted_config_to_the_uninterrupted_result(finished, tmp_path):
    out = tmp_path / "out"
    p = grid(*small(out, finished[1]))
    for line in p.stdout:
        if line.startswith("== smoke_grid [1/3]"):
            p.send_signal(signal.SIGTERM)       # config 1 stops after the step it is in
    p.wait()
    assert p.returncode == stops.PREEMPTED_EXIT
    assert [r["status"] for r in rows(out / "smoke_grid.csv")] == ["done", "interrupted"]
    p = grid(*small(out, finished[1]))
    output = p.communicate()[0]
    assert p.returncode == 0, output
    assert "resuming lr0.002_c16-32 at epoch 1" in output and output.count("already finished") == 1
    summary, whole = rows(out / "smoke_grid.csv", {"train_s"}), rows(finished[0] / "smoke_grid.csv", {"train_s"})
    assert summary == whole
    run = "smoke_grid/lr0.002_c16-32.csv"
    assert rows(out / run, TIMING) == rows(finished[0] / run, TIMING)     # same epochs, none twice


def test_stop_after_an_epochs_last_step_resumes_with_the_uninterrupted_csv(finished, tmp_path, monkeypatch):
    cfg = run_grid.grid_configs("smoke_grid", [("data_dir", str(finished[1])), ("subset", 320),
                                                ("out_dir", str(tmp_path)), ("compile", "off")])[1][1][2]
    real_step, steps = engine.train_step, []

    def step_then_stop_at_5(*args):
        steps.append(1)
        if len(steps) == 5:          # the last of epoch 1's 5 steps
            stops.stop_requested.append("test")
        return real_step(*args)
    monkeypatch.setattr(engine, "train_step", step_then_stop_at_5)
    try:
        with pytest.raises(stops.Preempted):
            trainer.train(cfg, log=lambda s: None)
    finally:
        stops.stop_requested.clear()
    monkeypatch.setattr(engine, "train_step", real_step)
    resumed = trainer.train(cfg, resume=True, log=lambda s: None)
    run = Path("smoke_grid") / f"{cfg.name}.csv"
    assert rows(Path(cfg.out_dir).parent / run, TIMING) == rows(finished[0] / run, TIMING)
    whole = json.loads((finished[0] / "smoke_grid" / f"{cfg.name}.json").read_text())
    assert (resumed["best_val_acc"], resumed["test_loss"]) == (whole["best_val_acc"], whole["test_loss"])


def write_rows(path, first):
    for i in range(first, first + 10):
        run_grid.update_summary(path, {"index": i, "run": f"r{i}", "status": "done"}, ["index", "run", "status"])


def test_concurrent_summary_updates_lose_no_row(tmp_path):
    path = tmp_path / "g.csv"
    workers = [multiprocessing.Process(target=write_rows, args=(path, 10 * k)) for k in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [r["run"] for r in rows(path)] == [f"r{i}" for i in range(40)]


@pytest.mark.slow
def test_unknown_grid_and_bad_index_are_one_error_line(tmp_path):
    for args, message in [(["--grid", "smoke_gird"], "did you mean 'smoke_grid'"),
                          (["--grid", "smoke_grid", "--index", "4"], "configs 0-3")]:
        r = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), *args, "--out", str(tmp_path)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and r.stderr.startswith("error: ") and message in r.stderr


def test_shards_partition_the_configs_by_index_mod_n():
    for n in range(1, 6):
        shards = [run_grid.shard_indices(10, f"{i}/{n}") for i in range(n)]
        assert sorted(sum(shards, [])) == list(range(10))
        assert all(j % n == i for i, shard in enumerate(shards) for j in shard)
    assert run_grid.shard_indices(4, "1/2") == [1, 3] and run_grid.shard_indices(4, "5/8") == []


@pytest.mark.slow
def test_two_shards_at_once_write_one_summary_equal_to_the_whole_grids(finished, tmp_path):
    out = tmp_path / "out"
    shards = [grid("--shard", f"{i}/2", *small(out, finished[1])) for i in range(2)]
    outputs = [p.communicate()[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    assert outputs[0].startswith("grid smoke_grid | 2 of 4 configs (shard 0/2) of lr x channels")
    assert [line.split()[2] for line in outputs[1].splitlines() if line.startswith("== ")] == ["[1/3]", "[3/3]"]
    assert rows(out / "smoke_grid.csv", {"train_s"}) == rows(finished[0] / "smoke_grid.csv", {"train_s"})
    for r in rows(out / "smoke_grid.csv"):
        run = f"smoke_grid/{r['run']}.csv"
        assert rows(out / run, TIMING) == rows(finished[0] / run, TIMING)


@pytest.mark.parametrize("args, message", [
    (["--shard", "3/2"], "--shard expects I/N with 0 <= I < N, e.g. 0/4, got '3/2'"),
    (["--shard", "a/b"], "got 'a/b'"),
    (["--shard", "2"], "got '2'"),
    (["--shard", "0/2", "--index", "1"], "--index and --shard each choose the configs to run"),
])
@pytest.mark.slow
def test_a_malformed_shard_is_one_error_line(tmp_path, args, message):
    r = subprocess.run([sys.executable, str(ROOT / "run_grid.py"), "--grid", "smoke_grid", *args, "--out", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr


def in_process(monkeypatch, *args):
    """run_grid.main() with these arguments; its SystemExit (an error line, or a run's exit status)."""
    monkeypatch.setattr(sys, "argv", ["run_grid.py", "--grid", "smoke_grid", *map(str, args)])
    monkeypatch.setattr(stops, "install_stop_handlers", lambda: None)     # keep pytest's own signal handlers
    with pytest.raises(SystemExit) as stop:
        run_grid.main()
    return stop.value


def test_the_grids_first_line_times_bf16_against_fp32_at_the_threads_its_runs_will_use(monkeypatch, tmp_path):
    """run_grid.py says the precision before a run's setup sets the threads; a CPU with bf16 units times both."""
    threads = []

    def stop(cfg, resume):
        raise KeyboardInterrupt         # the grid ends at its first run

    monkeypatch.setattr(hardware, "matmul_tflops", lambda *args, **kw: threads.append(torch.get_num_threads()) or 1.0)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(trainer, "train", stop)
    before = torch.get_num_threads()
    hardware.cpu_matmul_tflops.cache_clear()
    try:
        torch.set_num_threads(2)        # torch's default on a 2-core CPU; the runs are set to 1
        in_process(monkeypatch, "--index", "0", "--device", "cpu", "--set", "threads=1", "--out", tmp_path)
    finally:
        torch.set_num_threads(before)
        hardware.cpu_matmul_tflops.cache_clear()
    assert threads and set(threads) == {1}


def test_a_grid_asked_to_compile_where_it_cannot_is_one_error_line_before_any_run(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "cpp_compiler_problem", lambda: "No working C++ compiler found")
    error = in_process(monkeypatch, "--compile", "--device", "cpu", "--out", tmp_path)
    assert str(error).startswith("error: torch.compile failed its check here (No working C++ compiler found)")
    assert not list(tmp_path.iterdir())
