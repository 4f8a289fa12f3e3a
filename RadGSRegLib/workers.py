"""Worker processes on this machine: one pool for every job that runs its pieces in parallel
(a batch's cases, a training run's sample shards), and one call in a process of its own (a
benchmark's measurement, its memory and threads apart from the caller's).

A job that stops early must not leave its workers running on their own. Ctrl-C in a terminal
reaches every process of the job; ``kill PID`` (SIGTERM: what a scheduler, a shell script
or a Slicer job's Cancel sends) reaches only the one it names. :func:`process_pool`
therefore stops its workers itself when the block is left through an exception
(KeyboardInterrupt included). Its workers turn SIGINT and SIGTERM into KeyboardInterrupt
while they run a task, so that the task's clean-ups (temporary outputs removed,
:mod:`RadGSRegLib.io.atomic`) happen, and leave quietly while they wait for one.
"""
from __future__ import annotations

import contextlib
import signal
import time

__all__ = ["process_pool", "run_in_child"]

#: in a worker: whether it runs a task (its signal handler then raises KeyboardInterrupt)
_BUSY = []
#: in a worker: the signals it got; once it has one it starts no other task (the executor
#: hands a task or two to its workers ahead of time, where cancelling cannot reach them)
_STOPPED = []


def _on_signal(signum, frame):
    _STOPPED.append(signum)
    if _BUSY:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)       # waiting for work: nothing to clean up, no traceback


def _start_worker(initializer, initargs):
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if initializer is not None:
        initializer(*initargs)


def _task(fn, args):
    if _STOPPED:
        raise KeyboardInterrupt
    _BUSY.append(True)
    try:
        return fn(*args)
    finally:
        _BUSY.clear()


class _Pool:
    """What :func:`process_pool` yields: ``submit(fn, *args)`` returns a
    ``concurrent.futures.Future``. ``fn`` and its arguments are pickled (module-level
    functions and plain values)."""

    def __init__(self, executor):
        self._executor = executor

    def submit(self, fn, *args):
        return self._executor.submit(_task, fn, args)


def _stop(executor, grace_s: float) -> None:
    """Cancel what has not started; ask the running workers to stop (SIGTERM), kill those
    still running after ``grace_s`` seconds (SIGKILL); wait for all of them."""
    # the workers as they are now (shutdown forgets them). ProcessPoolExecutor has no public
    # list of its processes before Python 3.14 (terminate_workers); _processes is its pid -> Process map
    procs = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()


@contextlib.contextmanager
def process_pool(workers: int, *, initializer=None, initargs: tuple = (), grace_s: float = 10.0):
    """A pool of ``workers`` new (spawned, not forked) processes.

    ``initializer(*initargs)`` runs once in each worker before its first task. Leaving the
    block normally waits for every submitted task. Leaving it through an exception
    (KeyboardInterrupt from Ctrl-C or SIGTERM included) cancels the tasks not yet started and
    stops the running ones: each gets KeyboardInterrupt (its ``finally`` blocks run), and a
    worker still alive ``grace_s`` seconds later is killed. No worker outlives the block.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                                   initargs=(initializer, initargs))
    try:
        yield _Pool(executor)
    except BaseException:
        _stop(executor, grace_s)
        raise
    executor.shutdown(wait=True)


def run_in_child(fn, *args, grace_s: float = 10.0):
    """``fn(*args)`` in a new (spawned) process of its own; returns what it returns (pickled
    back). The child's peak memory and threads are its own, as a benchmark's measurement
    needs. An interrupt of the caller (Ctrl-C, SIGTERM) stops the child as
    :func:`process_pool` does; a child that dies without a result (killed, out of memory)
    raises ``concurrent.futures.process.BrokenProcessPool`` instead of leaving the caller
    waiting."""
    with process_pool(1, grace_s=grace_s) as pool:
        return pool.submit(fn, *args).result()
