"""Top-1 of a checkpoint on val and test with TTA shifts of 0-3 pixels (and without TTA), at one thread.

    PYTHONPATH=. python results/2026-12-06-epyc-zen4-accuracy-per-flop/probes/tta_translate.py CKPT DATA_DIR
"""
import sys

import data
import devices
import engine
import files

ckpt = files.load_checkpoint(sys.argv[1])
cfg = files.config_from(ckpt)
cfg.device, cfg.data_dir, cfg.threads = "cpu", sys.argv[2], 1
device = devices.setup(cfg)
model, splits = engine.model_from(ckpt, device), data.load(cfg, device)
precision = devices.pick_precision(cfg, device)[0]
for split in ("val", "test"):
    x, y = splits[split]
    for translate in range(4):
        plain, averaged = engine.predict(model, x, precision, translate=translate)
        print(split, translate, engine.metrics(averaged, y)["acc"], engine.metrics(plain, y)["acc"], flush=True)
