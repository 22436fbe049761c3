"""RetainSubspace: an orthonormal basis of recent retain gradients, per parameter tensor or per
group of tensors, and the projections of Geometric-Disentanglement Unlearning onto its complement.

Every pass over the parameters is one lethe.ops.gu op over the whole list (subspace_dots,
subspace_axpy, subspace_transform); what is left is a tiny fp64 problem per scope on the host
(a few numbers per direction), which is also all that travels between processes.

The basis is Euclidean-orthonormal, of the raw retain gradients, in fp32 (fp64 for fp64
parameters), oldest direction first. The three projections of an update g:

  project(g)                      g <- g - Q Q^T g (Euclidean)
  project(g, exp_avg_sq=v, eps)   the Adam metric H = diag(sqrt(v) + eps): g <- g - Q c with
                                  (Q^T H^-1 Q) c = Q^T H^-1 g, so that the preconditioned step
                                  H^-1 g is orthogonal to every retain gradient (G_r^T H^-1 g = 0).
                                  It equals S^-1 (I - P P^T) S g with S = H^-1/2 and P an
                                  orthonormal basis of S G_r, for the metric of the call (no
                                  staleness when v changes between steps).
  project_update(params, before)  the realised update D = params - before of any optimiser:
                                  params <- before + D - Q Q^T D, so that G_r^T D = 0.

Each returns the norms before and after, per scope, in the metric of the projection (so that
after^2 = before^2 - removed^2).

Under torch.distributed the parameters may be shards (FSDP2 DTensors, handled on their local
shards, or plain local shards with process_group=): the ops' per-scope sums are all-reduced, the
host solves are then the same on every rank. Replicated parameters (DDP) need no reduction.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from lethe.ops import gu as G

__all__ = ["RetainSubspace"]

SCOPES = ("tensor", "group")
ORTHOGONALIZE = ("cgs2", "cholqr2")
WHEN_FULL = ("fifo", "freeze")


def _local(t):
    """The local tensor of a DTensor (a view sharing its storage), else t."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and type(t).__name__ == "DTensor" else t


def _shard_group(params):
    """The process group over which DTensor parameters are sharded, or None."""
    for p in params:
        if type(p).__name__ == "DTensor":
            if any(type(pl).__name__ == "Shard" or getattr(pl, "is_shard", lambda: False)() for pl in p.placements):
                mesh = p.device_mesh
                return mesh.get_group() if mesh.ndim == 1 else mesh.get_group(0)
    return None


