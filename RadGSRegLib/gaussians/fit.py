"""Per-case fitting of radiative Gaussians to projections (the optimisation baseline).

Gradient descent (Adam) on the Gaussians' raw parameters to minimise, over the given views,

    L1(I, I_m) + lambda_ssim (1 - SSIM(I, I_m)) + lambda_tv TV(V_block)

(RadGS-Reg Eq. 2 with lambda_1 = 0.2, lambda_2 = 0.05), where I is the rasterized image, I_m
the measured line integrals and V_block the voxelized volume on a random block of the output
grid. Every ``densify_every`` steps the Gaussians with the largest accumulated position
gradients are cloned (small ones) or split in two (large ones), and near-empty ones are
pruned, as in R²-Gaussian / 3DGS. Without a given start, Gaussians are drawn where the
back-projections of all views agree (a visual-hull prior).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..geometry import View
from ..losses import projection_loss, tv_3d
from ..volume import Volume
from .model import RadiativeGaussians
from .rasterizer import rasterize
from .voxelizer import voxelize

__all__ = ["FitConfig", "FitResult", "fit_gaussians", "backprojection_init", "recon_grid", "fit_case_xrays",
           "CaseFit", "fit_case"]


@dataclass
class FitConfig:
    """Settings of :func:`fit_gaussians` (lengths in mm; learning rates per raw parameter)."""

    n_gaussians: int = 3000
    max_gaussians: int = 15000
    iterations: int = 800
    views_per_step: int = 4
    lr_position: float = 0.1
    lr_scale: float = 0.02
    lr_rotation: float = 0.01
    lr_density: float = 0.03
    lr_final_factor: float = 0.1
    lambda_ssim: float = 0.2
    lambda_tv: float = 0.05
    tv_block: int = 24
    densify_every: int = 100
    densify_until: float = 0.7
    densify_fraction: float = 0.1
    prune_fraction: float = 0.005
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FitResult:
    gaussians: RadiativeGaussians
    history: list = field(default_factory=list)
    seconds: float = 0.0


def backprojection_init(images: torch.Tensor, views: Sequence[View], shape, affine, n: int,
                        rng: np.random.Generator) -> RadiativeGaussians:
    """``n`` Gaussians drawn on the grid where every view's image is high at the voxel's
    projection (product of normalised back-projections), with a common scale and a density
    set so that the rendered images match the measured mean."""
    K, J, I = shape
    A = np.asarray(affine, dtype=np.float64)
    m = max(20 * n, 20000)
    ijk = rng.uniform(-0.5, np.array([I, J, K]) - 0.5, (m, 3))
    pts = ijk @ A[:3, :3].T + A[:3, 3]
    score = np.ones(m)
    for img, v in zip(images, views):
        im = img.detach().cpu().numpy().astype(np.float64)
        im = np.clip(im / max(im.max(), 1e-12), 0, None)
        uv = v.project(pts)
        c = np.clip(np.round(uv[:, 0]).astype(int), 0, im.shape[1] - 1)
        r = np.clip(np.round(uv[:, 1]).astype(int), 0, im.shape[0] - 1)
        inside = (uv[:, 0] >= 0) & (uv[:, 0] <= im.shape[1] - 1) & (uv[:, 1] >= 0) & (uv[:, 1] <= im.shape[0] - 1)
        score *= np.where(inside, im[r, c], 0.0)
    score = score ** (1.0 / max(len(views), 1))
    if score.sum() <= 0:
        score = np.ones(m)
    keep = score > 0.2 * score.max()
    cand, w = pts[keep], score[keep] ** 2
    pick = rng.choice(len(cand), size=n, replace=len(cand) < n, p=w / w.sum())
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    region = keep.mean() * I * J * K * float(np.prod(spacing))
    s = float(np.clip(0.6 * (region / n) ** (1 / 3), 0.5, 20.0))
    q = np.tile([0.0, 0.0, 0.0, 1.0], (n, 1))
    g = RadiativeGaussians(cand[pick] + rng.normal(0, 0.5 * s, (n, 3)), np.full((n, 3), s), q, np.full(n, 0.01))
    with torch.no_grad():
        pred = rasterize(g.density, g.position, g.covariance(), g.whitening(), views)
        ratio = float(images.mean() / max(float(pred.mean()), 1e-12))
        g._density.copy_(torch.log(torch.expm1(torch.clamp(g.density * ratio, min=1e-8))))
    return g


def _optimizer(g: RadiativeGaussians, cfg: FitConfig, factor: float):
    return torch.optim.Adam([
        {"params": [g._position], "lr": cfg.lr_position * factor},
        {"params": [g._scale], "lr": cfg.lr_scale * factor},
        {"params": [g._rotation], "lr": cfg.lr_rotation * factor},
        {"params": [g._density], "lr": cfg.lr_density * factor},
    ])


def _densify(g: RadiativeGaussians, grad_acc: torch.Tensor, cfg: FitConfig, split_scale: float,
             gen: torch.Generator) -> RadiativeGaussians:
    """Clone/split the Gaussians with the largest position gradients; prune the emptiest."""
    n = len(g)
    with torch.no_grad():
        rho = g.density
        keep = rho > cfg.prune_fraction * float(rho.max())
        room = max(0, cfg.max_gaussians - int(keep.sum()))
        k = min(int(cfg.densify_fraction * n), room)
        grown = []
        if k > 0:
            order = torch.argsort(grad_acc * keep, descending=True)[:k]
            big = g.scale[order].max(dim=1).values > split_scale
            pos, sc, rot, den = g.position[order], g.scale[order], g.rotation[order], g.density[order]
            R = g.rotmat()[order]
            # split: two children sampled inside the parent, 1.6x smaller, together holding the
            # parent's mass (density x 1.6^3 / 2); clone: two copies at half the density
            off = (R @ (torch.randn(k, 3, 1, generator=gen) * sc[:, :, None]))[..., 0]
            child_pos = torch.where(big[:, None], pos + off, pos)
            child_sc = torch.where(big[:, None], sc / 1.6, sc)
            child_den = torch.where(big, den * (1.6 ** 3 / 2), den * 0.5)
            grown.append(RadiativeGaussians(child_pos, child_sc, rot, child_den, scale_range=g.scale_range))
            # the parent: moved to the other side (split) or halved (clone)
            g._position[order] = torch.where(big[:, None], pos - off, pos)
            lo, hi = g.scale_range
            new_sc = torch.clamp(torch.where(big[:, None], sc / 1.6, sc), lo * 1.001, hi * 0.999)
            frac = (new_sc - lo) / (hi - lo)
            g._scale[order] = torch.log(frac / (1 - frac))
            new_den = child_den
            g._density[order] = torch.log(torch.expm1(torch.clamp(new_den, min=1e-8)))
        out = g.select(keep)
        for extra in grown:
            out = out.cat(extra)
    return out


def fit_gaussians(images: torch.Tensor, views: Sequence[View], shape, affine, config: FitConfig | None = None, *,
                  init: RadiativeGaussians | None = None,
                  progress: Callable[[int, dict], None] | None = None) -> FitResult:
    """Fit Gaussians (C-arm frame) to line-integral projections.

    Args:
        images: (V, rows, cols) measured line integrals, one per view.
        views: the V views (C-arm frame, sized like the images).
        shape, affine: the output grid (K, J, I) and its voxel -> C-arm mm map; the
            Gaussians are initialised inside it and the TV term samples blocks of it.
        config: :class:`FitConfig`. init: a starting set (else :func:`backprojection_init`).
        progress: called as ``progress(step, {"loss": ..., "n": ...})``.
    """
    cfg = config or FitConfig()
    views = list(views)
    if images.shape[0] != len(views):
        raise ValueError(f"{images.shape[0]} images for {len(views)} views")
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    images = images.float()
    g = init if init is not None else backprojection_init(images, views, shape, affine, cfg.n_gaussians, rng)
    spacing = float(np.linalg.norm(np.asarray(affine)[:3, :3], axis=0).mean())
    K, J, I = shape
    # typical density: image scale over half the grid's mean side (what the TV term is relative to)
    scale = float(images.abs().max())
    vol_scale = scale / (0.5 * spacing * (K + J + I) / 3.0)
    t0 = time.perf_counter()
    opt = _optimizer(g, cfg, 1.0)
    grad_acc = torch.zeros(len(g))
    history = []
    for step in range(cfg.iterations):
        factor = cfg.lr_final_factor ** (step / max(cfg.iterations - 1, 1))
        for group, base in zip(opt.param_groups, (cfg.lr_position, cfg.lr_scale, cfg.lr_rotation, cfg.lr_density)):
            group["lr"] = base * factor
        sel = rng.choice(len(views), size=min(cfg.views_per_step, len(views)), replace=False)
        pred = rasterize(g.density, g.position, g.covariance(), g.whitening(), [views[i] for i in sel])
        loss = projection_loss(pred, images[sel], lambda_ssim=cfg.lambda_ssim, scale=scale)
        if cfg.lambda_tv > 0:
            b = min(cfg.tv_block, K, J, I)
            o = [int(rng.integers(0, n - b + 1)) for n in (I, J, K)]
            A = np.asarray(affine, dtype=np.float64).copy()
            A[:3, 3] = A[:3, 3] + A[:3, :3] @ np.array(o, dtype=np.float64)
            block = voxelize(g.density, g.position, g.covariance(), g.precision(), (b, b, b), A)
            loss = loss + cfg.lambda_tv * tv_3d(block / vol_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_acc += g._position.grad.norm(dim=1).detach()
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "n": len(g)}
        if progress is not None:
            progress(step, rec)
        if step % 10 == 0 or step == cfg.iterations - 1:
            history.append(rec)
        if (step + 1) % cfg.densify_every == 0 and step < cfg.densify_until * cfg.iterations:
            g = _densify(g, grad_acc, cfg, split_scale=2.0 * spacing, gen=gen)
            opt = _optimizer(g, cfg, factor)
            grad_acc = torch.zeros(len(g))
    return FitResult(g, history, time.perf_counter() - t0)


def recon_grid(grid_mm: float = 96.0, voxel_mm: float = 1.5, centre=(0.0, 0.0, 0.0)):
    """((n, n, n), affine): the fit's reconstruction cube, :func:`RadGSRegLib.region.cube_affine`
    of side ``grid_mm`` at ``voxel_mm`` centred on ``centre`` (C-arm mm; default the isocentre)."""
    from ..region import cube_affine

    return cube_affine(centre, grid_mm, voxel_mm)


def fit_case_xrays(case, config: FitConfig | None = None, *, pixels: int = 128, grid_mm: float = 96.0,
                   voxel_mm: float = 1.5, centre=(0.0, 0.0, 0.0), progress=None):
    """Fit Gaussians to a case's two X-rays (as line integrals, resized to ``pixels``) on
    :func:`recon_grid` around ``centre``; returns (FitResult, recon Volume in the C-arm frame)."""
    from ..xray import as_line_integral, resize_view_image
    from . import to_volume, voxelize_model

    shape, affine = recon_grid(grid_mm, voxel_mm, centre)
    imgs, views = [], []
    for name in ("ap", "lat"):
        img, v = resize_view_image(as_line_integral(case.xrays[name], case.image_kind), case.views[name], pixels)
        imgs.append(img)
        views.append(v)
    res = fit_gaussians(torch.from_numpy(np.stack(imgs)), views, shape, affine, config, progress=progress)
    with torch.no_grad():
        return res, to_volume(voxelize_model(res.gaussians, shape, affine), affine)


@dataclass
class CaseFit:
    """What :func:`fit_case` returns: the fit, its voxelized reconstruction (C-arm frame, on
    :func:`recon_grid`) and the report ``radgsreg fit-gaussians`` writes as fit.json."""

    result: FitResult
    recon: Volume
    #: {"source": what was fitted, "config": FitConfig.to_dict(), "seconds", "n_gaussians",
    #: "history", and with a ground truth "metrics_vs_ground_truth": PSNR/SSIM (metrics.md)}
    report: dict


def fit_case(case, config: FitConfig | None = None, *, simulated: bool = False, views: int = 2,
             pixels: int = 128, grid_mm: float = 96.0, voxel_mm: float = 1.5,
             log: Callable[[str], None] | None = None,
             progress: Callable[[int, dict], None] | None = None) -> CaseFit:
    """Fit Gaussians to one case (``radgsreg fit-gaussians``) on a cube of side ``grid_mm``
    at ``voxel_mm`` around the isocentre, and score the reconstruction against the truth
    when the case has one (a case read with ``ground_truth=True`` or ``"if-present"``, with
    vertebra labels): :func:`RadGSRegLib.region.ground_truth_volume` on the same cube,
    :func:`RadGSRegLib.metrics.recon_metrics`.

    Args:
        case: a :class:`~RadGSRegLib.io.Case`.
        config: the fit (default :class:`FitConfig`); ``torch.manual_seed(config.seed)`` first.
        simulated: fit DRRs of the case's vertebra alone at its true pose instead of its X-rays
            (a validation of the fitting; needs the truth and labels): ``views`` of them, 2 the
            case's AP + lateral geometry resized to ``pixels``, more a full orbit of the same
            C-arm (source and detector distances, field of view) at ``pixels``.
        pixels: the detector size worked at (the X-rays are resized to it).
        log: gets one line saying what is fitted, before the fit.
        progress: called as ``progress(step, {"loss", "n"})`` each step.
    """
    from ..drr import DRR
    from ..geometry import c_arm_view
    from ..metrics import recon_metrics
    from ..region import ground_truth_volume
    from . import to_volume, voxelize_model

    cfg = config or FitConfig()
    if views < 2 or (views > 2 and not simulated):
        raise ValueError(f"views={views}: a case has two X-rays; more views are simulated (simulated=True)")
    shape, affine = recon_grid(grid_mm, voxel_mm)
    gt = None
    if case.ground_truth is not None and case.seg is not None:
        gt = ground_truth_volume(case.ct, case.seg, case.vertebra_label, case.ground_truth, shape, affine)
    if simulated:
        if gt is None:
            raise ValueError("simulated views render the case's vertebra at its true pose: the case needs its "
                             "ground truth and vertebra labels")
        ref = case.views["ap"]
        if views == 2:
            fit_views = [case.views[k].resized(pixels) for k in ("ap", "lat")]
        else:
            fit_views = [c_arm_view(a, sdd=abs(ref.source_to_detector), sid=float(np.linalg.norm(ref.source)),
                                    pixels=pixels, pixel_spacing=ref.pixel_spacing[0] * ref.size[0] / pixels)
                         for a in np.linspace(0.0, 360.0, views, endpoint=False)]
        if not np.any(gt.array > 0):
            from ..errors import InputError

            raise InputError(f"the vertebra at its true pose lies outside the fitting cube ({grid_mm:g} mm around the "
                             "isocentre): nothing to fit; enlarge grid_mm (--grid-mm) to hold it")
        images = DRR(gt.array, gt.affine).render(fit_views)
        source = f"{views} DRRs of the vertebra alone at its true pose (validation of the fitting)"
    else:
        source = "the case's AP + lateral X-rays"
    torch.manual_seed(cfg.seed)
    if log is not None:
        log(f"fitting {cfg.n_gaussians} Gaussians to {source}, {pixels}x{pixels} pixels, "
            f"{cfg.iterations} iterations, grid {shape[0]}^3 at {voxel_mm} mm")
    if simulated:
        res = fit_gaussians(images, fit_views, shape, affine, cfg, progress=progress)
        with torch.no_grad():
            recon = to_volume(voxelize_model(res.gaussians, shape, affine), affine)
    else:
        res, recon = fit_case_xrays(case, cfg, pixels=pixels, grid_mm=grid_mm, voxel_mm=voxel_mm, progress=progress)
    report = {"source": source, "config": cfg.to_dict(), "seconds": res.seconds, "n_gaussians": len(res.gaussians),
              "history": res.history}
    if gt is not None:
        report["metrics_vs_ground_truth"] = recon_metrics(recon.array, gt.array)
    return CaseFit(res, recon, report)
