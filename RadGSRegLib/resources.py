"""Where RadGSReg's shipped files are: one lookup for every way the package is installed.

The files (model weights, training configs, the sample CT) have one source: the repository's
top-level ``Resources/`` folder. Each layout puts them somewhere else:

- an installed wheel: package data, ``RadGSRegLib/_resources/<name>`` (setup.py maps
  ``Resources/Models`` and ``Resources/SampleData`` there);
- a source checkout (and an editable install of it): ``<checkout>/Resources/<name>``, beside
  the ``RadGSRegLib`` folder;
- the Slicer extension: ``<qt-scripted-modules>/Resources/<name>``, also beside the
  ``RadGSRegLib`` folder (RadGSReg/CMakeLists.txt copies it there).

:func:`resource_path` looks in those places in that order and returns the first file found::

    from RadGSRegLib.resources import resource_path
    weights = resource_path("Models/radgsreg_stage1.pt")
    ct = resource_path("SampleData/example_ct.nii.gz")

Names are POSIX paths relative to ``Resources/``. The result is a real file on disk (other
libraries open it by name), so a zipped install, where there is none, is not searched. The
icon and the panel's .ui file are the Slicer module's (``RadGSReg.py`` opens them); wheels do
not carry them. Torch-free, Python 3.9 (Slicer imports it).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath
from typing import List, Optional, Sequence, Tuple

__all__ = ["resource_path", "find_resource", "resource_roots", "ResourceNotFoundError", "PACKAGE_DATA_DIR"]

#: the folder of the package that holds the shipped files in a wheel
PACKAGE_DATA_DIR = "_resources"


class ResourceNotFoundError(FileNotFoundError):
    """A shipped file that is in none of the places searched; the message names the file
    and every place looked at."""

    def __init__(self, name: str, looked_at: Sequence[Tuple[Path, str]], hint: str = ""):
        self.name = name
        self.looked_at = [p for p, _ in looked_at]
        where = "; ".join(f"{p} ({what})" for p, what in looked_at) or "no folder to search"
        msg = f"the RadGSReg resource '{name}' is missing: looked for {where}"
        super().__init__(msg + (f". {hint}" if hint else ""))


def _package_dir() -> Optional[Path]:
    """The RadGSRegLib package folder as importlib.resources sees it (None when it is not a
    folder on disk, e.g. zipped)."""
    try:
        root = importlib.resources.files(__package__ or "RadGSRegLib")
    except (ImportError, TypeError):
        root = None
    if isinstance(root, Path):
        return root.resolve()
    return None


def resource_roots() -> List[Tuple[Path, str]]:
    """The folders searched, in order, each with what it is: the wheel's package data, then
    the ``Resources`` folder beside the ``RadGSRegLib`` folder (source checkout, Slicer
    extension). The folders need not exist."""
    here = Path(__file__).resolve().parent
    pkg = _package_dir() or here
    return [(pkg / PACKAGE_DATA_DIR, "package data of an installed wheel"),
            (here.parent / "Resources", "the Resources folder of a source checkout or the Slicer extension")]


def _relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name or rel == PurePosixPath("."):
        raise ValueError(f"a resource name is a relative POSIX path inside Resources/ (e.g. "
                         f"'Models/radgsreg_stage1.pt'), not {name!r}")
    return rel


def find_resource(name: str) -> Optional[Path]:
    """The shipped file ``name`` (e.g. ``"Models/radgsreg_stage1.pt"``) as an absolute path,
    or None when no layout has it."""
    rel = _relative(name)
    for root, _ in resource_roots():
        p = root.joinpath(*rel.parts)
        if p.is_file():
            return p
    return None


def resource_path(name: str, hint: str = "") -> Path:
    """The shipped file ``name`` as an absolute path; :class:`ResourceNotFoundError` (a
    FileNotFoundError) naming it and every place looked at when it is missing, ``hint``
    added to the message."""
    p = find_resource(name)
    if p is None:
        rel = _relative(name)
        raise ResourceNotFoundError(name, [(root.joinpath(*rel.parts), what) for root, what in resource_roots()],
                                    hint or "A wheel install ships it; reinstall radgsreg, or run from a source checkout.")
    return p
