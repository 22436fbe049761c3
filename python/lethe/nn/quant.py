"""Fake-quantised modules and a context manager that round-trips a model through a quantiser."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lethe.ops.quant import QuantSpec, fake_quantize, quant_spec

__all__ = ["FakeQuantLinear", "quantized_weights"]


class FakeQuantLinear(nn.Linear):
    """nn.Linear whose weight passes through fake_quantize on every forward (straight-through
    gradient to the full-precision weight), as quantisation-aware unlearning needs.

    preset / quantisation keywords: as lethe.ops.fake_quantize. enabled: switch the quantiser off
    to run the full-precision layer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 preset: Union[str, QuantSpec, None] = "int4-g128", ste: str = "identity",
                 backend: Optional[str] = None, device=None, dtype=None, **quant_kwargs):
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be torch.float32, torch.float16 or torch.bfloat16 (what fake_quantize "
                            f"takes), got {dtype}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.spec = quant_spec(preset, **quant_kwargs)
        self.spec.group_length(self.weight)  # fail now if the group size does not divide in_features
        if ste not in ("identity", "clipped"):
            raise ValueError(f"ste must be 'identity' or 'clipped', got {ste!r}")
        self.ste = ste
        self.backend = backend
        self.enabled = True

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "FakeQuantLinear":
        """A FakeQuantLinear sharing linear's parameters (no copy)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device="meta", **kwargs)
        m.weight = linear.weight
        m.bias = linear.bias
        return m

    def quantized_weight(self) -> torch.Tensor:
        return fake_quantize(self.weight, self.spec, ste=self.ste, backend=self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight() if self.enabled else self.weight
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, spec={self.spec}, ste={self.ste!r}"


def stores_weight_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as [in_features, out_features]: Hugging Face's Conv1D
    (GPT-2, GPT-J's predecessors), a linear layer despite its name."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or stores_weight_transposed(module)


def _selected_weights(model: nn.Module, modules) -> list[tuple[str, nn.Module]]:
    """(name, module) of each module whose weight the selection quantises, each weight once."""
    if modules == "all":
        # Every weight matrix (Linear, Embedding, convolutions, GPT-2's Conv1D): what weight-only
        # INT4 quantisers round. 1-D weights (norm gains) stay in full precision.
        pick = lambda m: isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() >= 2  # noqa: E731
    elif modules == "linear":
        pick = _is_linear
    elif isinstance(modules, type) or (isinstance(modules, tuple) and all(isinstance(t, type) for t in modules)):
        pick = lambda m: isinstance(m, modules)  # noqa: E731
    elif isinstance(modules, Iterable) and not isinstance(modules, str):
        names = set(modules)
        missing = names - {n for n, _ in model.named_modules()}
        if missing:
            raise ValueError(f"modules names {sorted(missing)} not found in the model")
        pick = None
    else:
        raise ValueError(
            f"modules must be 'all', 'linear', a module type (or tuple of types) or module names, got {modules!r}"
        )
    out, seen = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not ((pick(m) if pick is not None else name in names) and isinstance(getattr(m, "weight", None), torch.Tensor)):
            continue
        if torch.nn.utils.parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"module {name!r} computes its weight through a parametrization (weight_norm, ...): "
                             "quantise the module without it (torch.nn.utils.parametrize.remove_parametrizations)")
        w = m.weight
        # a weight shared by several modules (tied embeddings, or any shared storage) is quantised once
        key = (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride())
        if key in seen:
            continue
        other = next((n for k, n in seen.items() if k[0] == key[0] and key[0] != 0), None)
        if other is not None:
            raise ValueError(f"the weights of modules {other!r} and {name!r} share memory as different views; "
                             "quantising one would change the other")
        seen[key] = name
        out.append((name, m))
    return out


def _along_inputs(m: nn.Module) -> torch.Tensor:
    """The module's weight with its input features last (the axis INT4 quantisers group along)."""
    return m.weight.t() if stores_weight_transposed(m) else m.weight


@contextlib.contextmanager
def quantized_weights(model: nn.Module, preset: Union[str, QuantSpec] = "int4-g128", *,
                      modules="all", backend: Optional[str] = None, **quant_kwargs) -> Iterator[nn.Module]:
    """Within the block, the model's weights are replaced in place by their quantise-dequantise
    round trip; on exit (also on an exception) the original values are restored bit for bit.

    modules: "all" (every weight with two or more dimensions, as DurableUn's attack quantises the
    whole model), "linear" (nn.Linear and Hugging Face's Conv1D), a module type or tuple of types, or
    module names. Each weight is quantised along its input features (the last dimension of a
    Linear's or an Embedding's weight, the first of a Conv1D's); a weight shared by several modules
    (tied embeddings) is quantised once."""
    spec = quant_spec(preset, **quant_kwargs)
    chosen = _selected_weights(model, modules)
    for name, m in chosen:  # check every weight before touching anything
        if not m.weight.is_floating_point():
            raise TypeError(f"weight of module {name!r} is {m.weight.dtype}, expected a float tensor")
        try:
            spec.group_length(_along_inputs(m))
        except ValueError as e:
            raise ValueError(f"module {name!r}: {e}") from None
    saved = []
    try:
        with torch.no_grad():
            for name, m in chosen:
                w = m.weight
                saved.append((w, w.detach().clone()))
                q = fake_quantize(_along_inputs(m).detach(), spec, backend=backend)
                w.copy_(q.t() if stores_weight_transposed(m) else q)
        yield model
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)
