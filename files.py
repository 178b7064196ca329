"""File safety: atomic writes (a crash or a full disk leaves the old file or the new one, never half of one)
and the lock that keeps two runs from writing the same files."""
import contextlib
import csv
import fcntl
import json
import os
from pathlib import Path

from config import UserError


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Write to a temp file beside path, fsync it, rename it over path; the temp file never outlives a failure."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(obj, path):
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=2) + "\n")


def write_csv(path, columns, rows):
    """A CSV with a header and rows (dicts; keys outside columns are left out, missing ones left empty)."""
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore", restval="")
        w.writeheader()
        w.writerows(rows)


@contextlib.contextmanager
def run_lock(path):
    """Hold an exclusive lock on path while the run lives; a second run of the same name is refused."""
    try:
        f = open(path, "a")
    except OSError as e:
        raise UserError(f"cannot write to {path.parent}: {e.strerror}")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another run is writing {path.with_suffix('')}.* (lock {path} is held); "
                        f"wait for it or use another --out")
    try:
        yield
    finally:
        f.close()
