"""Scatter-add of per-Gaussian boxes into a flat image/volume, with a backward pass that
recomputes the indices instead of storing them (int64 per pair would dominate memory)."""
from __future__ import annotations

import torch

__all__ = ["box_index", "box_scatter_add"]


def box_index(base: torch.Tensor, B: int, strides: tuple[int, ...]) -> torch.Tensor:
    """(n, B, ..., B) flat indices ``base[n] + Σ_d a_d * strides[d]`` (a_d = 0..B-1, slowest first)."""
    ar = torch.arange(B, device=base.device)
    idx = base
    for s in strides:
        idx = idx[..., None] + ar * s
    return idx


class _BoxScatterAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, val, base, B, strides):
        out.index_add_(0, box_index(base, B, strides).reshape(-1), val.reshape(-1))
        ctx.mark_dirty(out)
        ctx.save_for_backward(base)
        ctx.B, ctx.strides, ctx.val_shape = B, strides, val.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (base,) = ctx.saved_tensors
        grad_val = None
        if ctx.needs_input_grad[1]:
            grad_val = grad_out[box_index(base, ctx.B, ctx.strides).reshape(-1)].reshape(ctx.val_shape)
        return grad_out, grad_val, None, None, None


def box_scatter_add(out: torch.Tensor, val: torch.Tensor, base: torch.Tensor, B: int, strides) -> torch.Tensor:
    """``out[box_index(base, B, strides)] += val`` in place (differentiable in out and val).

    Args:
        out: flat accumulator. val: (n, B, ..., B) values. base: (n,) int64 flat index of
        each box's first element. strides: flat strides of the box axes, slowest first.
    """
    return _BoxScatterAdd.apply(out, val, base, int(B), tuple(int(s) for s in strides))
