"""X-ray rasterizer: line integrals of radiative Gaussians on a cone-beam detector.

What is integrated: for each pixel, the sum over Gaussians of the **exact** integral of the
Gaussian kernel along the ray from the source through the pixel centre (t in mm). With the
ray ``x(t) = s + t d`` (``|d| = 1``), ``M = Sigma^-1`` and ``Delta = s - p``:

    ∫ G(s + t d) dt = rho * sqrt(2 pi / a) * exp(-1/2 (c - b^2 / a)),
    a = d^T M d,   b = d^T M Delta,   c = Delta^T M Delta

(``shared/docs/radgs-math.md`` §2). This is the line integral itself, not the splat
approximation of R²-Gaussian (local affine projection with the "integration bias"
correction ``mu``): the two agree on the ray through the centre, and the exact form has
no error for large Gaussians, where the splat is off by up to tens of percent. Because the
integral is taken along the true ray in mm, it does not depend on the distance to the
source, which is what R²-Gaussian's correction achieves for the splat. Units: rho in 1/mm
gives dimensionless line integrals, the same as :mod:`RadGSRegLib.drr`.

Speed: each Gaussian contributes only to the pixels inside the bounding box of the
projection of its ``cutoff``-sigma ellipsoid (computed exactly from the dual quadric,
``C* = P Q* P^T``). Gaussians are grouped by box size; each group is one broadcast
(n, B, B) evaluation (no per-pair gathers) scatter-added into the image, in chunks, so
memory is bounded by a chunk, never N x pixels; with gradients each chunk is recomputed in
the backward pass (checkpointing) and the scatter recomputes its indices.
:func:`rasterize_dense` is the plain reference twin (every Gaussian at every pixel, no
truncation, the textbook formula).

Differentiable in density, position, scale and rotation through autograd; same code on CPU
and CUDA.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch.utils.checkpoint import checkpoint

from ..geometry import View
from ._scatter import box_scatter_add

__all__ = ["rasterize", "rasterize_many", "rasterize_dense", "projected_boxes"]


def _view_tensors(view: View, device, dtype=torch.float32):
    s = torch.as_tensor(view.source, dtype=dtype, device=device)
    base = torch.as_tensor(view.detector_origin - view.source, dtype=dtype, device=device)
    U = torch.as_tensor(view.pixel_spacing[0] * view.u, dtype=dtype, device=device)
    V = torch.as_tensor(view.pixel_spacing[1] * view.v, dtype=dtype, device=device)
    return s, base, U, V


def projected_boxes(position: torch.Tensor, covariance: torch.Tensor, view: View, cutoff: float = 3.0):
    """Pixel bounding boxes of the projected ``cutoff``-sigma ellipsoids.

    Args:
        position: (N, 3) mm. covariance: (N, 3, 3) mm^2. view: the detector.
    Returns:
        (u0, u1, v0, v1) int64 (N,) inclusive column/row ranges, clipped to the detector;
        empty where ``u1 < u0`` or ``v1 < v0``. A Gaussian whose ellipsoid holds the source
        gets the whole detector.
    """
    P = torch.as_tensor(view.projection_matrix(), dtype=torch.float64, device=position.device)
    return _boxes(position, covariance, P, view.size, cutoff)


def _boxes(position: torch.Tensor, covariance: torch.Tensor, P: torch.Tensor, size, cutoff: float):
    """:func:`projected_boxes` with the projection matrix ``P`` (3, 4), or one per Gaussian
    (N, 3, 4) float64, on a detector of ``size`` (cols, rows)."""
    with torch.no_grad():
        dev = position.device
        p = position.detach().double()
        A = (cutoff ** 2) * covariance.detach().double()
        n = p.shape[0]
        Qd = torch.zeros(n, 4, 4, dtype=torch.float64, device=dev)
        Qd[:, :3, :3] = A - p[:, :, None] * p[:, None, :]
        Qd[:, :3, 3] = -p
        Qd[:, 3, :3] = -p
        Qd[:, 3, 3] = -1.0
        C = P @ Qd @ P.transpose(-1, -2)                             # (N, 3, 3) dual conic
        cols, rows = size

        def extent(i, size):
            cii, ci3, c33 = C[:, i, i], C[:, i, 2], C[:, 2, 2]
            disc = ci3 ** 2 - cii * c33
            ok = (disc >= 0) & (c33.abs() > 1e-12)
            r = torch.sqrt(torch.clamp(disc, min=0))
            a = (ci3 - r) / torch.where(ok, c33, torch.ones_like(c33))
            b = (ci3 + r) / torch.where(ok, c33, torch.ones_like(c33))
            lo = torch.minimum(a, b)
            hi = torch.maximum(a, b)
            # the source inside the ellipsoid (c33 >= 0): the projection covers everything
            full = ~ok | (c33 >= 0)
            lo = torch.where(full, torch.zeros_like(lo), lo)
            hi = torch.where(full, torch.full_like(hi, size - 1), hi)
            lo = torch.clamp(torch.ceil(lo), 0, size).long()
            hi = torch.clamp(torch.floor(hi), -1, size - 1).long()
            return lo, hi

        u0, u1 = extent(0, cols)
        v0, v1 = extent(1, rows)
        return u0, u1, v0, v1


def _box_values(t: torch.Tensor, base, U, V, u0, v0, w, h, B: int) -> torch.Tensor:
    """Exact line integrals over B x B pixel boxes: Gaussian terms t (13, n), each pair's
    detector (``base`` = detector origin - source, ``U``, ``V`` pixel steps; (n, 3) mm), box
    corners u0, v0 and true box sizes w, h (n,) -> (n, B, B) values at pixels (v0 + row,
    u0 + col), (~0: below 1e-34) outside each true box.

    With M = W^T W (W = S^-1 R^T, the whitening map), d' = W d and Delta' = W Delta, the
    module docstring's integral is ``rho sqrt(2 pi / a) exp(-|Delta' x d'|^2 / (2 a))`` with
    ``a = |d'|^2`` (Lagrange's identity: c - b^2/a = |Delta' x d'|^2 / a, without the
    cancellation of two terms ~(700 mm / sigma)^2). Here the ray direction is left
    unnormalised, ``d = row_start + c U`` (``row_start = base + u0 U + (v0 + r) V``, c = 0..B-1 within the
    box): ``integral = rho |d| sqrt(2 pi / a) exp(-e / (2 a))`` with ``d' = W d``,
    ``a = |d'|^2``, ``e = |Delta' x d'|^2``. Each of |d|^2, a and e is a quadratic in c whose
    coefficients are per-row, so the (n, B, B) work is a few multiply-adds per pixel; c is
    counted from the box's own corner, which keeps the float32 sums small. Constant factors
    are folded into the coefficients, and pixels outside the true box get a huge
    exponent (value ~0) instead of a separate mask.
    """
    dt = base.dtype
    ar = torch.arange(B, device=base.device, dtype=dt)
    W = t[:9].T.reshape(-1, 3, 3)                                   # (n, 3, 3)
    E = t[9:12].T                                                   # (n, 3) W Delta
    rho2 = (2.0 * math.pi * t[12] ** 2)[:, None, None]              # (n, 1, 1)
    rv = v0.to(dt)[:, None] + ar[None, :]                           # (n, B) absolute rows
    row = (base + u0.to(dt)[:, None] * U)[:, None, :] + rv[..., None] * V[:, None, :]   # (n, B, 3)
    A = torch.einsum("nij,nbj->nbi", W, row)                        # (n, B, 3) W row_start
    WU = (W @ U[:, :, None])[:, :, 0]                               # (n, 3)
    Xr = torch.cross(E[:, None, :].expand_as(A), A, dim=-1)         # (n, B, 3)
    Y = torch.cross(E, WU, dim=-1)[:, None, :]                      # (n, 1, 3)
    c = ar[None, None, :]                                           # (1, 1, B)
    inf = torch.tensor(1e30, dtype=dt, device=base.device)          # finite: keeps 0 * grad = 0
    # outside the true box: a huge exponent in the per-row term (rows) and per-column term (columns)
    zero = torch.zeros((), dtype=dt, device=base.device)
    row_out = torch.where(ar[None, :] < h.to(dt)[:, None], zero, inf)[..., None]   # (n, B, 1)
    col_out = torch.where(ar[None, :] < w.to(dt)[:, None], zero, inf)[:, None, :]  # (n, 1, B)

    def coef(p, q, scale=1.0):                                      # |p + c q|^2 = k0 + c (k1 + c k2)
        return (scale * (p * p).sum(-1)[..., None], (2.0 * scale) * (p * q).sum(-1)[..., None],
                scale * (q * q).sum(-1)[..., None])

    a0, a1, a2 = coef(A, WU[:, None, :])
    d0, d1, d2 = coef(row, U[:, None, :], 1.0)
    e0, e1, e2 = coef(Xr, Y, -0.5)
    inv_a = 1.0 / (a0 + c * (a1 + c * a2))                          # (n, B, B)
    ratio = (rho2 * d0 + c * (rho2 * d1 + c * (rho2 * d2))) * inv_a   # rho^2 2 pi |d|^2 / a
    expo = ((e0 - row_out) + c * (e1 + c * e2) - col_out) * inv_a    # -e / (2 a), huge outside
    # exp is 5x slower on huge negative arguments: clamp at -80 (exp(-80) ~ 2e-35, nothing)
    return torch.sqrt(ratio) * torch.exp(torch.clamp(expo, min=-80.0))


def _gaussian_terms(density, position, whitening, source) -> torch.Tensor:
    """(13, N): W (9, row-major), W Delta (3) with Delta = source - p, rho (rows contiguous);
    ``source`` (3,) or one per Gaussian (N, 3)."""
    delta = source - position
    wd = (whitening @ delta[:, :, None])[:, :, 0]
    return torch.cat([whitening.reshape(-1, 9), wd, density[:, None]], dim=1).T.contiguous()


def _naive_values(density, position, precision, source, d) -> torch.Tensor:
    """(N, P) the textbook formula rho sqrt(2 pi/a) exp(-(c - b^2/a)/2) (reference; use float64)."""
    delta = source[None, :] - position                                   # (N, 3)
    a = torch.einsum("pi,nij,pj->np", d, precision, d)
    b = torch.einsum("pi,nij,nj->np", d, precision, delta)
    c = torch.einsum("ni,nij,nj->n", delta, precision, delta)[:, None]
    return density[:, None] * torch.sqrt(2 * math.pi / a) * torch.exp(-0.5 * (c - b * b / a))


#: box sizes (pixels) that Gaussians are grouped by; a box is padded up to the next size
#: (every size up to 16, then steps of ~20 %: at most ~1.4x the pixels of the true box)
_LADDER = tuple(range(1, 17)) + tuple(sorted({int(round(16 * 1.2 ** k)) for k in range(1, 40)}))


#: (padded) Gaussian/pixel pairs evaluated at once by default: on the CPU the fastest of
#: 2^17-2^23 measured on a training batch (2^19: ~30 MB of intermediates); on a GPU, where each
#: chunk is a dozen kernel launches, far more (2^22: ~250 MB)
CHUNK_PAIRS = {"cpu": 2 ** 19, "cuda": 2 ** 22}


def chunk_pairs_for(device: torch.device, given: int | None) -> int:
    """``given``, or the default of :data:`CHUNK_PAIRS` for ``device``'s type."""
    return int(given) if given else CHUNK_PAIRS.get(torch.device(device).type, CHUNK_PAIRS["cpu"])


