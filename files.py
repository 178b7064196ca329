"""Atomic file writes: a crash or a full disk leaves the old file or the new one, never half of one."""
import contextlib
import csv
import json
import os
from pathlib import Path


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
