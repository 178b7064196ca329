"""Bad input: one clear `error:` line, a non-zero exit, and the files already written left untouched."""
import errno
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from torch._inductor.exc import InductorError

import config
import data
import devices
import files
import run_eval
import run_lrfind
import run_train
import stops
import trainer
from fault_helpers import ENV, REPO, SMALL, assert_one_error_line, main_error, run, snapshot
from resnet import ResNet


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 2-epoch run stopped by a signal in epoch 2 (CSV, best and last checkpoints, no summary), on generated
    data laid out as the real cifar-100-python/ (dataset=cifar100)."""
    base = tmp_path_factory.mktemp("interrupted")
    data.write_synthetic(base / "cifar" / "cifar-100-python")
    pairs = [("subset", 256), ("batch_size", 32), ("epochs", 2), ("device", "cpu"), ("dataset", "cifar100"),
             ("download", False), ("data_dir", str(base / "cifar")), ("out_dir", str(base / "out"))]
    try:
        with pytest.raises(stops.Preempted):
            trainer.train(config.resolve("smoke", pairs),
                         log=lambda line: line.startswith("ep 1/") and stops.stop_requested.append(signal.SIGUSR1))
    finally:
        stops.stop_requested.clear()
    return base


@pytest.fixture
def work(interrupted, tmp_path):
    """A copy of the interrupted run to spoil: (folder, run_train.py arguments that resume or redo that run)."""
    shutil.copytree(interrupted, tmp_path / "w")
    w = tmp_path / "w"
    return w, [*SMALL, "--epochs", "2", "--set", "dataset=cifar100", "--set", "download=false",
               "--data-dir", w / "cifar", "--out", w / "out"]


def refused(module, argv, folder, monkeypatch, capsys):
    """The one-line error of module.main(argv), checking that nothing under folder changed."""
    before = snapshot(folder)
    message = main_error(module, argv, monkeypatch, capsys)
    assert snapshot(folder) == before
    return message


# ----------------------------------------------------------------------------
# config: command line and experiments file

@pytest.mark.parametrize("argv, expected", [
    (["--set", "lr"], "--set expects key=value, got 'lr'"),
    (["--set", "=0.1"], "--set expects key=value"),
    (["--set", "lrr=0.1"], "unknown config key 'lrr' (did you mean 'lr'?)"),
    (["--set", "batchsize=64"], "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    (["--set", "batch_size=abc"], "config key 'batch_size' must be int, got str 'abc'"),
    (["--set", "seed=2.5"], "config key 'seed' must be int, got float 2.5"),
    (["--set", "augment=yes"], "config key 'augment' must be bool"),
    (["--set", "blocks=[1,x]"], "config key 'blocks' must be a non-empty list of integers"),
    (["--set", "optimizer=adm"], "config key 'optimizer' must be one of sgd, adam, adamw, muon, got 'adm'"),
    (["--set", "lr=-0.1"], "config key 'lr' must be > 0, got -0.1"),
    (["--set", "lr=NaN"], "config key 'lr' must be a finite number"),
    (["--epochs", "0"], "config key 'epochs' must be > 0, got 0"),
    (["--set", "label_smoothing=1.5"], "config key 'label_smoothing' must be in [0, 1), got 1.5"),
    (["--set", "channels=[16,32,64]"], "must have the same length"),
    (["--exp", "smok"], "unknown experiment 'smok' (did you mean 'smoke'?); known: "
                        + ", ".join(config.read_experiments()["experiments"])),
])
def test_command_line_mistakes_are_one_line_naming_the_key(work, monkeypatch, capsys, argv, expected):
    w, args = work
    assert expected in refused(run_train, [*args, *argv], w, monkeypatch, capsys)


@pytest.mark.parametrize("text, expected", [
    ('{\n  "experiments": {\n    "x": {"lr": 0.1,}\n  }\n}\n',
     "malformed JSON at line 3 column 21: Expecting property name enclosed in double quotes"),
    ('{"experiments": {"x": {"batchsize": 64}}}', "unknown config key 'batchsize' (did you mean 'batch_size'?)"),
    ('{"experiments": {"x": {"lr": "fast"}}}', "config key 'lr' must be float, got str 'fast'"),
    ('{"experiments": {"x": {"warmup": 1.5}}}', "config key 'warmup' must be in [0, 1), got 1.5"),
    ('{"experiments": {"x": [1, 2]}}', 'expected {"defaults": {...}, "experiments": {"<name>": {...}}}'),
    ('{"experiments": {"y": {}}}', "unknown experiment 'x'; known: y"),
    ('{"experiments": {"x": {"base": "yy"}, "y": {}}}',
     "experiment 'x' names base 'yy', which is no experiment (did you mean 'y'?); known: x, y"),
    ('{"experiments": {"x": {"base": "y"}, "y": {"base": "x"}}}',
     "experiments' bases go round in a circle: x -> y -> x"),
    ('{"experiments": {"x": {"base": ["y"]}, "y": {}}}', "experiment 'x': \"base\" must name an experiment, got ['y']"),
])
def test_experiments_file_mistakes_are_one_line_with_where(work, monkeypatch, capsys, text, expected):
    w, args = work
    (w / "experiments.json").write_text(text)
    assert expected in refused(run_train, [*args, "--experiments", w / "experiments.json", "--exp", "x"],
                               w, monkeypatch, capsys)


def test_missing_experiments_file_is_one_line(work, monkeypatch, capsys):
    w, args = work
    message = refused(run_train, [*args, "--experiments", w / "nope.json"], w, monkeypatch, capsys)
    assert f"cannot read {w / 'nope.json'}: No such file or directory" in message


# ----------------------------------------------------------------------------
# checkpoints, for run_eval.py and for --resume

def truncated(good, path):
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])


def text_file(good, path):
    path.write_text("epoch,lr\n1,0.1\n")


def tensor_only(good, path):
    torch.save(torch.zeros(3), path)


def other_weights(good, path):
    """Its config says channels [16, 32], its weights are of channels [8, 16]."""
    ckpt = torch.load(good, weights_only=True)
    torch.save({**ckpt, "model": ResNet([1, 1], [8, 16]).state_dict()}, path)


def other_architecture(good, path):
    """A consistent checkpoint of another model: blocks [2, 2]."""
    ckpt = torch.load(good, weights_only=True)
    ckpt["config"]["blocks"] = [2, 2]
    torch.save({**ckpt, "model": ResNet([2, 2], [16, 32]).state_dict()}, path)


def newer_format(good, path):
    torch.save({**torch.load(good, weights_only=True), "format_version": files.FORMAT_VERSION + 1}, path)


def best_not_last(good, path):
    """A best checkpoint (weights only, no optimizer or RNG state) where last.ckpt should be."""
    shutil.copy(good.with_name("smoke.ckpt"), path)


@pytest.mark.parametrize("spoil, expected", [
    (None, "checkpoint {path} not found"),
    (truncated, "{path} is not a readable checkpoint (truncated, or not from torch.save)"),
    (text_file, "{path} is not a readable checkpoint"),
    (tensor_only, "{path} is not a checkpoint of this project"),
    (other_weights, "checkpoint weights do not fit blocks=[1, 1] channels=[16, 32]"),
    (newer_format, "{path} has checkpoint format 2, newer than this code's 1: update the code"),
])
def test_bad_checkpoint_for_run_eval_is_one_line_and_writes_nothing(work, monkeypatch, capsys, spoil, expected):
    w, _ = work
    path = w / "out" / "spoilt.ckpt"
    if spoil:
        spoil(w / "out" / "smoke.ckpt", path)
    message = refused(run_eval, [path, "--data-dir", w / "cifar"], w, monkeypatch, capsys)
    assert expected.format(path=path) in message


@pytest.mark.parametrize("spoil, expected", [
    (truncated, "{path} is not a readable checkpoint (truncated, or not from torch.save)"),
    (text_file, "{path} is not a readable checkpoint"),
    (tensor_only, "{path} is not a checkpoint of this project"),
    (other_weights, "checkpoint weights do not fit blocks=[1, 1] channels=[16, 32]"),
    (other_architecture, "{path} was made with other settings (blocks); resume with the same config"),
    (newer_format, "{path} has checkpoint format 2, newer than this code's 1: update the code"),
    (best_not_last, "{path} holds no training state"),
])
def test_bad_last_checkpoint_for_resume_is_one_line_and_touches_nothing(work, monkeypatch, capsys, spoil, expected):
    w, args = work
    path = w / "out" / "smoke.last.ckpt"
    spoil(w / "out" / "smoke.last.ckpt", path)
    message = refused(run_train, [*args, "--resume"], w, monkeypatch, capsys)
    assert expected.format(path=path) in message


# ----------------------------------------------------------------------------
# data folder and output folder

def spoil_data(w, file, how):
    path = w / "cifar" / "cifar-100-python" / file
    if how == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("file, how, expected", [
    ("train", "missing", "CIFAR-100 not found: {folder} lacks train."),
    ("meta", "missing", "CIFAR-100 not found: {folder} lacks meta."),
    ("train", "truncated", "{folder}/train is unreadable or truncated"),
    ("test", "truncated", "{folder}/test is unreadable or truncated"),
])
@pytest.mark.parametrize("script", ["run_train", "run_eval"])
def test_missing_or_truncated_data_is_one_line_and_touches_nothing(work, monkeypatch, capsys, file, how, expected,
                                                                  script):
    w, args = work
    spoil_data(w, file, how)
    argv = args if script == "run_train" else [w / "out" / "smoke.ckpt", "--data-dir", w / "cifar"]
    message = refused({"run_train": run_train, "run_eval": run_eval}[script], argv, w, monkeypatch, capsys)
    assert expected.format(folder=w / "cifar" / "cifar-100-python") in message


def test_output_folder_that_cannot_be_created_is_one_line(work, monkeypatch, capsys):
    w, args = work
    (w / "a_file").write_text("")
    message = refused(run_train, [*args, "--out", w / "a_file" / "out"], w, monkeypatch, capsys)
    assert re.search(f"cannot create output folder {w / 'a_file' / 'out'}: Not a directory", message)


def test_eval_results_that_cannot_be_written_are_one_line(work, monkeypatch, capsys):
    w, _ = work
    (w / "out" / "smoke.eval.json").mkdir()          # root ignores permissions: a folder in the way instead
    (w / "out" / "smoke.eval.json" / "keep").write_text("")
    message = refused(run_eval, [w / "out" / "smoke.ckpt", "--data-dir", w / "cifar"], w, monkeypatch, capsys)
    assert f"cannot write {w / 'out' / 'smoke.eval.json'}" in message


# ----------------------------------------------------------------------------
# the real command lines: exactly one line on stderr, nothing else (no traceback, no warning)

@pytest.mark.parametrize("case", ["unknown experiment", "malformed experiments file", "truncated checkpoint",
                                  "output folder under a file"])
@pytest.mark.slow
def test_command_line_errors_print_exactly_one_line(work, case):
    w, args = work
    (w / "bad.json").write_text("{\n  \"experiments\": {,}\n}\n")
    (w / "a_file").write_text("")
    truncated(w / "out" / "smoke.ckpt", w / "out" / "spoilt.ckpt")
    argv = {"unknown experiment": ["run_train.py", *args, "--exp", "nope"],
            "malformed experiments file": ["run_train.py", *args, "--experiments", w / "bad.json"],
            "truncated checkpoint": ["run_eval.py", w / "out" / "spoilt.ckpt"],
            "output folder under a file": ["run_train.py", *args, "--out", w / "a_file" / "out"]}[case]
    before = snapshot(w)
    assert_one_error_line(run(*argv))
    assert snapshot(w) == before


# ----------------------------------------------------------------------------
# what a cluster user meets: no C/C++ compiler for torch.compile, an OS error that is not the run's own write

TINY_COMPILED = ["--exp", "smoke", "--compile", "--device", "cpu", "--set", "blocks=[1]", "--set", "channels=[8]",
                 "--set", "subset=64", "--set", "batch_size=32", "--epochs", "1", "--set", "lrfind_iters=10"]


@pytest.mark.slow
def test_compile_without_a_working_compiler_is_one_line_naming_it_and_suggesting_no_compile(tmp_path):
    env = {**ENV, "CXX": str(tmp_path / "no-such-g++"), "CC": str(tmp_path / "no-such-gcc"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}     # an empty cache: the compiler is needed
    argv = [*TINY_COMPILED, "--data-dir", tmp_path / "data", "--out", tmp_path / "out"]
    proc = subprocess.run([sys.executable, "run_train.py", *map(str, argv)], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=180)
    line = assert_one_error_line(proc)
    assert "torch.compile failed" in line and "no-such-g++" in line and line.endswith("--no-compile"), line


def test_lr_sweep_whose_compile_fails_is_one_line_suggesting_no_compile(tmp_path, monkeypatch, capsys):
    def no_compiler(*args):
        raise InductorError(RuntimeError("InvalidCxxCompiler: No working C++ compiler found"), None)
    monkeypatch.setattr(devices, "compile_model", lambda model, cfg: no_compiler)
    message = main_error(run_lrfind, [*TINY_COMPILED, "--data-dir", tmp_path / "data", "--out", tmp_path / "out"],
                         monkeypatch, capsys)
    assert "torch.compile failed: RuntimeError: InvalidCxxCompiler" in message and message.endswith("--no-compile")


@pytest.mark.parametrize("in_the_way, expected", [("", "the data folder {data_dir} is a file"),
                                                   ("synthetic", "cannot generate the synthetic data in {data_dir}/")])
@pytest.mark.slow
def test_a_data_dir_that_is_a_file_is_one_line_that_does_not_blame_the_output_folder(tmp_path, in_the_way, expected):
    data_dir = tmp_path / "hostname"
    if in_the_way:
        data_dir.mkdir()
    (data_dir / in_the_way).write_text("node17\n")
    line = assert_one_error_line(run("run_train.py", "--exp", "smoke", "--set", f"data_dir={data_dir}",
                                     "--out", tmp_path / "out"))
    assert "cannot write" not in line and expected.format(data_dir=data_dir) in line, line


def test_an_os_error_outside_the_runs_own_files_names_its_file_not_the_output_folder(work, monkeypatch, capsys):
    w, args = work

    def unreadable(*a, **kw):
        raise PermissionError(errno.EACCES, "Permission denied", "/shared/datasets/cifar-100-python/train")
    monkeypatch.setattr(data, "load", unreadable)
    message = refused(run_train, args, w, monkeypatch, capsys)
    assert message == "error: Permission denied: /shared/datasets/cifar-100-python/train"