class RetainSubspace:
    """Up to `rank` (<= 16) retain-gradient directions per scope.

    params: the tensors (parameters) whose updates are projected, or (name, tensor) pairs.
    scope: "tensor" (a basis per tensor), "group" (one basis over all of them, treated as one
    vector) or a list of group ids, one per tensor. orthogonalize: "cgs2" (two-pass classical
    Gram-Schmidt) or "cholqr2" (CholeskyQR2 with an fp64 Gram matrix). A retain gradient whose
    residual after orthogonalisation is below `threshold` times its norm is dropped. when_full:
    "fifo" replaces the oldest direction, "freeze" keeps the basis. process_group: all-reduce the
    inner products over it (parameters sharded by hand); DTensor shards find their own group."""

    def __init__(self, params, rank: int = 8, *, scope="tensor", orthogonalize: str = "cgs2",
                 when_full: str = "fifo", threshold: float = 1e-3, process_group=None,
                 backend: Optional[str] = None):
        params = list(params)
        if not params:
            raise ValueError("params: expected at least one tensor")
        names = []
        tensors = []
        for i, p in enumerate(params):
            if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
                names.append(p[0])
                p = p[1]
            else:
                names.append(str(i))
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if not p.is_floating_point():
                raise TypeError(f"params[{i}] must be a floating-point tensor, got {p.dtype}")
            tensors.append(p)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= G.MAX_ROWS:
            raise ValueError(f"rank must be an int in [1, {G.MAX_ROWS}], got {rank!r}")
        if orthogonalize not in ORTHOGONALIZE:
            raise ValueError(f"orthogonalize must be one of {ORTHOGONALIZE}, got {orthogonalize!r}")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {WHEN_FULL}, got {when_full!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
            raise ValueError(f"threshold must be a number in [0, 1), got {threshold!r}")
        if isinstance(scope, str):
            if scope not in SCOPES:
                raise ValueError(f"scope must be one of {SCOPES} or a list of group ids, got {scope!r}")
            ids = list(range(len(tensors))) if scope == "tensor" else [0] * len(tensors)
        else:
            ids = list(scope)
            if len(ids) != len(tensors) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                   for s in ids):
                raise ValueError(f"scope: a list of group ids must hold one int >= 0 per tensor ({len(tensors)}), "
                                 f"got {scope!r}")
            remap = {s: i for i, s in enumerate(dict.fromkeys(ids))}  # dense ids, first-seen order
            ids = [remap[s] for s in ids]
        self.names, self.params = names, tensors
        self.rank_cap, self.orthogonalize, self.when_full = rank, orthogonalize, when_full
        self.threshold, self.backend = float(threshold), backend
        self.scope_name = scope if isinstance(scope, str) else "custom"
        self.scope = ids
        self.num_scopes = max(ids) + 1
        self.group = process_group if process_group is not None else _shard_group(tensors)
        rows = rank + (1 if when_full == "fifo" else 0)  # fifo: a spare row for the incoming direction
        self.storage = []
        for p in tensors:
            loc = _local(p)
            dt = torch.float64 if p.dtype == torch.float64 else torch.float32
            self.storage.append(torch.zeros((rows, *loc.shape), dtype=dt, device=loc.device))
        self.count = [0] * self.num_scopes
        self.added = 0  # directions accepted so far (all scopes)
        self.dropped = 0  # (scope, gradient) pairs dropped as (nearly) dependent

    # -------------------------------------------------------------------------------------------
    @property
    def memory_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self.storage)

    def ranks(self) -> dict:
        """The basis rank of each tensor, by name."""
        return {n: self.count[s] for n, s in zip(self.names, self.scope)}

    @property
    def rank(self) -> list:
        """The rank of each scope."""
        return list(self.count)

    def memory(self) -> dict:
        """Bytes of basis storage of each tensor, by name."""
        return {n: s.numel() * s.element_size() for n, s in zip(self.names, self.storage)}

    def basis(self, i: int) -> torch.Tensor:
        """Tensor i's basis rows [rank, *shape] (a view; oldest first)."""
        return self.storage[i][: self.count[self.scope[i]]]

    def state_dict(self) -> dict:
        return {"rank": self.rank_cap, "scope": list(self.scope), "orthogonalize": self.orthogonalize,
                "when_full": self.when_full, "threshold": self.threshold, "count": list(self.count),
                "added": self.added, "dropped": self.dropped,
                "basis": [s.detach().cpu().clone() for s in self.storage]}

    def load_state_dict(self, d: dict) -> None:
        for k in ("rank", "scope", "orthogonalize", "when_full"):
            mine = self.rank_cap if k == "rank" else list(self.scope) if k == "scope" else getattr(self, k)
            if d.get(k) != mine:
                raise ValueError(f"state_dict: the saved subspace has {k}={d.get(k)!r}, this one {mine!r}")
        saved = d["basis"]
        if len(saved) != len(self.storage):
            raise ValueError(f"state_dict: the saved basis has {len(saved)} tensors, this subspace {len(self.storage)}")
        for i, (a, b) in enumerate(zip(saved, self.storage)):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(f"state_dict: basis {i} ({self.names[i]}) was built for shape {list(a.shape[1:])} "
                                 f"{a.dtype}, this tensor is {list(b.shape[1:])} {b.dtype}")
        for a, b in zip(saved, self.storage):
            b.copy_(a)
        self.count = list(d["count"])
        self.added, self.dropped = d.get("added", 0), d.get("dropped", 0)

    # -------------------------------------------------------------------------------------------
    def _grads(self, grads, what: str) -> list:
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"{what}: expected one tensor per parameter ({len(self.params)}), got {len(grads)}")
        out = []
        for i, (g, s) in enumerate(zip(grads, self.storage)):
            if not isinstance(g, torch.Tensor):
                raise TypeError(f"{what}[{i}] must be a torch.Tensor, got {type(g).__name__}")
            g = _local(g)
            if list(g.shape) != list(s.shape[1:]):
                raise ValueError(f"{what}[{i}] ({self.names[i]}) must have the shape {list(s.shape[1:])} the "
                                 f"subspace was built for, got {list(g.shape)}")
            out.append(g)
        return out

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            import torch.distributed as dist

            dist.all_reduce(t, group=self.group)
        return t

    def _sub(self, scopes: list):
        """The tensors of `scopes` and their scope ids renumbered 0.. in that order."""
        pos = {s: i for i, s in enumerate(scopes)}
        idx = [t for t, s in enumerate(self.scope) if s in pos]
        return idx, [pos[self.scope[t]] for t in idx]

    def _dots(self, basis, x, scope, n, **kw):
        return self._reduce(G.subspace_dots(basis, x, scope=scope, num_scopes=n, backend=self.backend, **kw))

    def _axpy(self, out, basis, coeff, scope, **kw):
        coeff = coeff[:, : max(b.shape[0] for b in basis)].contiguous()  # a subset's K may be smaller
        return self._reduce(G.subspace_axpy(out, basis, coeff, scope=scope, backend=self.backend, **kw))

    # -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, grads: Sequence[torch.Tensor]) -> dict:
        """Adds one retain gradient (a tensor per parameter): per scope, its part orthogonal to the
        basis becomes a new direction unless it is below `threshold` of its norm. Returns
        {"added": scopes that took it, "dropped": scopes that did not, "residual": the smallest
        relative residual}."""
        grads = self._grads(grads, "grads")
        full = [c >= self.rank_cap for c in self.count]
        scopes = [s for s in range(self.num_scopes) if not (full[s] and self.when_full == "freeze")]
        if not scopes:
            return {"added": 0, "dropped": 0, "residual": float("nan")}
        idx, sid = self._sub(scopes)
        lo = [1 if full[s] else 0 for s in scopes]  # fifo on a full basis: orthogonalise against all but the oldest
        q = [self.storage[t][lo[a]: self.count[scopes[a]]] for t, a in zip(idx, sid)]
        slot = [self.storage[t][self.count[scopes[a]]] for t, a in zip(idx, sid)]
        x = [grads[t] for t in idx]
        if self.orthogonalize == "cgs2":
            res, accept = self._add_cgs2(q, slot, x, sid, len(scopes))
        else:
            res, accept = self._add_cholqr2(idx, q, slot, x, sid, scopes, lo)
        for a, s in enumerate(scopes):
            if not accept[a]:
                continue
            if full[s]:  # drop the oldest: rows 1..cap (the new one last) move to 0..cap-1
                ts = [t for t, b in zip(idx, sid) if b == a]
                for i in range(self.rank_cap):
                    torch._foreach_copy_([self.storage[t][i] for t in ts], [self.storage[t][i + 1] for t in ts])
            else:
                self.count[s] += 1
        n_acc = int(sum(bool(v) for v in accept))
        self.added += n_acc
        self.dropped += len(scopes) - n_acc
        return {"added": n_acc, "dropped": len(scopes) - n_acc, "residual": float(res.min())}

    def _add_cgs2(self, q, slot, x, sid, n):
        k = max(b.shape[0] for b in q)
        d1 = self._dots(q, x, sid, n)
        gg = d1[:, k]
        st = self._axpy(slot, q, d1[:, :k].contiguous(), sid, x=x, dots=True)  # r = x - Q Q^T x
        rr, c2 = st[:, k], st[:, :k].contiguous()
        res = torch.where(gg > 0, (rr / gg).clamp_min(0).sqrt(), torch.zeros_like(gg))
        norm2 = rr - (c2 * c2).sum(-1)  # |r - Q Q^T r|^2, Q orthonormal
        accept = torch.isfinite(gg) & (gg > 0) & (res >= self.threshold) & (res > 0) & (norm2 > 0)
        scale = torch.where(accept, norm2.clamp_min(1e-300).rsqrt(), torch.zeros_like(norm2))
        keep = [i for i, a in enumerate(sid) if accept[a]]
        if keep:  # second pass: q_new = (r - Q Q^T r) / |.|
            self._axpy([slot[i] for i in keep], [q[i] for i in keep], c2, [sid[i] for i in keep], scale=scale)
        return res, accept.tolist()

    def _add_cholqr2(self, idx, q, slot, x, sid, scopes, lo):
        n = len(scopes)
        k = max(b.shape[0] for b in q)
        kt = [0] * n
        for b, a in zip(q, sid):
            kt[a] = b.shape[0]
        g = self._dots(q, x, sid, n, gram=True)  # [n, k+1, k+1]: rows q_0..q_{k-1}, x
        gg = g[:, k, k].clone()
        _identity_past(g, kt, upto=k)  # absent rows: identity, so that they stay out of the factorisation
        r, info = torch.linalg.cholesky_ex(g, upper=True)
        ok = info == 0
        diag = torch.where(ok, r[:, k, k], torch.zeros_like(gg))
        res = torch.where(gg > 0, diag / gg.clamp_min(1e-300).sqrt(), torch.zeros_like(gg))
        accept = ok & torch.isfinite(gg) & (gg > 0) & (res >= self.threshold) & (res > 0)
        eye = torch.eye(k + 1, dtype=torch.float64, device=g.device).expand_as(g)
        t = torch.linalg.solve_triangular(torch.where(ok[:, None, None], r, eye), eye, upper=True).transpose(1, 2)
        keep = [i for i, a in enumerate(sid) if accept[a]]
        if not keep:
            return res, accept.tolist()
        # new row = T[k,k] (x - sum_j (-T[k,j] / T[k,k]) q_j); then the old rows q <- T[:k,:k] q
        coeff = (-t[:, k, :k] / t[:, k, k:k + 1]).contiguous()
        self._axpy([slot[i] for i in keep], [q[i] for i in keep], coeff, [sid[i] for i in keep],
                   x=[x[i] for i in keep], scale=t[:, k, k].contiguous())
        if k:
            kk = max(q[i].shape[0] for i in keep)
            G.subspace_transform([q[i] for i in keep], t[:, :kk, :kk].contiguous(), scope=[sid[i] for i in keep],
                                 backend=self.backend)
        # second CholeskyQR pass over the rows and the new one together
        rows = [self.storage[idx[i]][lo[sid[i]]: self.count[scopes[sid[i]]] + 1] for i in keep]
        ks = [rw.shape[0] for rw in rows]
        m = max(ks)
        g2 = self._dots(rows, None, [sid[i] for i in keep], n, gram=True)[:, :m, :m].clone()
        _identity_past(g2, [kt[a] + 1 if accept[a] else 0 for a in range(n)])  # rejected scopes, absent rows
        r2, info2 = torch.linalg.cholesky_ex(g2, upper=True)
        eye2 = torch.eye(m, dtype=torch.float64, device=g2.device).expand_as(g2)
        t2 = torch.linalg.solve_triangular(torch.where((info2 == 0)[:, None, None], r2, eye2), eye2,
                                           upper=True).transpose(1, 2)
        G.subspace_transform(rows, t2[:, :m, :m].contiguous(), scope=[sid[i] for i in keep], backend=self.backend)
        return res, accept.tolist()

    # -------------------------------------------------------------------------------------------
    def _views(self):
        return [self.storage[t][: self.count[s]] for t, s in enumerate(self.scope)]

    @torch.no_grad()
    def project(self, grads: Sequence[torch.Tensor], exp_avg_sq: Optional[Sequence[torch.Tensor]] = None,
                eps: float = 1e-8):
        """Projects grads (in place) onto the complement of the basis: Euclidean, or in the Adam
        metric diag(sqrt(exp_avg_sq) + eps). Returns (before, after): per-scope norms [S] (fp64,
        on the CPU) in that metric."""
        grads = self._grads(grads, "grads")
        q = self._views()
        k = max(b.shape[0] for b in q)
        if exp_avg_sq is None:
            d = self._dots(q, grads, self.scope, self.num_scopes)
            before2 = d[:, k].clone()
            st = self._axpy(grads, q, d[:, :k].contiguous(), self.scope)
            after2 = st[:, k]
        else:
            v = self._grads(exp_avg_sq, "exp_avg_sq")
            g = self._dots(q, grads, self.scope, self.num_scopes, exp_avg_sq=v, eps=eps, gram=True)
            before2 = g[:, k, k].clone()
            m, b = g[:, :k, :k].clone(), g[:, :k, k].clone()
            _identity_past(m, self.count)
            c = _spd_solve(m, b)
            self._axpy(grads, q, c.contiguous(), self.scope)
            after2 = (before2 - (b * c).sum(-1)).clamp_min(0)
        return before2.clamp_min(0).sqrt().cpu(), after2.clamp_min(0).sqrt().cpu()

    @torch.no_grad()
    def project_update(self, params: Sequence[torch.Tensor], before: Sequence[torch.Tensor]):
        """The realised update params - before of any optimiser, projected: params <- before +
        (I - Q Q^T)(params - before), in place. `before` is overwritten (with the update).
        Returns (before, after): per-scope Euclidean norms of the update [S]."""
        p = self._grads(params, "params")
        prev = self._grads(before, "before")
        torch._foreach_mul_(prev, -1.0)
        torch._foreach_add_(prev, p)  # prev <- params - prev: the update
        q = self._views()
        k = max(b.shape[0] for b in q)
        d = self._dots(q, prev, self.scope, self.num_scopes)
        c = d[:, :k].contiguous()
        self._axpy(p, q, c, self.scope)  # params - Q Q^T D
        before2 = d[:, k]
        after2 = (before2 - (c * c).sum(-1)).clamp_min(0)
        return before2.clamp_min(0).sqrt().cpu(), after2.sqrt().cpu()


