"""gpu_check.sh without a GPU: fake `date`, `timeout` and python show how it spends its deadline."""
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = {
    "date": '#!/bin/bash\nif [ "$1" = "+%s" ]; then cat "$CLOCK"; else exec /bin/date "$@"; fi\n',
    # timeout -k 20 LIMIT CMD...: a step takes 1 s of the fake clock; run_train.py --exp best runs to its limit
    "timeout": '#!/bin/bash\nlimit=$3; shift 3; now=$(cat "$CLOCK")\n'
               'if [[ "$*" == *"run_train.py --exp best"* ]]; then echo $((now + limit)) > "$CLOCK"; exit 124; fi\n'
               'echo $((now + 1)) > "$CLOCK"\n',
    "python": "#!/bin/sh\nexit 0\n",
}


def test_best_stopped_at_the_deadline_keeps_the_time_its_evaluation_needs(tmp_path):
    shutil.copy(ROOT / "gpu_check.sh", tmp_path)        # it works beside itself (out/gpu_check): not in the repo
    (tmp_path / "bin").mkdir()
    for name, text in STUBS.items():
        (tmp_path / "bin" / name).write_text(text)
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "clock").write_text("1000000\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "CLOCK": str(tmp_path / "clock"),
           "OUT": str(tmp_path / "gpu_out"), "PYTHON": str(tmp_path / "bin" / "python"), "BUDGET_S": "530"}
    r = subprocess.run(["bash", str(tmp_path / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    limits = dict(re.findall(r"^(\S+)\s+rc\s+-?\d+ \|\s+-?\d+ s \(limit (\d+) s\)$",
                             (tmp_path / "gpu_out" / "steps.txt").read_text(), re.M))
    assert list(limits) == ["data", "bench", "lrfind", "fast", "fast-eval", "c70", "c70-eval", "report",
                            "report-eval", "best", "best-eval"]
    assert int(limits["best-eval"]) >= 30                     # the other evaluations' limit: all it may need
    assert int(limits["best"]) > 300


def test_empty_arrays_expand_on_bash_4_2_under_set_u():
    """Before bash 4.4, "${A[@]}" of an empty array under set -u aborts: an array that can be empty is expanded as
    ${A[@]+"${A[@]}"} everywhere."""
    text = (ROOT / "gpu_check.sh").read_text()
    for name in set(re.findall(r"^\s*(\w+)=\(\)", text, re.M)):
        uses = text.count(f'"${{{name}[@]}}"')
        assert uses and uses == text.count(f'${{{name}[@]+"${{{name}[@]}}"}}'), name
