"""A bending spine (articulation.py) and the operating-room effects of the X-ray simulation."""
import numpy as np
import pytest

from RadGSRegLib.articulation import ArticulationConfig, articulate, vertebra_labels
from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.drr import DRR, hu_to_mu
from RadGSRegLib.geometry import apply, biplanar_views, compose, matrix_to_pose, translation
from RadGSRegLib.simulate import XraySimConfig, field_mask, simulate_xrays
from RadGSRegLib.volume import Volume

TARGET = 29                                           # L3


@pytest.fixture(scope="module")
def spine(small_phantom):
    ct, seg = small_phantom
    G = translation(-seg.label_centroid(TARGET))
    return ct, seg, G, biplanar_views(pixels=64)


def test_moving_parts_partition_the_bone_and_hold_their_vertebra(spine):
    ct, seg, _, _ = spine
    art = articulate(ct, seg, TARGET, ArticulationConfig(3.0, 2.0), np.random.default_rng(0))
    assert art.labels == sorted(vertebra_labels(seg))                    # along LPS z (up): S1 = 26 ... T12 = 32
    bone = np.clip(ct.array - 100.0, 0, None).astype(np.float32)
    parts = list(art.parts(bone, ct.affine))
    assert [p[0] for p in parts] == art.labels + [None]
    total = np.zeros_like(bone)
    for label, sub, A, M in parts:
        if label is None:
            total += sub
            continue
        box, mask = art.regions[label]
        assert np.allclose(A[:3, 3], ct.index_to_world([box[2].start, box[1].start, box[0].start]))
        assert np.all(mask[seg.array[box] == label])                     # its whole label moves with it
        assert not np.any(mask & np.isin(seg.array[box], [v for v in art.labels if v != label]))
        total[box] += sub
    assert np.array_equal(total, bone)                                   # a partition: nothing lost, nothing twice


def test_motions_accumulate_away_from_the_target_within_their_ranges(spine):
    ct, seg, _, _ = spine
    cfg = ArticulationConfig(4.0, 1.5)
    art = articulate(ct, seg, TARGET, cfg, np.random.default_rng(3))
    assert np.array_equal(art.motions[TARGET], np.eye(4))
    t = art.labels.index(TARGET)
    own = {(a, b): (c, J) for a, b, c, J in art.joints}
    for i, (a, b) in enumerate(zip(art.labels[:-1], art.labels[1:])):
        c, J = own[(a, b)]
        p = matrix_to_pose(J, center=c)                          # Euler per axis about the joint centre
        assert np.all(np.abs(p[:3]) <= cfg.rot_deg + 1e-9) and np.all(np.abs(p[3:]) <= cfg.trans_mm + 1e-9)
        # the vertebra beyond a joint moves as its inner neighbour, then by the joint
        if i >= t:
            assert np.allclose(art.motions[b], compose(art.motions[a], J))
        else:
            assert np.allclose(art.motions[a], compose(art.motions[b], J))
    far = art.labels[-1]
    assert not np.allclose(art.motions[far], np.eye(4))
    record = art.to_dict()
    assert record["target"] == TARGET and len(record["vertebrae"]) == len(art.labels)
    assert len(record["joints"]) == len(art.labels) - 1


def test_no_motion_is_the_rigid_drr(spine):
    ct, seg, G, views = spine
    art = articulate(ct, seg, TARGET, ArticulationConfig(0.0, 0.0), np.random.default_rng(0))
    ideal = XraySimConfig.ideal()
    a = simulate_xrays(ct, list(views.values()), G, ideal, articulation=art)
    b = simulate_xrays(ct, list(views.values()), G, ideal)
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-4 * np.abs(b[k]).max())


def test_the_target_projects_exactly_as_without_articulation(spine):
    """Only the target holds bone: whatever the neighbours do, the X-rays are the rigid ones
    at the true pose; with the neighbours' bone present they are not."""
    ct, seg, G, views = spine
    art = articulate(ct, seg, TARGET, ArticulationConfig(6.0, 3.0), np.random.default_rng(1))
    box, mask = art.regions[TARGET]
    only = np.minimum(ct.array, 100.0)                                  # soft tissue everywhere ...
    target_bone = np.zeros(ct.array.shape, bool)
    target_bone[box] = mask
    only[target_bone] = ct.array[target_bone]                           # ... bone of the target only
    target_only = Volume(only.astype(np.float32), ct.affine)
    ideal = XraySimConfig.ideal()
    a = simulate_xrays(target_only, list(views.values()), G, ideal, articulation=art)
    b = simulate_xrays(target_only, list(views.values()), G, ideal)
    for k in a:
        assert np.allclose(a[k], b[k], atol=1e-5)
    whole = simulate_xrays(ct, list(views.values()), G, ideal, articulation=art)
    rigid = simulate_xrays(ct, list(views.values()), G, ideal)
    assert max(np.abs(whole[k] - rigid[k]).max() for k in whole) > 0.05


def test_cases_record_the_articulation_and_stay_the_same_without_it(small_phantom):
    ct, seg = small_phantom
    base = CaseGenConfig(rot_deg=5.0, trans_mm=5.0, pixels=48, sim=XraySimConfig.ideal(), seed=4)
    plain = make_case(ct, seg, "L3", base, np.random.default_rng(4))
    assert "articulation" not in plain.extra["generator"]
    bent = make_case(ct, seg, "L3", CaseGenConfig(**{**base.__dict__, "articulation": ArticulationConfig(5.0, 2.0)}),
                     np.random.default_rng(4))
    assert np.allclose(bent.ground_truth, plain.ground_truth)          # the target's pose is drawn first, unchanged
    rec = bent.extra["generator"]["articulation"]
    motions = {v["label"]: np.array(v["motion"]) for v in rec["vertebrae"]}
    assert np.allclose(motions[TARGET], np.eye(4)) and len(motions) == len(vertebra_labels(seg))
    assert bent.extra["generator"]["config"]["articulation"] == {"rot_deg": 5.0, "trans_mm": 2.0}
    assert not np.allclose(bent.xrays["lat"], plain.xrays["lat"])
    with pytest.raises(ValueError, match=">= 0"):
        ArticulationConfig(-1.0, 0.0)


def test_a_circular_field_blacks_out_the_corners(spine):
    ct, _, G, views = spine
    v = views["ap"]
    d = 0.8 * v.size[0] * v.pixel_spacing[0]
    m = field_mask(v, d)
    assert np.isclose(m.mean(), np.pi * 0.4 ** 2, atol=0.02)
    li = simulate_xrays(ct, [v], G, XraySimConfig(field_diameter_mm=d, photons_per_mm2=None))["ap"]
    free = simulate_xrays(ct, [v], G, XraySimConfig(photons_per_mm2=None))["ap"]
    assert np.allclose(li[m], free[m]) and np.all(li[~m] > free.max())     # no counts: the largest value
    inten = simulate_xrays(ct, [v], G, XraySimConfig(field_diameter_mm=d, photons_per_mm2=None, output="intensity"))
    assert np.all(inten["ap"][~m] == 0)
    with pytest.raises(ValueError, match="field_diameter_mm"):
        XraySimConfig(field_diameter_mm=0.0)
