"""Training samples for RadGS-Reg, made with the project's own simulator.

A sample is one vertebra seen by a biplanar C-arm at a known pose ``G`` (``T_ct_to_carm``):

- ``images`` (2, P, P): the AP and lateral X-rays, as line integrals, resampled to the
  working size P (``ModelConfig.input_pixels``) and normalised (:func:`prepare_images`);
  ``proj`` (2, 3, 4) their exact projection matrices at that size.
- ``T_in`` (4, 4): the truth perturbed about the vertebra (what localisation leaves, the
  input RegM corrects); ``centre`` (3,): where ``T_in`` puts the vertebra (C-arm mm), the
  centre of the reconstruction cube.
- ``target`` (2, W, W): the *vertebra's own* projection (DRR of the CT's vertebra region,
  its label dilated by 3 mm, at ``G``) in a W x W window around ``centre``'s projection,
  ``win`` (2, 2) the windows' (column, row) origins. This is ``I_m`` of Eq. 2: the
  Gaussians model one vertebra, so they are compared with what that vertebra alone
  contributes, which simulation (or a CT with a known pose) provides.
- ``gt_volume`` (V, V, V): the same region's attenuation at ``G`` on the reconstruction
  grid (metrics.md's reconstruction target).
- ``ct`` (S, S, S) + ``ct_affine`` (4, 4): the vertebra region in the CT frame (a cube of
  1.25 x ``roi_mm`` around its centroid), which RegM's loss moves by the estimated pose;
  ``centroid`` (3,) CT mm.

Sources: stage 1 phantoms (seeded) and any CT + labels; stage 2 real case folders with
ground truth (their own X-rays); stage 3 the target patient's CT. In stages 1 and 3 the
X-rays are simulated at a random pose (``pose_rot_deg`` / ``pose_trans_mm`` about the
nominal one) either with the whole CT only (``realism`` "none") or as a realistic case with
every effect drawn (``realism`` "drawn": :func:`~RadGSRegLib.cases.make_case` with
:func:`~RadGSRegLib.cases.random_case_config`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..geometry import View, apply, biplanar_views, compose, sample_offsets
from ..learned.config import ModelConfig
from ..learned.inputs import prepare_images
from ..region import VertebraRegion, cube_affine_batch
from ..simulate import XraySimConfig, simulate_xrays
from ..volume import resample_to_grid
from .config import TrainConfig

__all__ = ["perturb_pose", "make_sample", "collate", "sample_sources", "phantom_tops",
           "build_samples", "shard_plan", "usable_levels", "CTSpecError", "SAMPLE_KEYS", "ct_spec_paths"]


#: the entries of a sample (:func:`make_sample`)
SAMPLE_KEYS = ("images", "proj", "views", "win", "target", "gt_volume", "ct", "ct_affine", "centroid", "G", "T_in",
               "centre")


def perturb_pose(G: np.ndarray, centroid: np.ndarray, rng: np.random.Generator, *, rot_deg: float,
                 trans_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """RegM's input pose: the truth ``G`` (4, 4) perturbed by a random rigid offset about the
    vertebra (rotation uniform in ±``rot_deg`` per axis about where ``G`` puts ``centroid``
    (3,) CT mm, translation uniform in ±``trans_mm`` per axis, C-arm frame).

    Returns:
        ``T_in`` (4, 4) and ``centre`` (3,): where ``T_in`` puts the centroid (C-arm mm).
    """
    D = sample_offsets(1, rng, rot_deg=rot_deg, trans_mm=trans_mm, center=apply(G, centroid))[0]
    T_in = compose(D, G)
    return T_in, apply(T_in, centroid)


def make_sample(vr: VertebraRegion, G: np.ndarray, xrays: dict, views: dict, image_kind: str, cfg: ModelConfig,
                rng: np.random.Generator, *, input_rot_deg: float, input_trans_mm: float) -> dict:
    """One training sample (see the module docstring) from X-rays taken at pose ``G``."""
    images, wviews, proj = prepare_images(xrays, views, image_kind, cfg.input_pixels)
    T_in, centre = perturb_pose(G, vr.centroid, rng, rot_deg=input_rot_deg, trans_mm=input_trans_mm)
    W = cfg.render_pixels
    targets, wins = [], []
    for name in ("ap", "lat"):
        v = wviews[name]
        u, r = v.project(centre)
        c0, r0 = int(round(u - W / 2)), int(round(r - W / 2))
        wins.append((c0, r0))
        targets.append(vr.drr.render([v.cropped(c0, r0, W, W)], G)[0].numpy())
    A = cube_affine_batch(centre[None], cfg.roi_mm, cfg.voxels)[0].numpy().astype(np.float64)
    V = cfg.voxels
    gt = resample_to_grid(vr.region, (V, V, V), A, G)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    return {"images": images, "proj": proj, "views": {k: v.to_dict() for k, v in wviews.items()},
            "win": torch.tensor(wins), "target": f32(np.stack(targets)), "gt_volume": f32(gt.array),
            "ct": f32(vr.crop.array), "ct_affine": f32(vr.crop.affine), "centroid": f32(vr.centroid),
            "G": f32(G), "T_in": f32(T_in), "centre": f32(centre)}


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch (views stay a list)."""
    out = {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "views"}
    out["views"] = [{n: View.from_dict(d, n) for n, d in s["views"].items()} for s in samples]
    return out


