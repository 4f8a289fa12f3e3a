"""The learned RadGS-Reg method: RecM (X-rays -> radiative Gaussians, with CAL), RegM
(reconstruction + CT -> pose), their losses (paper Eq. 1-4), training data made with the
project's simulator, three-stage training and inference.

Heavy imports (MONAI, the networks) happen when these modules are used, not here.
"""
__all__ = ["config", "data", "encoders", "recm", "regm", "model", "train", "infer"]
