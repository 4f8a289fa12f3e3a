import numpy as np
import pytest

from RadGSRegLib.levels import TOTALSEG_IDS, level_id, level_name, parse_levels
from RadGSRegLib.phantom import PhantomConfig, make_phantom
from scipy import ndimage


def test_labels_are_totalsegmentator_ids(small_phantom):
    ct, seg = small_phantom
    labels = set(np.unique(seg.array)) - {0}
    assert {31, 30, 29, 28, 27} <= labels          # L1..L5
    assert labels <= {32, 31, 30, 29, 28, 27, 26}  # + T12 / S1 context
    assert ct.same_grid(seg)


def test_anatomy_is_in_order(small_phantom):
    ct, seg = small_phantom
    z = [seg.label_centroid(level_id(f"L{i}"))[2] for i in range(1, 6)]
    assert all(a > b for a, b in zip(z, z[1:]))                    # L1 on top (+z superior)
    gaps = -np.diff(z)
    assert np.all((gaps > 25) & (gaps < 50))                       # ~ body height + disc
    for lab in (31, 29, 27):
        m = seg.array == lab
        n_comp = ndimage.label(m)[1]
        assert n_comp == 1                                          # one connected bone
        hu = ct.array[m]
        assert np.median(hu) > 150                                   # bone
        vol_cm3 = m.sum() * np.prod(seg.spacing) / 1000
        assert 15 < vol_cm3 < 90                                     # a lumbar vertebra is ~40-60 cm^3


def test_posterior_elements_are_behind_the_body():
    ct, seg = make_phantom(PhantomConfig(spacing=(2.0, 2.0, 2.0), seed=4, n_vertebrae=1, top_level="L3", context=0))
    pts = seg.label_points(29)
    y = pts[:, 1]
    # the body (anterior) and the spinous process (posterior): extent along y > 70 mm
    assert y.max() - y.min() > 70
    # the spinal canal: soft tissue enclosed between body and arch in the mid-sagittal plane
    c = seg.label_centroid(29)
    i = int(round(seg.world_to_index(c)[0]))
    k = int(round(seg.world_to_index(c)[2]))
    line = seg.array[k, :, i] == 29
    runs = np.flatnonzero(np.diff(line.astype(int)) != 0)
    assert len(runs) >= 4   # bone, canal, bone


def test_seeded_and_varied():
    cfg = PhantomConfig(spacing=(4.0, 4.0, 4.0), seed=7)
    a, sa = make_phantom(cfg)
    b, sb = make_phantom(cfg)
    assert np.array_equal(a.array, b.array) and np.array_equal(sa.array, sb.array)
    c, _ = make_phantom(PhantomConfig(spacing=(4.0, 4.0, 4.0), seed=8))
    assert a.array.shape != c.array.shape or not np.array_equal(a.array, c.array)


def test_anisotropic_spacing_and_air():
    ct, seg = make_phantom(PhantomConfig(spacing=(2.0, 3.0, 5.0), seed=2, n_vertebrae=2))
    assert np.allclose(ct.spacing, [2.0, 3.0, 5.0])
    assert ct.array.min() < -900 and ct.array.max() > 900          # air outside, cortical bone
    assert set(np.unique(seg.array)) - {0} >= {31, 30}


def test_config_validation():
    with pytest.raises(ValueError):
        PhantomConfig(top_level="L9")
    with pytest.raises(ValueError, match="cannot take"):
        PhantomConfig(top_level="L4", n_vertebrae=5)


def test_level_names():
    assert level_id("L3") == 29 and level_id("vertebrae_T12") == 32 and level_id("c1") == 50
    assert level_name(27) == "L5" and TOTALSEG_IDS["S1"] == 26
    assert parse_levels("l1, L2") == ["L1", "L2"]
    with pytest.raises(ValueError, match="unknown vertebra level"):
        level_id("L7")


