"""quant family: INT-k / NF4 fake quantisation with a straight-through estimator.

Public entry: fake_quantize(x, preset, ...). The op itself, lethe::fake_quantize, works on
contiguous groups of group_size elements; this layer turns a user's granularity (per-tensor,
per-row, groups along the last dimension) and preset into those arguments, checks them, picks the
backend and wires autograd (straight-through: identity, or clipped to the unclamped codes).

Non-finite input: a group (row, block, or the whole tensor, by granularity) that holds an Inf or a
NaN quantises to NaN throughout, since its scale is not finite; under ste="clipped" its gradient is
zero, under ste="identity" the gradient passes unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch

from lethe.ops import _backend
from lethe.ops import checks as C
from lethe.ops._op import define_op
from lethe.ops.quant_reference import fake_quantize_reference, nf4_tables

__all__ = ["QuantSpec", "PRESETS", "quant_spec", "fake_quantize"]

GRANULARITIES = ("tensor", "row", "group")
CODEBOOKS = {"int": 0, "nf4": 1}
SCALE_RULES = ("qmax", "qmax+0.5")
STES = ("identity", "clipped")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """What a fake quantiser does.

    bits: 2..8 (4 for nf4). granularity: "tensor", "row" (each slice along the last dimension) or
    "group" (runs of group_size along the last dimension). symmetric: absmax scaling with codes in
    [-2^(b-1), 2^(b-1)-1], else min/max with a zero point and codes in [0, 2^b-1]. scale_rule
    (symmetric only): "qmax" = absmax / (2^(b-1)-1) (DurableUn's absmax/7 at 4 bits) or
    "qmax+0.5" = absmax / (2^(b-1)-0.5) (torchao's absmax/7.5), or a positive divisor.
    codebook: "int" (uniform) or "nf4" (the 16 NF4 levels, absmax scaling)."""

    bits: int = 4
    granularity: str = "group"
    group_size: Optional[int] = 128
    symmetric: bool = True
    scale_rule: Union[str, float] = "qmax"
    codebook: str = "int"

    def __post_init__(self):
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {type(self.symmetric).__name__} {self.symmetric!r}")
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"codebook must be one of {tuple(CODEBOOKS)}, got {self.codebook!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"bits must be an int, got {type(self.bits).__name__}")
        if self.codebook == "nf4" and self.bits != 4:
            raise ValueError(f"bits must be 4 for the nf4 codebook, got {self.bits}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in [2, 8], got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive int for granularity='group', got {self.group_size!r}")
        if isinstance(self.scale_rule, str):
            if self.scale_rule not in SCALE_RULES:
                raise ValueError(f"scale_rule must be one of {SCALE_RULES} or a positive number, got {self.scale_rule!r}")
        elif not (isinstance(self.scale_rule, (int, float)) and 0 < float(self.scale_rule) < float("inf")):
            raise ValueError(f"scale_rule must be one of {SCALE_RULES} or a positive number, got {self.scale_rule!r}")

    @property
    def scale_div(self) -> float:
        if self.codebook == "nf4" or not self.symmetric:
            return 1.0
        qmax = 2 ** (self.bits - 1) - 1
        if self.scale_rule == "qmax":
            return float(qmax)
        if self.scale_rule == "qmax+0.5":
            return qmax + 0.5
        return float(self.scale_rule)

    def group_length(self, x: torch.Tensor) -> int:
        """Length of the contiguous groups the op works on, for a tensor shaped like x."""
        last = x.shape[-1] if x.dim() > 0 else 1
        if self.granularity == "tensor":
            return max(x.numel(), 1)
        if self.granularity == "row":
            return max(last, 1)
        if last % self.group_size != 0:
            raise ValueError(
                f"group_size={self.group_size} must divide the last dimension of x "
                f"(shape {tuple(x.shape)})"
            )
        return self.group_size


PRESETS = {
    # DurableUn "paper" preset: symmetric per-row absmax/7, codes in [-8, 7].
    "paper-int4": QuantSpec(bits=4, granularity="row", group_size=None, symmetric=True, scale_rule="qmax"),
    # torchao convention: groups of 128, absmax/7.5.
    "int4-g128": QuantSpec(bits=4, granularity="group", group_size=128, symmetric=True, scale_rule="qmax+0.5"),
    "int4-g128-asym": QuantSpec(bits=4, granularity="group", group_size=128, symmetric=False),
    "nf4-b64": QuantSpec(bits=4, granularity="group", group_size=64, codebook="nf4"),
    "int8": QuantSpec(bits=8, granularity="tensor", group_size=None, symmetric=True, scale_rule="qmax"),
}


def quant_spec(preset: Union[str, QuantSpec, None] = None, **overrides) -> QuantSpec:
    """A QuantSpec from a preset name (see PRESETS) or spec, with fields overridden by keyword."""
    if preset is None:
        base = QuantSpec()
    elif isinstance(preset, QuantSpec):
        base = preset
    elif isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)} or a QuantSpec, got {preset!r}")
        base = PRESETS[preset]
    else:
        raise TypeError(f"preset must be a str or QuantSpec, got {type(preset).__name__}")
    fields = {k: v for k, v in overrides.items() if v is not None}
    if not fields:
        return base
    unknown = set(fields) - {f.name for f in dataclasses.fields(QuantSpec)}
    if unknown:
        raise TypeError(f"unknown quantisation arguments: {sorted(unknown)}")
    if fields.get("granularity") == "group" and "group_size" not in fields and base.group_size is None:
        raise ValueError("group_size is required for granularity='group'")
    return dataclasses.replace(base, **fields)


def _check_x(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"x must be a float32, float16 or bfloat16 tensor, got {x.dtype}"
            + (" (integer and complex tensors cannot be fake-quantised)" if not x.is_floating_point() else "")
        )


def fake_quantize(
    x: torch.Tensor,
    preset: Union[str, QuantSpec, None] = None,
    *,
    bits: Optional[int] = None,
    granularity: Optional[str] = None,
    group_size: Optional[int] = None,
    symmetric: Optional[bool] = None,
    scale_rule: Union[str, float, None] = None,
    codebook: Optional[str] = None,
    ste: str = "identity",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Quantise and dequantise x in one pass; backward is a straight-through estimator.

    preset: one of "paper-int4", "int4-g128", "int4-g128-asym", "nf4-b64", "int8", or a QuantSpec;
    keyword arguments override its fields (see QuantSpec). ste: "identity" passes the gradient
    unchanged; "clipped" zeroes it where the code was clamped to the integer range.
    backend: "auto" (default, or LETHE_BACKEND), "native", "triton" or "reference".
    Rounding is half to even; the result has x's dtype and shape, computed in fp32."""
    _check_x(x)
    if ste not in STES:
        raise ValueError(f"ste must be one of {STES}, got {ste!r}")
    spec = quant_spec(preset, bits=bits, granularity=granularity, group_size=group_size,
                      symmetric=symmetric, scale_rule=scale_rule, codebook=codebook)
    L = spec.group_length(x)
    args = (L, spec.bits, CODEBOOKS[spec.codebook], spec.symmetric, spec.scale_div)
    which = _backend.resolve(FAKE_QUANTIZE, x, backend)
    if which == "reference":
        check_fake_quantize(x, *args, ste == "clipped", values=True)
        return fake_quantize_reference(x, *args, ste=ste)
    y, _ = FAKE_QUANTIZE.kernel(which)(x, *args, ste == "clipped")
    return y


# ---- the ops: lethe::fake_quantize and lethe::fake_quantize_backward ----

def check_fake_quantize(x, group_size, bits, codebook, symmetric, scale_div, return_mask, values=False):
    """The op's argument checks (csrc/include/lethe/quant_checks.h words them the same way)."""
    C.float_tensor(x, "x")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if x.numel() % group_size != 0:
        raise ValueError(f"group_size ({group_size}) must divide the number of elements of x ({x.numel()})")
    if codebook not in (0, 1):
        raise ValueError(f"codebook must be 0 (int) or 1 (nf4), got {codebook}")
    if codebook == 1:
        if bits != 4:
            raise ValueError(f"bits must be 4 for the nf4 codebook, got {bits}")
    elif not 2 <= bits <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    elif symmetric and not (0.0 < scale_div < float("inf")):
        raise ValueError(f"scale_div must be a positive finite number, got {scale_div:g}")


def check_fake_quantize_backward(grad, mask, values=False):
    C.float_tensor(grad, "grad")
    C.dtype_tensor(mask, "mask", torch.bool)
    if mask.shape != grad.shape:
        raise ValueError(f"mask must have grad's shape {C.shape(grad)}, got {C.shape(mask)}")
    C.same_device(mask, "mask", grad, "grad")


def _fake(x, group_size, bits, codebook, symmetric, scale_div, return_mask):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    mask = x.new_empty(x.shape if return_mask else (0,), dtype=torch.bool)
    return y, mask


def _setup_context(ctx, args, output):
    ctx.clipped = args["return_mask"]
    ctx.save_for_backward(output[1] if ctx.clipped else None)


def _backward(ctx, which, grad_y, grad_mask):
    # the clipped STE's select runs as the op fake_quantize_backward of the same backend:
    # torch.where would allocate a fresh output, whose first-touch page faults on CPU cost
    # several times the select
    if ctx.clipped:
        (mask,) = ctx.saved_tensors
        grad_y = FAKE_QUANTIZE_BACKWARD.kernel(which)(grad_y, mask)
    return {"x": grad_y}


def _backward_op_setup(ctx, args, output):
    ctx.save_for_backward(args["mask"])


def _backward_op_backward(ctx, which, gg):  # linear in grad: the same select
    (mask,) = ctx.saved_tensors
    return {"grad": FAKE_QUANTIZE_BACKWARD.kernel(which)(gg, mask)}


_NF4: dict = {}


def _nf4_tables(x, *_):
    """The NF4 levels and midpoints on x's device, for the Triton launcher."""
    key = str(x.device)
    if key not in _NF4:
        _NF4[key] = tuple(t.contiguous() for t in nf4_tables(x.device))
    return {"tables": _NF4[key]}


# Quantise-dequantise contiguous groups of group_size elements; codebook 0 = uniform integer,
# 1 = NF4. Returns (y, mask); mask (the clipped STE's) is empty unless return_mask.
FAKE_QUANTIZE = define_op(
    "fake_quantize(Tensor x, int group_size, int bits, int codebook, bool symmetric, "
    "float scale_div, bool return_mask) -> (Tensor, Tensor)",
    check=check_fake_quantize, fake=_fake, triton="quant.fake_quantize", triton_kwargs=_nf4_tables,
    backward=_backward, setup_context=_setup_context)

# The clipped STE's backward: grad where mask, else 0 (grad's dtype and shape).
FAKE_QUANTIZE_BACKWARD = define_op(
    "fake_quantize_backward(Tensor grad, Tensor mask) -> Tensor",
    check=check_fake_quantize_backward,
    fake=lambda grad, mask: torch.empty_like(grad, memory_format=torch.contiguous_format),
    triton="quant.fake_quantize_backward", backward=_backward_op_backward,
    setup_context=_backward_op_setup)
