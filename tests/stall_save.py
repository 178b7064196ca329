"""run_train.py, but stalled half-way through writing a checkpoint, so that a test can SIGKILL it right there.

    python tests/stall_save.py smoke.last.ckpt 2 --exp smoke ...   # stalls in the 2nd write of smoke.last.ckpt

The test code lives here, not in engine.py: torch.save is wrapped to write half of the bytes, fsync, print
"stalled writing <temp file>" and sleep.
"""
import io
import os
import runpy
import sys
import time
from pathlib import Path

import torch

target, stall_at = sys.argv[1], int(sys.argv[2])
real_save, writes = torch.save, []


def stalling_save(obj, f, *args, **kwargs):
    if os.path.basename(getattr(f, "name", "")).startswith(target + "."):    # the temp file of target
        writes.append(f.name)
        if len(writes) == stall_at:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: buf.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            print(f"stalled writing {f.name}", flush=True)
            time.sleep(600)
    return real_save(obj, f, *args, **kwargs)


torch.save = stalling_save
repo = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(repo))
sys.argv = ["run_train.py", *sys.argv[3:]]
runpy.run_path(str(repo / "run_train.py"), run_name="__main__")
