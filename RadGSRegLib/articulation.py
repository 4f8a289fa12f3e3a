"""A spine that bends between the preoperative CT and the X-rays (simulation).

The CT is taken supine, the X-rays prone on the operating table: each intervertebral joint
moves a little, so the vertebrae around the target no longer sit where the CT has them.
Simulated piecewise-rigidly, bone only:

- every **joint** between neighbouring labelled vertebrae (in order along the spine) gets a
  random rigid motion about its centre (the midpoint of the two centroids, CT frame): Euler
  angles uniform in ±``rot_deg`` and a translation uniform in ±``trans_mm`` per axis, as the
  case generator's offsets;
- a vertebra moves with every joint between it and the target, the motions accumulating away
  from the target (:attr:`Articulation.motions`, CT frame); the **target does not move**;
- what moves is each vertebra's *bone*: the attenuation above the soft-tissue cap
  (:func:`RadGSRegLib.simulate.split_soft_bone`) inside its label grown by ``margin_mm``
  (each grown voxel to its nearest vertebra). Soft tissue and unlabelled bone stay rigid with
  the target: they deform smoothly in a real patient, and cutting them into rigid blocks
  would draw seams across the whole image.

The X-rays are then the rigid line integrals plus each vertebra's bone at
``T_ct_to_carm @ motion`` (:func:`RadGSRegLib.simulate.simulate_xrays`, ``articulation=``):
line integrals add over a partition, so with no motion the result is the rigid DRR, and the
target projects exactly as without articulation (tests). The registration still gets the
unarticulated CT: that is the point.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .geometry import compose, sample_offsets
from .levels import TOTALSEG_IDS
from .volume import Volume

__all__ = ["ArticulationConfig", "Articulation", "articulate", "vertebra_labels", "spine_order"]


@dataclass
class ArticulationConfig:
    """Motion of each intervertebral joint (± per axis, uniform): ``rot_deg`` degrees
    (Euler, about the joint's centre), ``trans_mm`` mm. Both 0: no articulation."""

    rot_deg: float = 0.0
    trans_mm: float = 0.0

    def __post_init__(self):
        for name in ("rot_deg", "trans_mm"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"articulation {name} must be a number >= 0, got {v}")

    @property
    def enabled(self) -> bool:
        return self.rot_deg > 0 or self.trans_mm > 0


@dataclass
class Articulation:
    """One articulated spine: which bone moves and how.

    Attributes:
        labels: the vertebrae's label values, in order along the spine.
        motions: {label: (4, 4) rigid motion in the CT frame}; the target's is the identity.
        target: the target's label.
        regions: {label: (bounding box as three index slices of the ``[k, j, i]`` array, bool
            mask on that box)}: the voxels whose bone moves with that vertebra.
        joints: per joint between ``labels[i]`` and ``labels[i + 1]``: (label, label, its
            centre (3,) CT mm, its own motion (4, 4)).
    """

    labels: list
    motions: dict
    target: int
    regions: dict
    joints: list = field(default_factory=list)

    def parts(self, bone: np.ndarray, affine: np.ndarray):
        """Split a CT-grid bone array ([k, j, i], attenuation) into what moves with each
        vertebra and the rest. Yields ``(label or None, sub_array, sub_affine, motion)``: one
        cropped part per vertebra, then the rest (label None, the identity) on the full grid."""
        rest = np.array(bone, dtype=np.float32, copy=True)
        for label in self.labels:
            box, mask = self.regions[label]
            part = np.where(mask, rest[box], 0.0).astype(np.float32)
            rest[box][mask] = 0.0
            A = np.array(affine, dtype=np.float64)
            start = np.array([box[2].start, box[1].start, box[0].start], dtype=np.float64)   # (i, j, k)
            A[:3, 3] = A[:3, :3] @ start + A[:3, 3]
            yield label, np.ascontiguousarray(part), A, self.motions[label]
        yield None, rest, np.asarray(affine, dtype=np.float64), np.eye(4)

    def to_dict(self) -> dict:
        """The ground-truth record (case.json): per vertebra its motion (CT frame; its true
        pose is ``ground_truth @ motion``), per joint its centre and own motion."""
        return {"target": int(self.target),
                "vertebrae": [{"label": int(lb), "motion": self.motions[lb].tolist()} for lb in self.labels],
                "joints": [{"between": [int(a), int(b)], "centre_mm": c.tolist(), "motion": J.tolist()}
                           for (a, b, c, J) in self.joints]}


def vertebra_labels(seg: Volume) -> list:
    """The label values of ``seg`` that are vertebrae: the TotalSegmentator vertebra ids
    present (25..50), or, in a label map without any of them, every non-zero label."""
    present = [int(v) for v in np.unique(seg.array) if v != 0]
    ts = set(TOTALSEG_IDS.values())
    verts = [v for v in present if v in ts]
    return verts or present


def spine_order(seg: Volume) -> list:
    """:func:`vertebra_labels` in order along the spine, from the lowest (LPS z: up)."""
    return sorted(vertebra_labels(seg), key=lambda lb: float(seg.label_centroid(lb)[2]))


def _regions(seg: Volume, labels: list, margin_mm: float) -> dict:
    """Each label grown by ``margin_mm`` (every grown voxel to its nearest label), as
    (bounding box, mask) on the label map's grid."""
    from scipy import ndimage

    inside = np.isin(seg.array, labels)
    pad = np.ceil(margin_mm / seg.spacing[::-1]).astype(int) + 1                 # (k, j, i) voxels
    nz = np.argwhere(inside)
    lo, hi = np.maximum(nz.min(axis=0) - pad, 0), np.minimum(nz.max(axis=0) + pad + 1, seg.array.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))         # the labels and their margin only
    lab = np.where(inside[crop], seg.array[crop], 0).astype(np.int32)
    dist, idx = ndimage.distance_transform_edt(lab == 0, sampling=seg.spacing[::-1], return_indices=True)
    grown = np.where(dist <= margin_mm, lab[tuple(idx)], 0)
    out = {}
    for lb, box in enumerate(ndimage.find_objects(grown), start=1):
        if box is not None and lb in labels:
            full = tuple(slice(b.start + c.start, b.stop + c.start) for b, c in zip(box, crop))
            out[lb] = (full, grown[box] == lb)
    return out


