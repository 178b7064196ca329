"""ms per SGD step (Nesterov, wd, 2 groups) of the cpu model: for-loop (CPU default), foreach, fused."""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3]))   # the repository
import config, engine, optim
cfg = config.resolve("cpu")
model = engine.build_model(cfg, 100, torch.device("cpu"))
for p in model.parameters():
    p.grad = torch.randn_like(p)
for kind in ["default", "foreach", "fused"] * 2:
    extra = {} if kind == "default" else {kind: True}
    opt = torch.optim.SGD(optim.param_groups(model, cfg), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True, **extra)
    for _ in range(3):
        opt.step()
    t = time.time()
    for _ in range(50):
        opt.step()
    print(f"{kind}: {(time.time() - t) / 50 * 1e3:.2f} ms", flush=True)
