import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")    # tiny models: one thread each is fastest on a busy shared CPU

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
