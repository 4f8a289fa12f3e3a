"""RecM: two X-rays -> radiative Gaussians of one vertebra (paper Sec. 2, Fig. 1e).

1. **Encoder** (:mod:`.encoders`): each view's normalised X-ray -> a feature map. With
   ``ModelConfig.crop`` (ours; off by default, 0.6 in the shipped weights) the encoder sees a window of
   ``crop`` of the detector's side centred where the cube's centre projects, resampled
   from the finer working detector (``input_pixels``) to ``image_pixels``; the projection
   matrices are mapped into the window, so step 2 is unchanged.
2. **Geometry-aware fusion**: a cube of ``anchors^3`` anchor points (C-arm frame, side
   ``roi_mm``, centred on the vertebra's estimated position) is projected into both views
   with their exact projection matrices; each anchor gets the bilinearly sampled features
   of both views plus its position in the cube, mixed by an MLP. (The paper does not say
   how the views are fused; sampling along the true rays keeps the cone-beam geometry.)
3. **CAL** (Eq. 1, after Rao et al. 2021): attention ``A = sigmoid(Linear-ReLU-Linear(X))``
   weights the anchor features before the Gaussian head ``Y``. At training time a
   counterfactual pass uses random attention ``Ā ~ U(0, 1)``; the *effect* is
   ``Y(A ⊙ X) − Y(Ā ⊙ X)``, taken on the head's raw outputs, then activated like the
   factual ones. Inference uses the factual prediction.
4. **Gaussian head**: per anchor, ``per_anchor`` Gaussians: position = anchor +
   spacing·tanh(·), scales in ``scale_mm`` (sigmoid), unit quaternion (xyzw), density =
   ``density_scale``·softplus(·). Rendered by the rasterizer, voxelized by the voxelizer.
5. **Locator** (ours, ``ModelConfig.locate``; not in the paper; off in the shipped
   weights): an explicit answer to where the vertebra is, where RecM alone draws it near its
   cube's centre, i.e. where the input pose puts it (on the real CT: model card). With the
   locator, a first pass of the fusion at the given centre scores every anchor (a small MLP,
   softmax over the cube); the score-weighted mean anchor is where the X-rays put the
   vertebra (a soft arg-max, ``shift`` = that minus the centre, trained directly on the true
   offset). The cube is then re-centred there (the shift detached) and steps 2-4 run as
   before: the Gaussians are drawn where the vertebra is, and the reconstruction, voxelized
   on the grid of the *given* centre, shows RegM the input pose's error. Its last layer
   starts at zero, so a new locator leaves a trained RecM's output unchanged (shift 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import roma
import torch
import torch.nn.functional as F
from torch import nn

from ..gaussians.model import covariance, precision, whitening
from .config import ModelConfig
from .encoders import make_encoder

__all__ = ["GaussianSet", "RecM"]

_RAW = 11                    # 3 offset + 3 scale + 4 quaternion + 1 density


@dataclass
class GaussianSet:
    """Predicted Gaussians of one sample, activated (C-arm frame): density (N,) 1/mm,
    position (N, 3) mm, scale (N, 3) mm, quaternion (N, 4) xyzw; with a locator, ``shift``
    (3,) mm, its estimate of the vertebra's offset from the cube centre it was given."""

    density: torch.Tensor
    position: torch.Tensor
    scale: torch.Tensor
    quaternion: torch.Tensor
    raw_density: torch.Tensor | None = None     # the head's output before softplus (training)
    shift: torch.Tensor | None = None           # (3,) mm: the locator's estimate of where the vertebra
    #                                             lies from the given centre (None without a locator)

    def tensors(self):
        """(density, position, covariance, precision, whitening) for the rasterizer/voxelizer."""
        R = roma.unitquat_to_rotmat(self.quaternion)
        return self.density, self.position, covariance(self.scale, R), precision(self.scale, R), whitening(self.scale, R)


