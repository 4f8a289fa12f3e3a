"""The background registration the Slicer panel runs (RadGSRegLib.job), with real child
processes: progress events arrive in order while the child runs, cancel leaves no process
and no temporary patient data behind, failures say why, nothing is left on any path."""
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.job import WORKSPACE_PREFIX, RegistrationJob, child_environment, remove_stale_workspaces
from RadGSRegLib.progress import STAGES, ProgressEvent, parse_line, to_json_line
from RadGSRegLib.register import RegisterConfig
from RadGSRegLib.register.config import Level, RefineConfig, SearchConfig

pytestmark = pytest.mark.skipif(os.name == "nt", reason="process-group handling is tested on POSIX")

#: a quick registration of the small phantom case (one rotation hypothesis, two levels)
QUICK = RegisterConfig(search=SearchConfig(rot_deg=(0.0,), candidates=1),
                       refine2d=RefineConfig(levels=[Level(48, 6, 1.0, 1.0, 30.0, None),
                                                     Level(96, 4, 0.5, 0.5, 20.0, 12.0)]), drrs=True)
#: a slow one, to cancel in the middle (27 rotation hypotheses)
SLOW = RegisterConfig(search=SearchConfig(rot_deg=(-12.0, 0.0, 12.0)))


@pytest.fixture(scope="module")
def case(small_phantom):
    ct, seg = small_phantom
    c = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=3.0, trans_mm=6.0, pixels=96, seed=3), np.random.default_rng(3))
    truth = c.ground_truth
    c.ground_truth, c.initial_guess = None, None       # what the panel sends: no answer, no guess
    return c, truth


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_progress_lines_round_trip():
    ev = ProgressEvent("progress", "search", 0.25, "pose search: rotation hypothesis 3/27")
    assert parse_line(to_json_line(ev)) == ev
    assert parse_line("  candidate (search score 0.5): final NCC 0.9") is None      # log text is not an event
    assert parse_line('{"event": "progress", "fraction": 2.5, "stage": "x", "new_field": 1}').fraction == 1.0
    assert parse_line('{"event": "unknown"}') is None and parse_line("{not json") is None


