"""The bundled real CT: a lumbar CT with TotalSegmentator vertebra labels.

From TotalSegmentator 2.18.0's source distribution (Apache-2.0; see
``Resources/SampleData/NOTICE``): 122 x 101 x 112 voxels at 3 mm, L1-L5 and S1 complete,
T12 cut by the top of the scan. The files live in ``Resources/SampleData`` next to the
package (source checkout, editable install, Slicer extension); ``RADGSREG_SAMPLE_DATA``
points elsewhere.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SampleData", "lumbar_ct", "sample_data_dir", "verify_checksums", "LUMBAR_LEVELS"]

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
    """Where the sample files are (``$RADGSREG_SAMPLE_DATA`` or ``Resources/SampleData``)."""
    env = os.environ.get("RADGSREG_SAMPLE_DATA")
    d = Path(env) if env else Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
    if not (d / "example_ct.nii.gz").is_file():
        raise FileNotFoundError(
            f"the RadGSReg sample data is not at {d} (expected example_ct.nii.gz and totalseg.nii.gz). "
            "It ships with the source tree and the Slicer extension; with a plain wheel install set "
            "RADGSREG_SAMPLE_DATA to a folder holding it (Resources/SampleData/fetch_sample_data.py re-derives it).")
    return d


def lumbar_ct() -> SampleData:
    """The lumbar sample's file paths."""
    d = sample_data_dir()
    return SampleData(ct=d / "example_ct.nii.gz", seg=d / "totalseg.nii.gz", license=d / "LICENSE",
                      notice=d / "NOTICE")


def verify_checksums(directory: Path | None = None) -> dict[str, bool]:
    """SHA-256 of each file listed in ``SHA256SUMS`` against the record: {name: ok}."""
    d = Path(directory) if directory else sample_data_dir()
    out = {}
    for line in (d / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, name = line.split()
            out[name] = hashlib.sha256((d / name).read_bytes()).hexdigest() == digest
    return out