class CTSpecError(InputError, FileNotFoundError):
    """A ``ct_dirs`` entry (``--ct``) that names no CT and label map."""


def ct_spec_paths(spec: str):
    """``CT:LABELS`` paths, a folder with a CT and its labels under the case format's
    names (``ct.nrrd`` + ``seg.nrrd``), the phantom command's or the sample data's, or
    "sample": the bundled lumbar CT (:func:`RadGSRegLib.sample_data.lumbar_ct`)."""
    if spec == "sample" and not Path(spec).exists():
        from ..sample_data import lumbar_ct

        sd = lumbar_ct()
        return sd.ct, sd.seg
    if ":" in spec and not Path(spec).exists():
        ct, seg = spec.split(":", 1)
        return Path(ct), Path(seg)
    d = Path(spec)
    for ct, seg in (("ct.nrrd", "seg.nrrd"), ("ct.nii.gz", "seg.nii.gz"), ("example_ct.nii.gz", "totalseg.nii.gz")):
        if (d / ct).is_file() and (d / seg).is_file():
            return d / ct, d / seg
    raise CTSpecError(f"ct_dirs (--ct) {spec!r}: expected 'CT:LABELS' paths or a folder with ct.nrrd + seg.nrrd")


def usable_levels(seg, levels, source: str) -> dict:
    """{level: label value} of the ``levels`` present and whole in the label map ``seg``.

    Raises:
        InputError: none is (names ``source`` and the levels).
    """
    from ..levels import LevelError, resolve_level

    ok = {}
    for lv in levels:
        try:
            ok[lv] = resolve_level(lv, seg, source=source)
        except LevelError:
            pass
    if not ok:
        raise InputError(f"{source}: none of the levels {', '.join(levels)} is present and whole "
                         "(set levels to ones the label map holds)")
    return ok


def phantom_tops(levels) -> list[str]:
    """The top levels a stage-1 phantom (5 vertebrae) is drawn with for training ``levels``:
    T11, T12, L1 when every level lies within T11-L5 (the earlier shipped weights' data); otherwise
    every top whose 5 vertebrae include at least one of ``levels`` (label values and levels
    the phantom cannot have, such as the sacrum, are left out of that reckoning)."""
    from ..levels import LEVELS

    idx = [LEVELS.index(lv) for lv in levels if lv in LEVELS]
    legacy = LEVELS.index("T11")
    if not idx or all(legacy <= i <= legacy + 6 for i in idx):
        return ["T11", "T12", "L1"]
    return [LEVELS[t] for t in range(len(LEVELS) - 4) if any(t <= i < t + 5 for i in idx)]


def _anatomy_draws(cfg: TrainConfig, seed: int) -> dict:
    """A stage-1 phantom's ``size`` and ``bone_density`` (PhantomConfig keywords), drawn
    uniformly from the config's ranges on a stream of the phantom's seed of their own (so
    the phantom's other draws stay those of a run without them); {} for ranges that are
    None."""
    rng = np.random.default_rng([seed, 77])
    out = {}
    for key, name in (("size", "phantom_size"), ("bone_density", "phantom_bone_density")):
        r = getattr(cfg, name)
        if r is not None:
            out[key] = float(rng.uniform(r[0], r[1]))
    return out