def _bucket(n: torch.Tensor) -> torch.Tensor:
    """Index into :data:`_LADDER` of the smallest size >= n."""
    return torch.searchsorted(torch.tensor(_LADDER, device=n.device), n)


def rasterize(density: torch.Tensor, position: torch.Tensor, covariance: torch.Tensor, whitening: torch.Tensor,
              views: Sequence[View], *, cutoff: float = 3.0, chunk_pairs: int | None = None) -> torch.Tensor:
    """Line-integral images of Gaussians (C-arm frame) for views of equal size.

    Gaussians are grouped by the size of their pixel box (square, padded up to a size of
    a ~sqrt(2) ladder); each group is evaluated as one broadcast (n, B, B) batch, so no
    per-pair gathers are needed, then scatter-added.

    Args:
        density: (N,) 1/mm. position: (N, 3) mm. covariance: (N, 3, 3) ``R S^2 R^T``.
        whitening: (N, 3, 3) ``W = S^-1 R^T`` (so that ``Sigma^-1 = W^T W``).
        views: detectors of equal ``size``.
        cutoff: support in sigmas (contributions beyond the projected box are dropped;
            they are below exp(-cutoff²/2) of the Gaussian's peak line integral).
        chunk_pairs: at most this many (padded) Gaussian/pixel pairs are evaluated at once
            (default: :data:`CHUNK_PAIRS` of the device).
    Returns:
        (V, rows, cols) tensor (dtype of ``position``).
    """
    return rasterize_many([(density, position, covariance, whitening, views)], cutoff=cutoff,
                          chunk_pairs=chunk_pairs)[0]


