"""Radiative Gaussians: representation, cone-beam rasterizer, density voxelizer, per-case fitting."""
from .model import RadiativeGaussians
from .rasterizer import rasterize, rasterize_dense, rasterize_many, projected_boxes
from .voxelizer import voxelize, voxelize_dense, voxelize_many, to_volume

__all__ = ["RadiativeGaussians", "rasterize", "rasterize_many", "rasterize_dense", "projected_boxes", "voxelize",
           "voxelize_many", "voxelize_dense", "to_volume", "render", "voxelize_model"]


def render(g: RadiativeGaussians, views, **kw):
    """:func:`rasterize` of a :class:`RadiativeGaussians` (C-arm frame): (V, rows, cols)."""
    return rasterize(g.density, g.position, g.covariance(), g.whitening(), views, **kw)


def voxelize_model(g: RadiativeGaussians, shape, affine, **kw):
    """:func:`voxelize` of a :class:`RadiativeGaussians`: (K, J, I) densities (1/mm)."""
    return voxelize(g.density, g.position, g.covariance(), g.precision(), shape, affine, **kw)
