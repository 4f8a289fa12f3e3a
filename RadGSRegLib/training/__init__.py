"""Training of the RadGS-Reg networks (:mod:`RadGSRegLib.learned`): the run's settings
(:mod:`.config`, :class:`~.config.TrainConfig`), samples made with the project's own
simulator (:mod:`.data`) and the module-aware, three-stage loop with checkpoints
(:mod:`.train`). Nothing in registration imports this package.
"""
__all__ = ["config", "data", "train"]
