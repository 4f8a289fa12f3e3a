"""Worker processes stop with their job: an exception in the pool's block, Ctrl-C, or a
``kill PID`` (SIGTERM) of the command leaves no worker running on its own."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from RadGSRegLib.workers import process_pool, run_in_child

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _square(x):
    return x * x


def _slow(folder, k):
    """A task that says it started (with its pid), then waits; its ``finally`` leaves a mark."""
    folder = Path(folder)
    (folder / f"started{k}").write_text(str(os.getpid()))
    try:
        time.sleep(120)
    finally:
        (folder / f"cleaned{k}").write_text("")


def _die():
    os._exit(3)                                     # as a child killed or out of memory would


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing workers whose parent is ``pid``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            found.append(int(d.name))
    return found


def _wait_for(pred, timeout_s: float, what: str):
    end = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_the_pool_returns_what_its_workers_compute():
    with process_pool(2) as pool:
        futures = [pool.submit(_square, k) for k in range(5)]
        assert [f.result() for f in futures] == [0, 1, 4, 9, 16]


def test_a_call_in_a_child_returns_its_value_and_a_dead_child_raises():
    """A benchmark's measurement runs in a process of its own; one that dies without a
    result raises (before: the caller waited on a queue for ever)."""
    from concurrent.futures.process import BrokenProcessPool

    assert run_in_child(_square, 7) == 49
    with pytest.raises(BrokenProcessPool):
        run_in_child(_die)


@linux_only
def test_leaving_the_block_through_an_error_stops_the_running_workers_with_their_clean_ups(tmp_path):
    t0 = None
    with pytest.raises(RuntimeError, match="the caller failed"):
        with process_pool(2, grace_s=30.0) as pool:
            futures = [pool.submit(_slow, str(tmp_path), k) for k in range(3)]      # the third never starts
            _wait_for(lambda: all((tmp_path / f"started{k}").exists() for k in range(2)), 60, "two tasks")
            pids = [int((tmp_path / f"started{k}").read_text()) for k in range(2)]
            t0 = time.monotonic()
            raise RuntimeError("the caller failed")
    # the running tasks were stopped (well before their 120 s), their finally blocks ran
    assert time.monotonic() - t0 < 30
    assert (tmp_path / "cleaned0").exists() and (tmp_path / "cleaned1").exists()
    assert not (tmp_path / "started2").exists()                      # queued, never begun
    assert all(isinstance(f.exception(), (KeyboardInterrupt, BaseException)) or f.cancelled() for f in futures)
    assert not any(_alive(p) for p in pids)


@linux_only
def test_sigterm_during_the_sample_simulation_stops_train_and_its_workers(tmp_path):
    """``kill PID`` of ``radgsreg train`` while two processes simulate the samples: the
    command says it was terminated (exit 143) and neither worker outlives it."""
    cfg = {"stage": 1, "phantoms": 12, "samples_per_ct": 16, "val_samples": 1, "data_shards": 2, "data_workers": 2,
           "rec_epochs": 1, "reg_epochs": 0, "joint_epochs": 0, "batch": 2, "threads": 1,
           "model": {"anchors": 4, "per_anchor": 1, "image_pixels": 64, "features": 8, "hidden": 16, "voxels": 16,
                     "render_pixels": 32}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    err_file = tmp_path / "stderr.txt"
    workers = []
    with open(err_file, "w") as err_out:        # not a pipe: a worker left behind would hold it open
        proc = subprocess.Popen([sys.executable, "-m", "RadGSRegLib.cli", "train", "--config",
                                 str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run")],
                                stdout=subprocess.DEVNULL, stderr=err_out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(lambda: len(_spawned_children(proc.pid)) == 2 or proc.poll() is not None, 120, "the two workers")
        workers = _spawned_children(proc.pid)
        assert proc.poll() is None and len(workers) == 2, "train ended before its workers could be seen"
        time.sleep(1.0)                                  # the workers start on their shards
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        err = err_file.read_text()
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "terminated" in err and "Traceback" not in err, err[-2000:]
        assert not any(_alive(p) for p in workers), "a worker outlived train"
    finally:                                             # nothing of a failed run left running
        for pid in [proc.pid] + workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