def sample_sources(cfg: TrainConfig, *, validation: bool) -> Iterator[tuple[str, Callable]]:
    """(name, loader) pairs; each loader returns (ct, seg, levels) or, for stage 2, a case."""
    from ..levels import level_id

    if cfg.stage == 1:
        from ..phantom import PhantomConfig, make_phantom

        tops = phantom_tops(cfg.levels)
        n = max(1, -(-cfg.val_samples // max(cfg.samples_per_ct, 1))) if validation else cfg.phantoms
        base = 100_000 if validation else 0
        for i in range(n):
            seed = base + cfg.seed * 1000 + i
            rng = np.random.default_rng(seed)

            def load(seed=seed, rng=rng):
                pc = PhantomConfig(top_level=str(rng.choice(tops)), n_vertebrae=5,
                                   spacing=(cfg.phantom_spacing_mm,) * 3, lordosis_deg=float(rng.uniform(10, 45)),
                                   scoliosis_deg=float(rng.uniform(-10, 10)), table=bool(rng.random() < 0.3),
                                   ribs=cfg.phantom_ribs, sacrum=cfg.phantom_sacrum, seed=seed,
                                   **_anatomy_draws(cfg, seed))
                ct, seg = make_phantom(pc)
                return ct, seg, {lv: level_id(lv) for lv in cfg.levels if lv in pc.levels}
            yield f"phantom seed {seed}", load
    if cfg.stage in (1, 3):
        from ..io import read_label_map, read_volume

        for spec in cfg.ct_dirs:
            def load(spec=spec):
                ct_p, seg_p = ct_spec_paths(spec)
                ct, seg = read_volume(ct_p, field=str(ct_p)), read_label_map(seg_p, field=str(seg_p))
                if not seg.same_grid(ct):       # labels off the grid would label other voxels (coarsened or not)
                    raise InputError(f"{seg_p}: not on the grid of {ct_p} (origin, spacing, direction and size must "
                                     "match); resample the label map onto the CT first")
                if cfg.ct_spacing_mm is not None:
                    from ..volume import block_factors, coarsen

                    f = block_factors(ct.spacing, cfg.ct_spacing_mm)
                    ct, seg = coarsen(ct, f), coarsen(seg, f, labels=True)
                return ct, seg, usable_levels(seg, cfg.levels, str(seg_p))
            yield f"CT {spec}", load
    if cfg.stage == 2:
        from ..io import read_case

        for d in cfg.case_dirs:
            yield f"case {d}", (lambda d=d: read_case(d, ground_truth=True))


def _counts(cfg: TrainConfig, sources: list, *, validation: bool) -> list[int]:
    """Samples to draw from each source (stage 1 validation: until ``val_samples``)."""
    per, n_src = cfg.samples_per_ct, max(len(sources), 1)
    if cfg.stage == 2:
        return [per if not validation else max(1, per // 4)] * len(sources)
    n = per if not validation or cfg.stage == 1 else max(1, cfg.val_samples // n_src)
    return [n] * len(sources)


def shard_plan(counts: list[int], shards: int) -> list[list[tuple[int, int]]]:
    """Which samples each of ``shards`` streams draws: a list per shard of (source index,
    sample count). With at least as many sources as shards every source lies whole in one
    shard (round robin: a phantom is made once); otherwise each source's samples are split
    into ``shards`` near-equal parts, one per shard (one CT's samples on every core)."""
    if shards <= 1:
        return [[(j, n) for j, n in enumerate(counts)]]
    plan: list[list[tuple[int, int]]] = [[] for _ in range(shards)]
    if len(counts) >= shards:
        for j, n in enumerate(counts):
            plan[j % shards].append((j, n))
    else:
        for j, n in enumerate(counts):
            for k in range(shards):
                part = n // shards + (1 if k < n % shards else 0)
                if part:
                    plan[k].append((j, part))
    return plan


def _shard_samples(cfg: TrainConfig, work: list[tuple[int, int]], rng: np.random.Generator, *, validation: bool,
                   progress=None) -> list[dict]:
    """The samples of one stream: ``work`` (source index, count) drawn in order with ``rng``."""
    from ..cases import make_case, random_case_config

    mc = cfg.model
    views = biplanar_views(pixels=mc.input_pixels)
    sim = XraySimConfig()
    total = cfg.val_samples if validation else None
    sources = list(sample_sources(cfg, validation=validation))
    out = []
    it = progress(work) if progress else work
    for j, n in it:
        name, load = sources[j]
        obj = load()
        if cfg.stage == 2:
            case = obj
            if case.ground_truth is None:
                raise ValueError(f"{name}: stage 2 needs cases with ground_truth")
            vr = VertebraRegion.of(case.ct, case.seg, case.vertebra_label, side_mm=mc.roi_mm, voxel_mm=mc.voxel_mm)
            for _ in range(n):
                out.append(make_sample(vr, case.ground_truth, case.xrays, case.views, case.image_kind, mc, rng,
                                       input_rot_deg=cfg.input_rot_deg, input_trans_mm=cfg.input_trans_mm))
            continue
        ct, seg, levels = obj
        regions = {}
        for _ in range(n):
            lv = str(rng.choice(sorted(levels)))
            if lv not in regions:
                regions[lv] = VertebraRegion.of(ct, seg, levels[lv], side_mm=mc.roi_mm,
                                                voxel_mm=mc.voxel_mm)
            vr = regions[lv]
            if cfg.realism == "drawn":      # a realistic case, its effects drawn (at the suites' detector)
                case = make_case(ct, seg, lv, random_case_config(
                    rng, pixels=max(2 * mc.image_pixels, mc.input_pixels), metal_share=cfg.metal_share,
                    rot_deg=cfg.pose_rot_deg, trans_mm=cfg.pose_trans_mm), rng, label=levels[lv])
                G, xr, sviews, kind = case.ground_truth, case.xrays, case.views, case.image_kind
            else:
                T0 = np.eye(4)
                T0[:3, 3] = -vr.centroid
                G = compose(sample_offsets(1, rng, rot_deg=cfg.pose_rot_deg, trans_mm=cfg.pose_trans_mm)[0], T0)
                xr = simulate_xrays(ct, list(views.values()), G, sim, rng)
                sviews, kind = views, sim.output
            out.append(make_sample(vr, G, xr, sviews, kind, mc, rng,
                                   input_rot_deg=cfg.input_rot_deg, input_trans_mm=cfg.input_trans_mm))
        if total is not None and len(out) >= total:
            break
    return out[:total] if total is not None else out


def _shard_rng(cfg: TrainConfig, k: int, shards: int, *, validation: bool) -> np.random.Generator:
    """Stream ``k``'s generator; one stream (``shards`` 1) keeps the first runs' sequence.
    (The shard count is in the key: NumPy's seeds ignore trailing zeros, so ``key + [0]``
    would repeat the single stream.)"""
    key = [cfg.seed, 1 if validation else 0, cfg.stage]
    return np.random.default_rng(key if shards <= 1 else key + [shards, k])


def _build_shard(cfg: TrainConfig, k: int, shards: int, validation: bool) -> list[dict]:
    """One stream's samples (NumPy values made plain, as they cross processes)."""
    from ..learned.model import plain

    sources = list(sample_sources(cfg, validation=validation))
    work = shard_plan(_counts(cfg, sources, validation=validation), shards)[k]
    return plain(_shard_samples(cfg, work, _shard_rng(cfg, k, shards, validation=validation), validation=validation))


def _worker_shard(cfg: TrainConfig, k: int, shards: int, validation: bool) -> bytes:
    """:func:`_build_shard` in a worker process, on one torch and one numba thread (the
    workers share the cores), returned as ``torch.save`` bytes: pickled tensors would cross
    as shared-memory handles, two open files each until the parent has read them all (a
    shard of a few hundred samples exceeds the usual limit of 1 024)."""
    import io

    import numba

    torch.set_num_threads(1)
    numba.set_num_threads(1)
    buf = io.BytesIO()
    torch.save(_build_shard(cfg, k, shards, validation), buf)
    return buf.getvalue()


def _shard_from_bytes(data: bytes) -> list[dict]:
    """A worker's shard read back (``weights_only``: tensors and plain values only)."""
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def build_samples(cfg: TrainConfig, *, validation: bool, progress=None) -> list[dict]:
    """All samples of a run's training (or validation) set, seeded.

    The training set is drawn as ``cfg.data_shards`` independent streams (:func:`shard_plan`;
    validation always as one), made by ``cfg.data_workers`` processes: the samples depend on
    the shard count, never on the worker count. ``progress`` wraps an iterable (the sources
    of one process, or the shards of several).
    """
    shards = 1 if validation else cfg.data_shards
    if shards == 1:
        sources = list(sample_sources(cfg, validation=validation))
        work = shard_plan(_counts(cfg, sources, validation=validation), 1)[0]
        return _shard_samples(cfg, work, _shard_rng(cfg, 0, 1, validation=validation), validation=validation,
                              progress=progress)
    workers = min(cfg.data_workers, shards)
    if workers <= 1:
        it = progress(range(shards)) if progress else range(shards)
        return [s for k in it for s in _build_shard(cfg, k, shards, validation)]
    from ..workers import process_pool

    with process_pool(workers) as pool:          # a failed or interrupted shard: the others stop too
        futures = [pool.submit(_worker_shard, cfg, k, shards, validation) for k in range(shards)]
        it = progress(futures) if progress else futures
        return [s for f in it for s in _shard_from_bytes(f.result())]