def rasterize_many(items: Sequence[tuple], *, cutoff: float = 3.0,
                   chunk_pairs: int | None = None) -> list[torch.Tensor]:
    """:func:`rasterize` of several Gaussian sets, each on its own views, in one pass: every
    (Gaussian, view) pair of every set is grouped by box size together, so a batch costs
    one group loop instead of one per set and view (on a GPU, where each small operation
    is a kernel launch, this is what makes a training batch cheap).

    Args:
        items: (density (N_i,), position (N_i, 3), covariance (N_i, 3, 3), whitening
            (N_i, 3, 3), views) per set, as :func:`rasterize` takes them; every view of
            every set has the same size; all tensors on one device and of one dtype.
    Returns:
        One (V_i, rows, cols) tensor per set.
    """
    items = [(d, p, c, w, list(vs)) for d, p, c, w, vs in items]
    sizes = {v.size for *_, vs in items for v in vs}
    if len(sizes) > 1:
        raise ValueError(f"all views must have the same size, got {sorted(sizes)}")
    if not sizes:
        raise ValueError("no views to rasterize")
    cols, rows = sizes.pop()
    dev, dt = items[0][1].device, items[0][1].dtype
    chunk_pairs = chunk_pairs_for(dev, chunk_pairs)
    # every (Gaussian, view) pair: its set's tensors repeated per view, its view's detector
    parts, img, Ps, det = [], [], [], []
    for d, p, c, w, vs in items:
        for v in vs:
            parts.append((d, p, c, w))
            img.append(torch.full((d.shape[0],), len(Ps), dtype=torch.long, device=dev))
            Ps.append(torch.as_tensor(v.projection_matrix(), dtype=torch.float64, device=dev))
            det.append(torch.stack(_view_tensors(v, dev, dt)))                # (4, 3): s, base, U, V
    n_img = len(Ps)
    dens, pos, cov, wht = zip(*parts)
    img = torch.cat(img)
    det = torch.stack(det)[img]                                              # (M, 4, 3)
    position, covariance = torch.cat(pos), torch.cat(cov)
    u0, u1, v0, v1 = _boxes(position, covariance, torch.stack(Ps)[img], (cols, rows), cutoff)
    w = u1 - u0 + 1
    h = v1 - v0 + 1
    live = (w > 0) & (h > 0)
    bucket = torch.where(live, _bucket(torch.maximum(w, h)), torch.full_like(w, -1))
    used = [b for b in torch.unique(bucket).tolist() if b >= 0]
    pad = _LADDER[used[-1]] if used else 0
    pc = cols + pad                                                          # padded row length
    plane = (rows + pad) * pc
    out = torch.zeros(n_img * plane, dtype=dt, device=dev)
    if used:
        terms = _gaussian_terms(torch.cat(dens), position, torch.cat(wht), det[:, 0])   # (13, M)
        grad = torch.is_grad_enabled() and terms.requires_grad
        first = img * plane + v0 * pc + u0                                   # each box's first pixel
        for bi in used:
            B = _LADDER[bi]
            idx_all = torch.nonzero(bucket == bi).flatten()
            step = max(1, chunk_pairs // (B * B))
            for c0 in range(0, idx_all.numel(), step):
                idx = idx_all[c0:c0 + step]
                args = (terms[:, idx], det[idx, 1], det[idx, 2], det[idx, 3], u0[idx], v0[idx], w[idx], h[idx], B)
                # with gradients, recompute each chunk in the backward pass instead of keeping its
                # intermediates: memory stays bounded by one chunk whatever N and the detector size
                val = checkpoint(_box_values, *args, use_reentrant=False) if grad else _box_values(*args)
                # each image has a margin of B columns and rows, so padded pixels (value ~0)
                # beyond the detector's edge still have valid indices (in their own image)
                out = box_scatter_add(out, val, first[idx], B, (pc, 1))
    images = out.reshape(n_img, rows + pad, pc)[:, :rows, :cols]
    res, k = [], 0
    for *_, vs in items:
        res.append(images[k:k + len(vs)])
        k += len(vs)
    return res


def rasterize_dense(density, position, precision, views: Sequence[View]) -> torch.Tensor:
    """Reference twin of :func:`rasterize`: every Gaussian at every pixel, no truncation,
    the textbook formula (pass float64). Memory N x pixels: small cases and tests only."""
    views = list(views)
    cols, rows = views[0].size
    dev, dt = position.device, position.dtype
    out = []
    for view in views:
        s, base, U, V = _view_tensors(view, dev, dt)
        r, c = torch.meshgrid(torch.arange(rows, device=dev, dtype=dt), torch.arange(cols, device=dev, dtype=dt),
                              indexing="ij")
        d = base + c[..., None] * U + r[..., None] * V
        d = (d / torch.linalg.norm(d, dim=-1, keepdim=True)).reshape(-1, 3)          # (P, 3)
        out.append(_naive_values(density, position, precision, s, d).sum(0).reshape(rows, cols))
    return torch.stack(out)
