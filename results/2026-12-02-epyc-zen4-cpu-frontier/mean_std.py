"""Mean +- sample std (n) over seeds of the runs' summary JSON given, e.g. from the repository root:

    python results/2026-12-02-epyc-zen4-cpu-frontier/mean_std.py results/2026-12-02-epyc-zen4-cpu-frontier/{cpu5/run2/cpu5,seeds/seed1,seeds/seed2}.json
"""
import json
import statistics
import sys
from pathlib import Path

runs = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
for key in ["best_val_acc", "test_acc", "test_acc_plain", "test_top5", "train_s"]:
    values = [r[key] * (1 if key == "train_s" else 100) for r in runs]
    print(f"{key}: {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} (n={len(values)}); per seed "
          + ", ".join(f"{v:.2f}" for v in values))
