"""Writers that never clobber: refuse to overwrite unless told, write to a temp name, rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "full_suffix"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def full_suffix(path: Path) -> str:
    """".nii.gz" for "x.nii.gz", ".nrrd" for "x.nrrd"."""
    s = "".join(path.suffixes[-2:]) if path.suffixes[-1:] == [".gz"] else path.suffix
    return s


@contextlib.contextmanager
def atomic_file(path, overwrite: bool = False):
    """Yield a temporary path beside ``path`` (same extension); rename it onto ``path`` on success.

    Raises FileExistsError if ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
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
def atomic_dir(path, overwrite: bool = False):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    An existing folder is kept until the new one is complete, then removed.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
