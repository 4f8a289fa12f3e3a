"""Procedural spine CT phantoms with per-vertebra labels.

A stand-in for public CT collections: a segment of the spine (default L1-L5) inside a
soft-tissue trunk, in HU, on an LPS grid (+x left, +y posterior, +z superior), with a
label map using TotalSegmentator ids (L1 = 31 ... L5 = 27; see :mod:`levels`).

Each vertebra is built in its own frame (origin at the body centre; x left, y posterior,
z along the spine) from smooth signed-distance primitives:

* vertebral body: a waisted super-elliptic cylinder, flatter posteriorly, with a cortical
  shell (~1 mm) around cancellous bone with a trabecular texture;
* posterior arch: pedicles, laminae, spinous process (pointing posteriorly and down),
  transverse processes, superior/inferior articular processes (facet joints), around an
  empty spinal canal;
* intervertebral discs between the bodies (annulus + nucleus);
* optionally (``ribs``) a pair of ribs on every thoracic vertebra: from the side of the body
  past the tip of the transverse process, back, round the side of the trunk and forward,
  sloping down, shorter for the first and the floating (11th, 12th) ribs; labelled with
  TotalSegmentator's rib ids (:func:`rib_id`);
* optionally (``sacrum``) a sacrum in place of an S1 vertebra when the column reaches S1:
  five fused segments tapering down and curving back, the S1 segment with its alae and
  superior articular processes (label S1 = 26), the rest the sacrum (25), a sacral canal,
  a dorsal plate with its median crest and four pairs of foramina; and the two hip bones
  (TotalSegmentator's hip_left = 77, hip_right = 78) joined to it at the sacroiliac joints:
  the iliac wing up to its crest, about level with the L5 body, and the ilium's body down
  towards the acetabulum (clipped by the grid, as a scan would be).

Around it: skin, subcutaneous fat, paraspinal and psoas muscles, abdominal contents with
bowel gas, the aorta, and optionally a table. Sizes vary randomly per vertebra
(``variation``), the column follows a lordotic / scoliotic curve, every edge has partial
volume (no staircase), and everything is a function of ``seed``.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import numpy as np
from scipy import ndimage

from .geometry import euler_to_matrix
from .levels import LEVELS, level_id
from .volume import Volume, affine_from

__all__ = ["PhantomConfig", "make_phantom", "rib_id", "SACRUM_ID", "HIP_IDS", "MAX_FACTOR"]

#: the largest ``size`` / ``bone_density`` a phantom takes (3: far past any adult's spine)
MAX_FACTOR = 3.0

SACRUM_ID = 25                                  # TotalSegmentator "sacrum" (the S1 segment is S1 = 26)
HIP_IDS = {"left": 77, "right": 78}             # TotalSegmentator "hip_left", "hip_right"


def rib_id(k: int, side: str) -> int:
    """TotalSegmentator "total" id of rib ``k`` (1-12) on ``side`` ("left" / "right"):
    rib_left_k = 91 + k, rib_right_k = 103 + k."""
    if not 1 <= int(k) <= 12 or side not in ("left", "right"):
        raise ValueError(f"no rib {k} on the {side} side")
    return (91 if side == "left" else 103) + int(k)


@dataclass
class PhantomConfig:
    """Parameters of :func:`make_phantom`.

    Attributes:
        top_level: the highest vertebra (e.g. "L1", "T11").
        n_vertebrae: how many, going down from ``top_level``.
        spacing: voxel size (x, y, z) in mm; anisotropic allowed.
        trunk_mm: trunk width (x) and depth (y), mm.
        lordosis_deg / scoliosis_deg: total bend across the segment (sagittal / coronal).
        variation: scale of the random size/shape variation (0: the mean anatomy).
        table: add a carbon table under the back.
        ribs: give every thoracic vertebra built (T1-T12, ``context`` ones included) its
            pair of ribs (own labels, :func:`rib_id`). Off by default: the phantoms of
            earlier versions, which the documented suites and the earlier shipped weights were
            made of, stay the same; with it the rest of the phantom is unchanged (the ribs draw
            from their own random stream).
        sacrum: when the column reaches S1 (a requested or ``context`` level), build a sacrum
            there instead of a lumbar-like S1, with the hip bones beside it (own labels,
            :data:`SACRUM_ID`, :data:`HIP_IDS`; the S1 segment keeps S1's). The grid then
            reaches down past the sacrum's tip by whole slices (the grid above is the same);
            the vertebrae, discs and ribs above have the same shapes and labels as without
            (the sacrum draws from its own random stream), the random textures of bone and
            soft tissue differ (drawn on the larger grid). The hip bones' crests may be cut
            by the top of the grid when S1 is among the top levels built. Off by default, as
            ``ribs``.
        size: scale of the vertebrae's and discs' dimensions (bodies, canals, pedicles,
            the processes' lengths; the processes' and laminae's thickness keep theirs) and
            so of the column's length (1: the phantom as before; a large adult's lumbar
            vertebrae are some 10-30 % larger than the mean phantom's, a small adult's
            smaller); the trunk keeps ``trunk_mm``, the sacrum follows S1's dimensions but
            its lateral masses and the hip bones keep their millimetres. At most
            :data:`MAX_FACTOR`.
        bone_density: scale of every bone's HU (cortical shell, cancellous core, ribs,
            sacrum, hip bones; 1: as before, a young adult's dense bone; about 0.5: the thin,
            porous bone of an older patient, whose vertebrae stand out far less from the soft
            tissue in an X-ray). At most :data:`MAX_FACTOR`.
        context: extra vertebrae built (and labelled) above and below the requested ones,
            so that the column and the trunk run on past the levels of interest, as in a
            real scan.
        seed: random seed; same seed, same phantom.
    """

    top_level: str = "L1"
    n_vertebrae: int = 5
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    trunk_mm: tuple[float, float] = (320.0, 230.0)
    lordosis_deg: float = 30.0
    scoliosis_deg: float = 0.0
    variation: float = 1.0
    table: bool = False
    ribs: bool = False
    sacrum: bool = False
    size: float = 1.0
    bone_density: float = 1.0
    context: int = 1
    seed: int = 0

    def __post_init__(self):
        level_id(self.top_level)
        for name in ("size", "bone_density"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                    or not (np.isfinite(v) and 0 < v <= MAX_FACTOR):
                raise ValueError(f"{name} must be a factor > 0 and <= {MAX_FACTOR:g}, got {v!r}")
        if self.top_level not in LEVELS:
            raise ValueError(f"top_level must be a vertebra name, got {self.top_level!r}")
        first = LEVELS.index(self.top_level)
        if self.n_vertebrae < 1 or first + self.n_vertebrae > len(LEVELS):
            raise ValueError(f"cannot take {self.n_vertebrae} vertebrae down from {self.top_level}")
        if any(s <= 0 for s in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def levels(self) -> list[str]:
        """The requested levels, top down."""
        first = LEVELS.index(self.top_level)
        return list(LEVELS[first:first + self.n_vertebrae])

    @property
    def all_levels(self) -> list[str]:
        """The requested levels plus ``context`` neighbours on each side (all labelled)."""
        first = LEVELS.index(self.top_level)
        lo = max(0, first - self.context)
        hi = min(len(LEVELS), first + self.n_vertebrae + self.context)
        return list(LEVELS[lo:hi])

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- primitives
def _capsule(p, a, b, r):
    """Signed distance to the capsule of radius r around segment a-b. p: (..., 3)."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1) - r


