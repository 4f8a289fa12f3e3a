"""Registration: case -> ``T_ct_to_carm`` (pipeline of stages; never reads ground truth).

:mod:`.config` (the settings, torch-free) is imported eagerly; :func:`run` and the stages
(which need torch) load on first use, so that ``from RadGSRegLib.register import
RegisterConfig`` works before torch is installed (the Slicer module loads it at start-up).
"""
from .config import INITS, REFINES, ConfigError, RegisterConfig, read_config

__all__ = ["RegisterConfig", "ConfigError", "read_config", "run", "slab_around", "INITS", "REFINES"]


def __getattr__(name):
    if name in ("run", "slab_around"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
