"""Configuration of the learned method's network (:class:`ModelConfig`): a dataclass saved
inside every weight file and readable from JSON (nested in a training config,
:class:`RadGSRegLib.training.config.TrainConfig`).

Every value is checked when the object is made (from JSON or in Python): a wrong type, an
unknown key, a count below its minimum, an unknown backbone, stage or device raise
:class:`~RadGSRegLib.configio.ConfigError` (an :class:`~RadGSRegLib.errors.InputError`)
naming the file and the field path (``model.backbone``), before any work starts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..configio import ConfigError, at_least, build, check

__all__ = ["ModelConfig", "BACKBONES", "REGM_KINDS", "ConfigError"]

BACKBONES = ("small", "resnet50", "densenet121", "vit")
REGM_KINDS = ("resnet", "flow")


@dataclass
class ModelConfig:
    """The RadGS-Reg network (RecM + RegM).

    Attributes:
        backbone: RecM's 2-D image encoder: "small" (a 4-block MONAI ResNet, the CPU
            default), "resnet50" (the paper's), "densenet121" or "vit" (the ablation's).
        image_pixels: the side, in pixels, of the image RecM's encoder sees: the whole
            working detector (each X-ray resampled to it, area-averaged, geometry kept exact),
            or with ``crop`` a window of it.
        crop: None: RecM sees the whole detector at ``image_pixels``. A fraction in (0, 1]:
            each X-ray is resampled to :attr:`input_pixels` (``image_pixels / crop``) and RecM
            sees a window of ``crop`` of the detector's side around where the cube's centre
            projects, at ``image_pixels`` (finer pixels for the same cost; ours, not in the
            paper: :class:`~RadGSRegLib.learned.recm.RecM` step 1).
        features: channels of the encoder's feature map fed to the fusion.
        hidden: width of the per-anchor features (fusion, CAL, Gaussian head).
        anchors: anchors per axis of the cube the Gaussians live in (anchors^3 of them).
        per_anchor: Gaussians predicted per anchor.
        roi_mm: side of the reconstruction cube (C-arm frame), centred on the vertebra's
            estimated position; it is also the grid RegM works on.
        voxels: voxels per side of the reconstruction grid (RegM's input).
        scale_mm: (min, max) standard deviation of a predicted Gaussian.
        density_scale: 1/mm; a raw head output of 0 gives about this density.
        cal: counterfactual attention (Eq. 1) before the Gaussian head.
        render_pixels: side (pixels of the working detector) of the window around the
            vertebra that the training loss renders.
        regm: RegM's kind (:mod:`~RadGSRegLib.learned.regm`): "resnet" (the paper's pose
            regressor) or "flow" (per-voxel correspondences and a rigid fit).
        regm_channels: widths of RegM's 3-D ResNet stages ("resnet") or U-Net levels ("flow").
        locate: RecM finds the vertebra in the X-rays and draws it there, not at its cube's
            centre (:class:`~RadGSRegLib.learned.recm.RecM`, step 5; ours, off in the paper's
            network and in weight files written before it).
    """

    backbone: str = "small"
    image_pixels: int = 128
    features: int = 32
    hidden: int = 64
    anchors: int = 10
    per_anchor: int = 2
    roi_mm: float = 96.0
    voxels: int = 32
    scale_mm: tuple[float, float] = (1.0, 12.0)
    density_scale: float = 0.01
    cal: bool = True
    render_pixels: int = 64
    regm: str = "resnet"
    regm_channels: tuple[int, int, int, int] = (16, 32, 64, 128)
    locate: bool = False
    crop: float | None = None

    def __post_init__(self):
        check(self)
        if self.backbone not in BACKBONES:
            raise ConfigError(f"must be one of {', '.join(BACKBONES)}, not {self.backbone!r}", field="backbone")
        if self.regm not in REGM_KINDS:
            raise ConfigError(f"must be one of {', '.join(REGM_KINDS)}, not {self.regm!r}", field="regm")
        at_least(self, ("image_pixels", "features", "hidden", "anchors", "per_anchor", "voxels", "render_pixels"),
                  1, "a positive integer")
        for name in ("roi_mm", "density_scale"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, not {getattr(self, name)}", field=name)
        if self.crop is not None and not 0 < self.crop <= 1:
            raise ConfigError(f"must be a fraction of the detector's side in (0, 1] (or null: the whole "
                              f"detector), not {self.crop}", field="crop")
        if not 0 < self.scale_mm[0] < self.scale_mm[1]:
            raise ConfigError(f"must be [min, max] with 0 < min < max, not {list(self.scale_mm)}", field="scale_mm")
        for i, c in enumerate(self.regm_channels):
            if c < 1:
                raise ConfigError(f"must be a positive integer, not {c}", field=f"regm_channels[{i}]")
        halvings = 2 ** (len(self.regm_channels) - 1)
        if self.regm == "flow" and self.voxels % halvings:
            raise ConfigError(f"must be a multiple of {halvings} for the flow RegM (its U-Net halves the grid "
                              f"{len(self.regm_channels) - 1} times), not {self.voxels}", field="voxels")

    @property
    def voxel_mm(self) -> float:
        return self.roi_mm / self.voxels

    @property
    def input_pixels(self) -> int:
        """The side, in pixels, of the working detector each X-ray is resampled to before
        RecM (:func:`~RadGSRegLib.learned.inputs.prepare_images`): ``image_pixels``, or with
        ``crop`` ``round(image_pixels / crop)``."""
        return self.image_pixels if self.crop is None else int(round(self.image_pixels / self.crop))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, *, source: str | None = None) -> "ModelConfig":
        """From a JSON object; errors name ``source`` (a file) and the field."""
        return build(cls, d, source=source, unknown="unknown model config key")