def test_label_points_are_every_voxel_of_the_label_in_index_order(small_phantom):
    """``Volume.label_points`` looks inside the label's bounding box only (issue #21: a
    1 mm CT's whole label map was scanned): the same points, in the same order, as every
    voxel of the whole array; none for an absent label; a seeded subset when capped."""
    _, seg = small_phantom
    for lab in (29, 26, 99):
        kji = np.argwhere(seg.array == lab)
        assert np.array_equal(seg.label_points(lab), seg.index_to_world(kji[:, ::-1].astype(np.float64)))
    assert seg.label_points(99).shape == (0, 3)
    sub = seg.label_points(29, max_points=50)
    assert sub.shape == (50, 3) and np.array_equal(sub, seg.label_points(29, max_points=50))


def test_rib_ids_are_totalsegmentators():
    from RadGSRegLib.phantom import rib_id

    assert (rib_id(1, "left"), rib_id(12, "left"), rib_id(1, "right"), rib_id(12, "right")) == (92, 103, 104, 115)
    for bad in ((0, "left"), (13, "right"), (5, "middle")):
        with pytest.raises(ValueError):
            rib_id(*bad)


def test_ribs_on_every_thoracic_vertebra_and_nothing_else_changed():
    """``ribs``: a pair per thoracic vertebra built (context ones too), own labels, bone, left
    ribs at +x (LPS), right at -x, leaving the spine at its level and reaching forward and
    down; every voxel that is not a rib (nor at its partial-volume edge) is what the phantom
    without ribs has (3 voxels away from a rib voxel)."""
    from RadGSRegLib.phantom import rib_id

    cfg = PhantomConfig(top_level="T9", n_vertebrae=4, spacing=(3.0, 3.0, 3.0), seed=5, ribs=True)
    ct, seg = make_phantom(cfg)
    ct0, seg0 = make_phantom(PhantomConfig(**{**cfg.to_dict(), "ribs": False}))
    levels = cfg.all_levels                                           # T8 ... L1
    thoracic = [int(n[1:]) for n in levels if n.startswith("T")]
    want = {rib_id(k, s) for k in thoracic for s in ("left", "right")}
    assert set(np.unique(seg.array)) - {0} == {level_id(n) for n in levels} | want
    rib = seg.array >= 92
    edge = ndimage.binary_dilation(rib, iterations=3)              # thin ribs: partial volume beyond the label
    assert np.array_equal(seg.array[~rib], seg0.array[~rib]) and np.array_equal(ct.array[~edge], ct0.array[~edge])
    assert not np.array_equal(ct.array, ct0.array)
    assert np.median(ct.array[rib]) > 300                             # bone
    for k in thoracic:
        vert = seg.label_centroid(level_id(f"T{k}"))
        for side, sign in (("left", 1), ("right", -1)):
            pts = seg.label_points(rib_id(k, side))
            assert len(pts) > 20
            assert np.all(sign * (pts[:, 0] - vert[0]) > 0)           # on its own side of the column
            assert np.ptp(pts[:, 0]) > 60                              # round the side of the trunk
            back = pts[pts[:, 1] > np.percentile(pts[:, 1], 90)]        # posterior end, at its vertebra's level
            front = pts[pts[:, 1] < np.percentile(pts[:, 1], 10)]
            assert abs(back[:, 2].mean() - vert[2]) < 20
            assert front[:, 2].mean() < back[:, 2].mean() - 5          # sloping down forwards
    # a lumbar phantom has no rib to give, ribs or not
    _, sl = make_phantom(PhantomConfig(top_level="L2", n_vertebrae=2, spacing=(4.0, 4.0, 4.0), context=0, ribs=True))
    assert sl.array.max() < 92


def test_phantom_command_writes_ribs(tmp_path, capsys):
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_label_map

    main(["phantom", "--out", str(tmp_path / "th"), "--top-level", "T11", "--n-vertebrae", "2", "--spacing", "4", "4",
          "4", "--ribs"])
    assert "6 ribs" in capsys.readouterr().out                        # T10, T11, T12 (with context)
    seg = read_label_map(tmp_path / "th" / "seg.nrrd")
    assert {102, 103, 113, 114, 115, 101} <= set(np.unique(seg.array).tolist())


