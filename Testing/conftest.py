"""Shared fixtures: small phantoms (<= 64^3-ish voxels) so that the suite stays fast on 2 cores."""
import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def small_phantom():
    """(ct, seg) at 4 mm: ~62 x 64 x 86 voxels, L1-L5 (+ T12 and S1 context)."""
    from RadGSRegLib.phantom import PhantomConfig, make_phantom

    return make_phantom(PhantomConfig(spacing=(4.0, 4.0, 4.0), seed=1))


@pytest.fixture()
def rng():
    return np.random.default_rng(1234)
