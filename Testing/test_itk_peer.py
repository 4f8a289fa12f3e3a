"""The ITK two-projection peer sees the case exactly as we do (geometry checked before any
benchmark number is trusted)."""
import numpy as np
import pytest

from RadGSRegLib.bench import itk_peer
from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.drr import DRR


@pytest.fixture(scope="module")
def case(small_phantom):
    ct, seg = small_phantom
    return make_case(ct, seg, "L3", CaseGenConfig(rot_deg=10.0, trans_mm=20.0, pixels=64, seed=3),
                     np.random.default_rng(3))


def test_itk_projects_the_ct_where_our_drr_does(case):
    images = itk_peer.render_itk(case.ct, case.views, case.ground_truth, 48)
    views = [case.views[n].resized(48) for n in ("ap", "lat")]
    ours = DRR.from_ct(case.ct).render(views, case.ground_truth).numpy()
    for i, name in enumerate(("ap", "lat")):
        assert np.corrcoef(images[name].ravel(), ours[i].ravel())[0, 1] > 0.99, name


def test_pose_round_trip_and_refusals(case):
    geo = itk_peer.ItkGeometry(case.views, case.ct)
    Tr = geo.tr_from_pose(case.ground_truth)
    assert np.allclose(geo.pose_from_tr(geo.tr_from_params(geo.params(Tr))), case.ground_truth, atol=1e-9)
    tilted = dict(case.views)
    tilted["lat"] = case.views["lat"].transformed(np.array([[1, 0, 0, 0], [0, 0.9, -0.43589, 0],
                                                           [0, 0.43589, 0.9, 0], [0, 0, 0, 1.0]]))
    with pytest.raises(ValueError, match="90-degree isocentric pair"):
        itk_peer.ItkGeometry(tilted, case.ct)
