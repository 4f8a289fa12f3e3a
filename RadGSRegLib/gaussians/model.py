"""A set of radiative Gaussians (R²-Gaussian, Zha et al. 2024; RadGS-Reg Eq. 1-2).

Gaussian i has a central density ``rho_i`` (linear attenuation, 1/mm), a position ``p_i``
(mm, C-arm frame), scales ``s_i`` (3, mm) and a rotation ``q_i`` (unit quaternion in
roma's ``(x, y, z, w)`` order). Its kernel is

    G_i(x) = rho_i * exp(-1/2 (x - p_i)^T Sigma_i^-1 (x - p_i)),   Sigma_i = R_i S_i^2 R_i^T.

There is no opacity: a volume is the sum of the kernels, a pixel the sum of their line
integrals (see :mod:`.rasterizer` and :mod:`.voxelizer`).

Parameters are stored raw and activated so that every value stays valid under gradient
descent: ``rho = softplus(raw)``, ``s = s_min + (s_max - s_min) * sigmoid(raw)``, ``q``
normalised.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import roma
import torch
import torch.nn.functional as F

__all__ = ["RadiativeGaussians", "covariance", "precision", "whitening"]


def _inv_softplus(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20, x, torch.log(torch.expm1(torch.clamp(x, min=1e-12))))


def covariance(scale: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) ``R S^2 R^T`` (mm^2) from scales (N, 3) mm and rotations (N, 3, 3)."""
    return (R * scale[:, None, :] ** 2) @ R.transpose(1, 2)


def precision(scale: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) ``R S^-2 R^T`` (1/mm^2), the inverse covariance without an inversion."""
    return (R / scale[:, None, :] ** 2) @ R.transpose(1, 2)


def whitening(scale: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) ``W = S^-1 R^T`` (``Sigma^-1 = W^T W``)."""
    return R.transpose(1, 2) / scale[:, :, None]


