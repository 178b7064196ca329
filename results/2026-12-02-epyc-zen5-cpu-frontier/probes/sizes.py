"""img/s of the cpu recipe's compiled training step at several image sides (random data), batch 256."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))   # the repository
import config, engine, optim, devices
cfg = config.resolve("cpu")
torch.manual_seed(0)
dev = torch.device("cpu")
model = engine.build_model(cfg, 100, dev)
compiled = devices.compile_model(model, cfg)
opt = optim.make_optimizer(model, cfg)
prec = devices.pick_precision(cfg, dev)[0]
bs = int(sys.argv[1]) if len(sys.argv) > 1 else 256
for side in [32, 24, 20, 16, 32]:
    x = torch.randn(bs, 3, side, side); y = torch.randint(0, 100, (bs,))
    for _ in range(2):
        engine.train_step(compiled, opt, x, y, cfg, 0.01, prec)
    t = time.time(); n = 8
    for _ in range(n):
        engine.train_step(compiled, opt, x, y, cfg, 0.01, prec)
    dt = time.time() - t
    print(f"side {side}: {n * bs / dt:,.0f} img/s", flush=True)
