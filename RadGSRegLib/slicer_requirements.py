"""The Python packages RadGSRegLib needs inside 3D Slicer, and how to install them without
touching Slicer's own.

Slicer's Python already holds numpy, scipy, SimpleITK, VTK and Pillow (Slicer's
``SuperBuild/External_python-*.cmake``); replacing any of them can break Slicer, so the
install runs pip with a constraints file that pins each of them to the version installed
(:func:`constraints`). PyTorch comes from Slicer's *PyTorch* extension
(``PyTorchUtils``), never from here. Everything else in :data:`REQUIREMENTS` is installed on
first use. Import-free of torch and of the packages it checks, so it runs before they exist.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from typing import Optional

__all__ = ["REQUIREMENTS", "SLICER_OWNED", "TORCH_REQUIREMENT", "missing_requirements", "constraints",
           "pip_arguments", "torch_problem"]

#: (import name, pip requirement) of what RadGSRegLib needs beyond Slicer's own packages and torch
REQUIREMENTS = (
    ("numba", "numba>=0.60"),
    ("monai", "monai>=1.4"),
    ("einops", "einops>=0.7"),
    ("roma", "roma>=1.5"),
    ("tqdm", "tqdm>=4.60"),
    ("nrrd", "pynrrd>=1.0"),
)
#: distributions Slicer bundles (with the minimum RadGSRegLib needs): pinned, never replaced
SLICER_OWNED = (("numpy", "numpy>=1.26"), ("scipy", "scipy>=1.11"), ("SimpleITK", "SimpleITK>=2.3"),
                ("vtk", "vtk"), ("pillow", "pillow>=10"))
#: what RadGSRegLib needs of torch (installed by the PyTorch extension)
TORCH_REQUIREMENT = ">=2.0"


def _version_tuple(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _satisfied(requirement: str, distribution: str) -> bool:
    """Is ``distribution`` installed at a version that meets ``requirement`` ("name>=x.y")?"""
    try:
        have = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    m = re.search(r">=\s*([\d.]+)", requirement)
    return m is None or _version_tuple(have) >= _version_tuple(m.group(1))


def missing_requirements() -> list:
    """The pip requirements of :data:`REQUIREMENTS` that are absent or too old."""
    out = []
    for module, requirement in REQUIREMENTS:
        distribution = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
        if importlib.util.find_spec(module) is None or not _satisfied(requirement, distribution):
            out.append(requirement)
    return out


def torch_problem() -> Optional[str]:
    """Why the installed torch cannot be used (absent, or older than
    :data:`TORCH_REQUIREMENT`), or None when it can."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed"
    if not _satisfied("torch" + TORCH_REQUIREMENT, "torch"):
        return (f"PyTorch {importlib.metadata.version('torch')} is older than RadGSReg needs "
                f"(torch{TORCH_REQUIREMENT}): update it in the PyTorch extension")
    return None


def constraints() -> str:
    """A pip constraints file's text pinning each installed Slicer-owned distribution, and
    torch (the PyTorch extension's), to its installed version (``numpy==1.26.4`` ...), so that
    installing a requirement never replaces them."""
    lines = []
    for distribution in [d for d, _ in SLICER_OWNED] + ["torch"]:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        lines.append(f"{distribution}=={version}")
    return "\n".join(lines) + "\n"


def pip_arguments(requirements: list, constraints_file: Optional[str] = None) -> list:
    """Arguments after ``pip install`` for ``requirements``, constrained by
    ``constraints_file`` (written from :func:`constraints`)."""
    args = ["-c", str(constraints_file)] if constraints_file else []
    return args + list(requirements)
