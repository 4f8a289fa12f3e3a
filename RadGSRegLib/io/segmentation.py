"""Vertebra segmentations as users have them: a label map, or a Slicer segmentation
(``.seg.nrrd``) whose segments carry names such as ``vertebrae_L3`` (SlicerTotalSegmentator).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..volume import Volume
from .errors import CaseFormatError
from .images import read_label_map

__all__ = ["Segmentation", "read_segmentation"]


@dataclass
class Segmentation:
    """A label map and, when the file names them, each label's segment name."""

    labelmap: Volume
    names: dict[int, str] = field(default_factory=dict)
    path: Path | None = None
    #: label values are segment positions 1..N, not the segments' own values (segments
    #: that share a value on several layers): only the names identify them
    positional: bool = False


def read_segmentation(path, *, field: str | None = None) -> Segmentation:
    """Read a label map (NRRD, NIfTI, ...) or a Slicer ``.seg.nrrd``.

    A ``.seg.nrrd`` with several layers (overlapping segments) is merged into one label map
    (where segments overlap, the smaller one shows, so that a vertebra inside a larger
    structure stays whole) that keeps the segments' label values when they differ,
    and numbers them 1..N in segment order when some share a value (``positional``); a
    single-layer one keeps its label values.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise CaseFormatError(path, field, "file not found")
    if not path.name.lower().endswith(".seg.nrrd"):
        return Segmentation(read_label_map(path, field=field), {}, path)
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseFormatError(path, field, f"cannot be read ({str(e).strip().splitlines()[-1]})") from None
    keys = set(img.GetMetaDataKeys())
    segs = []
    i = 0
    while f"Segment{i}_Name" in keys:
        get = lambda k, d=None: img.GetMetaData(f"Segment{i}_{k}") if f"Segment{i}_{k}" in keys else d  # noqa: E731
        segs.append((get("Name"), int(get("LabelValue", str(i + 1))), int(get("Layer", "0"))))
        i += 1
    if not segs:
        raise CaseFormatError(path, field, "a .seg.nrrd without Segment0_Name: not a Slicer segmentation")
    arr = sitk.GetArrayFromImage(img)
    if img.GetNumberOfComponentsPerPixel() == 1:
        arr = arr[..., None]
    ref = sitk.VectorIndexSelectionCast(img, 0) if img.GetNumberOfComponentsPerPixel() > 1 else img
    geom = Volume.from_sitk(ref)
    if arr.shape[-1] == 1:
        lab = arr[..., 0].astype(np.int32)
        names = {v: n for n, v, _ in segs}
    else:
        lab = np.zeros(arr.shape[:-1], np.int32)
        values = [value for _, value, _ in segs]
        own = len(set(values)) == len(values)               # each segment keeps its value when they differ
        names = {}
        masks = [(n_, name, value, arr[..., layer] == value) for n_, (name, value, layer) in enumerate(segs, start=1)]
        for n_, name, value, mask in sorted(masks, key=lambda m: -int(m[3].sum())):   # larger first, smaller on top
            lab[mask] = value if own else n_
            names[value if own else n_] = name
        names = dict(sorted(names.items()))
        return Segmentation(Volume(lab, geom.affine), names, path, positional=not own)
    return Segmentation(Volume(lab, geom.affine), names, path)