def test_sacrum_and_hip_bones_in_place_of_s1():
    """``sacrum``: where the column reaches S1 it is a sacrum: the S1 segment (S1's label)
    wider than L5 with its alae, the rest of the sacrum (25) below it and curving back, the
    hip bones (77 left at +x, 78 right at -x, LPS) beside it from below the sacrum's top up
    to about L5, bone; the grid reaches down past the sacrum's tip by whole voxels and the
    vertebrae above have exactly the labels they have without it."""
    from RadGSRegLib.phantom import HIP_IDS, SACRUM_ID

    cfg = PhantomConfig(top_level="L4", n_vertebrae=2, spacing=(3.0, 3.0, 3.0), seed=5, sacrum=True)
    ct, seg = make_phantom(cfg)
    ct0, seg0 = make_phantom(PhantomConfig(**{**cfg.to_dict(), "sacrum": False}))
    above = [level_id(n) for n in ("L3", "L4", "L5")]
    assert set(np.unique(seg.array)) - {0} == set(above) | {26, SACRUM_ID, *HIP_IDS.values()}
    s1, sac, l5 = seg.label_points(26), seg.label_points(SACRUM_ID), seg.label_points(27)
    assert np.ptp(s1[:, 0]) > np.ptp(l5[:, 0]) + 20                   # the alae
    assert sac[:, 2].mean() < s1[:, 2].mean() - 20                      # below S1
    tip = sac[sac[:, 2] < np.percentile(sac[:, 2], 20)]
    assert tip[:, 1].mean() > s1[:, 1].mean() + 5                       # the sacrum goes down and back
    for name, sign in (("left", 1), ("right", -1)):
        hip = seg.label_points(HIP_IDS[name])
        assert np.all(sign * hip[:, 0] > 0.8 * s1[:, 0].max())          # beside the sacrum, its own side
        assert hip[:, 2].max() > seg.label_centroid(27)[2] - 15         # the iliac crest reaches about L5
        assert hip[:, 2].min() < sac[:, 2].mean()
        assert np.median(ct.array[seg.array == HIP_IDS[name]]) > 300    # bone
    assert np.median(ct.array[seg.array == SACRUM_ID]) > 300
    assert sac[:, 2].min() > seg.affine[2, 3] + 6                      # whole: the grid reaches past its tip
    # the grid: whole extra slices below; the vertebrae above unchanged
    extra = seg.array.shape[0] - seg0.array.shape[0]
    assert extra > 0 and seg.array.shape[1:] == seg0.array.shape[1:]
    np.testing.assert_allclose(seg.affine[:3, 3], seg0.affine[:3, 3] - [0, 0, extra * 3.0])
    kept = np.isin(seg0.array, above)
    assert np.array_equal(np.isin(seg.array[extra:], above), kept)
    assert np.array_equal(seg.array[extra:][kept], seg0.array[kept])
    # a column that does not reach S1 has no sacrum to give: the same phantom as without
    cfg = PhantomConfig(top_level="L1", n_vertebrae=2, spacing=(4.0, 4.0, 4.0), seed=2, sacrum=True)
    (a, b), (c, d) = make_phantom(cfg), make_phantom(PhantomConfig(**{**cfg.to_dict(), "sacrum": False}))
    assert np.array_equal(a.array, c.array) and np.array_equal(b.array, d.array)


def test_phantom_command_writes_a_sacrum(tmp_path, capsys):
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_label_map

    main(["phantom", "--out", str(tmp_path / "s"), "--top-level", "L4", "--n-vertebrae", "2", "--spacing", "4", "4",
          "4", "--sacrum"])
    assert "sacrum and hip bones" in capsys.readouterr().out
    assert {25, 26, 77, 78} <= set(np.unique(read_label_map(tmp_path / "s" / "seg.nrrd").array).tolist())
    main(["phantom", "--out", str(tmp_path / "t"), "--top-level", "L1", "--n-vertebrae", "2", "--spacing", "4", "4",
          "4", "--sacrum"])
    assert "no sacrum (the column does not reach S1)" in capsys.readouterr().out


