"""C-arm geometry from the tags of an X-ray DICOM file (XA / RF / DX).

Tags read (via SimpleITK): Distance Source to Detector (0018,1110), Distance Source to
Patient (0018,1111, taken as source-to-isocentre), Imager Pixel Spacing (0018,1164; else
Pixel Spacing 0028,0030), Rows/Columns (0028,0010/0011), Positioner Primary Angle
(0018,1510; LAO positive) and Positioner Secondary Angle (0018,1511; cranial positive).

Convention: the view is :func:`~RadGSRegLib.geometry.c_arm_view` with ``angle_deg`` = the
primary angle (0: AP with the source behind the patient; +90: LAO 90, detector on the
patient's left), tilted about the patient's left-right axis by the secondary angle
(cranial: the detector moves toward the head), isocentre at the C-arm origin, detector
centred on the central ray. Missing tags are reported by name and number.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geometry import View, c_arm_view, euler_to_matrix
from .errors import CaseFormatError

__all__ = ["view_from_dicom", "TAGS"]

TAGS = {"sdd": "0018|1110", "sid": "0018|1111", "imager_spacing": "0018|1164", "pixel_spacing": "0028|0030",
        "rows": "0028|0010", "columns": "0028|0011", "primary": "0018|1510", "secondary": "0018|1511"}


def _number(reader, key, path, name, required=True):
    tag = TAGS[key]
    if not reader.HasMetaDataKey(tag):
        if required:
            raise CaseFormatError(path, f"DICOM {name} ({tag.replace('|', ',')})", "tag missing: the C-arm geometry "
                                  "cannot be read from this file; give a geometry.json or type the geometry in")
        return None
    try:
        return [float(x) for x in reader.GetMetaData(tag).strip().split("\\")]
    except ValueError:
        raise CaseFormatError(path, f"DICOM {name} ({tag.replace('|', ',')})",
                              f"not a number: {reader.GetMetaData(tag)!r}") from None


def view_from_dicom(path, name: str = "") -> View:
    """The :class:`View` of one X-ray DICOM file (see the module docstring)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise CaseFormatError(path, None, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CaseFormatError(path, None, f"not readable as DICOM ({str(e).strip().splitlines()[-1]})") from None
    sdd = _number(reader, "sdd", path, "Distance Source to Detector")[0]
    sid = _number(reader, "sid", path, "Distance Source to Patient")[0]
    spacing = _number(reader, "imager_spacing", path, "Imager Pixel Spacing", required=False) or \
        _number(reader, "pixel_spacing", path, "Pixel Spacing")
    rows = int(_number(reader, "rows", path, "Rows")[0])
    cols = int(_number(reader, "columns", path, "Columns")[0])
    primary = (_number(reader, "primary", path, "Positioner Primary Angle", required=False) or [0.0])[0]
    secondary = (_number(reader, "secondary", path, "Positioner Secondary Angle", required=False) or [0.0])[0]
    if not 0 < sid < sdd:
        raise CaseFormatError(path, "DICOM Distance Source to Patient (0018,1111)",
                              f"must be between 0 and the source-to-detector distance {sdd} mm, got {sid}")
    row_sp, col_sp = spacing[0], spacing[-1]
    view = c_arm_view(primary, sdd=sdd, sid=sid, pixels=(cols, rows), pixel_spacing=(col_sp, row_sp), name=name)
    if secondary:
        # cranial tilt: rotate the whole C-arm about the patient's left-right axis (+x in LPS)
        T = np.eye(4)
        T[:3, :3] = euler_to_matrix((-secondary, 0.0, 0.0))
        view = view.transformed(T)
    return view
