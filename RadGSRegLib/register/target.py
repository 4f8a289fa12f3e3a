"""What the 2-D/3-D stages register against: a case prepared once.

:class:`Target` holds a DRR projector of the CT slab around the vertebra (and of a
block-averaged copy for the coarse stages), the vertebra's points (CT frame), the X-rays as
line integrals (resized copies cached per detector size) and their views; it renders DRRs
at a pose and finds the vertebra's window on a detector. :func:`make_target` builds it
from a :class:`~RadGSRegLib.io.Case` (:func:`slab_around`, :func:`block_average`).

Poses are ``T_ct_to_carm`` (4, 4); mm everywhere; images are ``[row, column]``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from ..drr import DRR, hu_to_mu
from ..simulate import beyond_ct
from ..geometry import View, apply
from ..volume import Volume
from ..xray import as_line_integral

__all__ = ["Target", "make_target", "slab_around", "block_average", "UNCOVERED"]

#: line integral (dimensionless; 0.1 is 5 mm of water) beyond the CT's ends above which a
#: pixel is not covered by the CT (:meth:`Target.covered`)
UNCOVERED = 0.1
#: how far beyond each end (mm) and at what voxel size (mm) the stand-in body is rendered
BEYOND_MM, BEYOND_VOXEL_MM = 100.0, 6.0


def slab_around(ct: Volume, centre_ct: np.ndarray, half_mm: float) -> Volume:
    """The CT cropped to the slices within ``half_mm`` of ``centre_ct`` (3,) CT mm along the
    volume axis closest to the patient's cranio-caudal (LPS z) direction; full in-plane
    extent."""
    ax = ct.axis_along_z
    n = ct.size[ax]
    coord = ct.world_to_index(centre_ct)[ax]
    half = half_mm / ct.spacing[ax]
    lo, hi = int(max(0, np.floor(coord - half))), int(min(n, np.ceil(coord + half) + 1))
    sl = [slice(None)] * 3
    sl[2 - ax] = slice(lo, hi)
    start = np.zeros(3)
    start[ax] = lo
    return Volume(np.ascontiguousarray(ct.array[tuple(sl)]), ct.affine_at(start))


def block_average(mu: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` ([k, j, i]) averaged over blocks of ``floor(target_mm / spacing)`` voxels per axis,
    and its affine (voxel centres at the blocks' centres)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)                      # (i, j, k)
    f = np.maximum(1, np.floor(target_mm / sp).astype(int))
    if np.all(f == 1):
        return mu, affine
    fk, fj, fi = f[2], f[1], f[0]
    K, J, I = (n // m * m for n, m in zip(mu.shape, (fk, fj, fi)))
    b = np.empty((K // fk, J // fj, I // fi), np.float32)
    _block_mean(np.asarray(mu, dtype=np.float32), int(fk), int(fj), int(fi), b)
    A = affine.copy()
    A[:3, :3] = affine[:3, :3] * f[None, :]
    A[:3, 3] = affine[:3, :3] @ ((f - 1) / 2.0) + affine[:3, 3]
    return np.ascontiguousarray(b, dtype=np.float32), A


@njit(cache=True, parallel=True)
def _block_mean(mu, fk, fj, fi, out):
    """``out`` (K', J', I') = the means of ``mu`` ([k, j, i]) over blocks of fk x fj x fi
    voxels (summed in float64; ``out``'s shape says how many blocks: a remainder is left
    out)."""
    K2, J2, I2 = out.shape
    inv = 1.0 / (fk * fj * fi)
    for kb in prange(K2):
        for jb in range(J2):
            for ib in range(I2):
                acc = 0.0
                for dk in range(fk):
                    for dj in range(fj):
                        for di in range(fi):
                            acc += mu[kb * fk + dk, jb * fj + dj, ib * fi + di]
                out[kb, jb, ib] = acc * inv


class Target:
    """What the 2-D/3-D stages need: a DRR of the CT, the vertebra's points (CT frame), the
    X-rays (line integrals) and their views. ``renders`` and ``rays`` count the DRRs
    :meth:`render` and :meth:`covered` made and the rays they cast (the projector's work; a
    profile's unit)."""

    def __init__(self, drr: DRR, points_ct: np.ndarray, images: dict[str, np.ndarray], views: dict[str, View],
                 coarse: DRR | None = None, beyond: list | None = None):
        from ..xray import body_ends_in_field, signal_mask

        self.drr = drr
        self.beyond = list(beyond or [])
        self.coarse = coarse or drr
        self.points = np.asarray(points_ct, dtype=np.float64)
        self.centre = self.points.mean(axis=0)
        self.images = images
        self.views = views
        # the pixels that carry a signal (None: all of them; not outside a round field)
        self.signal, self.open_ends = {}, {}
        for name, img in images.items():
            m = signal_mask(img)
            self.signal[name] = None if m.all() else m
            # an X-ray showing the body's end: the CT's air beyond its ends is what it shows
            self.open_ends[name] = body_ends_in_field(img, views[name], self.signal[name])
        self._cache = {}
        self.renders = 0
        self.rays = 0

    def exclude(self, name: str, mask: np.ndarray) -> None:
        """Leave the pixels of view ``name``'s X-ray where ``mask`` (bool (rows, cols), the
        X-ray's own pixels) is True out of every comparison from now on (e.g. metal the CT
        does not have): they stop counting as signal (:meth:`valid`)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.images[name].shape:
            raise ValueError(f"{name}: mask shape {mask.shape} is not the X-ray's {self.images[name].shape}")
        if not mask.any():
            return
        s = self.signal[name]
        self.signal[name] = ~mask if s is None else s & ~mask
        self._cache = {k: v for k, v in self._cache.items() if not (k[0] == name and k[-1] in ("valid", "highpass"))}

    def image(self, name: str, pixels: int) -> tuple[np.ndarray, View]:
        """The X-ray resized to ``pixels`` per side (area-averaged) and its view."""
        key = (name, pixels)
        if key not in self._cache:
            from ..xray import resize_view_image

            self._cache[key] = resize_view_image(self.images[name], self.views[name], pixels)
        return self._cache[key]

    def valid(self, name: str, pixels: int) -> np.ndarray | None:
        """The pixels of :meth:`image` that carry a signal (bool; a resized pixel counts only
        when all of it does), or None when every pixel does."""
        if self.signal[name] is None:
            return None
        key = (name, pixels, "valid")
        if key not in self._cache:
            from ..xray import resize_view_image

            frac, _ = resize_view_image(self.signal[name].astype(np.float32), self.views[name], pixels)
            self._cache[key] = frac > 0.999
        return self._cache[key]

    def highpassed(self, name: str, pixels: int, sigma_px: float) -> np.ndarray:
        """:meth:`image` high-passed (:func:`~RadGSRegLib.similarity.highpass`, sigma in
        pixels, over :meth:`valid`), kept per size and sigma (the pose search asks for the
        same one for its rotation hypotheses, up to the last bit of the sigma)."""
        key = (name, pixels, float(sigma_px), "highpass")
        if key not in self._cache:
            from ..similarity import highpass

            self._cache[key] = highpass(self.image(name, pixels)[0], sigma_px, self.valid(name, pixels))
        return self._cache[key]

    def magnification(self, view: View, T) -> float:
        """Detector mm per mm at the vertebra's centre (pose ``T``) for ``view``."""
        return abs(view.source_to_detector) / max(float(np.linalg.norm(view.source - apply(T, self.centre))), 1.0)

    def window(self, view: View, T, margin_mm: float) -> tuple[int, int, int, int]:
        """(col0, row0, cols, rows): bounding box of the projected vertebra + margin, clipped."""
        uv = view.project(apply(T, self.points))
        m = margin_mm * self.magnification(view, T) / view.pixel_spacing[0]
        c0 = int(np.clip(np.floor(uv[:, 0].min() - m), 0, view.size[0] - 2))
        r0 = int(np.clip(np.floor(uv[:, 1].min() - m), 0, view.size[1] - 2))
        c1 = int(np.clip(np.ceil(uv[:, 0].max() + m), c0 + 2, view.size[0]))
        r1 = int(np.clip(np.ceil(uv[:, 1].max() + m), r0 + 2, view.size[1]))
        return c0, r0, c1 - c0, r1 - r0

    def covered(self, view: View, T) -> np.ndarray | None:
        """Which pixels of ``view`` (rows, cols) the rendered CT explains at pose ``T``: False
        where the pixel's ray would cross more than :data:`UNCOVERED` of attenuation beyond
        the rendered slab's cranio-caudal ends (the CT's own, or where the slab crops it) if
        the body went on there (the ``beyond`` stand-in: the end slices repeated,
        :func:`~RadGSRegLib.simulate.beyond_ct`, block-averaged to ~6 mm, whose first voxel
        reaches a few mm into the slab: it errs towards leaving out). A C-arm's field is
        often longer than the scan; there the X-ray holds anatomy the DRR lacks. None when
        every pixel is covered, without ``beyond``, or when the X-ray of this view (looked
        up by ``view.name``) shows the body ending in its field (``open_ends``,
        :func:`~RadGSRegLib.xray.body_ends_in_field`: a DRR-like image of the CT alone, whose
        air beyond the scan the CT explains; both ends are then trusted)."""
        return self.covered_each([view], [T])[0]

    def covered_each(self, views: list, poses: list) -> list:
        """:meth:`covered` of each view at its own pose (views of one size), each stand-in's
        DRRs rendered in one pass over the views whose rays can cross it."""
        out = [None] * len(views)
        if not self.beyond:
            return out
        todo = [n for n, v in enumerate(views) if not self.open_ends.get(v.name, False)]
        missing = {n: 0 for n in todo}
        for drr in self.beyond:
            seen = [n for n in todo if _in_view(drr, views[n], poses[n])]      # the others add nothing there
            if not seen:
                continue
            self.renders += len(seen)
            self.rays += views[0].size[0] * views[0].size[1] * len(seen)
            for n, img in zip(seen, drr.render_each([views[n] for n in seen], [poses[n] for n in seen])):
                missing[n] = missing[n] + img
        for n, m in missing.items():
            lost = np.asarray(m) > UNCOVERED
            out[n] = ~lost if lost.any() else None
        return out

    def render(self, view: View, T, supersample: int = 1, coarse: bool = False,
               ray_step_mm: float | None = None) -> np.ndarray:
        """DRR of ``view`` at pose ``T`` (area-averaged from ``supersample``^2 rays per pixel;
        ``coarse``: from the block-averaged CT, for the low-resolution stages; ``ray_step_mm``:
        the sample spacing along a ray, :class:`~RadGSRegLib.drr.DRR`)."""
        return self.render_each([view], [T], supersample, coarse, ray_step_mm)[0]

    def render_each(self, views: list, poses: list, supersample: int = 1, coarse: bool = False,
                    ray_step_mm: float | None = None) -> np.ndarray:
        """:meth:`render` of each view at its own pose (views of one size; (N, rows, cols)),
        from one pass of the projector (:meth:`~RadGSRegLib.drr.DRR.render_each`)."""
        drr = self.coarse if coarse else self.drr
        self.renders += len(views)
        self.rays += views[0].size[0] * views[0].size[1] * max(supersample, 1) ** 2 * len(views)
        if supersample <= 1:
            return drr.render_each(views, poses, ray_step_mm=ray_step_mm)
        fine = [v.resized((v.size[0] * supersample, v.size[1] * supersample)) for v in views]
        img = torch.from_numpy(drr.render_each(fine, poses, ray_step_mm=ray_step_mm))
        return F.avg_pool2d(img[:, None], supersample)[:, 0].numpy()

    def render_jacobian(self, view: View, T, center, supersample: int = 1, coarse: bool = False,
                        ray_step_mm: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`render` and its derivatives (6, rows, cols) with respect to the step
        ``p`` of ``pose_to_matrix(p, center) @ T`` (deg, mm; ``center`` (3,) C-arm mm):
        :meth:`~RadGSRegLib.drr.DRR.render_jacobian`, area-averaged like the DRR. Counts
        as one render."""
        drr = self.coarse if coarse else self.drr
        self.renders += 1
        self.rays += view.size[0] * view.size[1] * max(supersample, 1) ** 2
        if supersample <= 1:
            img, jac = drr.render_jacobian([view], T, center, ray_step_mm=ray_step_mm)
            return img[0], jac[0]
        fine = view.resized((view.size[0] * supersample, view.size[1] * supersample))
        img, jac = drr.render_jacobian([fine], T, center, ray_step_mm=ray_step_mm)
        both = F.avg_pool2d(torch.from_numpy(np.concatenate([img, jac[0]]))[:, None], supersample)[:, 0].numpy()
        return both[0], both[1:]


def _in_view(drr: DRR, view: View, T) -> bool:
    """Whether any ray of ``view`` can cross ``drr``'s volume at pose ``T``: its support
    (voxel indices -1 to n per axis, where the interpolation fades to zero) projects, as the
    bounding box of its eight corners' projections, onto the detector (pixel -1 to size)."""
    K, J, I = drr.mu.shape
    idx = np.array([[i, j, k, 1.0] for i in (-1, I) for j in (-1, J) for k in (-1, K)])
    pts = (np.asarray(T, dtype=np.float64) @ drr.affine @ idx.T).T[:, :3]
    h = np.c_[pts, np.ones(8)] @ view.projection_matrix().T
    if np.any(h[:, 2] <= 0):                               # a corner behind the source: no shortcut
        return True
    uv = h[:, :2] / h[:, 2:]
    cols, rows = view.size
    return bool(uv[:, 0].max() >= -1 and uv[:, 0].min() <= cols and uv[:, 1].max() >= -1 and uv[:, 1].min() <= rows)


def make_target(case, *, slab_mm: float, coarse_mm: float) -> Target:
    """The :class:`Target` of a :class:`~RadGSRegLib.io.Case`: the CT slab of ``slab_mm``
    either side of its vertebra (and a copy block-averaged to about ``coarse_mm`` voxels),
    the vertebra's points (the whole CT's centre without a label) and the X-rays as line
    integrals."""
    if case.seg is not None and case.vertebra_label is not None:
        pts = case.seg.label_points(case.vertebra_label, max_points=3000)
    else:
        pts = case.ct.index_to_world(np.array([[(n - 1) / 2 for n in case.ct.size]]))
    images = {k: as_line_integral(case.xrays[k], case.image_kind) for k in ("ap", "lat")}
    slab = slab_around(case.ct, pts.mean(axis=0), slab_mm)
    mu = hu_to_mu(slab.array)
    coarse_mu, coarse_affine = block_average(mu, slab.affine, coarse_mm)
    coarse = DRR(coarse_mu, coarse_affine) if coarse_mu is not mu else None
    # the body beyond the slab's ends, for Target.covered: coarse is all it needs
    b_mu, b_affine = block_average(coarse_mu, coarse_affine, BEYOND_VOXEL_MM)
    if min(b_mu.shape) == 0:                              # a slab thinner than one block: its own grid
        b_mu, b_affine = coarse_mu, coarse_affine
    beyond = [DRR(b.array, b.affine) for b in beyond_ct(Volume(b_mu, b_affine), BEYOND_MM)]
    return Target(DRR(mu, slab.affine), pts, images, case.views, coarse=coarse, beyond=beyond)
