import sys, torch, files, engine, data, devices, run_eval
torch.set_num_threads(1)
ck = files.load_checkpoint(sys.argv[1]); cfg = files.config_from(ck); cfg.device="cpu"; cfg.data_dir=sys.argv[2]
dev = devices.setup(cfg); cfg.threads=1; torch.set_num_threads(1)
m = engine.model_from(ck, dev); d = data.load(cfg, dev)
for split in ["val","test"]:
    x, y = d[split]
    for t in [0,1,2,3]:
        p, a = engine.predict(m, x, "bf16", translate=t)
        print(split, t, engine.metrics(a,y)["acc"], engine.metrics(p,y)["acc"], flush=True)
