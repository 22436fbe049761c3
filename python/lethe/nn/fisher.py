"""A diagonal Fisher over a list of parameters: the mean over batches of the squared batch-mean
gradient, accumulated by lethe.ops.fisher_accumulate in one pass over the list per batch (SSD's
importances; the accumulators of any method that weighs parameters by their Fisher diagonal).

    fisher = FisherDiagonal(params)            # float32 accumulators (dtype=torch.bfloat16: half the memory)
    for batch in data:
        fisher.accumulate(torch.autograd.grad(loss(batch), params, allow_unused=True))
    importance = fisher.mean()                 # [I_t], the sums divided by the number of batches

The sums divide by the batch count at the end (`I /= n`, the authors' order for SSD). bf16
accumulators round stochastically (random bits from a hash of the seed, the batch and the
element: reproducible, unbiased; tests/test_ssd.py bounds the bias).

Under torch.distributed: with `process_group`, `mean()` sums the accumulators and the batch counts
over the group: replicas that each saw their own batches, with their own (not all-reduced)
gradients. FSDP2 DTensor parameters are handled on their local shards and never reduced: every
rank must see the same batches, so that a shard's gradient is the batch's (SSD arranges that).
Each rank draws its own random bits for bf16 rounding (the seed, the rank and the batch).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lethe.nn.retain_subspace import _local  # a DTensor's local shard, else the tensor
from lethe.ops import fisher_accumulate

__all__ = ["FisherDiagonal"]

DTYPES = (torch.float32, torch.bfloat16)


class FisherDiagonal:
    def __init__(self, params: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                 process_group=None, backend: Optional[str] = None):
        if not isinstance(params, (list, tuple)) or not params:
            raise ValueError("params: expected a non-empty list of tensors")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dtype, self.seed, self.process_group, self.backend = dtype, seed, process_group, backend
        self.sharded = [type(p).__name__ == "DTensor" for p in params]
        self.rank = 0
        if process_group is not None:
            import torch.distributed as dist

            self.rank = dist.get_rank(process_group)
        self.importance = [torch.zeros(_local(p).shape, dtype=dtype, device=_local(p).device) for p in params]
        self.batches = 0
        self._mean = None

    @property
    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.importance)

    def accumulate(self, grads: Sequence[Optional[torch.Tensor]], scale: float = 1.0) -> None:
        """Adds (g * g) * scale for one batch; None entries (parameters without a gradient) are skipped."""
        if self._mean is not None:
            raise RuntimeError("FisherDiagonal: mean() was taken; accumulate into a new one")
        if not isinstance(grads, (list, tuple)) or len(grads) != len(self.importance):
            n = len(grads) if isinstance(grads, (list, tuple)) else type(grads).__name__
            raise ValueError(f"grads: expected one entry per parameter ({len(self.importance)}), got {n}")
        imp, gs = [], []
        for i, g in zip(self.importance, grads):
            if g is not None:
                imp.append(i)
                gs.append(_local(g).contiguous())
        if imp:
            # a new seed per batch, so that the rounding of successive batches is independent
            key = ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.batches) % 2**64
            fisher_accumulate(imp, gs, scale=scale, seed=key - 2**64 if key >= 2**63 else key, backend=self.backend)
        self.batches += 1

    def mean(self) -> list:
        """The accumulated sums over the batches (all ranks' with a process group) divided by their
        number, in place; taken once."""
        if self._mean is not None:
            return self._mean
        n_local = n_global = self.batches
        if self.process_group is not None and not all(self.sharded):
            import torch.distributed as dist

            count = torch.tensor([float(n_local)], dtype=torch.float64, device=self.importance[0].device)
            dist.all_reduce(count, group=self.process_group)
            n_global = int(count.item())
            for t, sharded in zip(self.importance, self.sharded):
                if not sharded:
                    buf = t.float() if t.dtype != torch.float32 else t
                    dist.all_reduce(buf, group=self.process_group)
                    if buf is not t:
                        t.copy_(buf)
        if n_global == 0:
            raise ValueError("FisherDiagonal: no batch was accumulated")
        for t, sharded in zip(self.importance, self.sharded):
            # the authors' `imp /= len(dataloader)`; a shard's batches are the global ones already
            t.div_(float(n_local if sharded else n_global))
        self._mean = self.importance
        return self._mean

    def state_dict(self) -> dict:
        return {"importance": [t.clone() for t in self.importance], "batches": self.batches,
                "seed": self.seed, "dtype": str(self.dtype), "mean": self._mean is not None}

    def load_state_dict(self, d: dict) -> None:
        if d.get("dtype") != str(self.dtype) or len(d.get("importance", ())) != len(self.importance):
            raise ValueError(f"FisherDiagonal: the state is of {len(d.get('importance', ()))} {d.get('dtype')} "
                             f"accumulators, not {len(self.importance)} {self.dtype} ones")
        for t, s in zip(self.importance, d["importance"]):
            if t.shape != s.shape:
                raise ValueError(f"FisherDiagonal: a saved accumulator has shape {list(s.shape)}, not {list(t.shape)}")
            t.copy_(s)
        self.batches, self.seed = int(d["batches"]), int(d["seed"])
        self._mean = self.importance if d.get("mean") else None
