"""Training on several processes (``torchrun --nproc-per-node N``): which process this is,
and the few collectives the training loop needs.

``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :meth:`Dist.from_env` joins the
process group (gloo on the CPU, NCCL on CUDA) when there is more than one process, and is a
no-op otherwise, so ``radgsreg train`` runs unchanged either way. Every process holds the
whole network; the gradients are averaged over the processes after each backward pass (the
same arithmetic as DistributedDataParallel, without its wrapper: the networks are trained
through their own loss methods, not ``forward``), each process taking its share of every
epoch's batches (:meth:`Dist.share`, padded so that all take as many steps).
"""
from __future__ import annotations

import os

import torch

__all__ = ["Dist"]


class Dist:
    """This process's place among ``world`` training processes (rank 0 writes the run's
    files). ``world`` 1: every method does nothing."""

    def __init__(self, rank: int = 0, world: int = 1, created: bool = False):
        self.rank, self.world, self.created = rank, world, created

    @property
    def main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def env_rank() -> int:
        """The rank ``torchrun`` gave this process (0 without torchrun)."""
        return int(os.environ.get("RANK", "0"))

    @classmethod
    def from_env(cls, device: torch.device) -> "Dist":
        """Joins the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), once."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        created = not dist.is_initialized()
        if created:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), created)

    def device(self, device: torch.device) -> torch.device:
        """On CUDA, this process's GPU (``LOCAL_RANK``); the CPU as it is."""
        if self.world > 1 and device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return device

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def share(self, starts: list) -> list:
        """This process's batches of an epoch (``starts``: every batch's first index, the
        same list on every process): every ``world``-th, the list padded from its start so
        that every process takes as many steps."""
        starts = list(starts)
        if self.world <= 1 or not starts:
            return starts
        steps = -(-len(starts) // self.world)                  # every rank takes this many
        padded = [starts[i % len(starts)] for i in range(steps * self.world)]
        return padded[self.rank::self.world]

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every process (the same start everywhere)."""
        if self.world > 1:
            import torch.distributed as dist

            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    def average_gradients(self, params: list) -> None:
        """Each parameter's gradient averaged over the processes (a missing one counts as 0)."""
        if self.world > 1:
            import torch.distributed as dist

            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad)
                p.grad /= self.world

    def all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every process (a batch is skipped by all or none)."""
        ok = bool(torch.isfinite(loss))
        if self.world <= 1:
            return ok
        import torch.distributed as dist

        t = torch.tensor([1.0 if ok else 0.0], device=loss.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def sum_stats(self, sums: dict, n: int) -> tuple[dict, int]:
        """``sums`` (name -> float, the same names on every process) and ``n`` added up over
        the processes: the epoch's logged losses cover every process's batches."""
        if self.world <= 1:
            return sums, n
        import torch.distributed as dist

        keys = sorted(sums)
        t = torch.tensor([float(n)] + [sums[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(t)
        return dict(zip(keys, t[1:].tolist())), int(t[0].item())

    def average_buffers(self, module: torch.nn.Module) -> None:
        """The floating-point buffers (batch-norm statistics) averaged over the processes."""
        if self.world > 1:
            import torch.distributed as dist

            for b in module.buffers():
                if b.dtype.is_floating_point:
                    dist.all_reduce(b.data)
                    b.data /= self.world

    def close(self) -> None:
        """Leaves the process group if :meth:`from_env` joined it."""
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()
