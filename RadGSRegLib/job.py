"""A registration in a child process: what the Slicer panel runs so that Slicer stays
responsive, usable (and tested) without Qt.

One :class:`RegistrationJob`:

1. writes the case and its :class:`~RadGSRegLib.register.RegisterConfig` (JSON) into a
   private temporary workspace (``RadGSReg-*`` in the system's temp folder, mode 0700,
   with an ``owner.json`` naming the process that made it);
2. starts ``<python> -u -m RadGSRegLib.cli register CASE --out RESULT --config CONFIG
   --progress json`` with ``PYTHONUNBUFFERED=1`` and this package on ``PYTHONPATH``, in a
   new process group (session), so that a launcher such as Slicer's ``PythonSlicer`` and
   the interpreter it starts can be stopped together;
3. reads the child's standard output (JSON progress events, :mod:`RadGSRegLib.progress`)
   and standard error (its log) on two reader threads; :meth:`poll` hands the events to
   the caller's thread (the Slicer widget calls it from a ``QTimer``), :meth:`wait`
   blocks (scripts, tests);
4. on success reads the result folder into memory (:attr:`result`), and in every case —
   success, failure, :meth:`cancel`, garbage collection, interpreter exit — removes the
   workspace, which holds a copy of the patient's CT and X-rays.

:meth:`cancel` stops the whole process group (SIGTERM, then SIGKILL after a grace period;
``taskkill /T /F`` on Windows). :func:`remove_stale_workspaces` removes workspaces left by
processes that no longer exist (a crash, a killed Slicer).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Optional, Sequence

from .progress import ProgressEvent, parse_line

__all__ = ["RegistrationJob", "remove_stale_workspaces", "WORKSPACE_PREFIX", "child_environment", "register_command",
           "default_python"]

#: name prefix of the temporary workspaces
WORKSPACE_PREFIX = "RadGSReg-"
_LIB_ROOT = Path(__file__).resolve().parents[1]          # the folder holding RadGSRegLib/


def default_python() -> list:
    """The command that runs Python for the child. Inside the Slicer application: its
    ``PythonSlicer`` launcher (on ``PATH`` there; it sets up Slicer's libraries, while
    ``sys.executable`` is the application itself). Anywhere else: this interpreter."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        launcher = shutil.which("PythonSlicer")
        if not launcher:
            raise RuntimeError("PythonSlicer was not found on PATH: cannot start the registration process")
        return [launcher]
    return [sys.executable]


def child_environment(base: Optional[dict] = None) -> dict:
    """The environment of the child: ``base`` (default: this process's) with unbuffered
    UTF-8 output and this package's folder first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    paths = [str(_LIB_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def register_command(python: Sequence[str], case_dir: Path, result_dir: Path, config_file: Path,
                     threads: Optional[int] = None) -> list:
    """The child's command line (``python`` is the interpreter or launcher, as a list)."""
    cmd = [*python, "-u", "-m", "RadGSRegLib.cli", "register", str(case_dir), "--out", str(result_dir),
           "--config", str(config_file), "--progress", "json"]
    if threads is not None:
        cmd += ["--threads", str(int(threads))]
    return cmd


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if os.name == "nt":                                   # no signal-0 probe on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                               # exists, another user's
        return True
    return True


