"""Metal in an X-ray that the CT does not have: a small 2-D segmentation network.

Pedicle screws, K-wires and retractor blades are dense, sharp and absent from the
preoperative CT; where they cross the vertebra's window they dominate any similarity of the
X-ray with the CT's DRR. Thresholds cannot find them before the pose is known (the X-ray's
scatter compresses metal to a few times bone's contrast; measured, see the robustness
issue's notes), so a small U-Net (MONAI's ``BasicUNet``, 2-D) marks them, trained on X-rays
our own simulator makes with instruments whose exact footprint it knows
(:mod:`RadGSRegLib.training.metal`). The registration leaves the marked pixels out of every
comparison (:meth:`~RadGSRegLib.register.target.Target.exclude`; ``RegisterConfig.metal``).

The network sees an X-ray as line integrals (:func:`~RadGSRegLib.xray.as_line_integral`)
resampled to :attr:`MetalNetConfig.pixel_mm` detector mm per pixel (:func:`network_input`:
two channels, the image standardised over its signal pixels and its high-pass), and gives a
metal logit per pixel; :func:`segment_metal` turns that into a mask on the X-ray's own
pixels, grown by ``dilate_mm`` (detector mm) so the metal's blurred rim goes too.

A weight file (``.pt``) is a plain dictionary (``format`` :data:`FORMAT`, ``net_config``,
``state_dict``, ``card``) read with ``torch.load(weights_only=True)``
(:func:`~RadGSRegLib.learned.model.read_weight_file` / ``write_weight_file``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import View

__all__ = ["MetalNetConfig", "MetalNet", "network_input", "segment_metal", "FORMAT", "DEFAULT_WEIGHTS"]

FORMAT = "radgsreg-metal/1"
#: the shipped weights (``Resources/``; :func:`~RadGSRegLib.resources.resource_path`)
DEFAULT_WEIGHTS = "Models/metal_seg.pt"


@dataclass
class MetalNetConfig:
    """The metal network's shape and working resolution.

    Attributes:
        pixel_mm: detector mm per working pixel (X-rays are resampled to it; ~1.15 mm is a
            30 cm detector at 256 pixels: a 2 mm K-wire is ~3 pixels wide at 1.6x).
        features: ``BasicUNet``'s six feature counts (four downsamplings, so the working
            image is padded to a multiple of 16).
        highpass_mm: the Gaussian (detector mm) whose blur the second input channel subtracts.
    """

    pixel_mm: float = 1.15
    features: tuple = (16, 16, 32, 64, 128, 16)
    highpass_mm: float = 6.0

    def __post_init__(self):
        self.features = tuple(int(f) for f in self.features)
        if len(self.features) != 6 or min(self.features) < 1:
            raise ValueError(f"features must be six positive channel counts, not {self.features}")
        if not self.pixel_mm > 0 or not self.highpass_mm > 0:
            raise ValueError("pixel_mm and highpass_mm must be > 0")

    def to_dict(self) -> dict:
        return asdict(self)


class MetalNet(nn.Module):
    """``BasicUNet`` (2-D, 2 input channels, 1 output logit) with its config and model card."""

    def __init__(self, cfg: MetalNetConfig | None = None):
        super().__init__()
        from monai.networks.nets import BasicUNet

        self.cfg = cfg or MetalNetConfig()
        self.unet = BasicUNet(spatial_dims=2, in_channels=2, out_channels=1, features=self.cfg.features)
        self.card: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2, H, W) inputs (H, W multiples of 16) -> (B, 1, H, W) metal logits."""
        return self.unet(x)

    def save(self, path, *, card: dict | None = None, overwrite: bool = False) -> Path:
        """Write the weight file (atomically; an existing file only with ``overwrite``)."""
        from .model import write_weight_file

        return write_weight_file(path, FORMAT, {"net_config": self.cfg.to_dict()}, self.state_dict(),
                                 card if card is not None else self.card, overwrite=overwrite)

    @classmethod
    def load(cls, path, *, device="cpu") -> "MetalNet":
        """A network from a weight file (nothing in it runs). Raises
        :class:`~RadGSRegLib.learned.model.WeightFileError` naming the file: missing, unsafe,
        not a metal network's, or weights that do not fit their own config."""
        from .model import WeightFileError, read_weight_file

        blob = read_weight_file(path, FORMAT, what="metal segmentation weight file",
                                hint="use a weight file written by radgsreg train-metal")
        try:
            net = cls(MetalNetConfig(**dict(blob.get("net_config") or {})))
            net.load_state_dict(blob.get("state_dict"))
        except (TypeError, ValueError, RuntimeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightFileError(f"{path}: not a usable metal segmentation weight file ({first[:300]})") from None
        card = blob.get("card", {})
        net.card = card if isinstance(card, dict) else {}
        return net.to(device).eval()


def network_input(image: np.ndarray, view: View, cfg: MetalNetConfig,
                  valid: np.ndarray | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The network's input for one X-ray.

    Args:
        image: (rows, cols) line integrals (:func:`~RadGSRegLib.xray.as_line_integral`).
        view: its view (pixel spacing: detector mm). valid: (rows, cols) bool, the pixels
            with a signal (None: all; e.g. not outside a round field).

    Returns:
        (1, 2, H, W) float32 (H, W: the working size, padded up to multiples of 16; channel
        0 the image standardised over its signal pixels, channel 1 its high-pass over
        ``cfg.highpass_mm``, both 0 where there is no signal), and the working size
        (rows, cols) before padding.
    """
    from scipy import ndimage

    from ..xray import resize_view_image

    rows, cols = image.shape
    size = (max(16, int(round(cols * view.pixel_spacing[0] / cfg.pixel_mm))),
            max(16, int(round(rows * view.pixel_spacing[1] / cfg.pixel_mm))))
    image = np.asarray(image, np.float32)
    if valid is not None and valid.any():            # no signal: filled, so that resampling carries none of it
        image = np.where(valid, image, np.float32(np.median(image[valid])))
    img, _ = resize_view_image(image, view, size)
    if valid is None:
        ok = np.ones(img.shape, bool)
    else:
        frac, _ = resize_view_image(np.asarray(valid, np.float32), view, size)
        ok = frac > 0.999
    vals = img[ok] if ok.any() else img.ravel()
    mean, std = float(vals.mean()), float(vals.std()) + 1e-6
    z = np.where(ok, (img - mean) / std, 0.0).astype(np.float32)
    hp = (z - ndimage.gaussian_filter(z, cfg.highpass_mm / cfg.pixel_mm, mode="mirror", truncate=3.0)) * ok
    x = torch.from_numpy(np.stack([z, hp.astype(np.float32)]))[None]
    H, W = x.shape[-2:]
    ph, pw = (-H) % 16, (-W) % 16
    return F.pad(x, (0, pw, 0, ph)), (H, W)


@torch.no_grad()
def metal_probability(net: MetalNet, image: np.ndarray, view: View, valid: np.ndarray | None = None) -> np.ndarray:
    """(rows, cols) float32 in [0, 1]: the network's probability of metal at each of the
    X-ray's own pixels (bilinear from the working size; 0 where ``valid`` is False)."""
    dev = next(net.parameters()).device
    x, (H, W) = network_input(image, view, net.cfg, valid)
    p = torch.sigmoid(net(x.to(dev)))[..., :H, :W].float().cpu()
    p = F.interpolate(p, size=image.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return p if valid is None else np.where(valid, p, 0.0).astype(np.float32)


def segment_metal(net: MetalNet, image: np.ndarray, view: View, valid: np.ndarray | None = None, *,
                  threshold: float = 0.5, dilate_mm: float = 1.5) -> np.ndarray:
    """(rows, cols) bool: the pixels of one X-ray (line integrals, its ``view``) that show
    metal, grown by ``dilate_mm`` detector mm (a disc). ``valid``: the signal pixels (None:
    all); nothing outside them is marked."""
    from scipy import ndimage

    m = metal_probability(net, image, view, valid) > threshold
    r = dilate_mm / float(min(view.pixel_spacing))
    if r >= 0.5 and m.any():
        k = int(np.floor(r))
        yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
        m = ndimage.binary_dilation(m, structure=(yy ** 2 + xx ** 2) <= r * r)
    return m if valid is None else m & valid