def articulate(ct: Volume, seg: Volume, target: int, config: ArticulationConfig,
               rng: np.random.Generator, *, margin_mm: float = 3.0) -> Articulation:
    """Draw the motions of one articulated spine around the vertebra ``target``.

    Args:
        ct: the CT. seg: its vertebra labels (same grid).
        target: the label value that stays put. config: the per-joint ranges.
        rng: draws each joint's motion (joints nearest the target first).
        margin_mm: how far around each label its bone moves with it.
    Raises:
        ValueError: ``target`` is not in ``seg``, or the label map is not on the CT's grid.
    """
    if not seg.same_grid(ct):
        raise ValueError("articulation needs the label map on the CT's grid")
    labels = spine_order(seg)
    if int(target) not in labels:
        raise ValueError(f"the target label {target} is not in the label map")
    centroid = {lb: seg.label_centroid(lb) for lb in labels}
    t = labels.index(int(target))
    # each joint's own motion, drawn from the target outward (nearest joints first)
    order = sorted(range(len(labels) - 1), key=lambda i: min(abs(i - t), abs(i + 1 - t)))
    own, joints = {}, []
    for i in order:
        a, b = labels[i], labels[i + 1]
        centre = (centroid[a] + centroid[b]) / 2
        J = (sample_offsets(1, rng, rot_deg=config.rot_deg, trans_mm=config.trans_mm, center=centre)[0]
             if config.enabled else np.eye(4))
        own[i] = J
        joints.append((a, b, centre, J))
    joints.sort(key=lambda j: labels.index(j[0]))
    motions = {}
    for k, lb in enumerate(labels):
        # the joints between the target and vertebra k, the one nearest the target outermost
        chain = range(t, k) if k > t else range(t - 1, k - 1, -1)
        motions[lb] = compose(*[own[i] for i in chain]) if k != t else np.eye(4)
    return Articulation(labels, motions, int(target), _regions(seg, labels, margin_mm), joints)