def _box(p, c, half):
    """Signed distance to an axis-aligned box (local frame)."""
    q = np.abs(p - c) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(axis=-1), 0.0)


def _smooth_union(d1, d2, k=2.0):
    h = np.clip(0.5 + 0.5 * (d2 - d1) / k, 0.0, 1.0)
    return d2 * (1 - h) + d1 * h - k * h * (1 - h)


def _occupancy(sdf, voxel):
    """Partial-volume fraction from a signed distance (mm) and the voxel size (mm)."""
    return np.clip(0.5 - sdf / voxel, 0.0, 1.0)


def _jitter(rng, var):
    """``j(s)``: a random size factor in 1 ± var·s (one draw from ``rng`` per call)."""
    return lambda s: 1.0 + var * rng.uniform(-s, s)


def _canal_centre_y(d, canal_d):
    """y (local frame, mm) of the canal's centre behind a body of half-depth ``d``: its
    posterior wall (0.8 d) plus half the canal and 1 mm."""
    return d * 0.8 + canal_d / 2 + 1.0


def _canal_sdf(p, w, d, cy):
    """Signed distance (about, mm) to an elliptic canal along z (width w, depth d, centre y cy)."""
    return (np.sqrt((p[..., 0] / (w / 2)) ** 2 + ((p[..., 1] - cy) / (d / 2)) ** 2) - 1.0) * min(w, d) / 2


def _grid_box(points, pad, lo, sp, shape):
    """The grid's part within ``pad`` mm of ``points`` (M, 3) (volume frame, mm):
    ``(slices, p, lo_i, hi_i)`` with p (..., 3) its voxel centres (mm) and lo_i/hi_i its
    index range (x, y, z); None when that part is outside the grid (``shape`` (K, J, I))."""
    n = np.array(shape[::-1])
    lo_i = np.clip(np.floor((points.min(0) - pad - lo) / sp).astype(int), 0, n)
    hi_i = np.clip(np.ceil((points.max(0) + pad - lo) / sp).astype(int) + 1, 0, n)
    if np.any(hi_i <= lo_i):
        return None
    sl = (slice(lo_i[2], hi_i[2]), slice(lo_i[1], hi_i[1]), slice(lo_i[0], hi_i[0]))
    Z, Y, X = np.meshgrid(*(lo[a] + sp[a] * np.arange(lo_i[a], hi_i[a]) for a in (2, 1, 0)), indexing="ij")
    return sl, np.stack([X, Y, Z], -1), lo_i, hi_i


def _paint_bone(ct, seg, sl, sdf, labels, vox, inner_hu, shell_hu, density=1.0):
    """Bone of signed distance ``sdf`` (mm, on ``ct[sl]``) into ``ct`` (HU) and ``seg`` on free
    voxels only (label 0): partial volume, a 1.5 mm cortical shell of ``shell_hu`` around
    ``inner_hu`` (a number or an array like sdf), both times ``density``; ``labels`` a number
    or an array like sdf."""
    occ = _occupancy(sdf, vox)
    shell = np.clip(occ - _occupancy(sdf + 1.5, vox), 0, 1)
    free = seg[sl] == 0
    occ = occ * free
    shell = shell * free
    ct[sl] = ct[sl] * (1 - occ) + density * ((occ - shell) * inner_hu + shell * shell_hu)
    inside = occ > 0.5
    seg[sl][inside] = labels if np.isscalar(labels) else labels[inside]


