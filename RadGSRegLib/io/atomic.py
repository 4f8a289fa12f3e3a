"""Writers that never clobber: refuse to overwrite unless told, write to a temp name, rename.

Temporary names start with "." (``.NAME.XXXXXXXX.tmp`` beside a folder, ``.NAME.XXXXXXXX.ext``
beside a file) and are removed on every exception, KeyboardInterrupt included (the command line
and its worker processes turn SIGTERM into one); the output appears only when complete, in one
rename. A process killed outright (SIGKILL, power loss) can leave such a hidden temp behind,
never a visible half-written output: delete it by hand.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from ..errors import OutputError

__all__ = ["atomic_file", "atomic_dir", "full_suffix", "OutputExistsError"]


class OutputExistsError(OutputError, FileExistsError):
    """The output exists and ``overwrite`` (``--overwrite``) was not given. Both an
    :class:`~RadGSRegLib.errors.OutputError` and a ``FileExistsError``."""


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def full_suffix(path: Path) -> str:
    """".nii.gz" for "x.nii.gz", ".nrrd" for "x.nrrd"."""
    s = "".join(path.suffixes[-2:]) if path.suffixes[-1:] == [".gz"] else path.suffix
    return s


def _real(path) -> Path:
    """The path with symbolic links resolved: a link to an output is written through, the
    link itself is kept."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


@contextlib.contextmanager
def _signals_deferred():
    """Hold a Ctrl-C (SIGINT) or a SIGTERM that arrives inside the block until its end, so
    that a two-step rename is never cut in half; then it takes its course (the handler that
    was there runs; Python's defaults: KeyboardInterrupt for SIGINT, the end of the process
    for SIGTERM). Outside the main thread: no effect."""
    got = []
    prev = {}
    if threading.current_thread() is threading.main_thread():
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                h = signal.getsignal(sig)
                if h is not None:                          # None: a handler not installed from Python
                    prev[sig] = h
                    signal.signal(sig, lambda s, f: got.append(s))
        except (ValueError, OSError, AttributeError):      # pragma: no cover - embedded interpreters
            for sig, h in prev.items():
                signal.signal(sig, h)
            prev = {}
    try:
        yield
    finally:
        for sig, h in prev.items():
            signal.signal(sig, h)
        for sig in dict.fromkeys(got):                     # each one once, in the order they came
            h = prev[sig]
            if callable(h):
                h(sig, None)
            elif h == signal.SIG_DFL and sig == signal.SIGINT:
                raise KeyboardInterrupt
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


@contextlib.contextmanager
def atomic_file(path, overwrite: bool = False):
    """Yield a temporary path beside ``path`` (same extension); rename it onto ``path`` on success.

    Raises :class:`OutputExistsError` (a FileExistsError) if ``path`` exists and
    ``overwrite`` is False. Which files may be replaced at all is decided by
    :func:`~RadGSRegLib.io.outputs.check_output_file`.
    """
    shown = path
    path = _real(path)
    if os.path.lexists(path) and not overwrite:
        raise OutputExistsError(f"{shown} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=full_suffix(path) or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_dir(path, overwrite: bool = False, *, kind: str | None = None, inputs=()):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    Args:
        path: the output folder.
        overwrite: replace an existing folder (with ``kind``: only our own previous output
            of that kind).
        kind: one of :data:`~RadGSRegLib.io.outputs.FOLDER_KINDS`. Given, the location is
            checked first (:func:`~RadGSRegLib.io.outputs.check_output`: an error before
            anything is written) and the marker ``.radgsreg.json`` is written into the
            folder, last, so that it arrives with the complete folder.
        inputs: the inputs :func:`check_output` protects (with ``kind``).

    An existing folder is kept until the new one is complete, then removed. On any
    exception (KeyboardInterrupt included) the temporary folder is removed and ``path`` is
    left as it was.
    """
    shown = path
    if kind is not None:
        from .outputs import check_output

        check_output(path, kind, overwrite=overwrite, inputs=inputs)
    path = _real(path)
    if os.path.lexists(path) and not overwrite and not (path.is_dir() and not any(os.scandir(path))):
        raise OutputExistsError(f"{shown} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield tmp
        if kind is not None:
            from .outputs import MARKER, stamp

            (tmp / MARKER).write_text(json.dumps(stamp(kind), indent=1))
        os.chmod(tmp, 0o777 & ~_umask())
        with _signals_deferred():
            # the location again, now: a long job may have been overtaken (another run wrote
            # there, someone put files there); the new folder never replaces what it may not
            if os.path.lexists(path) and not (path.is_dir() and not any(os.scandir(path))):
                if not overwrite:
                    raise OutputExistsError(f"{shown} was created while this job ran; its result is not written "
                                            "(pass --overwrite to replace it)")
                if kind is not None:
                    from .outputs import why_not_ours

                    why = why_not_ours(path, kind)
                    if why is not None:
                        raise OutputError(f"{shown} changed while this job ran and now {why}; its result is not "
                                          "written")
            if os.path.lexists(path):
                old = path.parent / f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)             # put the old folder back
                    old = None
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and os.path.lexists(old):
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
