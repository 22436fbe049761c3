"""lethe.RetainSubspace (GU's retain subspace, on the gu ops) against references built on
torch.linalg.qr in fp64: orthonormality at condition numbers up to 1e7, the projections'
invariants (Euclidean, the Adam metric, the realised update), dropped directions, FIFO / freeze,
state_dict, bad input, and two gloo processes holding shards equal to one process."""
import os

import pytest
import torch

import gloo
from lethe import RetainSubspace

# the kernels that run the subspace's passes here (triton: interpreted on CPU tensors)
BACKENDS = ["native", "triton", "reference"]
SHAPES = [(7, 5), (13,), (3, 4, 2), (0, 3)]


def _numel(s):
    n = 1
    for d in s:
        n *= d
    return n


def _split(vec, shapes, dtype=torch.float32):
    parts = torch.split(vec, [_numel(s) for s in shapes])
    return [p.reshape(s).to(dtype).contiguous() for p, s in zip(parts, shapes)]


def _flat(ts):
    return torch.cat([t.double().reshape(-1) for t in ts])


def _retain_grads(d, n, cond, seed=0):
    """n synthetic retain gradients [d, n] (fp64) whose matrix has condition number `cond`."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, n, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    return (u * torch.logspace(0, -torch.log10(torch.tensor(float(cond))).item(), n, dtype=torch.float64)) @ v.T


def _group_basis(rs):
    k = rs.count[0]
    return torch.cat([rs.basis(t).reshape(k, -1).double() for t in range(len(rs.params))], 1)


def _params(shapes=SHAPES, dtype=torch.float32):
    return [torch.zeros(s, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orth", ["cgs2", "cholqr2"])
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e7])
def test_basis_is_orthonormal_and_spans_the_retain_gradients(backend, orth, cond):
    d = sum(_numel(s) for s in SHAPES)
    gr = _retain_grads(d, 6, cond)
    rs = RetainSubspace(_params(), rank=8, scope="group", orthogonalize=orth, threshold=1e-6, backend=backend)
    for j in range(gr.shape[1]):
        rs.add(_split(gr[:, j], SHAPES))
    q = _group_basis(rs)
    err = torch.linalg.matrix_norm(torch.eye(q.shape[0], dtype=torch.float64) - q @ q.T, 2).item()
    print(f"{backend} {orth} cond {cond:g}: rank {q.shape[0]}, |I - Q^T Q|_2 = {err:.2e}")
    assert err <= 1e-5
    assert q.shape[0] >= (6 if cond <= 1e3 else 3)
    if cond <= 1e3:  # the same span as the fp64 QR of the (fp32-rounded) gradients, to fp32's
        g32 = torch.stack([_flat(_split(gr[:, j], SHAPES)) for j in range(6)], 1)  # eps times cond
        ref, _ = torch.linalg.qr(g32)
        dist = torch.linalg.matrix_norm(q.T @ q - ref @ ref.T, 2).item()
        print(f"  distance of the projectors from the fp64 QR's: {dist:.2e}")
        assert dist <= 1e-6 + 1e-7 * cond


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_projections_keep_their_promises(backend, scope):
    shapes = [(9, 4), (11,), (2, 3, 5)]
    d = sum(_numel(s) for s in shapes)
    gen = torch.Generator().manual_seed(1)
    gr = _retain_grads(d, 4, 1e4, seed=2)
    rs = RetainSubspace(_params(shapes), rank=4, scope=scope, threshold=1e-6, backend=backend)
    for j in range(4):
        rs.add(_split(gr[:, j], shapes))
    assert rs.rank == ([4] * 3 if scope == "tensor" else [4])
    pieces = [list(range(len(shapes)))] if scope == "group" else [[t] for t in range(len(shapes))]

    def sub(ts, idx):
        return torch.cat([ts[t].double().reshape(-1) for t in idx])

    g = [torch.randn(s, generator=gen) for s in shapes]
    # Euclidean: |<g_hat, q_i>| <= 1e-5 |g_hat| for every basis vector
    e = [x.clone() for x in g]
    before, after = rs.project(e)
    for si, idx in enumerate(pieces):
        gh = sub(e, idx)
        q = torch.cat([rs.basis(t).reshape(rs.count[si], -1).double() for t in idx], 1)
        assert (q @ gh).abs().max() <= 1e-5 * gh.norm()
        assert torch.allclose(before[si], sub(g, idx).norm(), rtol=1e-5)
        assert torch.allclose(after[si], gh.norm(), rtol=1e-5)
        # what was removed is the component along the basis (the fp64 projection)
        ref = sub(g, idx) - q.T @ (q @ sub(g, idx))
        assert torch.allclose(gh, ref, atol=1e-5 * sub(g, idx).norm().item())
    # the Adam metric H = diag(sqrt(v) + eps): G_r^T H^-1 g_hat = 0 for every retain gradient
    v = [torch.rand(s, generator=gen) ** 4 * 1e-2 for s in shapes]
    v[0].view(-1)[:5] = 0  # parameters Adam has seen no gradient for
    a = [x.clone() for x in g]
    before, after = rs.project(a, exp_avg_sq=v, eps=1e-8)
    hinv = [1.0 / (x.double().sqrt() + 1e-8) for x in v]
    for si, idx in enumerate(pieces):
        gh, w = sub(a, idx), sub(hinv, idx)
        for j in range(4):
            grj = sub(_split(gr[:, j], shapes), idx)
            lhs = (grj * w * gh).sum().abs()
            assert lhs <= 1e-5 * (grj * w * grj).sum().sqrt() * (gh * w * gh).sum().sqrt()
        assert torch.allclose(before[si], (sub(g, idx) ** 2 * w).sum().sqrt(), rtol=1e-5)
        assert torch.allclose(after[si], (gh ** 2 * w).sum().sqrt(), rtol=1e-4)
    # the realised update of any optimiser: G_r^T (params - before) = 0
    start = [torch.randn(s, generator=gen) for s in shapes]
    now = [s0 + 1e-2 * torch.randn(s0.shape, generator=gen) for s0 in start]
    prev = [s0.clone() for s0 in start]
    rs.project_update(now, prev)
    for si, idx in enumerate(pieces):
        delta = sub(now, idx) - sub(start, idx)
        for j in range(4):
            grj = sub(_split(gr[:, j], shapes), idx)
            assert (grj @ delta).abs() <= 1e-5 * grj.norm() * delta.norm() + 1e-7 * grj.norm()


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_dependent_duplicate_and_zero_gradients_are_dropped(backend):
    rs = RetainSubspace(_params(), rank=8, scope="group", backend=backend)
    d = sum(_numel(s) for s in SHAPES)
    gr = _retain_grads(d, 3, 10.0)
    rs.add(_split(gr[:, 0], SHAPES))
    rs.add(_split(gr[:, 1], SHAPES))
    assert rs.rank == [2]
    assert rs.add(_split(gr[:, 0], SHAPES))["dropped"] == 1  # duplicate
    assert rs.add(_split(2 * gr[:, 0] - 3 * gr[:, 1], SHAPES))["dropped"] == 1  # in the span
    assert rs.add(_params())["dropped"] == 1  # zero
    assert rs.rank == [2] and rs.dropped == 3
    rs.add(_split(gr[:, 2], SHAPES))
    assert rs.rank == [3]


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_empty_basis_and_zero_gradient_are_no_ops(backend):
    rs = RetainSubspace(_params(), rank=4, backend=backend)
    g = [torch.randn(s) for s in SHAPES]
    e = [x.clone() for x in g]
    before, after = rs.project(e)
    assert all(torch.equal(a, b) for a, b in zip(e, g))
    assert torch.allclose(before, after)
    z = _params()
    rs.add(_split(_retain_grads(sum(_numel(s) for s in SHAPES), 1, 1.0)[:, 0], SHAPES))
    rs.project(z)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in z)


@pytest.mark.parametrize("orth", ["cgs2", "cholqr2"])
def test_fifo_replaces_the_oldest_and_freeze_keeps_the_first(orth):
    d = sum(_numel(s) for s in SHAPES)
    gr = _retain_grads(d, 4, 10.0)
    fifo = RetainSubspace(_params(), rank=2, scope="group", orthogonalize=orth)
    frozen = RetainSubspace(_params(), rank=2, scope="group", orthogonalize=orth, when_full="freeze")
    for j in range(4):
        fifo.add(_split(gr[:, j], SHAPES))
        frozen.add(_split(gr[:, j], SHAPES))
    g32 = [_flat(_split(gr[:, j], SHAPES)) for j in range(4)]
    # the reference (fp64 QR): FIFO drops the oldest *direction*, then orthonormalises the new one
    ref = torch.zeros(d, 0, dtype=torch.float64)
    for g in g32:
        if ref.shape[1] == 2:
            ref = ref[:, 1:]
        ref, _ = torch.linalg.qr(torch.cat([ref, g[:, None]], 1))
    first, _ = torch.linalg.qr(torch.stack(g32[:2], 1))
    for rs, r in ((fifo, ref), (frozen, first)):
        q = _group_basis(rs)
        assert q.shape[0] == 2
        assert torch.linalg.matrix_norm(q.T @ q - r @ r.T, 2) <= 1e-5
    assert fifo.added == 4 and frozen.added == 2


def test_tensor_scope_keeps_a_rank_per_tensor_and_dtypes_follow_the_parameters():
    ps = [torch.zeros(5, 3, dtype=torch.float64), torch.zeros(7, dtype=torch.bfloat16), torch.zeros(4)]
    rs = RetainSubspace([("a", ps[0]), ("b", ps[1]), ("c", ps[2])], rank=3)
    assert [s.dtype for s in rs.storage] == [torch.float64, torch.float32, torch.float32]
    rs.add([torch.randn(5, 3, dtype=torch.float64), torch.randn(7).bfloat16(), torch.zeros(4)])
    assert rs.ranks() == {"a": 1, "b": 1, "c": 0}
    assert rs.memory() == {"a": 4 * 15 * 8, "b": 4 * 7 * 4, "c": 4 * 4 * 4}  # rank + 1 rows (fifo's spare)
    assert rs.memory_bytes == sum(rs.memory().values())
    g = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7).bfloat16(), torch.randn(4)]
    rs.project(g)
    q0 = rs.basis(0).reshape(-1)
    assert abs(float(q0 @ g[0].reshape(-1))) <= 1e-12 * float(g[0].norm())


def test_state_dict_round_trip_and_a_basis_built_for_other_shapes():
    d = sum(_numel(s) for s in SHAPES)
    gr = _retain_grads(d, 3, 10.0)
    rs = RetainSubspace(_params(), rank=4)
    for j in range(3):
        rs.add(_split(gr[:, j], SHAPES))
    other = RetainSubspace(_params(), rank=4)
    other.load_state_dict(rs.state_dict())
    assert other.rank == rs.rank and all(torch.equal(a, b) for a, b in zip(other.storage, rs.storage))
    wrong = RetainSubspace(_params([(7, 5), (12,), (3, 4, 2), (0, 3)]), rank=4)
    with pytest.raises(ValueError, match=r"basis 1 \(1\) was built for shape \[13\] torch.float32, this tensor is \[12\]"):
        wrong.load_state_dict(rs.state_dict())
    with pytest.raises(ValueError, match="the saved subspace has rank=4, this one 3"):
        RetainSubspace(_params(), rank=3).load_state_dict(rs.state_dict())


def test_bad_input_gets_clear_errors():
    ps = _params()
    with pytest.raises(ValueError, match="params: expected at least one tensor"):
        RetainSubspace([])
    with pytest.raises(TypeError, match=r"params\[1\] must be a floating-point tensor, got torch.int64"):
        RetainSubspace([torch.zeros(3), torch.zeros(3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 16\], got 17"):
        RetainSubspace(ps, rank=17)
    with pytest.raises(ValueError, match=r"threshold must be a number in \[0, 1\), got -0.1"):
        RetainSubspace(ps, threshold=-0.1)
    with pytest.raises(ValueError, match="scope must be one of"):
        RetainSubspace(ps, scope="layer")
    rs = RetainSubspace(ps)
    with pytest.raises(ValueError, match=r"grads: expected one tensor per parameter \(4\), got 3"):
        rs.add([torch.zeros(s) for s in SHAPES[:3]])
    with pytest.raises(ValueError, match=r"grads\[1\] \(1\) must have the shape \[13\] the subspace was built for, got \[12\]"):
        rs.project([torch.zeros(7, 5), torch.zeros(12), torch.zeros(3, 4, 2), torch.zeros(0, 3)])
    with pytest.raises(ValueError, match=r"exp_avg_sq: expected one tensor per parameter"):
        rs.project(_params(), exp_avg_sq=_params()[:2])


# ------------------------------------------------------------------------------------------------
# two gloo processes, each holding a shard of every tensor, equal one process with the whole
# ------------------------------------------------------------------------------------------------

DIST_SHAPES = [(9, 4), (7,), (5, 6)]


def _dist_inputs():
    d = sum(_numel(s) for s in DIST_SHAPES)
    gr = _retain_grads(d, 5, 1e3, seed=5)
    g = torch.randn(d, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    v = torch.rand(d, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 1e-2
    return gr, g, v


def _run_subspace(shapes, grs, g, v, group=None, shard=None, dtensor_mesh=None):
    """Adds the retain gradients and projects g (Euclidean, then a copy in the Adam metric);
    shard(t) -> the local part of a whole tensor t when sharding by hand."""
    cut = shard or (lambda t: t)
    ps = [cut(torch.zeros(s)) for s in shapes]
    if dtensor_mesh is not None:
        from torch.distributed.tensor import Shard, distribute_tensor

        ps = [distribute_tensor(torch.zeros(s), dtensor_mesh, [Shard(0)]) for s in shapes]
        cut = lambda t: t  # noqa: E731  (the DTensors' local shards are found by the subspace)
        wrap = lambda t: distribute_tensor(t, dtensor_mesh, [Shard(0)])  # noqa: E731
    else:
        wrap = cut
    rs = RetainSubspace(ps, rank=4, scope="group", process_group=group)
    for j in range(grs.shape[1]):
        rs.add([wrap(t) for t in _split(grs[:, j], shapes)])
    e = [wrap(t) for t in _split(g, shapes)]
    n_e = rs.project(e)
    a = [wrap(t) for t in _split(g, shapes)]
    n_a = rs.project(a, exp_avg_sq=[wrap(t) for t in _split(v, shapes)])
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    return ([local(x) for x in e], [local(x) for x in a], n_e, n_a, rs.rank,
            [rs.basis(i).clone() for i in range(len(shapes))])


def _worker(rank, world, port, out, use_dtensor):
    with gloo.process_group(rank, world, port) as dist:
        gr, g, v = _dist_inputs()
        if use_dtensor:
            from torch.distributed.device_mesh import init_device_mesh

            res = _run_subspace(DIST_SHAPES, gr, g, v, dtensor_mesh=init_device_mesh("cpu", (world,)))
        else:
            def shard(t):  # uneven shards along dim 0: rank 0 gets the larger part
                n = t.shape[0]
                cut = (n + 1) // 2
                return (t[:cut] if rank == 0 else t[cut:]).contiguous()
            res = _run_subspace(DIST_SHAPES, gr, g, v, group=dist.group.WORLD, shard=shard)
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("use_dtensor", [False, True], ids=["local-shards", "dtensor"])
def test_two_gloo_processes_with_shards_equal_one_process(tmp_path, use_dtensor):
    import torch.multiprocessing as mp

    mp.start_processes(_worker, args=(2, gloo.free_port(), str(tmp_path), use_dtensor), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    gr, g, v = _dist_inputs()
    whole = _run_subspace(DIST_SHAPES, gr, g, v)
    assert r0[4] == r1[4] == whole[4]  # the same rank everywhere
    for k in (2, 3):  # the norms: all-reduced, the same on both ranks and as one process
        for a, b, c in zip(r0[k], r1[k], whole[k]):
            assert torch.allclose(a, c, rtol=1e-5) and torch.allclose(b, c, rtol=1e-5)
    for k in (0, 1, 5):  # the projected gradients and the basis: the shards of one process's
        for t in range(len(DIST_SHAPES)):
            joined = torch.cat([r0[k][t], r1[k][t]], dim=1 if k == 5 else 0)
            assert torch.allclose(joined, whole[k][t], atol=1e-5), (k, t)