def _body_sdf(p, w, d, h, waist):
    """Vertebral body: super-ellipse (x half-width w, y half-depth d), flatter behind."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    zz = np.clip(2 * z / h, -1, 1)
    pinch = 1.0 - waist * (1 - zz ** 2)
    dy = np.where(y > 0, d * 0.8, d)  # posterior wall flatter/closer
    pw = 2.6
    r = (np.abs(x / (w * pinch)) ** pw + np.abs(y / (dy * pinch)) ** pw) ** (1 / pw)
    radial = (r - 1.0) * np.minimum(w, d) * pinch
    return np.maximum(radial, np.abs(z) - h / 2)


@dataclass
class _Vert:
    name: str
    centre: np.ndarray  # (3,) mm, volume frame
    R: np.ndarray       # local -> volume rotation
    w: float
    d: float
    h: float
    canal_w: float
    canal_d: float
    ped_r: float
    spin_len: float
    tp_len: float

    # landmarks of the posterior arch (local frame, mm): shared by the arch and the ribs
    @property
    def back(self) -> float:
        """y of the body's posterior wall."""
        return self.d * 0.8

    @property
    def canal_y(self) -> float:
        """y of the spinal canal's centre."""
        return _canal_centre_y(self.d, self.canal_d)

    @property
    def pedicle_x(self) -> float:
        """|x| of the pedicles."""
        return self.canal_w / 2 + self.ped_r * 0.6

    @property
    def lamina_y(self) -> float:
        """y of the laminae, behind the canal."""
        return self.back + self.canal_d + 2.0

    @property
    def arch_z(self) -> float:
        """z of the arch, a little high on the body."""
        return self.h * 0.12

    def to_volume(self, q, spine_y: float):
        """Local points q (..., 3) -> the volume frame (mm); ``spine_y`` as in make_phantom."""
        return self.centre + np.array([0.0, -spine_y, 0.0]) + q @ self.R.T

    def to_local(self, p, spine_y: float):
        """Volume-frame points p (..., 3) -> this vertebra's local frame (mm)."""
        return (p - (self.centre + np.array([0.0, -spine_y, 0.0]))) @ self.R


def _vertebra_sdfs(v: _Vert, p):
    """(body sdf, posterior-arch sdf) at local points p (..., 3)."""
    body = _body_sdf(p, v.w, v.d, v.h, waist=0.07)
    back, cy, px, lam_y, zc = v.back, v.canal_y, v.pedicle_x, v.lamina_y, v.arch_z
    parts = []
    for s in (-1.0, 1.0):
        # pedicle: elliptic (taller than wide) bar from the body's back to the lamina
        q = p.copy()
        q[..., 2] = (q[..., 2] - zc) * 0.55
        parts.append(_capsule(q, np.array([s * px, back - 4, 0.0]), np.array([s * px, lam_y - 2, 0.0]), v.ped_r))
        # lamina: slanted plate from the pedicle to the midline
        parts.append(_capsule(p, np.array([s * px, lam_y - 1, zc + 2]), np.array([0.0, lam_y + 4, zc]), 4.2))
        parts.append(_capsule(p, np.array([s * px, lam_y - 1, zc - 6]), np.array([0.0, lam_y + 4, zc - 8]), 4.0))
        # transverse process: lateral, slightly back and up
        parts.append(_capsule(p, np.array([s * px, lam_y - 3, zc + 1]), np.array([s * (px + v.tp_len), lam_y, zc + 4]), 3.2))
        # articular processes (facet joints): superior goes up, inferior goes down
        parts.append(_capsule(p, np.array([s * (px + 1), lam_y, zc + 2]), np.array([s * (px + 2), lam_y + 2, v.h / 2 + 7]), 4.0))
        parts.append(_capsule(p, np.array([s * (px - 3), lam_y + 3, zc - 4]), np.array([s * (px - 4), lam_y + 5, -v.h / 2 - 6]), 3.8))
    # spinous process: a tall, thin plate going back and slightly down
    q = p.copy()
    q[..., 1] -= lam_y + v.spin_len / 2
    q[..., 2] -= zc - 5 + 0.15 * q[..., 1]
    spin = _box(q, np.zeros(3), np.array([2.5, v.spin_len / 2, 7.5])) - 1.5
    arch = spin
    for d in parts:
        arch = _smooth_union(arch, d, 2.0)
    # canal: an elliptic cylinder along z removed from the arch
    arch = np.maximum(arch, -_canal_sdf(p, v.canal_w, v.canal_d, cy))
    arch = np.maximum(arch, -(body - 0.5))  # no overlap with the body
    return body, arch


def _smooth_noise(shape, rng, sigma):
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return n / (n.std() + 1e-6)


