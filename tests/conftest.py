import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")    # tiny models: one thread each is fastest on a busy shared CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of several seconds (subprocesses, torchrun, SLURM); run by "
                            "default, -m 'not slow' leaves them out (the quick tier for the edit-test loop)")
