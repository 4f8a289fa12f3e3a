"""Registration: case -> ``T_ct_to_carm`` (pipeline of stages; never reads ground truth)."""
from .pipeline import RegisterConfig, run, slab_around

__all__ = ["RegisterConfig", "run", "slab_around"]
