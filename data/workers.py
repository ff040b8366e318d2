"""How data-loader worker processes meet the job's signals: they leave SIGTERM to their rank (which
checkpoints and ends them), start with it held, and die with their rank (data/mixture.py Loader)."""

from __future__ import annotations

import contextlib
import signal
import threading


def leave_sigterm_to_the_rank(worker_id: int) -> None:
    """A scheduler's SIGTERM (SLURM's scancel, Kubernetes) reaches every process of the job, the
    data-loader workers too: they ignore it, so their rank can finish its step, agree on stopping
    with the other ranks and checkpoint (training/trainer.py), then end them itself. A worker killed
    by the signal would instead make the rank raise "DataLoader worker ... is killed by signal".
    The worker starts with SIGTERM blocked (`holding_sigterm`), so one sent while it was still
    starting waits, and is dropped here once ignored. Since they no longer die of SIGTERM, they die
    with their rank instead (Linux: the kernel sends them SIGKILL when it exits, however it exits):
    an orphaned worker with batches nobody reads would block forever flushing its queue, holding the
    job's pipes open."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the DataLoader's own parent watchdog remains
        pass


@contextlib.contextmanager
def holding_sigterm(start_method: str):
    """SIGTERM blocked in this thread while data-loader workers start: a started process inherits the
    signal mask (across exec too), so a spawned worker cannot die of a SIGTERM in the second or two
    before `leave_sigterm_to_the_rank` runs. The rank's own SIGTERM is only delayed until this ends
    (another thread may also take it: Python runs the handler in the main thread either way)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    if start_method == "spawn":  # a spawn starts multiprocessing's resource tracker once and unblocks SIGTERM
        from multiprocessing import resource_tracker  # after it (bpo-33613): start it before the block

        resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