class RadiativeGaussians(torch.nn.Module):
    """N radiative Gaussians with valid-by-construction parameters.

    Args:
        positions: (N, 3) mm. scales: (N, 3) mm. rotations: (N, 4) quaternions (x, y, z, w).
        densities: (N,) 1/mm, > 0.
        scale_range: (s_min, s_max) in mm that the activation keeps scales within.
    """

    def __init__(self, positions, scales, rotations, densities, *, scale_range=(0.25, 40.0)):
        super().__init__()
        pos = torch.as_tensor(positions, dtype=torch.float32)
        sc = torch.as_tensor(scales, dtype=torch.float32)
        rot = torch.as_tensor(rotations, dtype=torch.float32)
        rho = torch.as_tensor(densities, dtype=torch.float32)
        n = pos.shape[0]
        if pos.shape != (n, 3) or sc.shape != (n, 3) or rot.shape != (n, 4) or rho.shape != (n,):
            raise ValueError(f"shapes must be (N,3), (N,3), (N,4), (N,); got {tuple(pos.shape)}, {tuple(sc.shape)}, "
                             f"{tuple(rot.shape)}, {tuple(rho.shape)}")
        lo, hi = (float(x) for x in scale_range)
        if not 0 < lo < hi:
            raise ValueError(f"scale_range must be 0 < min < max, got {scale_range}")
        self.scale_range = (lo, hi)
        frac = torch.clamp((sc - lo) / (hi - lo), 1e-4, 1 - 1e-4)
        self._position = torch.nn.Parameter(pos.clone())
        self._scale = torch.nn.Parameter(torch.log(frac / (1 - frac)))
        self._rotation = torch.nn.Parameter(F.normalize(rot, dim=-1).clone())
        self._density = torch.nn.Parameter(_inv_softplus(torch.clamp(rho, min=1e-8)))

    # ------------------------------------------------------------ activated values
    def __len__(self) -> int:
        return self._position.shape[0]

    @property
    def position(self) -> torch.Tensor:
        """(N, 3) mm."""
        return self._position

    @property
    def scale(self) -> torch.Tensor:
        """(N, 3) standard deviations along the Gaussian's own axes, mm."""
        lo, hi = self.scale_range
        return lo + (hi - lo) * torch.sigmoid(self._scale)

    @property
    def rotation(self) -> torch.Tensor:
        """(N, 4) unit quaternions (x, y, z, w)."""
        return F.normalize(self._rotation, dim=-1)

    @property
    def density(self) -> torch.Tensor:
        """(N,) central density, 1/mm."""
        return F.softplus(self._density)

    def rotmat(self) -> torch.Tensor:
        """(N, 3, 3) rotation matrices."""
        return roma.unitquat_to_rotmat(self.rotation)

    def covariance(self) -> torch.Tensor:
        """(N, 3, 3) ``R S^2 R^T`` (mm^2)."""
        return covariance(self.scale, self.rotmat())

    def precision(self) -> torch.Tensor:
        """(N, 3, 3) ``Sigma^-1 = R S^-2 R^T`` (1/mm^2), computed without inversion."""
        return precision(self.scale, self.rotmat())

    def whitening(self) -> torch.Tensor:
        """(N, 3, 3) ``W = S^-1 R^T``: ``W (x - p)`` is in units of sigma; ``Sigma^-1 = W^T W``."""
        return whitening(self.scale, self.rotmat())

    def total_mass(self) -> torch.Tensor:
        """Σ rho (2 pi)^{3/2} prod(s): the integral of the density over space (mm^2)."""
        return (self.density * (2 * math.pi) ** 1.5 * self.scale.prod(dim=1)).sum()

    # ------------------------------------------------------------ editing
    def select(self, mask) -> "RadiativeGaussians":
        """A new set with the Gaussians where ``mask`` is true (index or boolean)."""
        with torch.no_grad():
            return RadiativeGaussians(self.position[mask], self.scale[mask], self.rotation[mask], self.density[mask],
                                      scale_range=self.scale_range)

    def cat(self, other: "RadiativeGaussians") -> "RadiativeGaussians":
        with torch.no_grad():
            return RadiativeGaussians(torch.cat([self.position, other.position]), torch.cat([self.scale, other.scale]),
                                      torch.cat([self.rotation, other.rotation]),
                                      torch.cat([self.density, other.density]), scale_range=self.scale_range)

    def values(self) -> dict[str, np.ndarray]:
        """Activated values as NumPy arrays."""
        with torch.no_grad():
            return {"positions": self.position.cpu().numpy(), "scales": self.scale.cpu().numpy(),
                    "rotations_xyzw": self.rotation.cpu().numpy(), "densities": self.density.cpu().numpy(),
                    "scale_range": np.asarray(self.scale_range)}

    # ------------------------------------------------------------ files
    def save(self, path) -> Path:
        """``.pt`` (torch) or ``.npz`` (readable arrays: positions, scales, rotations_xyzw,
        densities, scale_range); both hold activated values in the C-arm frame, mm. Written
        atomically (a temporary file beside, then renamed); an existing file is replaced."""
        from ..io.atomic import atomic_file

        path = Path(path)
        if path.suffix not in (".npz", ".pt"):
            raise ValueError(f"save to .pt or .npz, not {path.suffix!r}")
        vals = self.values()
        with atomic_file(path, overwrite=True) as tmp:
            if path.suffix == ".npz":
                np.savez(tmp, **vals)
            else:
                torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in vals.items()}, tmp)
        return path

    @classmethod
    def load(cls, path) -> "RadiativeGaussians":
        """A set from :meth:`save`'s ``.pt`` or ``.npz``. Both are read without running
        anything in the file (``torch.load(weights_only=True)``, ``np.load`` without pickles).

        Raises:
            InputError: (naming the file) missing, unreadable, unsafe, or without the arrays.
        """
        from ..errors import InputError

        path = Path(path)
        if path.suffix not in (".npz", ".pt"):
            raise ValueError(f"load from .pt or .npz, not {path.suffix!r}")
        if not path.is_file():
            raise InputError(f"{path}: Gaussians file not found")
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            else:
                import warnings

                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
                    blob = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(blob, dict):
                    raise ValueError(f"holds a {type(blob).__name__}, not a dictionary of arrays")
                d = {k: (v.numpy() if torch.is_tensor(v) else np.asarray(v)) for k, v in blob.items()}
        except Exception as e:                                                 # noqa: BLE001
            text = str(e)
            if "Weights only load failed" in text or "WeightsUnpickler" in text:
                text = "it holds something other than tensors and plain values; refused without running it"
            else:
                text = (text.strip().splitlines() or [type(e).__name__])[0][:200]
            raise InputError(f"{path}: not a Gaussians file written by RadiativeGaussians.save ({text})") from None
        missing = {"positions", "scales", "rotations_xyzw", "densities"} - set(d)
        if missing:
            raise InputError(f"{path}: missing arrays {sorted(missing)}")
        return cls(d["positions"], d["scales"], d["rotations_xyzw"], d["densities"],
                   scale_range=tuple(float(x) for x in d.get("scale_range", (0.25, 40.0))))

    @classmethod
    def from_volume(cls, volume, n: int, rng: np.random.Generator, *, threshold: float | None = None,
                    T_to_carm=None, scale_range=(0.25, 40.0)) -> "RadiativeGaussians":
        """Gaussians at ``n`` voxel centres drawn where ``volume`` is dense.

        Args:
            volume: a :class:`~RadGSRegLib.volume.Volume` of densities (1/mm); its frame is
                mapped to the C-arm frame by ``T_to_carm`` (4x4, default identity).
            threshold: voxels above it are candidates (default: 20 % of the 99th percentile).
        Scales start at the mean spacing between the drawn points; densities at a fraction
        of the voxel values such that the voxelized sum is about the volume.
        """
        arr = np.asarray(volume.array, dtype=np.float64)
        thr = 0.2 * np.percentile(arr, 99) if threshold is None else threshold
        cand = np.argwhere(arr > thr)
        if len(cand) == 0:
            raise ValueError("no voxel above the threshold to place Gaussians at")
        w = arr[tuple(cand.T)]
        pick = rng.choice(len(cand), size=n, replace=len(cand) < n, p=w / w.sum())
        kji = cand[pick].astype(np.float64) + rng.uniform(-0.5, 0.5, (n, 3))
        pts = volume.index_to_world(kji[:, ::-1])
        if T_to_carm is not None:
            T = np.asarray(T_to_carm, dtype=np.float64)
            pts = pts @ T[:3, :3].T + T[:3, 3]
        vox_vol = float(np.prod(volume.spacing))
        region = len(cand) * vox_vol
        s = 0.5 * (region / n) ** (1 / 3)                  # ~ half the mean point spacing
        s = float(np.clip(s, scale_range[0] * 1.01, scale_range[1] * 0.99))
        # each Gaussian holds ~ (region / n) of volume: rho (2 pi)^1.5 s^3 = value * region / n
        rho = arr[tuple(cand[pick].T)] * (region / n) / ((2 * math.pi) ** 1.5 * s ** 3)
        rot = np.tile([0.0, 0.0, 0.0, 1.0], (n, 1))
        return cls(pts, np.full((n, 3), s), rot, rho, scale_range=scale_range)

    @classmethod
    def random_in_box(cls, n: int, lo, hi, rng: np.random.Generator, *, scale: float = 2.0, density: float = 0.01,
                      scale_range=(0.25, 40.0)) -> "RadiativeGaussians":
        """``n`` Gaussians uniform in the box [lo, hi] (mm), random rotations."""
        pts = rng.uniform(lo, hi, (n, 3))
        q = rng.normal(size=(n, 4))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        return cls(pts, np.full((n, 3), scale), q, np.full(n, density), scale_range=scale_range)