def remove_stale_workspaces(temp_dir=None) -> list:
    """Remove ``RadGSReg-*`` workspaces whose owner process no longer exists (POSIX; on
    Windows nothing is removed). Returns the removed paths."""
    base = Path(temp_dir or tempfile.gettempdir())
    removed = []
    for d in base.glob(WORKSPACE_PREFIX + "*"):
        owner = d / "owner.json"
        try:
            pid = int(json.loads(owner.read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue                                      # not ours, or being written: leave it
        if not _pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _kill_tree(proc: subprocess.Popen, grace_s: float) -> None:
    """Stop ``proc`` and every process of its group: SIGTERM, then SIGKILL after ``grace_s``."""
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        return
    pgid = proc.pid                                       # start_new_session: the child leads its group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break                                         # the whole group is gone
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass


def _pump(stream, kind: str, q: "queue.Queue") -> None:
    """Reader thread: each line of ``stream`` into ``q`` as (kind, line). Holds no reference
    to the job, so that a forgotten job can be collected (and its child stopped)."""
    for line in stream:
        q.put((kind, line.rstrip("\n")))
    stream.close()


def _remove(workspace: Path, attempts: int = 5) -> bool:
    """Remove the workspace; retried, since on Windows a process that is being stopped may
    still hold a file for a moment. Returns whether it is gone."""
    for i in range(attempts):
        shutil.rmtree(workspace, ignore_errors=True)
        if not workspace.exists():
            return True
        time.sleep(0.2 * (i + 1))
    return False


def _cleanup(proc_box: list, workspace: Path, grace_s: float) -> None:
    """Finalizer: stop the child if it still runs, remove the workspace."""
    proc = proc_box[0] if proc_box else None
    if proc is not None and proc.poll() is None:
        _kill_tree(proc, grace_s)
    _remove(workspace)


class RegistrationJob:
    """One registration in a child process (see the module docstring).

    Args:
        case: the case to register (its ground truth, if any, is left out of the copy).
        config: the registration settings; the child reads them from a JSON file.
        python: the command that runs Python: a path or a list (e.g. ``[PythonSlicer]``);
            default :func:`default_python`.
        threads: CPU threads for the child (``--threads``); None: the CLI's default.
        temp_dir: where the workspace is made (default the system's temp folder).
        grace_s: how long :meth:`cancel` waits after SIGTERM before SIGKILL.

    States: "new" -> "running" -> "finished" | "failed" | "cancelled".
    """

    def __init__(self, case, config, *, python=None, threads: Optional[int] = None, temp_dir=None,
                 grace_s: float = 3.0):
        self.case, self.config = case, config
        self.python = default_python() if python is None else ([python] if isinstance(python, (str, Path)) else list(python))
        self.python = [str(p) for p in self.python]
        self.threads, self.temp_dir, self.grace_s = threads, temp_dir, grace_s
        self.state = "new"
        self.result = None                 #: the Result, once finished
        self.error: Optional[str] = None   #: one-line reason, once failed or cancelled
        self.warnings: list = []           #: warning events' messages
        self.fraction = 0.0                #: progress of the job, from its events
        self.log = collections.deque(maxlen=400)    #: the child's human log (stderr), last lines
        self.workspace: Optional[Path] = None
        self.returncode: Optional[int] = None
        self._proc_box: list = []
        self._queue: "queue.Queue" = queue.Queue()
        self._readers: list = []
        self._finalizer = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> "RegistrationJob":
        """Write the workspace and start the child. Returns ``self``."""
        from .io import write_case
        from .register.config import config_to_dict

        if self.state != "new":
            raise RuntimeError(f"this job was already started (state {self.state})")
        remove_stale_workspaces(self.temp_dir)
        self.workspace = Path(tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=self.temp_dir))
        self._finalizer = weakref.finalize(self, _cleanup, self._proc_box, self.workspace, self.grace_s)
        try:
            (self.workspace / "owner.json").write_text(json.dumps({"pid": os.getpid()}))
            # never the answer: a case's ground truth stays out of the child's copy
            write_case(dataclasses.replace(self.case, ground_truth=None), self.workspace / "case", ct_dtype="float32")
            (self.workspace / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=1))
            cmd = register_command(self.python, self.workspace / "case", self.workspace / "result",
                                   self.workspace / "config.json", self.threads)
            # a process group of its own (cancel stops all of it); no console window on Windows
            kwargs = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW} \
                if os.name == "nt" else {"start_new_session": True}
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=child_environment(), cwd=str(self.workspace), text=True, encoding="utf-8",
                                    errors="replace", bufsize=1, **kwargs)
        except BaseException:
            self._finalizer()
            self.state = "failed"
            raise
        self._proc_box.append(proc)
        for stream, kind in ((proc.stdout, "out"), (proc.stderr, "err")):
            t = threading.Thread(target=_pump, args=(stream, kind, self._queue), daemon=True,
                                 name=f"RadGSReg job reader ({kind})")
            t.start()
            self._readers.append(t)
        self.state = "running"
        return self

    @property
    def pid(self) -> Optional[int]:
        """The child's process id (the launcher's, when ``python`` is a launcher)."""
        return self._proc_box[0].pid if self._proc_box else None

    @property
    def done(self) -> bool:
        return self.state in ("finished", "failed", "cancelled")

    def poll(self) -> list:
        """The events that arrived since the last call (in order); finishes the job when the
        child has exited and its output is read. Never blocks."""
        events = []
        while True:
            try:
                kind, line = self._queue.get_nowait()
            except queue.Empty:
                break
            ev = parse_line(line) if kind == "out" else None
            if ev is None:
                self.log.append(line)
                continue
            self.fraction = max(self.fraction, ev.fraction)
            if ev.event == "warning":
                self.warnings.append(ev.message)
            elif ev.event == "error":
                self.error = ev.message
            events.append(ev)
        if self.state == "running":
            proc = self._proc_box[0]
            if proc.poll() is not None and not any(t.is_alive() for t in self._readers) and self._queue.empty():
                self._finish(proc.returncode)
        return events

    def wait(self, timeout: Optional[float] = None, on_event: Optional[Callable[[ProgressEvent], None]] = None,
             interval: float = 0.05) -> "RegistrationJob":
        """Block until the job is done (or ``timeout`` seconds pass: then TimeoutError),
        passing each event to ``on_event``. Returns ``self``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for ev in self.poll():
                if on_event:
                    on_event(ev)
            if self.done:
                return self
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"registration still running after {timeout} s")
            time.sleep(interval)

    def cancel(self) -> None:
        """Stop the child and everything it started; remove the workspace. Idempotent."""
        if self.done:
            return
        if self.state == "running":
            _kill_tree(self._proc_box[0], self.grace_s)
            for t in self._readers:
                t.join(timeout=2.0)
            self.returncode = self._proc_box[0].returncode
        while not self._queue.empty():                 # what the child said before it stopped
            kind, line = self._queue.get_nowait()
            if kind == "err" or parse_line(line) is None:
                self.log.append(line)
        self.state = "cancelled"
        self.error = "registration cancelled"
        if self._finalizer is not None:
            self._finalizer()

    def _finish(self, returncode: int) -> None:
        from .io import read_result

        self.returncode = returncode
        if returncode == 0:
            try:
                self.result = read_result(self.workspace / "result")
                self.state = "finished"
            except Exception as e:                     # a child that exits 0 without a result
                self.state = "failed"
                self.error = f"the registration ended without a readable result ({e})"
        else:
            self.state = "failed"
            if not self.error:
                tail = [ln for ln in self.log if ln.strip()][-3:]
                self.error = (f"the registration process ended with exit code {returncode}"
                              + (": " + " | ".join(tail) if tail else ""))
        self._finalizer()