def _project(proj: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """(B, V, N, 2) pixel positions (column, row) of points ``X`` (B, N, 3) C-arm mm in the
    views of ``proj`` (B, V, 3, 4)."""
    Xh = torch.cat([X, torch.ones_like(X[..., :1])], -1)                         # (B, N, 4)
    uvw = torch.einsum("bvij,bnj->bvni", proj, Xh)                               # (B, V, N, 3)
    return uvw[..., :2] / uvw[..., 2:3].clamp(min=1e-6)


class RecM(nn.Module):
    """Biplanar X-rays -> radiative Gaussians (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = make_encoder(cfg.backbone, cfg.features, cfg.image_pixels)
        a = cfg.anchors
        lin = (torch.arange(a, dtype=torch.float32) + 0.5) / a * 2 - 1        # cube coordinates in (-1, 1)
        z, y, x = torch.meshgrid(lin, lin, lin, indexing="ij")
        self.register_buffer("unit_anchors", torch.stack([x, y, z], -1).reshape(-1, 3), persistent=False)
        h = cfg.hidden
        self.fuse = nn.Sequential(nn.Linear(2 * cfg.features + 3, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
        self.cal = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, h)) if cfg.cal else None
        self.head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, cfg.per_anchor * _RAW))
        self.locator = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)) if cfg.locate else None
        # a learned template per anchor (shape prior); the head predicts each case's departure from it
        self.anchor_bias = nn.Parameter(torch.zeros(a ** 3, cfg.per_anchor * _RAW))
        with torch.no_grad():                      # start as small, sparse-ish, isotropic blobs
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()
            self.head[-1].bias.view(cfg.per_anchor, _RAW)[:, 10] = 0.0
            if self.locator is not None:           # uniform scores: shift 0 (the anchors are symmetric)
                self.locator[-1].weight.zero_()
                self.locator[-1].bias.zero_()

    def anchors(self, centre: torch.Tensor) -> torch.Tensor:
        """(B, anchors^3, 3) anchor positions (mm) for ROI centres (B, 3)."""
        return centre[:, None, :] + self.unit_anchors[None] * (self.cfg.roi_mm / 2)

    def crop(self, images: torch.Tensor, proj: torch.Tensor, centre: torch.Tensor):
        """The window of each X-ray that RecM sees (``ModelConfig.crop``), and the
        projection matrices into it; the images and matrices as they are without ``crop``.

        Args: as :meth:`locate`.
        Returns:
            (B, 2, P, P) windows, ``P = image_pixels``: ``crop`` x S source pixels on a side,
            centred where ``centre`` projects, bilinear (0 outside the detector); (B, 2, 3, 4)
            matrices C-arm mm -> window pixels (pixel centres at integers, as in ``proj``).
        """
        if self.cfg.crop is None:
            return images, proj
        B, V, S, _ = images.shape
        P = self.cfg.image_pixels
        k = P / (self.cfg.crop * S)                                              # window pixels per source pixel
        uc = _project(proj, centre[:, None])[:, :, 0]                            # (B, V, 2) source pixels
        edge = uc + 0.5 - P / (2 * k)                                            # window's first edge (source
        #                                                                          pixel i spans [i, i + 1] here)
        t = (0.5 - edge) * k - 0.5                                               # u_window = k u_source + t
        A = torch.zeros(B, V, 3, 3, dtype=proj.dtype, device=proj.device)
        A[..., 0, 0] = k
        A[..., 1, 1] = k
        A[..., :2, 2] = t
        A[..., 2, 2] = 1.0
        j = (torch.arange(P, dtype=images.dtype, device=images.device) + 0.5) / k   # window pixel centres from its edge
        e = edge[..., None, :].to(images.dtype) + j[None, None, :, None]        # (B, V, P, 2) source edge coords
        gx = e[..., 0] / S * 2 - 1
        gy = e[..., 1] / S * 2 - 1
        grid = torch.stack([gx[:, :, None, :].expand(-1, -1, P, -1), gy[:, :, :, None].expand(-1, -1, -1, P)], -1)
        win = F.grid_sample(images.reshape(B * V, 1, S, S), grid.reshape(B * V, P, P, 2), mode="bilinear",
                            padding_mode="zeros", align_corners=False)
        return win.reshape(B, V, P, P), A @ proj

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 2, C, h, w) feature maps of the two views."""
        B, V, P, _ = images.shape
        fmap = self.encoder(images.reshape(B * V, 1, P, P))                      # (B V, C, h, w)
        return fmap.reshape(B, V, *fmap.shape[1:])

    def _fuse(self, fmap: torch.Tensor, proj: torch.Tensor, centre: torch.Tensor, P: int) -> torch.Tensor:
        B, V = fmap.shape[:2]
        X = self.anchors(centre)                                                 # (B, N, 3)
        uv = _project(proj, X)
        grid = (uv + 0.5) / P * 2 - 1                                            # pixel centres -> (-1, 1)
        f = F.grid_sample(fmap.reshape(B * V, *fmap.shape[2:]), grid.reshape(B * V, 1, -1, 2), mode="bilinear",
                          padding_mode="zeros", align_corners=False)             # (B V, C, 1, N)
        f = f.reshape(B, V, -1, X.shape[1]).permute(0, 3, 1, 2).reshape(B, X.shape[1], -1)
        return self.fuse(torch.cat([f, self.unit_anchors[None].expand(B, -1, -1)], -1))

    def locate(self, images: torch.Tensor, proj: torch.Tensor, centre: torch.Tensor):
        """Where the X-rays put the vertebra, and the fused features of the cube centred there.

        Args:
            images: (B, 2, S, S) normalised X-rays (AP, lateral) at the working size
                ``S = ModelConfig.input_pixels``.
            proj: (B, 2, 3, 4) their projection matrices (C-arm mm -> working pixels).
            centre: (B, 3) ROI centres, C-arm mm: where the input pose puts the vertebra.
        Returns:
            (features (B, anchors^3, hidden) at the re-centred cube, its centres (B, 3) C-arm
            mm, shift (B, 3) mm from ``centre`` (with gradient; the re-centring uses it
            detached)); without a locator: the cube at ``centre``, shift None.
        """
        images, proj = self.crop(images, proj, centre)
        fmap = self._encode(images)
        P = images.shape[-1]
        X = self._fuse(fmap, proj, centre, P)
        if self.locator is None:
            return X, centre, None
        w = torch.softmax(self.locator(X)[..., 0], dim=1)                        # (B, N)
        # the weights' departure from uniform: uniform scores give exactly 0 (in float32, the
        # anchors' own mean is not), the same gradient
        shift = torch.einsum("bn,nk->bk", w - 1.0 / w.shape[1], self.unit_anchors) * (self.cfg.roi_mm / 2)
        located = centre + shift.detach()
        return self._fuse(fmap, proj, located, P), located, shift

    def _activate(self, raw: torch.Tensor, centre: torch.Tensor, shift: torch.Tensor | None = None) -> list[GaussianSet]:
        cfg = self.cfg
        B, N, _ = raw.shape
        raw = (raw + self.anchor_bias).reshape(B, N, cfg.per_anchor, _RAW)
        spacing = cfg.roi_mm / cfg.anchors
        pos = self.anchors(centre)[:, :, None, :] + spacing * torch.tanh(raw[..., :3])
        lo, hi = cfg.scale_mm
        scale = lo + (hi - lo) * torch.sigmoid(raw[..., 3:6] - 1.0)
        quat = F.normalize(raw[..., 6:10] + torch.tensor([0.0, 0.0, 0.0, 1.0], device=raw.device), dim=-1)
        rho = cfg.density_scale * F.softplus(raw[..., 10])
        return [GaussianSet(rho[b].reshape(-1), pos[b].reshape(-1, 3), scale[b].reshape(-1, 3), quat[b].reshape(-1, 4),
                            raw[b, ..., 10].reshape(-1), None if shift is None else shift[b]) for b in range(B)]

    def forward(self, images, proj, centre, *, counterfactual: bool = False):
        """Predicted Gaussians per sample: ``(factual, effect)``; ``effect`` is None unless
        ``counterfactual`` (training with CAL). ``centre`` (B, 3) C-arm mm: where the input
        pose puts the vertebra; with a locator the Gaussians are drawn about where it finds it."""
        X, located, shift = self.locate(images, proj, centre)
        if self.cal is None:
            return self._activate(self.head(X), located, shift), None
        A = torch.sigmoid(self.cal(X))
        raw = self.head(X * A)
        effect = None
        if counterfactual:
            A_bar = torch.rand_like(A)                                             # do(A = random)
            effect = self._activate(raw - self.head(X * A_bar), located, shift)
        return self._activate(raw, located, shift), effect

    def attention(self, images, proj, centre) -> torch.Tensor | None:
        """(B, anchors^3) mean CAL attention per anchor (None without CAL): where RecM looks
        (in the cube it draws in: re-centred by the locator where there is one)."""
        if self.cal is None:
            return None
        with torch.no_grad():
            return torch.sigmoid(self.cal(self.locate(images, proj, centre)[0])).mean(-1)
