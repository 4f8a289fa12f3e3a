"""The RadGS-Reg network (RecM + RegM), its losses (Eq. 2-4) and its weight files.

A weight file (``.pt``) is a plain dictionary readable with ``torch.load(weights_only=True)``:
``format``, ``model_config`` (:class:`ModelConfig` as a dict), ``state_dict`` and ``card``
(what it was trained on, how, and its validation metrics). Every ``.pt`` file of the
learned method is read that way (:func:`load_plain`): a file holding anything but tensors
and plain values is refused before any of it runs.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from ..gaussians.rasterizer import rasterize_many
from ..gaussians.voxelizer import voxelize_many
from ..losses import projection_loss, ssim_loss, tv_3d
from ..geometry import apply_delta_torch
from ..region import cube_affine_batch, resample_region
from ..similarity import ncc_torch
from .config import ModelConfig
from .recm import GaussianSet, RecM
from .regm import VOLUME_SCALE, FlowRegM, grid_offsets, make_regm, pose_loss, support, true_flow

__all__ = ["RadGSRegNet", "FORMAT", "render_windows", "render_windows_many", "voxelize_set", "voxelize_sets",
           "centroid_distance", "true_offset", "locate_errors", "trained_levels", "level_names", "load_plain", "UnsafeFileError", "WeightFileError", "plain", "read_weight_file", "write_weight_file"]

FORMAT = "radgsreg-model/1"


class UnsafeFileError(Exception):
    """A ``.pt`` file :func:`load_plain` refused; ``reason`` says why in a few words."""

    def __init__(self, path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


class WeightFileError(InputError):
    """A weight file that is missing, unsafe or not RadGS-Reg's (names the file)."""


class _WeightFileMissing(WeightFileError, FileNotFoundError):
    pass


def trained_levels(card: dict) -> list[str] | None:
    """The vertebra levels ("T6", ..., "S1") a weight file's ``card`` says its network was trained
    on, every stage of its ``--init`` chain included: the card's ``levels_seen`` (written by
    ``radgsreg train``; null where the run could not tell), or, for stage-1 cards written
    before that key, their config's ``levels`` read as level names (their whole data; a label
    value only where it is a TotalSegmentator vertebra id); None where the card cannot tell."""
    if not isinstance(card, dict):
        return None
    if "levels_seen" in card:
        seen = card["levels_seen"]
        return list(seen) if isinstance(seen, list) and all(isinstance(x, str) for x in seen) else None
    tc = card.get("train_config")
    if card.get("stage") == 1 and isinstance(tc, dict) and isinstance(tc.get("levels"), list):
        return level_names(tc["levels"]) or None
    return None


def level_names(levels) -> list[str]:
    """Config ``levels`` ("L3", "vertebrae_L3", "l3", "29") as level names in spinal order, each
    once; a label value only where it is a TotalSegmentator vertebra id (another numbering
    cannot be read), anything else left out."""
    from ..levels import LEVELS, TOTALSEG_IDS, level_name, level_of_segment_name

    out = set()
    for lv in levels:
        text = str(lv).strip()
        if text.isdigit():
            name = level_name(int(text)) if int(text) in TOTALSEG_IDS.values() else None
        else:
            name = level_of_segment_name(text)
        if name:
            out.add(name)
    return sorted(out, key=lambda n: (LEVELS.index(n) if n in LEVELS else len(LEVELS), n))


