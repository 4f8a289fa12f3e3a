"""Vertebra levels found in segmentations the way users have them: TotalSegmentator label
values, segment names (SlicerTotalSegmentator's ``vertebrae_L3``, terminology names), and
segmentations numbered otherwise."""
import numpy as np
import pytest
import SimpleITK as sitk

from RadGSRegLib.io import read_segmentation
from RadGSRegLib.levels import LevelError, level_of_segment_name, resolve_level
from RadGSRegLib.volume import Volume, affine_from


@pytest.mark.parametrize("name, level", [("vertebrae_L3", "L3"), ("L3 vertebra", "L3"), ("l3", "L3"),
                                         ("lumbar vertebra 3", "L3"), ("Thoracic vertebra 12", "T12"),
                                         ("vertebrae_S1", "S1"), ("sacrum", "sacrum"), ("Segment_29", None),
                                         ("liver", None), ("L6", None)])
def test_level_of_segment_name(name, level):
    assert level_of_segment_name(name) == level


def _labels():
    a = np.zeros((8, 8, 8), np.int32)
    a[2:4, 2:6, 2:6], a[4:6, 2:6, 2:6] = 29, 28          # L3 above L4, both inside the scan
    return Volume(a, affine_from([0, 0, 0], [1, 1, 1]))


def test_names_choose_and_contradicting_names_refuse():
    labels = _labels()
    assert resolve_level("L3", labels, {29: "Segment_29"}) == 29          # generic name: the id decides
    assert resolve_level("L3", labels, {28: "vertebrae_L3"}) == 28        # a named segment wins
    assert resolve_level("L3", labels, {29: "vertebral body, third lumbar"}) == 29
    with pytest.raises(LevelError, match="liver"):
        resolve_level("L3", labels, {29: "liver"})
    with pytest.raises(LevelError, match="vertebrae_L4"):
        resolve_level("L3", labels, {29: "vertebrae_L4"})
    assert resolve_level("liver", labels, {29: "liver"}) == 29            # chosen by its own name
    with pytest.raises(LevelError, match="positions"):
        resolve_level("L2", labels, {29: "a", 28: "b"}, positional=True)


def _seg_nrrd(path, layers, segments):
    """A Slicer .seg.nrrd: ``layers`` (K, J, I, L) and (name, label value, layer) per segment."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(layers.astype(np.uint8)), isVector=True)
    for i, (name, value, layer) in enumerate(segments):
        img.SetMetaData(f"Segment{i}_Name", name)
        img.SetMetaData(f"Segment{i}_LabelValue", str(value))
        img.SetMetaData(f"Segment{i}_Layer", str(layer))
    sitk.WriteImage(img, str(path))


def test_layered_seg_nrrd_keeps_values_unless_they_collide(tmp_path):
    a = _labels().array
    layers = np.stack([np.where(a == 29, 29, 0), np.where(a > 0, 28, 0)], axis=-1)     # overlapping
    _seg_nrrd(tmp_path / "own.seg.nrrd", layers, [("vertebrae_L3", 29, 0), ("L3-L4 block", 28, 1)])
    seg = read_segmentation(tmp_path / "own.seg.nrrd")
    assert not seg.positional and seg.names == {29: "vertebrae_L3", 28: "L3-L4 block"}
    assert np.array_equal(seg.labelmap.array == 29, a == 29)             # the smaller segment stays whole
    assert resolve_level("L3", seg.labelmap, seg.names) == 29 == resolve_level("29", seg.labelmap, seg.names)
    layers = np.stack([np.where(a == 29, 1, 0), np.where(a == 28, 1, 0)], axis=-1)     # both value 1
    _seg_nrrd(tmp_path / "ones.seg.nrrd", layers, [("vertebrae_L3", 1, 0), ("vertebrae_L4", 1, 1)])
    seg = read_segmentation(tmp_path / "ones.seg.nrrd")
    assert seg.positional and seg.names == {1: "vertebrae_L3", 2: "vertebrae_L4"} and list(seg.names) == [1, 2]
    assert resolve_level("L4", seg.labelmap, seg.names, positional=True) == 2
    with pytest.raises(LevelError):
        resolve_level("1", seg.labelmap, seg.names, positional=True)
