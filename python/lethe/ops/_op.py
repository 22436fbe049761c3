"""One declaration per op.

`define_op(schema, ...)` declares lethe::<name> once, from its schema string:
  * the schema itself (the compiled library only registers kernels for it, with
    TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda);
  * its fake kernel (shapes for torch.compile and meta tensors), which runs the op's check first;
  * its autograd, whose backward returns the gradients by argument name;
  * its Triton twin lethe::<name>_triton: the same schema, fake kernel and autograd, and an
    implementation that runs the op's check and then the launcher in lethe.triton_kernels;
  * its row in OPS, which lethe.info, the backend choice and the build tests read.

The op's check (one Python function per op, `check(*args, values)`) is the Python side of the
argument checks; the C++ side (csrc/include/lethe/<family>_checks.h) words every error the same
way. `values` says whether the check may read tensor values (a host sync on a GPU): the Triton
twin and the reference path pass True, the fake kernel False.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable, Optional

import torch

from lethe import _lib

# One fragment of the lethe namespace holds every schema declared here (the compiled library
# declares none). Kept alive for the life of the process.
_LIB = torch.library.Library("lethe", "FRAGMENT")

OPS: dict = {}  # name -> Op, in declaration order


class Op:
    """A declared op: `op.native` is torch.ops.lethe.<name>, `op.twin` its Triton twin."""

    def __init__(self, name: str, schema, kernels: tuple, triton: Optional[str], check: Callable,
                 defined: bool):
        self.name = name
        self.schema = schema  # torch._C.FunctionSchema
        self.arg_names = tuple(a.name for a in schema.arguments)
        self.kernels = kernels  # compiled kernels the op has: "cpu", "cuda"
        self.triton = triton  # "module.function" in lethe.triton_kernels, or None
        self.check = check
        self.defined = defined  # False when a stale compiled library's kernel clashed with it

    @property
    def backends(self) -> tuple:
        return self.kernels + (("triton",) if self.triton else ())

    @property
    def native(self):
        return getattr(torch.ops.lethe, self.name)

    @property
    def twin(self):
        return getattr(torch.ops.lethe, self.name + "_triton")

    def kernel(self, which: str):
        """The op that runs `which` ("native" or "triton")."""
        return self.native if which == "native" else self.twin

    def bind(self, args, kwargs=None) -> list:
        """Every argument in schema order, defaults filled in."""
        return _bind(self.schema, args, kwargs or {})


def _bind(schema, args, kwargs) -> list:
    out = list(args)
    for a in schema.arguments[len(args):]:
        if a.name in kwargs:
            out.append(kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            raise TypeError(f"lethe::{schema.name.split('::')[-1]}() missing argument {a.name!r}")
    return out


def _triton_function(path: str) -> Callable:
    module, _, fn = path.rpartition(".")
    return getattr(importlib.import_module(f"lethe.triton_kernels.{module}"), fn)


def triton_importable(path: str) -> bool:
    from lethe.ops import _backend

    return _backend.triton_available() and _backend.module_exists(
        "lethe.triton_kernels." + path.rpartition(".")[0])


_stale_warned = False


def _warn_stale(name: str, why: str) -> None:
    global _stale_warned
    if not _stale_warned:
        _stale_warned = True
        warnings.warn(f"lethe: the compiled library {why} lethe::{name} (built from older sources?); "
                      "such ops run their pure-PyTorch reference. Rebuild to use the kernels "
                      "(`pip install --no-build-isolation -e .`).", RuntimeWarning, stacklevel=3)


def _define(schema_str: str) -> bool:
    try:
        _LIB.define(schema_str)
        return True
    except RuntimeError as e:  # a stale library registered a kernel of another signature
        _warn_stale(schema_str.split("(")[0], f"could not be matched ({str(e).splitlines()[0]}) with")
        return False


def define_op(schema: str, *, check: Callable, fake: Callable, kernels: tuple = ("cpu", "cuda"),
              triton: Optional[str] = None, triton_kwargs: Optional[Callable] = None,
              backward: Optional[Callable] = None, setup_context: Optional[Callable] = None) -> Op:
    """Declare lethe::<name> from `schema` (without the namespace).

    check(*args, values): raises TypeError / ValueError naming the argument. fake(*args): outputs
    of the right shapes. kernels: the compiled kernels the op has. triton: the launcher in
    lethe.triton_kernels ("module.function", called with the op's arguments, plus the keyword
    arguments triton_kwargs(*args) returns). backward(ctx, which, *grads) -> {argument: gradient}
    and setup_context(ctx, args: {argument: value}, output), for an op with autograd."""
    name = schema.split("(", 1)[0].strip()
    defined = _define(schema)
    parsed = torch._C.parse_schema(f"lethe::{schema}")
    op = Op(name, parsed, tuple(kernels), triton if defined else None, check, defined)
    OPS[name] = op
    if not defined:
        return op
    if _lib.available():
        for k in kernels:
            if not _lib.has_kernel(name, k.upper()) and (k == "cpu" or _lib.build_info()["cuda"]):
                _warn_stale(name, f"has no {k.upper()} kernel of")

    def fake_impl(*args, **kwargs):
        a = _bind(parsed, args, kwargs)
        check(*a, values=False)
        return fake(*a)

    torch.library.register_fake(f"lethe::{name}", fake_impl, lib=_LIB)
    twin = None
    if triton and triton_importable(triton):
        twin = f"{name}_triton"
        if not _define(schema.replace(name, twin, 1)):
            twin = None
    if twin:
        def twin_impl(*args, **kwargs):
            a = _bind(parsed, args, kwargs)
            check(*a, values=True)
            extra = triton_kwargs(*a) if triton_kwargs else {}
            return _triton_function(triton)(*a, **extra)

        _LIB.impl(twin, twin_impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"lethe::{twin}", fake_impl, lib=_LIB)
    else:
        op.triton = None
    if backward is not None:
        for which, opname in (("native", name), ("triton", twin)):
            if opname:
                torch.library.register_autograd(
                    f"lethe::{opname}", _labelled_backward(parsed, backward, which),
                    setup_context=_named_setup(parsed, setup_context), lib=_LIB)
    return op


def _named_setup(schema, setup_context):
    names = [a.name for a in schema.arguments]

    def setup(ctx, inputs, output):
        setup_context(ctx, dict(zip(names, inputs)), output)
    return setup


def _labelled_backward(schema, backward, which):
    names = [a.name for a in schema.arguments]

    def bw(ctx, *grads):
        return gradients(names, backward(ctx, which, *grads))
    return bw


def gradients(names, given: dict) -> tuple:
    """The positional gradients autograd expects, from {argument name: gradient}; every argument
    not named gets None."""
    unknown = set(given) - set(names)
    if unknown:
        raise KeyError(f"gradients for unknown arguments {sorted(unknown)}; the arguments are {names}")
    return tuple(given.get(n) for n in names)
