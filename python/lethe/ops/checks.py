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
    """x as an int: Python and numpy integers, not bool."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(x).__name__}")
    return int(x)


def number(x, name: str) -> float:
    """x as a float: Python and numpy numbers, not bool."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(x).__name__}")
    return float(x)


def row_vector(t, name: str, n: int, ref: torch.Tensor, ref_name: str) -> None:
    """An optional float vector [N] on ref's device (row_weight, grad_row_scale, grad_loss, lse)."""
    if t is None:
        return
    float_tensor(t, name)
    same_device(t, name, ref, ref_name)
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must have shape [N] = [{n}], got {shape(t)}")