def _identity_past(g: torch.Tensor, rows: list, upto: Optional[int] = None) -> None:
    """In place: batch entry a of the [n, m, m] matrices g gets identity rows and columns from
    rows[a] up to `upto` (default m), so that absent basis rows stay out of its factorisation."""
    end = g.shape[-1] if upto is None else upto
    for a, r in enumerate(rows):
        if r < end:
            g[a, r:end, :] = 0
            g[a, :, r:end] = 0
            idx = torch.arange(r, end, device=g.device)
            g[a, idx, idx] = 1


def _spd_solve(m: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solves m c = b per batch entry (m symmetric positive semi-definite, fp64): Cholesky, with a
    relative jitter where m is singular, lstsq where that fails too."""
    lower, info = torch.linalg.cholesky_ex(m)
    if bool((info != 0).any()):
        scale = torch.diagonal(m, dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1e-300)
        jit = m + (1e-12 * scale)[:, None, None] * torch.eye(m.shape[-1], dtype=m.dtype, device=m.device)
        lower, info = torch.linalg.cholesky_ex(jit)
        if bool((info != 0).any()):
            return torch.linalg.lstsq(m, b.unsqueeze(-1)).solution.squeeze(-1)
    return torch.cholesky_solve(b.unsqueeze(-1), lower).squeeze(-1)
