"""Stop signals and the exit statuses after them: SLURM's USR1 before a time limit, SIGTERM (preemption, torchrun),
Ctrl-C. The handler only sets a flag; the training loop finishes its step, saves last.ckpt and raises Preempted.

    python run_train.py --exp smoke & sleep 8; kill -USR1 $!; wait $!; echo $?     # 75: saved, resume with --resume
"""
import signal

PREEMPTED_EXIT = 75         # exit code after a stop signal: last.ckpt is saved, requeue and --resume
INTERRUPTED_EXIT = 130      # after Ctrl-C (128 + SIGINT, as shells expect); last.ckpt is saved as well
STOPPED_AT_ONCE = ("stopped at once by a second Ctrl-C: nothing saved since the last checkpoint; "
                   "--resume goes on from it")


class Preempted(Exception):
    """A stop signal arrived; last.ckpt holds the state to resume from. .status is the exit status to end with."""

    def __init__(self, signum, saved):
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else \
            f"stopped by {signal.Signals(signum).name}" if isinstance(signum, int) else f"stopped ({signum})"
        super().__init__(f"{what}: saved {saved}; rerun with --resume")
        self.status = INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


stop_requested = []


def request_stop(signum, frame):
    """Only set a flag: the loop finishes its step, saves last.ckpt and raises Preempted. A second Ctrl-C stops at
    once (KeyboardInterrupt)."""
    if signum == signal.SIGINT and signal.SIGINT in stop_requested:
        raise KeyboardInterrupt
    stop_requested.append(signum)


def install_stop_handlers():
    for name in ("SIGUSR1", "SIGTERM", "SIGINT"):      # note: Windows has no SIGUSR1
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), request_stop)
