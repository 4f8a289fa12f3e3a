"""Registration: case -> ``T_ct_to_carm`` (pipeline of stages; never reads ground truth).

Modules: :mod:`.config` (settings), :mod:`.target` (the case prepared: CT slab, DRR
projectors, X-rays), :mod:`.search` (pose search), :mod:`.refine2d` (Levenberg-Marquardt on
DRRs), :mod:`.refine3d` (CT vertebra onto a reconstruction), :mod:`.pipeline` (the stages
in order, :func:`run`).

:mod:`.config` (the settings, torch-free) is imported eagerly; :func:`run` and the stages
(which need torch) load on first use, so that ``from RadGSRegLib.register import
RegisterConfig`` works before torch is installed (the Slicer module loads it at start-up).
"""
from .config import INITS, REFINES, ConfigError, RegisterConfig, read_config

__all__ = ["RegisterConfig", "ConfigError", "read_config", "run", "slab_around", "INITS", "REFINES"]


def __getattr__(name):
    if name == "run":
        from .pipeline import run

        return run
    if name == "slab_around":
        from .target import slab_around

        return slab_around
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
