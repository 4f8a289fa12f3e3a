"""CT volumes, label maps and X-ray images on disk (SimpleITK).

* Volumes: NRRD, NIfTI (``.nii``/``.nii.gz``), MetaImage, or a folder holding one DICOM
  series. Returned as :class:`~RadGSRegLib.volume.Volume` (array ``[k, j, i]``, LPS affine).
* X-rays: NRRD, DICOM, PNG or TIFF, 2-D or a single-slice 3-D image. Returned as a 2-D
  float32 array indexed ``[row, column]`` (the file's first axis is the column).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..volume import Volume
from .atomic import atomic_file
from .errors import CaseFormatError

__all__ = ["read_volume", "write_volume", "read_xray", "write_xray", "read_label_map"]


def _sitk():
    import SimpleITK as sitk

    return sitk


def _read_image(path: Path, field: str | None, *, series: bool = False):
    """SimpleITK image of a file (or, with ``series``, a DICOM-series folder); errors name the file."""
    sitk = _sitk()
    if not (path.exists() if series else path.is_file()):
        raise CaseFormatError(path, field, "file not found")
    try:
        if path.is_dir():
            names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise CaseFormatError(path, field, "folder holds no DICOM series")
            return sitk.ReadImage(names)
        return sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise CaseFormatError(path, field, f"cannot be read as an image ({str(e).strip().splitlines()[-1]})") from None


def read_volume(path, *, dtype=np.float32, field: str | None = None) -> Volume:
    """Read a 3-D image (file or DICOM-series folder) as a Volume in its own LPS frame.

    Raises:
        CaseFormatError: missing file, unreadable, not 3-D, or NaN voxels.
    """
    path = Path(path)
    img = _read_image(path, field, series=True)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseFormatError(path, field, f"expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} components")
    if img.GetDimension() != 3:
        raise CaseFormatError(path, field, f"expected a 3-D volume, got a {img.GetDimension()}-D image")
    vol = Volume.from_sitk(img, dtype=dtype)
    if np.issubdtype(vol.array.dtype, np.floating) and not np.all(np.isfinite(vol.array)):
        raise CaseFormatError(path, field, "contains NaN or infinite voxels")
    return vol


def read_label_map(path, *, field: str | None = None) -> Volume:
    """Read an integer label map (any integer pixel type; stored as int32)."""
    vol = read_volume(path, dtype=None, field=field)
    if not np.issubdtype(vol.array.dtype, np.integer):
        rounded = np.rint(vol.array)
        if not np.allclose(rounded, vol.array):
            raise CaseFormatError(path, field, "a label map must hold integer labels")
        vol.array = rounded
    vol.array = vol.array.astype(np.int32)
    return vol


def write_volume(vol: Volume, path, *, overwrite: bool = False, compress: bool = True) -> Path:
    """Write a Volume (format from the extension), atomically; refuses to overwrite unless asked."""
    sitk = _sitk()
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        sitk.WriteImage(vol.to_sitk(), str(tmp), useCompression=compress)
    return path


def read_xray(path, *, field: str | None = None) -> np.ndarray:
    """Read an X-ray image as float32 ``[row, column]``.

    Accepts 2-D images and 3-D images with one slice; RGB(A) PNG/TIFF are refused.
    """
    sitk = _sitk()
    path = Path(path)
    img = _read_image(path, field)
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise CaseFormatError(path, field, f"expected a grey-level image, got {img.GetNumberOfComponentsPerPixel()} channels")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if arr.ndim == 3:
        if arr.shape[0] != 1:
            raise CaseFormatError(path, field, f"expected a 2-D X-ray, got a volume of {arr.shape[0]} slices")
        arr = arr[0]
    if arr.ndim != 2:
        raise CaseFormatError(path, field, f"expected a 2-D X-ray, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise CaseFormatError(path, field, "contains NaN or infinite pixels")
    return arr


def write_xray(image: np.ndarray, path, *, pixel_spacing=(1.0, 1.0), overwrite: bool = False) -> Path:
    """Write a 2-D ``[row, column]`` float image (NRRD/TIFF...; PNG gets 16-bit rescaled)."""
    sitk = _sitk()
    path = Path(path)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"an X-ray is 2-D [row, column], got shape {arr.shape}")
    if path.suffix.lower() == ".png":
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.round((arr - lo) / max(hi - lo, 1e-12) * 65535).astype(np.uint16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in pixel_spacing))
    with atomic_file(path, overwrite) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=path.suffix.lower() == ".nrrd")
    return path
