"""The bundled real CT: a lumbar CT with TotalSegmentator vertebra labels.

From TotalSegmentator 2.18.0's source distribution (Apache-2.0; see
``Resources/SampleData/NOTICE``): 122 x 101 x 112 voxels at 3 mm, L1-L5 and S1 complete,
T12 cut by the top of the scan. The files are the shipped resources ``SampleData/...``
(:mod:`RadGSRegLib.resources`: ``Resources/SampleData`` of a source checkout or the Slicer
extension, package data of a wheel); ``RADGSREG_SAMPLE_DATA`` points elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .resources import ResourceNotFoundError, resource_path

__all__ = ["SampleData", "lumbar_ct", "sample_data_dir", "recorded_checksums", "LUMBAR_LEVELS"]

#: the complete vertebrae of the sample, top down
LUMBAR_LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1")


@dataclass(frozen=True)
class SampleData:
    """Paths of the bundled sample: CT (HU) and its vertebra label map (same grid)."""

    ct: Path
    seg: Path
    license: Path
    notice: Path


def sample_data_dir() -> Path:
    """Where the sample files are: ``$RADGSREG_SAMPLE_DATA``, else the folder of the shipped
    resource ``SampleData/example_ct.nii.gz`` (:func:`RadGSRegLib.resources.resource_path`)."""
    hint = ("It ships with the source tree, the wheel and the Slicer extension; RADGSREG_SAMPLE_DATA can name "
            "a folder holding example_ct.nii.gz and totalseg.nii.gz (Resources/SampleData/fetch_sample_data.py "
            "in the source tree re-derives them).")
    env = os.environ.get("RADGSREG_SAMPLE_DATA")
    if not env:
        return resource_path("SampleData/example_ct.nii.gz", hint=hint).parent
    d = Path(env)
    if not (d / "example_ct.nii.gz").is_file():
        raise ResourceNotFoundError("SampleData/example_ct.nii.gz",
                                    [(d / "example_ct.nii.gz", "RADGSREG_SAMPLE_DATA")], hint=hint)
    return d


def lumbar_ct() -> SampleData:
    """The lumbar sample's file paths."""
    d = sample_data_dir()
    return SampleData(ct=d / "example_ct.nii.gz", seg=d / "totalseg.nii.gz", license=d / "LICENSE",
                      notice=d / "NOTICE")


def recorded_checksums(directory: Path | None = None) -> dict:
    """{file name: SHA-256 hex digest} as ``SHA256SUMS`` in ``directory`` (default
    :func:`sample_data_dir`) records them (``sha256sum`` format): what the Slicer Sample Data
    entry gives Slicer to check its downloads with."""
    d = Path(directory) if directory else sample_data_dir()
    return {name: digest for digest, name in
            (line.split() for line in (d / "SHA256SUMS").read_text().splitlines() if line.strip())}
