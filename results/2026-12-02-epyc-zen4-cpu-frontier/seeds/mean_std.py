"""Mean +- sample std (n) of the cpu5 recipe over seeds 0, 1, 2 on this CPU, from the three runs' JSON."""
import json
import statistics
from pathlib import Path

here = Path(__file__).parent
runs = [json.loads(p.read_text()) for p in [here.parent / "cpu5" / "run2" / "cpu5.json", here / "seed1.json",
                                             here / "seed2.json"]]
for key in ["best_val_acc", "test_acc", "test_acc_plain", "test_top5", "train_s"]:
    values = [r[key] * (1 if key == "train_s" else 100) for r in runs]
    print(f"{key}: {statistics.mean(values):.2f} +- {statistics.stdev(values):.2f} (n={len(values)}); per seed "
          + ", ".join(f"{v:.2f}" for v in values))