def test_size_and_bone_density_scale_the_bones_only():
    """``size`` scales the vertebrae and discs (so the column), ``bone_density`` every bone's
    HU and nothing else; 1 is the default phantom; a factor that is not a number in (0, 3]
    is refused, naming the field."""
    kw = dict(spacing=(3.0, 3.0, 3.0), seed=5, top_level="T12", n_vertebrae=3, ribs=True, sacrum=False)
    base, sb = make_phantom(PhantomConfig(**kw))
    same, ss = make_phantom(PhantomConfig(**kw, size=1.0, bone_density=1.0))
    assert np.array_equal(base.array, same.array) and np.array_equal(sb.array, ss.array)
    # density: same labels; bone voxels' HU scaled (their soft-tissue share aside), the rest as it was
    soft, s_soft = make_phantom(PhantomConfig(**kw, bone_density=0.5))
    assert np.array_equal(sb.array, s_soft.array)
    far = ndimage.binary_dilation(sb.array > 0, iterations=2)       # away from every bone's partial voxels
    assert np.array_equal(base.array[~far], soft.array[~far])
    core = ndimage.binary_erosion(sb.array == level_id("L1"), iterations=1)
    ratio = soft.array[core] / base.array[core]
    assert core.sum() > 20 and np.allclose(ratio, 0.5, atol=0.01) and np.median(ratio) == pytest.approx(0.5, abs=1e-4)
    ribs = sb.array >= 92                                            # rib labels (TotalSegmentator 92-115)
    assert np.median(soft.array[ribs]) < 0.75 * np.median(base.array[ribs])
    # size: every vertebra's volume grows about with its cube, the column with it
    big, s_big = make_phantom(PhantomConfig(**kw, size=1.2))
    for lv in ("T12", "L1", "L2"):
        v0, v1 = (sb.array == level_id(lv)).sum(), (s_big.array == level_id(lv)).sum()
        assert 1.25 < v1 / v0 < 1.2 ** 3 * 1.1, (lv, v1 / v0)
    gap = lambda s: s.label_centroid(level_id("T12"))[2] - s.label_centroid(level_id("L2"))[2]
    assert gap(s_big) / gap(sb) == pytest.approx(1.2, abs=0.06)
    for bad in (0, -1.0, float("nan"), 3.5, True, "1.2", None):
        for name in ("size", "bone_density"):
            with pytest.raises(ValueError, match=name):
                PhantomConfig(**{name: bad})


def test_phantom_command_takes_size_and_bone_density(tmp_path, capsys):
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_label_map, read_volume

    args = ["phantom", "--top-level", "L2", "--n-vertebrae", "1", "--spacing", "4", "4", "4"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b"), "--size", "1.25", "--bone-density", "0.5"])
    (ca, sa), (cb, sb) = [(read_volume(tmp_path / d / "ct.nrrd"), read_label_map(tmp_path / d / "seg.nrrd"))
                          for d in ("a", "b")]
    va, vb = [(s.array == level_id("L2")).sum() for s in (sa, sb)]
    assert vb > 1.4 * va                                            # 1.25^3 = 1.95, thick details kept
    assert np.percentile(cb.array[sb.array == level_id("L2")], 90) < 0.6 * np.percentile(
        ca.array[sa.array == level_id("L2")], 90)
    for bad in (["--size", "0"], ["--bone-density", "-1"], ["--size", "nan"]):
        assert main(args + ["--out", str(tmp_path / "c")] + bad) == 2
        assert f"argument {bad[0]}: must be a number > 0" in capsys.readouterr().err
    for bad in (["--size", "5"], ["--bone-density", "3.5"]):
        assert main(args + ["--out", str(tmp_path / "c")] + bad) == 2
        assert f"{bad[0]}: " in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