def make_phantom(config: PhantomConfig | None = None) -> tuple[Volume, Volume]:
    """Build a phantom.

    Returns:
        (ct, seg): CT in HU (float32) and label map (int16, TotalSegmentator ids) on the same
        LPS grid; the isocentre-free frame has its origin near the middle of the column.
    """
    cfg = config or PhantomConfig()
    rng = np.random.default_rng(cfg.seed)
    var = cfg.variation
    levels = cfg.all_levels
    sp = np.asarray(cfg.spacing, dtype=np.float64)

    # ---- column: sizes grow downwards; bend along arc length
    verts_dims = []
    for i, name in enumerate(levels):
        g = LEVELS.index(name)
        # vertebrae grow down the column (T1 ~0.55, L1 ~0.89, L5 1.0 of an L5): neighbours differ
        # in size as real ones do, instead of repeating (a repeating column misleads registration)
        size = 0.55 + 0.45 * np.clip((g - 7) / 16, 0, 1.05)
        j = _jitter(rng, var)
        dims = dict(w=22.0 * size * j(0.08), d=16.5 * size * j(0.08), h=26.0 * (0.85 + 0.15 * size) * j(0.06),
                    canal_w=21.0 * j(0.08), canal_d=15.0 * j(0.08), ped_r=4.3 * size * j(0.1),
                    spin_len=30.0 * size * j(0.12), tp_len=24.0 * size * j(0.15))
        verts_dims.append({k: val * cfg.size for k, val in dims.items()})
    discs = [10.0 * (0.8 + 0.2 * (LEVELS.index(n) >= 19)) * (1 + var * rng.uniform(-0.12, 0.12)) * cfg.size
             for n in levels[:-1]]
    total = sum(v["h"] for v in verts_dims) + sum(discs)
    lord = np.deg2rad(cfg.lordosis_deg * (1 + var * rng.uniform(-0.3, 0.3)))
    scol = np.deg2rad(cfg.scoliosis_deg)
    # walk down the column from the top: s = arc length from the top
    pos = np.zeros(3)
    s = 0.0
    centres = []
    step = 0.5
    path = [(0.0, pos.copy(), 0.0, 0.0)]
    while s < total:
        frac = s / total
        a_l = lord * (0.5 - frac)   # sagittal tangent angle: lordosis -> convex anterior
        a_s = scol * np.sin(np.pi * frac)
        tangent = np.array([np.sin(a_s), np.sin(a_l), -np.cos(a_l) * np.cos(a_s)])
        pos = pos + step * tangent
        s += step
        path.append((s, pos.copy(), a_l, a_s))
    path_s = np.array([p[0] for p in path])

    def at(s_):
        k = int(np.clip(np.searchsorted(path_s, s_), 0, len(path) - 1))
        return path[k]

    s_cur = 0.0
    verts = []
    for i, name in enumerate(levels):
        dims = verts_dims[i]
        _, c, a_l, a_s = at(s_cur + dims["h"] / 2)
        # local z (superior) = -tangent; rotate about x by -a_l (sagittal tilt), about y by a_s
        R = euler_to_matrix((np.rad2deg(a_l), np.rad2deg(a_s), var * rng.uniform(-3, 3)))
        verts.append(_Vert(name=name, centre=c.copy(), R=R, **dims))
        centres.append(c)
        s_cur += dims["h"] + (discs[i] if i < len(discs) else 0)
    centres = np.array(centres)
    mid = 0.5 * (centres.max(axis=0) + centres.min(axis=0))
    for v in verts:
        v.centre = v.centre - mid

    # ---- grid: the trunk around the column; the column sits behind the trunk centre
    W, Dp = cfg.trunk_mm
    spine_y = 0.5 * Dp - 75.0          # body centre ~75 mm in front of the skin of the back
    zmin = min(v.centre[2] for v in verts) - 15
    zmax = max(v.centre[2] for v in verts) + 15
    lo = np.array([-W / 2 - 10, -spine_y - Dp / 2 - 10, zmin])
    hi = np.array([W / 2 + 10, -spine_y + Dp / 2 + 10 + (25 if cfg.table else 0), zmax])
    n = np.ceil((hi - lo) / sp).astype(int) + 1
    sac = None
    if cfg.sacrum and verts[-1].name == "S1":
        sac = _Sacrum(verts[-1], np.random.default_rng([cfg.seed, 25]), var, W)
        below = int(np.ceil((zmin - sac.lowest_z()) / sp[2]))     # whole slices down past its tip
        if below > 0:
            lo[2] -= below * sp[2]
            n[2] += below
    affine = affine_from(lo, sp)
    I, J, K = n
    x = lo[0] + sp[0] * np.arange(I)
    y = lo[1] + sp[1] * np.arange(J)
    z = lo[2] + sp[2] * np.arange(K)
    vox = float(sp.mean())

    # ---- soft tissue (2-D in x, y; varies slowly along z)
    X, Y = np.meshgrid(x, y, indexing="xy")     # (J, I)
    yc = -spine_y                                # trunk centre y in the volume frame
    ell = np.sqrt((X / (W / 2)) ** 2 + ((Y - yc) / (Dp / 2)) ** 2)
    r_scale = min(W, Dp) / 2
    skin = _occupancy((ell - 1.0) * r_scale, vox)
    fat_in = _occupancy((ell - (1.0 - 18.0 / r_scale)) * r_scale, vox)           # inside the fat layer
    hu2 = -1000.0 + skin * (1000.0 - 100.0) + fat_in * 140.0                     # air -> fat -> ~40 HU
    # paraspinal muscles behind the column, psoas beside the bodies
    for sx in (-1, 1):
        para = np.sqrt(((X - sx * 35) / 30) ** 2 + ((Y - 45) / 28) ** 2) - 1.0
        hu2 += _occupancy(para * 28, vox) * fat_in * 15.0
        psoas = np.sqrt(((X - sx * 42) / 20) ** 2 + ((Y + 5) / 18) ** 2) - 1.0
        hu2 += _occupancy(psoas * 18, vox) * 15.0
    aorta = np.sqrt((X + 12) ** 2 + (Y + 35) ** 2) - 11.0
    hu2 += _occupancy(aorta, vox) * 15.0
    ct = np.repeat(hu2[None].astype(np.float32), K, axis=0)          # (K, J, I)
    # abdominal contents: low-frequency texture and bowel gas in front of the column
    front = np.broadcast_to((_occupancy((ell - 0.93) * r_scale, vox) * (Y < yc + 10))[None], ct.shape)
    tex = _smooth_noise((K // 2 + 1, J // 2 + 1, I // 2 + 1), rng, 3.0)
    tex = ndimage.zoom(tex, (K / tex.shape[0], J / tex.shape[1], I / tex.shape[2]), order=1)[:K, :J, :I]
    ct += 12.0 * tex * front
    gas = _smooth_noise((K // 4 + 1, J // 4 + 1, I // 4 + 1), rng, 2.0)
    gas = ndimage.zoom(gas, (K / gas.shape[0], J / gas.shape[1], I / gas.shape[2]), order=1)[:K, :J, :I]
    gas_occ = np.clip((gas - 2.0) * 2.0, 0, 1) * front * (np.broadcast_to((Y < yc - 20)[None], ct.shape))
    ct = ct * (1 - gas_occ) + (-900.0) * gas_occ
    if cfg.table:
        # a 10 mm carbon-fibre plate (~ 200 HU) 2 mm under the back
        tab = np.abs(Y - (yc + Dp / 2 + 7.0)) - 5.0
        ct += np.broadcast_to((_occupancy(tab, vox) * 1200.0)[None], ct.shape)

    # ---- bones and discs
    seg = np.zeros(ct.shape, dtype=np.int16)
    trab = _smooth_noise(ct.shape, rng, 0.8 / vox if vox < 1.6 else 0.5)
    canal_mask = np.zeros(ct.shape, dtype=bool)
    for i, v in enumerate(verts):
        lab = level_id(v.name)
        if sac is not None and v is sac.v:
            continue                                  # drawn by _Sacrum below (the disc above it is L5's)
        c = v.centre + np.array([0.0, -spine_y, 0.0])
        reach = np.array([v.w + v.tp_len + 12, max(v.d, 0) + v.canal_d + v.spin_len + 20, v.h / 2 + 22])
        lo_i = np.clip(np.floor((c - reach - lo) / sp).astype(int), 0, n - 1)
        hi_i = np.clip(np.ceil((c + reach - lo) / sp).astype(int) + 1, 1, n)
        lo_i[1] = max(0, int(np.floor((c[1] - v.d - 12 - lo[1]) / sp[1])))
        sl = (slice(lo_i[2], hi_i[2]), slice(lo_i[1], hi_i[1]), slice(lo_i[0], hi_i[0]))
        Z, Yy, Xx = np.meshgrid(z[sl[0]], y[sl[1]], x[sl[2]], indexing="ij")
        p = np.stack([Xx, Yy, Z], -1) - c
        p = p @ v.R                                              # volume -> local (R^T applied)
        body, arch = _vertebra_sdfs(v, p)
        occ_body = _occupancy(body, vox)
        occ_arch = _occupancy(arch, vox)
        shell_b = np.clip(_occupancy(body, vox) - _occupancy(body + 1.3, vox), 0, 1)
        shell_a = np.clip(_occupancy(arch, vox) - _occupancy(arch + 2.0, vox), 0, 1)
        cancel = 230.0 + 70.0 * trab[sl]
        bone_hu = cfg.bone_density * ((occ_body - shell_b) * cancel + shell_b * 1150.0
                                      + (occ_arch - shell_a) * (500.0 + 60.0 * trab[sl]) + shell_a * 1250.0)
        occ = np.clip(occ_body + occ_arch, 0, 1)
        region = ct[sl]
        ct[sl] = region * (1 - occ) + bone_hu
        seg_region = seg[sl]
        seg_region[(occ > 0.5) & (seg_region == 0)] = lab
        # spinal canal content (CSF / cord ~ 15 HU) stays soft tissue; remember it for the discs
        cy = v.canal_y
        canal = ((p[..., 0] / (v.canal_w / 2)) ** 2 + ((p[..., 1] - cy) / (v.canal_d / 2)) ** 2) < 1.0
        canal_mask[sl] |= canal
        # disc below this vertebra (towards the next one)
        if i + 1 < len(verts):
            nv = verts[i + 1]
            nc = nv.centre + np.array([0.0, -spine_y, 0.0])
            dc = 0.5 * (c + nc)
            half_h = 0.5 * (np.linalg.norm(nc - c) - v.h / 2 - nv.h / 2) + 1.0
            Rm = v.R
            q = (np.stack([Xx, Yy, Z], -1) - dc) @ Rm
            disc = _body_sdf(q, 0.5 * (v.w + nv.w) * 0.97, 0.5 * (v.d + nv.d) * 0.97, 2 * half_h, waist=-0.04)
            nucleus = np.sqrt((q[..., 0] / (v.w * 0.45)) ** 2 + ((q[..., 1] + 2) / (v.d * 0.45)) ** 2 + (q[..., 2] / half_h) ** 2) - 1.0
            occ_d = _occupancy(disc, vox) * (1 - occ)
            d_hu = 95.0 - 25.0 * _occupancy(nucleus * 5, vox)
            ct[sl] = ct[sl] * (1 - occ_d) + occ_d * d_hu
    ct[canal_mask & (seg == 0)] = np.minimum(ct[canal_mask & (seg == 0)], 20.0)
    if cfg.ribs:
        _add_ribs(ct, seg, verts, spine_y, (W, Dp), lo, sp, np.random.default_rng([cfg.seed, 12]), var,
                  cfg.bone_density)
    if sac is not None:
        sac.draw(ct, seg, spine_y, lo, sp, trab, cfg.bone_density)
    return Volume(ct.astype(np.float32), affine), Volume(seg, affine.copy())


def _rib_path(v: _Vert, k: int, side: float, trunk, spine_y: float, rng, var: float) -> np.ndarray:
    """(M, 4) points (x, y, z mm, volume frame) and radius (mm) along rib ``k`` of vertebra
    ``v`` on side ``side`` (+1 left, -1 right), every ~6 mm."""
    W, Dp = trunk
    back, px, lam_y, zc = v.back, v.pedicle_x, v.lamina_y, v.arch_z
    # local frame (origin at the body centre): head on the body's posterolateral side, tubercle
    # at the transverse process's tip
    head = np.array([side * v.w * 0.75, back * 0.6, zc])
    tubercle = np.array([side * (px + v.tp_len * 0.85), lam_y - 1.0, zc + 3.0])
    c = v.centre + np.array([0.0, -spine_y, 0.0])
    j = _jitter(rng, var)
    # the shaft: an ellipse about a centre in front of the column (volume frame, xy), from
    # behind the tubercle round the side to the front; short first and floating ribs
    ax = min(W / 2 - 30.0, (55.0 + 12.0 * (k - 1)) * j(0.06))
    ay = min(Dp / 2 - 15.0, (45.0 + 6.0 * (k - 1)) * j(0.06))
    end = {11: 95.0, 12: 70.0}.get(k, 150.0 if k <= 7 else 135.0) * j(0.05)
    drop = (20.0 + 4.0 * min(k, 8)) * j(0.15)                                # mm lower at the front end
    t_vol, h_vol = v.to_volume(tubercle, spine_y), v.to_volume(head, spine_y)
    yc = t_vol[1] + 12.0 - ay                                          # the ellipse's back passes 12 mm behind the tubercle
    phi0 = np.arcsin(np.clip(abs(t_vol[0] - c[0]) / ax, 0.0, 0.95))
    phis = np.linspace(phi0, np.deg2rad(end), max(4, int(np.deg2rad(end) * ax / 6.0)))
    f = (phis - phis[0]) / max(phis[-1] - phis[0], 1e-6)
    shaft = np.stack([c[0] + side * ax * np.sin(phis), yc + ay * np.cos(phis), t_vol[2] - drop * f ** 1.3], -1)
    pts = np.concatenate([h_vol[None], t_vol[None], shaft])
    r = np.concatenate([[4.5, 4.5], 4.5 - 1.0 * f]) * (0.8 + 0.2 * min(k, 6) / 6)
    return np.concatenate([pts, r[:, None]], -1)


def _add_ribs(ct, seg, verts, spine_y, trunk, lo, sp, rng, var, density=1.0):
    """Draw the ribs of the thoracic vertebrae of ``verts`` into ``ct`` (HU) and ``seg``
    (their own labels; vertebra voxels keep theirs), in place; clipped to the grid; bone HU
    times ``density``."""
    vox = float(sp.mean())
    for v in verts:
        if not v.name.startswith("T"):
            continue
        k = int(v.name[1:])
        for side, name in ((1.0, "left"), (-1.0, "right")):
            path = _rib_path(v, k, side, trunk, spine_y, rng, var)
            pts, rad = path[:, :3], path[:, 3]
            pad = rad.max() + 2 * vox
            box = _grid_box(pts, pad, lo, sp, ct.shape)
            if box is None:
                continue                                                   # wholly outside the grid
            sl, p, lo_i, hi_i = box
            sdf = np.full(p.shape[:-1], np.inf)
            for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
                # each segment only where it can reach (its own box within the rib's)
                blo = np.maximum(np.floor((np.minimum(a, b) - pad - lo) / sp).astype(int) - lo_i, 0)
                bhi = np.minimum(np.ceil((np.maximum(a, b) + pad - lo) / sp).astype(int) + 1 - lo_i, hi_i - lo_i)
                if np.any(bhi <= blo):
                    continue
                bs = (slice(blo[2], bhi[2]), slice(blo[1], bhi[1]), slice(blo[0], bhi[0]))
                sdf[bs] = np.minimum(sdf[bs], _capsule(p[bs], a, b, 0.5 * (ra + rb)))
            _paint_bone(ct, seg, sl, sdf, rib_id(k, name), vox, 350.0, 1100.0, density)


# ---------------------------------------------------------------- sacrum and hip bones
# per sacral segment S1..S5: (half-width, half-depth, length) as fractions of the column's S1
# (w, d, h), the lateral mass beyond the body (mm), the canal's (width, depth) as fractions
# of S1's canal
_SACRAL = ((1.05, 1.0, 0.9, 36.0, 0.9, 0.6), (0.8, 0.75, 0.75, 26.0, 0.7, 0.5), (0.62, 0.6, 0.6, 16.0, 0.55, 0.42),
           (0.47, 0.5, 0.5, 7.0, 0.45, 0.36), (0.35, 0.42, 0.4, 0.0, 0.35, 0.3))


def _rounded_box(p, c, half, r):
    """Signed distance to a box of half sizes ``half`` with edges rounded by ``r``."""
    return _box(p, c, np.maximum(np.asarray(half, dtype=float) - r, 0.0)) - r


def _triangle_dist(p, a, b, c):
    """Unsigned distance (mm) from points p (..., 3) to the triangle a, b, c (3,) each."""
    n = np.cross(b - a, c - a)
    n = n / np.linalg.norm(n)
    d_plane = (p - a) @ n
    q = p - d_plane[..., None] * n                                  # foot on the plane
    inside = np.ones(p.shape[:-1], dtype=bool)
    for u, v in ((a, b), (b, c), (c, a)):
        inside &= (np.cross(v - u, q - u) @ n) >= 0
    edges = np.minimum(np.minimum(_capsule(p, a, b, 0.0), _capsule(p, b, c, 0.0)), _capsule(p, c, a, 0.0))
    return np.where(inside, np.abs(d_plane), edges)


class _Sacrum:
    """A sacrum in place of the column's S1 (:class:`_Vert` ``v``) and the two hip bones,
    built in S1's local frame (x left, y posterior, z up the column; mm): five fused
    segments along an axis that leaves S1's centre down and back (``tilt``) and curls
    forward towards the tip, each a body with lateral masses (S1's: the alae), a canal
    behind it under a dorsal plate with a median crest; S1's superior articular processes;
    four pairs of foramina. The hip bones meet the alae at the sacroiliac joints (a gap of
    a few millimetres); each is a 7 mm plate (the iliac wing, a fan of triangles from the
    ilium's body to the crest) with a thick crest, the auricular block, the sciatic buttress
    and the ilium's body going down to the acetabulum; the iliac crest stays 20 mm inside a
    trunk ``trunk_width`` mm wide. Sizes vary with ``rng`` (its own stream)."""

    def __init__(self, v: _Vert, rng, var: float, trunk_width: float):
        self.v = v
        j = _jitter(rng, var)
        tilt, curl = 45.0 * j(0.2), 45.0 * j(0.25)
        self.segs = []                                                  # (centre, R, w, d, length, lateral, cw, cd)
        centre, prev_len = np.zeros(3), 0.0
        for i, (fw, fd, fh, lat, fcw, fcd) in enumerate(_SACRAL):
            length = v.h * fh * j(0.06)
            theta = 0.0 if i == 0 else tilt - curl * (i - 1) / 3
            R = euler_to_matrix((theta, 0.0, 0.0))                      # about x: the axis turns back
            if i:
                centre = centre + (prev_len / 2 + length / 2 - 1.0) * (R @ np.array([0.0, 0.0, -1.0]))
            self.segs.append((centre.copy(), R, v.w * fw * j(0.05), v.d * fd * j(0.05), length, lat * j(0.12),
                              v.canal_w * fcw, v.canal_d * fcd))
            prev_len = length
        _, _, w0, _, _, lat0, _, _ = self.segs[0]
        xa = w0 * 0.8 + lat0 + 2.0                                      # |x| of the alae's lateral end
        b, hgt = j(0.08), j(0.08)
        b = min(b, (trunk_width / 2 - 20.0 - xa) / 72.0)              # the crest's widest point inside the skin
        # the hip bone's landmarks on the left (+x); the right one is its mirror image
        self.hip = {
            "psis": np.array([xa + 6 * b, 45.0, 25.0 * hgt]), "auricular": np.array([xa + 9, 35.0, 12.0]),
            "si_low": np.array([xa + 2, 15.0, -45.0]), "hub": np.array([xa + 35 * b, -30.0, -40.0]),
            "acetabulum": np.array([xa + 38 * b, -40.0, -85.0]), "aiis": np.array([xa + 48 * b, -70.0, -25.0]),
            "crest": [np.array([xa + 6 * b, 45.0, 25.0 * hgt]), np.array([xa + 30 * b, 40.0, 42.0 * hgt]),
                      np.array([xa + 60 * b, 15.0, 50.0 * hgt]), np.array([xa + 72 * b, -20.0, 45.0 * hgt]),
                      np.array([xa + 66 * b, -55.0, 30.0 * hgt]), np.array([xa + 55 * b, -75.0, 12.0 * hgt])],
        }

    def corners(self) -> np.ndarray:
        """(40, 3) S1-local corners (mm) of boxes holding each sacral segment with all it carries."""
        out = []
        for c, R, w, d, length, lat, _, cd in self.segs:
            for corner in np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T:
                out.append(c + R @ (corner * np.array([w * 0.8 + lat + 3, d + cd + 16, length / 2 + 14])))
        return np.array(out)

    def lowest_z(self) -> float:
        """z (volume frame, mm) below which no part of the sacrum reaches."""
        return float(self.v.to_volume(self.corners(), 0.0)[:, 2].min())

    def _sacrum_sdfs(self, p):
        """(S1 segment sdf, S2-S5 sdf) at S1-local points p (..., 3)."""
        v = self.v
        out = []
        for i, (c, R, w, d, length, lat, cw, cd) in enumerate(self.segs):
            q = (p - c) @ R
            part = _body_sdf(q, w, d, length + 2.0, waist=0.04)
            if lat > 0:
                for s in (-1.0, 1.0):
                    part = _smooth_union(part, _rounded_box(q, np.array([s * (w * 0.8 + lat / 2), d * 0.25, 0.0]),
                                                            (lat / 2 + 2.0, d * 0.85, length / 2 + 1.0),
                                                            min(lat / 2 + 2.0, d * 0.85, length / 2 + 1.0) * 0.7), 3.0)
            cy = _canal_centre_y(d, cd)
            top = cy + cd / 2 + 6.0                                       # back of the dorsal plate
            arch = _rounded_box(q, np.array([0.0, (d * 0.6 + top) / 2, 0.0]), (cw / 2 + 7.0, (top - d * 0.6) / 2,
                                                                                length / 2 + 1.0), 2.0)
            if i < 4:                                                     # median sacral crest
                arch = _smooth_union(arch, _rounded_box(q, np.array([0.0, top + 4.0, 0.0]), (2.0, 5.0, length * 0.35),
                                                        1.5), 1.5)
            if i == 0:                                                    # superior articular processes (to L5's)
                for s in (-1.0, 1.0):
                    arch = _smooth_union(arch, _capsule(p, np.array([s * (v.pedicle_x + 1), v.lamina_y - 2, length / 2 - 4]),
                                                        np.array([s * (v.pedicle_x + 2), v.lamina_y, length / 2 + 8]),
                                                        4.2), 2.0)
            part = _smooth_union(part, arch, 2.0)
            part = np.maximum(part, -_canal_sdf(q, cw, cd, cy))
            out.append(part)
        rest = out[1]
        for part in out[2:]:
            rest = _smooth_union(rest, part, 2.0)
        # foramina: through holes (front to back) at the junctions of the segments, beside the bodies
        for i in range(4):
            c, R, w, _, length, _, _, _ = self.segs[i + 1]
            for s in (-1.0, 1.0):
                x = s * (0.5 * (w + self.segs[i][2]) + 4.0)
                q = (p - (c + R @ np.array([x, 0.0, length / 2]))) @ R
                hole = np.sqrt(q[..., 0] ** 2 + q[..., 2] ** 2) - (4.5 - 0.7 * i)
                if i == 0:
                    out[0] = np.maximum(out[0], -hole)
                rest = np.maximum(rest, -hole)
        return out[0], rest

    def _hip_landmarks(self, side: float) -> dict:
        """``self.hip`` for ``side`` (+1 left, -1 right: mirrored in x), S1-local mm."""
        m = np.array([side, 1.0, 1.0])
        return {k: (val * m if not isinstance(val, list) else [c * m for c in val]) for k, val in self.hip.items()}

    def _hip_sdf(self, p, side: float):
        """The hip bone on ``side`` (+1 left, -1 right) at S1-local points p (..., 3)."""
        L = self._hip_landmarks(side)
        crest, hub = L["crest"], L["hub"]
        wing = np.full(p.shape[:-1], np.inf)
        for a, b in zip(crest[:-1], crest[1:]):                           # the iliac wing: a fan from the hub
            wing = np.minimum(wing, _triangle_dist(p, hub, a, b))
        wing = np.minimum(wing, _triangle_dist(p, L["si_low"], crest[0], hub))
        bone = wing - 3.5
        for a, b in zip(crest[:-1], crest[1:]):                           # the crest's rim
            bone = _smooth_union(bone, _capsule(p, a, b, 5.0), 3.0)
        for a, b, r in ((L["auricular"], L["si_low"], 9.0), (L["psis"], L["auricular"], 8.0), (L["si_low"], hub, 7.0),
                        (hub, L["acetabulum"], 13.0), (crest[-1], L["aiis"], 5.0), (L["aiis"], L["acetabulum"], 6.0)):
            bone = _smooth_union(bone, _capsule(p, a, b, r), 4.0)
        return bone

    def draw(self, ct, seg, spine_y: float, lo, sp, trab, density: float = 1.0):
        """Draw the sacrum and hip bones into ``ct`` (HU) and ``seg`` in place, on free voxels
        only (label 0), clipped to the grid; ``trab`` is the phantom's bone texture (ct's
        shape); bone HU times ``density``."""
        v, vox = self.v, float(sp.mean())
        box = _grid_box(v.to_volume(self.corners(), spine_y), 3 * vox, lo, sp, ct.shape)
        if box is not None:
            sl, p, _, _ = box
            s1, rest = self._sacrum_sdfs(v.to_local(p, spine_y))
            _paint_bone(ct, seg, sl, _smooth_union(s1, rest, 1.0),
                        np.where(s1 <= rest, level_id("S1"), SACRUM_ID).astype(np.int16), vox, 230.0 + 60.0 * trab[sl],
                        1150.0, density)
        for side, name in ((1.0, "left"), (-1.0, "right")):
            L = self._hip_landmarks(side)
            pts = np.array([val for val in L.values() if not isinstance(val, list)] + L["crest"])
            box = _grid_box(v.to_volume(pts, spine_y), 16.0, lo, sp, ct.shape)
            if box is not None:
                sl, p, _, _ = box
                _paint_bone(ct, seg, sl, self._hip_sdf(v.to_local(p, spine_y), side), HIP_IDS[name], vox,
                            250.0 + 60.0 * trab[sl], 1150.0, density)
