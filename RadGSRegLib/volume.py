"""A 3-D image with its place in physical space.

A :class:`Volume` is a NumPy array indexed ``[k, j, i]`` (SimpleITK's order: slowest axis
first) and a 4x4 ``affine`` that maps the voxel index ``(i, j, k, 1)`` (column vector,
fastest axis first) to LPS millimetres in the volume's frame (the CT frame for a CT, the
C-arm frame for a reconstruction). The frame itself is not stored: the name of the
variable says it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Volume", "affine_from", "resample_to_grid", "block_factors", "coarsen"]


def affine_from(origin, spacing, direction=None) -> np.ndarray:
    """(4, 4) index-to-world matrix from ITK-style origin (3,), spacing (3,) and direction
    (3x3, columns are the i, j, k axis directions)."""
    D = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    A = np.eye(4)
    A[:3, :3] = D * np.asarray(spacing, dtype=np.float64)[None, :]
    A[:3, 3] = np.asarray(origin, dtype=np.float64)
    return A


@dataclass
class Volume:
    """array (K, J, I) + affine (4, 4) from (i, j, k) index to LPS mm."""

    array: np.ndarray
    affine: np.ndarray

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume array must be 3-D [k, j, i], got shape {self.array.shape}")
        if self.affine.shape != (4, 4) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise ValueError("a Volume affine must be an invertible 4x4 matrix")

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel size along i, j, k (mm)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """(3,) centre of voxel (0, 0, 0), mm."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """(3, 3) unit axis directions as columns (i, j, k)."""
        return self.affine[:3, :3] / self.spacing[None, :]

    @property
    def size(self) -> tuple[int, int, int]:
        """``(I, J, K)`` voxels, fastest axis first (ITK order)."""
        K, J, I = self.array.shape
        return (I, J, K)

    @property
    def axis_along_z(self) -> int:
        """The volume axis (0: i, 1: j, 2: k) closest to the frame's z (in LPS the patient's
        cranio-caudal direction); the array's axis is ``2 - axis_along_z``."""
        return int(np.argmax(np.abs(self.direction[2])))

    def affine_at(self, start_ijk) -> np.ndarray:
        """(4, 4) affine of a grid with this one's axes and spacing whose voxel (0, 0, 0) is
        this volume's voxel ``start_ijk`` (i, j, k; may lie outside it): a crop's or an
        extension's."""
        A = self.affine.copy()
        A[:3, 3] = self.index_to_world(start_ijk)
        return A

    def index_to_world(self, ijk) -> np.ndarray:
        """(..., 3) continuous ``(i, j, k)`` -> (..., 3) mm."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz) -> np.ndarray:
        """(..., 3) mm -> (..., 3) continuous ``(i, j, k)``."""
        inv = np.linalg.inv(self.affine)
        return np.asarray(xyz, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]

    def corners(self) -> np.ndarray:
        """(8, 3) world positions of the voxel-grid's outer corners (edges of the end voxels)."""
        I, J, K = self.size
        c = np.array([[i, j, k] for i in (-0.5, I - 0.5) for j in (-0.5, J - 0.5) for k in (-0.5, K - 0.5)])
        return self.index_to_world(c)

    def label_points(self, label: int, max_points: int | None = None, seed: int = 0) -> np.ndarray:
        """(N, 3) world centres of voxels equal to ``label`` (a fixed random subset if more
        than ``max_points``)."""
        mask = self.array == label
        lo = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if any(len(x) == 0 for x in lo):
            kji = np.zeros((0, 3), np.int64)
        else:                                   # within the label's bounding box: the same points, in the same order
            box = tuple(slice(x[0], x[-1] + 1) for x in lo)
            kji = np.argwhere(mask[box]) + np.array([x[0] for x in lo])
        if max_points is not None and len(kji) > max_points:
            kji = kji[np.random.default_rng(seed).choice(len(kji), max_points, replace=False)]
        return self.index_to_world(kji[:, ::-1].astype(np.float64))

    def label_centroid(self, label: int) -> np.ndarray:
        """(3,) world centroid (mm) of the voxels equal to ``label``."""
        c = self.label_centroids([label])
        if label not in c:
            raise ValueError(f"label {label} is not present")
        return c[label]

    def label_centroids(self, labels) -> dict[int, np.ndarray]:
        """{label: (3,) world centroid (mm)} of those of ``labels`` present (absent ones left
        out), from one pass over the array."""
        labels = [int(lb) for lb in labels]
        kji = np.argwhere(np.isin(self.array, labels))
        values = self.array[tuple(kji.T)]
        out = {}
        for lb in labels:
            sel = kji[values == lb]
            if len(sel):
                out[lb] = self.index_to_world(sel.mean(axis=0)[::-1])
        return out

    def same_grid(self, other: "Volume", tol: float = 1e-3) -> bool:
        """True when both volumes have the same size and affine (within ``tol`` mm)."""
        return self.array.shape == other.array.shape and np.allclose(self.affine, other.affine, atol=tol)

    def to_sitk(self):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetOrigin(tuple(self.origin))
        img.SetSpacing(tuple(self.spacing))
        img.SetDirection(tuple(self.direction.reshape(-1)))
        return img

    @classmethod
    def from_sitk(cls, img, dtype=None) -> "Volume":
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise ValueError(f"expected a 3-D image, got {img.GetDimension()}-D")
        arr = sitk.GetArrayFromImage(img)
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        return cls(arr, affine_from(img.GetOrigin(), img.GetSpacing(), img.GetDirection()))