def test_child_environment_is_unbuffered_and_finds_the_package():
    env = child_environment({"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert env["PYTHONUNBUFFERED"] == "1"
    first, second = env["PYTHONPATH"].split(os.pathsep)[:2]
    assert (Path(first) / "RadGSRegLib" / "job.py").is_file() and second == "/elsewhere"


def test_background_registration_streams_progress_and_cleans_up(case, tmp_path):
    c, truth = case
    job = RegistrationJob(c, QUICK, threads=1, temp_dir=tmp_path).start()
    workspace = job.workspace
    assert workspace.is_dir() and (workspace.stat().st_mode & 0o077) == 0     # private: patient data
    seen = []
    job.wait(timeout=300, on_event=lambda ev: seen.append((ev, job._proc_box[0].poll() is None)))
    assert job.state == "finished", (job.error, list(job.log)[-5:])
    events = [ev for ev, _ in seen]
    assert events[0].stage == "start" and events[-1].event == "done"
    fractions = [ev.fraction for ev in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    order = list(STAGES)
    stages = [order.index(ev.stage) for ev in events if ev.event == "progress"]
    assert stages == sorted(stages) and {"search", "refine2d", "check", "write"} <= {ev.stage for ev in events}
    # events arrive while the child runs (unbuffered, read on threads), not all at its exit
    assert sum(alive for ev, alive in seen if ev.event == "progress") >= 3
    # the result is in memory; the workspace with the copy of the case is gone
    from RadGSRegLib.metrics import registration_errors, target_points

    pts = target_points(c.seg, c.vertebra_label, max_points=2000)
    assert registration_errors(job.result.T_ct_to_carm, truth, pts)["mtre_mm"] < 2.0
    assert set(job.result.drrs) == {"ap", "lat"} and "final_ncc_views" in job.result.info
    assert not workspace.exists() and not list(tmp_path.glob(WORKSPACE_PREFIX + "*"))


def test_cancel_stops_the_launcher_and_its_child_and_removes_the_data(case, tmp_path, monkeypatch):
    """Slicer starts the child through the PythonSlicer launcher: cancel must stop both."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text("import os, subprocess, sys\n"
                        "p = subprocess.Popen([sys.executable] + sys.argv[1:])\n"
                        "open(os.environ['RADGSREG_TEST_PIDFILE'], 'w').write(str(p.pid))\n"
                        "sys.exit(p.wait())\n")
    pidfile = tmp_path / "child.pid"
    monkeypatch.setenv("RADGSREG_TEST_PIDFILE", str(pidfile))
    work = tmp_path / "tmp"
    work.mkdir()
    job = RegistrationJob(case[0], SLOW, python=[sys.executable, str(launcher)], temp_dir=work).start()
    deadline = time.monotonic() + 120
    while not any(ev.stage == "search" for ev in job.poll()):       # cancel in the middle of the search
        assert time.monotonic() < deadline and not job.done, list(job.log)
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child) and _alive(job.pid)
    job.cancel()
    assert job.state == "cancelled" and job.done and job.result is None
    assert _gone(job.pid) and _gone(child), "a registration process outlived cancel"
    assert not any(work.iterdir()), "the copy of the patient data outlived cancel"
    job.cancel()                                                      # idempotent
    assert job.poll() == [] and job.state == "cancelled"


def test_failed_registration_says_why_and_leaves_nothing(case, tmp_path):
    import dataclasses

    bad = dataclasses.replace(QUICK, init="learned", model=str(tmp_path / "missing.pt"))
    job = RegistrationJob(case[0], bad, temp_dir=tmp_path).start()
    job.wait(timeout=120)
    assert job.state == "failed" and job.returncode != 0
    assert "missing.pt" in job.error, job.error
    assert not list(tmp_path.glob(WORKSPACE_PREFIX + "*"))


def test_a_forgotten_job_is_stopped_and_cleaned(case, tmp_path):
    job = RegistrationJob(case[0], SLOW, temp_dir=tmp_path).start()
    pid, workspace = job.pid, job.workspace
    del job
    gc.collect()
    assert _gone(pid) and not workspace.exists()


def test_stale_workspaces_of_dead_processes_are_removed(tmp_path):
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("stale", dead.pid), ("live", os.getpid())):
        d = tmp_path / f"{WORKSPACE_PREFIX}{name}"
        (d / "case").mkdir(parents=True)
        (d / "owner.json").write_text(json.dumps({"pid": pid}))
    other = tmp_path / f"{WORKSPACE_PREFIX}not-ours"                 # no owner file: not touched
    other.mkdir()
    removed = remove_stale_workspaces(tmp_path)
    assert removed == [tmp_path / f"{WORKSPACE_PREFIX}stale"]
    assert (tmp_path / f"{WORKSPACE_PREFIX}live").is_dir() and other.is_dir()


def test_reporter_fractions_follow_the_stages_and_never_go_back():
    from RadGSRegLib.progress import Reporter

    events = []
    r = Reporter(events.append)
    r.stage("search", within=(0, 4))
    r.stage("search", within=(2, 4))
    r.stage("refine2d")
    r.stage("check")
    r.stage("output", within=(25, 50))        # the reconstruction for display, after the check
    r.stage("search")                          # a stage out of order does not move the bar back
    f = [e.fraction for e in events]
    assert f[0] == STAGES["search"] and f[1] == pytest.approx((STAGES["search"] + STAGES["learned"]) / 2)
    assert STAGES["output"] < f[4] < STAGES["write"] and f == sorted(f)
    with pytest.raises(ValueError, match="unknown progress stage"):
        r.stage("warp")


def test_default_python_is_pythonslicer_only_inside_slicer(monkeypatch, tmp_path):
    import types

    from RadGSRegLib.job import default_python

    assert default_python() == [sys.executable]                # plain Python (slicer-core has no app)
    fake = types.ModuleType("slicer")
    fake.app = object()
    monkeypatch.setitem(sys.modules, "slicer", fake)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="PythonSlicer"):
        default_python()
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    assert default_python() == [str(launcher)]
