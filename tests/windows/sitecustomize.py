"""A simulated Windows for tests/test_devices.py, loaded by any python started with this folder on PYTHONPATH: no
fcntl, no SIGUSR1, no os.sched_getaffinity, and an msvcrt whose byte-range locking stands on the real fcntl.lockf."""
import errno
import os
import signal
import subprocess  # noqa: F401  (imported first, while it can still tell that this is no Windows)
import sys
import types

import fcntl as posix_fcntl

sys.modules["fcntl"] = None         # `import fcntl` now raises ImportError
del signal.SIGUSR1, os.sched_getaffinity

msvcrt = types.ModuleType("msvcrt")
msvcrt.LK_UNLCK, msvcrt.LK_LOCK, msvcrt.LK_NBLCK = 0, 1, 2


def locking(fd, mode, nbytes):
    """Lock (LK_NBLCK) or unlock (LK_UNLCK) nbytes from the file's position; EACCES when another process holds them."""
    how = posix_fcntl.LOCK_UN if mode == msvcrt.LK_UNLCK else posix_fcntl.LOCK_EX | posix_fcntl.LOCK_NB
    try:
        posix_fcntl.lockf(fd, how, nbytes, 0, os.SEEK_CUR)
    except OSError as e:
        raise PermissionError(errno.EACCES, "Permission denied") from e


msvcrt.locking = locking
sys.modules["msvcrt"] = msvcrt