def resample_to_grid(vol: Volume, shape, affine, T_src_to_grid=None, *, order: int = 1, cval: float = 0.0) -> Volume:
    """Resample ``vol`` onto a grid of ``shape`` (K, J, I) whose ``affine`` maps (i, j, k) to
    mm of a target frame; ``T_src_to_grid`` (4x4) maps ``vol``'s frame to that frame
    (default identity). Linear interpolation (``order=1``), ``cval`` outside.
    """
    from scipy import ndimage

    K, J, I = (int(x) for x in shape)
    G = np.asarray(affine, dtype=np.float64)
    T = np.eye(4) if T_src_to_grid is None else np.asarray(T_src_to_grid, dtype=np.float64)
    # grid index -> target mm -> source mm -> source index
    M = np.linalg.inv(vol.affine) @ np.linalg.inv(T) @ G
    k, j, i = np.meshgrid(np.arange(K), np.arange(J), np.arange(I), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)
    src = ijk @ M[:3, :3].T + M[:3, 3]
    vals = ndimage.map_coordinates(np.asarray(vol.array, dtype=np.float32), src[:, ::-1].T, order=order,
                                   mode="constant", cval=cval)
    return Volume(vals.reshape(K, J, I).astype(np.float32), G)


def block_factors(spacing, min_spacing_mm: float) -> tuple[int, int, int]:
    """Whole-voxel block sizes ``(fi, fj, fk)`` that bring voxels of ``spacing`` (3,) mm
    (i, j, k) to about ``min_spacing_mm``: ``floor(min_spacing_mm / spacing)`` per axis, at
    least 1 (an axis already that coarse is kept)."""
    sp = np.asarray(spacing, dtype=np.float64)
    return tuple(max(1, int(np.floor(min_spacing_mm / s + 1e-6))) for s in sp)


def coarsen(vol: Volume, factors, *, labels: bool = False) -> Volume:
    """``vol`` on a grid of voxels ``factors`` ``(fi, fj, fk)`` times larger, covering the
    same place (the voxels past the last whole block on each axis are dropped).

    Intensities (``labels=False``) become the mean of each block (float32), which keeps line
    integrals through the volume (what a DRR sums) up to the blur of the block; a label map
    (``labels=True``) takes each block's voxel ``f // 2`` (its centre for an odd ``f``, half an
    old voxel from it for an even one), so labels stay labels.
    The new voxel ``(0, 0, 0)`` is centred on the first block: affine columns scaled by the
    factors, origin moved by ``(f - 1) / 2`` old voxels. Factors of 1 return ``vol``."""
    f = tuple(int(x) for x in factors)
    if len(f) != 3 or min(f) < 1:
        raise ValueError(f"coarsen factors must be 3 integers >= 1, not {factors!r}")
    if f == (1, 1, 1):
        return vol
    fi, fj, fk = f
    K, J, I = vol.array.shape
    nk, nj, ni = K // fk, J // fj, I // fi
    if min(nk, nj, ni) < 1:
        raise ValueError(f"a volume of {I} x {J} x {K} voxels is smaller than one {fi} x {fj} x {fk} block")
    a = vol.array[:nk * fk, :nj * fj, :ni * fi]
    if labels:
        out = a[fk // 2::fk, fj // 2::fj, fi // 2::fi].copy()
    else:
        out = a.reshape(nk, fk, nj, fj, ni, fi).mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)
    A = vol.affine.copy()
    A[:3, 3] = vol.affine[:3, :3] @ ((np.array(f, dtype=np.float64) - 1) / 2) + vol.affine[:3, 3]
    A[:3, :3] = vol.affine[:3, :3] * np.array(f, dtype=np.float64)[None, :]
    return Volume(out, A)
