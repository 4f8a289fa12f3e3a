"""The learned RadGS-Reg networks and their inference: RecM (X-rays -> radiative Gaussians,
with CAL), RegM (reconstruction + CT -> pose), the combined model with its losses (paper
Eq. 1-4) and weight files, the network's input images, and :func:`.infer.predict`.

Registration imports this package only; training (samples, loop, :class:`TrainConfig`)
lives in :mod:`RadGSRegLib.training`, which imports this one, never the other way.
Heavy imports (MONAI, the networks) happen when these modules are used, not here.
"""
__all__ = ["config", "inputs", "encoders", "recm", "regm", "model", "infer"]
