"""Argument checks shared by the op checks of every family (the Python side of
csrc/include/lethe/checks.h, worded the same way, so that the same bad input gets the same message
from every backend). Wrong types and dtypes raise TypeError; wrong shapes, devices and values
ValueError. Shapes print as lists, dtypes as torch.<name>, floats with %g."""
from __future__ import annotations

import numbers

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FLOAT_NAMES = "float32, float16 or bfloat16"


def shape(t: torch.Tensor) -> list:
    return list(t.shape)


def tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def float_tensor(t, name: str) -> None:
    tensor(t, name)
    if t.dtype not in FLOATS:
        raise TypeError(f"{name} must be {_FLOAT_NAMES}, got {t.dtype}")


def dtype_tensor(t, name: str, dtype: torch.dtype) -> None:
    tensor(t, name)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {str(dtype).replace('torch.', '')}, got {t.dtype}")


def dims(t: torch.Tensor, name: str, n: int, layout: str) -> None:
    if t.dim() != n:
        raise ValueError(f"{name} must be {n}-D {layout}, got shape {shape(t)}")


def same_device(t, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device ({ref.device}), got {t.device}")


def integer(x, name: str) -> int:
    """x as an int: Python and numpy integers, not bool, within the ops' 64-bit ints."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    if not -(2**63) <= int(x) < 2**63:
        raise ValueError(f"{name} must fit in 64 bits, got {int(x)}")
    return int(x)


def number(x, name: str) -> float:
    """x as a float: Python and numpy numbers, not bool."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    return float(x)


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., D] as [N, D] (N the product of the leading sizes: 0 and D = 0 included)."""
    n = 1
    for d in t.shape[:-1]:
        n *= d
    return t.reshape(n, t.shape[-1])


def no_grad_for(t, name: str, op: str) -> None:
    """The native and Triton kernels give no gradient for t: refuse it when autograd would want one."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but {op}'s native and Triton kernels compute no gradient for it: "
                         f"detach it, or use backend='reference'")


def no_double_backward(op: str) -> None:
    """Raised by a backward whose own gradient the kernels do not compute (create_graph=True)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: the native and Triton kernels' gradient is not differentiable (backward with "
                           f"create_graph=True); use backend='reference' for higher-order gradients")


def row_vector(t, name: str, n: int, ref: torch.Tensor, ref_name: str) -> None:
    """An optional float vector [N] on ref's device (row_weight, grad_row_scale, grad_loss, lse)."""
    if t is None:
        return
    float_tensor(t, name)
    same_device(t, name, ref, ref_name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}], got {shape(t)}")


def overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors' bytes overlap (same storage, intersecting ranges); never at trace time."""
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(a) or is_fake(b) or a.device.type == "meta":  # no addresses at trace time
        return False
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def no_overlap(outs, out_name: str, inputs) -> None:
    """No tensor of the list `outs` (written in place) shares a byte with another tensor of outs
    or of the input lists `inputs` ([(name, list)]); inputs may alias each other. The first overlap
    in address order is named: "<out>[i] must not overlap <other>[j]". One sort, O(T log T)."""
    from torch._subclasses.fake_tensor import is_fake

    iv = []
    for name, ts in [(out_name, outs)] + list(inputs):
        for j, t in enumerate(ts):
            if t.numel() == 0 or is_fake(t) or t.device.type == "meta":
                continue
            a = t.data_ptr()
            iv.append((a, a + t.numel() * t.element_size(), name, j, name == out_name))
    iv.sort(key=lambda v: (v[0], v[1]))
    last_all = last_out = None
    for v in iv:
        hit = last_all if v[4] else last_out
        if hit is not None and v[0] < hit[1]:
            out, other = (hit, v) if hit[4] else (v, hit)
            raise ValueError(f"{out[2]}[{out[3]}] must not overlap {other[2]}[{other[3]}]")
        if last_all is None or v[1] > last_all[1]:
            last_all = v
        if v[4] and (last_out is None or v[1] > last_out[1]):
            last_out = v
