"""val accuracy of best checkpoints: plain, flip TTA, flip + translate 1 and 2 (engine.predict); wrote tta.json:
    python results/2026-12-01-xeon-amx-cpu-frontier/tta.py out/base10.ckpt out/big222.ckpt
"""
import sys, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository
import engine, files, data, devices
torch.set_num_threads(2)
for path in sys.argv[1:]:
    ckpt = files.load_checkpoint(path); cfg = files.config_from(ckpt); cfg.data_dir = str(__import__("pathlib").Path("~/data").expanduser())
    model = engine.model_from(ckpt); d = data.load(cfg)
    prec = devices.pick_precision(cfg, torch.device("cpu"))[0]
    out = {"ckpt": path, "epoch": ckpt["epoch"]}
    for split in ("val",):
        x, y = d[split]
        for t in (0, 1, 2):
            plain, tta = engine.predict(model, x, prec, translate=t)
            if t == 0: out[f"{split}_plain"] = (plain.argmax(1) == y).float().mean().item()
            out[f"{split}_tta{t}"] = (tta.argmax(1) == y).float().mean().item()
    print(json.dumps(out), flush=True)