def load_plain(path, *, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors, dicts, lists, tuples, strings and
    numbers only; nothing in the file runs. Raises :class:`UnsafeFileError` (with a short
    reason) for a file that holds anything else or is not a torch file."""
    import warnings

    try:
        with warnings.catch_warnings():           # torch's note on a foreign pickle protocol: we refuse or read anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:                                                     # noqa: BLE001
        text = str(e)
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
        if m or "Weights only load failed" in text:
            detail = re.split(r"\s*Please use", m.group(1))[0].strip() if m else ""
            reason = ("it holds something other than tensors and plain values; refused without running it"
                      + (f": {detail}" if detail else ""))
        else:
            first = text.strip().splitlines()[0] if text.strip() else ""
            reason = f"not a readable torch file ({type(e).__name__}{': ' + first[:200] if first else ''})"
        raise UnsafeFileError(path, reason) from None


def plain(obj):
    """``obj`` with NumPy arrays and scalars turned into lists and Python numbers (tensors
    kept): what :func:`load_plain` can read back."""
    import numpy as np

    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [plain(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_weight_file(path, fmt: str, *, what: str, hint: str) -> dict:
    """The dictionary of a weight file of format ``fmt`` (:func:`load_plain`: nothing in it
    runs). Raises :class:`WeightFileError` naming ``path`` and saying it is not a ``what``
    (missing: also a ``FileNotFoundError``; unsafe or unreadable; another format), ending
    with ``hint`` (what to use instead)."""
    path = Path(path)
    if not path.is_file():
        raise _WeightFileMissing(f"{path}: model weights not found (a {what} was expected); {hint}")
    try:
        blob = load_plain(path, map_location="cpu")
    except UnsafeFileError as e:
        raise WeightFileError(f"{path}: not a {what} ({e.reason}); {hint}") from None
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise WeightFileError(f"{path}: not a {what} (format "
                              f"{blob.get('format') if isinstance(blob, dict) else '?'}, expected {fmt}); {hint}")
    return blob


def write_weight_file(path, fmt: str, config: dict, state_dict: dict, card: dict, *, overwrite: bool = False) -> Path:
    """Write a weight file that :func:`read_weight_file` reads: ``{"format": fmt, **config,
    "state_dict", "card"}`` (``config``: the network's settings under their key, made
    :func:`plain`), atomically; an existing file only with ``overwrite``."""
    from ..io.atomic import atomic_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": fmt, **plain(config), "state_dict": state_dict, "card": plain(card)}
    with atomic_file(path, overwrite=overwrite) as tmp:
        torch.save(blob, tmp)
    return path


def render_windows(g: GaussianSet, views: dict, win, size: int) -> torch.Tensor:
    """(2, size, size) line integrals of ``g`` in the AP and lateral windows whose
    (column, row) origins are ``win`` (2, 2) on the working ``views``."""
    return render_windows_many([g], [views], [win], size)[0]


def render_windows_many(sets: list, views: list, wins: list, size: int) -> list:
    """:func:`render_windows` of several Gaussian sets (each with its own working ``views``
    and windows ``wins``), rasterized in one pass (:func:`~..gaussians.rasterizer.rasterize_many`).
    Returns one (2, size, size) tensor per set."""
    items = []
    for g, vs, win in zip(sets, views, wins):
        d, p, cov, _, W = g.tensors()
        items.append((d, p, cov, W, [vs[n].cropped(int(win[i][0]), int(win[i][1]), size, size)
                                     for i, n in enumerate(("ap", "lat"))]))
    return rasterize_many(items)


def voxelize_set(g: GaussianSet, affine: torch.Tensor, voxels: int) -> torch.Tensor:
    """(V, V, V) density of ``g`` on the reconstruction grid ``affine`` (4, 4)."""
    return voxelize_sets([g], affine[None], voxels)[0]


def voxelize_sets(sets: list, affines: torch.Tensor, voxels: int) -> torch.Tensor:
    """(S, V, V, V) densities of the Gaussian sets, set i on its grid ``affines[i]`` (S, 4, 4),
    voxelized in one pass (:func:`~..gaussians.voxelizer.voxelize_many`)."""
    A = affines.detach().cpu().double().numpy()
    items = []
    for g, a in zip(sets, A):
        d, p, cov, prec, _ = g.tensors()
        items.append((d, p, cov, prec, a))
    return voxelize_many(items, (voxels,) * 3)


def centroid_distance(volume: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance (voxels, differentiable) between the mass centroids of two (V, V, V)
    non-negative volumes on the same grid (their values as weights; a volume without mass
    counts as at the grid's centre). The loss's centroid weighs every voxel, so that all of
    them get a gradient; the metric's (:func:`~RadGSRegLib.metrics.mass_offset`) keeps those
    above 0.3 of the maximum, so that a faint haze does not move it."""
    V = volume.shape[-1]
    idx = torch.arange(V, dtype=volume.dtype, device=volume.device)

    def centroid(v):                         # (k, j, i) voxels; eps x the centre keeps an empty volume there
        w, eps, mid = v.clamp(min=0), 1e-8, (V - 1) / 2
        num = torch.stack([(w.sum((1, 2)) * idx).sum(), (w.sum((0, 2)) * idx).sum(), (w.sum((0, 1)) * idx).sum()])
        return (num + eps * mid) / (w.sum() + eps)

    d = centroid(volume) - centroid(target.to(volume.dtype))
    return (d.pow(2).sum() + 1e-6).sqrt()


def true_offset(batch: dict) -> torch.Tensor:
    """(B, 3) C-arm mm: where the true pose ``G`` (B, 4, 4) puts the vertebra's ``centroid``
    (B, 3; CT mm) relative to the cube's ``centre`` (B, 3; where ``T_in`` puts it): what
    RecM's locator should find."""
    G = batch["G"]
    return torch.einsum("bij,bj->bi", G[:, :3, :3], batch["centroid"]) + G[:, :3, 3] - batch["centre"]


def locate_errors(sets: list, batch: dict) -> torch.Tensor | None:
    """(B,) mm: how far each Gaussian set's locator ``shift`` is from the vertebra's true
    offset (:func:`true_offset`); None for sets without a locator."""
    if sets[0].shift is None:
        return None
    return (torch.stack([g.shift for g in sets]) - true_offset(batch)).norm(dim=-1)


class RadGSRegNet(nn.Module):
    """RecM (X-rays -> Gaussians -> volume) and RegM (volume + CT -> pose)."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.recm = RecM(self.cfg)
        self.regm = make_regm(self.cfg)
        self.card: dict = {}

    def reconstruct(self, images: torch.Tensor, proj: torch.Tensor, centre: torch.Tensor):
        """RecM's factual Gaussians and their voxelization.

        Args:
            images (B, 2, P, P), proj (B, 2, 3, 4): :func:`~.inputs.network_images`' output, batched.
            centre (B, 3): the reconstruction cubes' centres (C-arm mm).
        Returns:
            (list of B :class:`GaussianSet`, (B, 1, V, V, V) volumes in 1/mm on the grids
            ``region.cube_affine_batch(centre)``).
        """
        fact, _ = self.recm(images, proj, centre)
        A = cube_affine_batch(centre.cpu(), self.cfg.roi_mm, self.cfg.voxels)
        rec = voxelize_sets(list(fact), A, self.cfg.voxels)[:, None]
        return fact, rec.to(centre.device)

    # ------------------------------------------------------------------ losses
    def reconstruction_loss(self, batch: dict, *, lambda_ssim=0.2, lambda_tv=0.05, lambda_volume=10.0,
                            lambda_centroid=0.0, lambda_locate=1.0, counterfactual: bool = True):
        """Eq. 2 for a batch: L1 + λ1 SSIM on the rendered windows and λ2 TV on the volume,
        for the effect branch (with CAL) plus the same for the factual branch, plus
        ``lambda_volume`` x the mean squared error against the ground-truth volume
        (factual branch, in units of bone-like attenuation 0.04/mm; squared, not L1: the
        vertebra fills a tenth of the cube and an L1 term's optimum there collapsed every
        density to zero within 25 steps in our first run), plus ``lambda_centroid`` x the
        distance between the factual volume's and the ground truth's mass centroids
        (:func:`centroid_distance`, in 10 mm; ours, off at 0), plus, with a locator
        (``ModelConfig.locate``), ``lambda_locate`` x the distance between its shift and the
        vertebra's true offset from the cube centre (:func:`true_offset`; in 10 mm; ours).

        Returns:
            (loss, recon (B, 1, V, V, V) factual volumes, parts dict).
        """
        cfg = self.cfg
        fact, eff = self.recm(batch["images"], batch["proj"], batch["centre"],
                              counterfactual=counterfactual and self.recm.cal is not None)
        A = cube_affine_batch(batch["centre"], cfg.roi_mm, cfg.voxels)
        total, vols, parts = 0.0, [], {"proj": 0.0, "tv": 0.0, "volume": 0.0, "effect": 0.0}
        if lambda_centroid:
            parts["centroid"] = 0.0
        B = len(fact)
        errs = locate_errors(fact, batch)
        if errs is not None:
            err = errs.mean() / 10.0
            total = total + lambda_locate * err
            parts["locate"] = float(err.detach())
        sets = list(fact) + (list(eff) if eff is not None else [])
        reps = len(sets) // B
        # one rasterizer and one voxelizer pass for the whole batch (factual sets, then effect sets)
        renders = render_windows_many(sets, list(batch["views"]) * reps, list(batch["win"]) * reps,
                                      cfg.render_pixels)
        vols_all = voxelize_sets(sets, A.repeat(reps, 1, 1), cfg.voxels)
        for b in range(B):
            tgt = batch["target"][b]
            V = vols_all[b]
            lp = projection_loss(renders[b], tgt, lambda_ssim=lambda_ssim)
            ltv = tv_3d(V / VOLUME_SCALE)
            lvol = ((V - batch["gt_volume"][b]) / VOLUME_SCALE).pow(2).mean()
            # keeps densities alive: softplus has no gradient far below zero, and an untrained
            # RecM otherwise drives every density there (the trivial all-empty optimum)
            lalive = fact[b].raw_density.clamp(max=-2.0).add(2.0).pow(2).mean()
            loss = lp + lambda_tv * ltv + lambda_volume * lvol + 0.01 * lalive
            if lambda_centroid:
                lcen = centroid_distance(V, batch["gt_volume"][b]) * (cfg.voxel_mm / 10.0)
                loss = loss + lambda_centroid * lcen
                parts["centroid"] += float(lcen.detach()) / B
            if eff is not None:
                Ve = vols_all[B + b]
                le = projection_loss(renders[B + b], tgt, lambda_ssim=lambda_ssim)
                le = le + lambda_tv * tv_3d(Ve / VOLUME_SCALE)
                loss = loss + le
                parts["effect"] += float(le.detach()) / B
            total = total + loss / B
            vols.append(V)
            parts["proj"] += float(lp.detach()) / B
            parts["tv"] += float(ltv.detach()) / B
            parts["volume"] += float(lvol.detach()) / B
        return total, torch.stack(vols)[:, None], parts

    def registration_loss(self, batch: dict, recon: torch.Tensor, *, lambda_geo=0.02, lambda_flow=1.0):
        """Eq. 3: NCC + SSIM (3-D) between the CT moved by the estimate and ``recon``, plus
        ``lambda_geo`` x the pose error; with the "flow" RegM also ``lambda_flow`` x the mean
        error of its displacements against the true ones (over the voxels where the CT at
        ``T_in`` shows tissue, :func:`~.regm.support`; in units of 10 mm: the correspondences
        are supervised directly, the rigid fit end to end through the pose terms).
        Returns (loss, T (B, 4, 4), parts)."""
        T, field = self._estimate(batch, recon)
        cfg = self.cfg
        A = cube_affine_batch(batch["centre"], cfg.roi_mm, cfg.voxels)
        moved = resample_region(batch["ct"][:, None], batch["ct_affine"], T, A, cfg.voxels)
        lncc = (1 - ncc_torch(moved, recon)).mean()
        lssim = ssim_loss(moved / VOLUME_SCALE, recon / VOLUME_SCALE, spatial_dims=3, data_range=1.5)
        lgeo = pose_loss(T, batch["G"], batch["centroid"]).mean()
        loss = lncc + lssim + lambda_geo * lgeo
        parts = {"ncc": float(lncc.detach()), "ssim": float(lssim.detach()), "geo": float(lgeo.detach())}
        if field is not None:
            offsets = grid_offsets(cfg.voxels, cfg.voxel_mm, device=recon.device, dtype=recon.dtype)
            err = (field[0] - true_flow(batch["T_in"], batch["G"], batch["centre"], offsets)).norm(dim=-1)
            seen = support(field[2]).flatten(1)
            lflow = ((err * seen).sum(1) / seen.sum(1).clamp(min=1.0)).mean() / 10.0
            loss = loss + lambda_flow * lflow
            parts["flow"] = float(lflow.detach())
        return loss, T, parts

    def estimate(self, batch: dict, recon: torch.Tensor) -> torch.Tensor:
        """(B, 4, 4) ``T_ct_to_carm`` from RegM, starting at ``batch["T_in"]``.

        Args:
            batch: ``ct`` (B, S, S, S) and ``ct_affine`` (B, 4, 4): the CT vertebra region
                (CT frame); ``T_in`` (B, 4, 4); ``centre`` (B, 3) the grid's centre (C-arm mm).
            recon: (B, 1, V, V, V) the reconstruction on that grid (1/mm).
        """
        return self._estimate(batch, recon)[0]

    def _estimate(self, batch: dict, recon: torch.Tensor):
        """:meth:`estimate` and, for the "flow" RegM, its (displacement, weight, CT at T_in) (else None)."""
        cfg = self.cfg
        A = cube_affine_batch(batch["centre"], cfg.roi_mm, cfg.voxels)
        ct_in = resample_region(batch["ct"][:, None], batch["ct_affine"], batch["T_in"], A, cfg.voxels)
        field = None
        if isinstance(self.regm, FlowRegM):
            flow, weight = self.regm.field(recon, ct_in)
            field = (flow, weight, ct_in)
            delta = self.regm.fit(flow, weight)
        else:
            delta = self.regm(recon, ct_in)
        return apply_delta_torch(delta, batch["T_in"], batch["centre"]), field

    # ------------------------------------------------------------------ files
    @property
    def trained_levels(self) -> list[str] | None:
        """The vertebra levels these weights were trained on (:func:`trained_levels` of their card)."""
        return trained_levels(self.card)

    def save(self, path, *, card: dict | None = None, overwrite: bool = False) -> Path:
        """Write the weight file (atomically; an existing file only with ``overwrite``)."""
        return write_weight_file(path, FORMAT, {"model_config": self.cfg.to_dict()}, self.state_dict(),
                                 card if card is not None else self.card, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, device="cpu") -> "RadGSRegNet":
        """A network from a weight file (read with ``weights_only=True``: nothing in it runs).

        Raises:
            WeightFileError: (an InputError naming the file) missing, unsafe or not a
                RadGSReg weight file, or weights that do not fit their own model config.
        """
        from .config import ConfigError

        blob = read_weight_file(path, FORMAT, what="RadGSReg weight file", hint="use a weight file written by radgsreg train")
        try:
            net = cls(ModelConfig.from_dict(blob.get("model_config"), source=f"{path}, model_config"))
        except ConfigError as e:
            raise WeightFileError(f"not a usable RadGSReg weight file: {e}") from None
        try:
            net.load_state_dict(blob.get("state_dict"))
        except (RuntimeError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightFileError(f"{path}: the weights do not fit the file's model_config ({first[:300]})") from None
        card = blob.get("card", {})
        net.card = card if isinstance(card, dict) else {}
        return net.to(device)
