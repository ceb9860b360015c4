"""A logical compute device on a CPU-only machine, strict about device mixing like CUDA.

`fake_cuda()` makes `cuda:0` usable without a GPU: a tensor moved there with `.to("cuda")`,
`.cuda()` or created with `device="cuda"` is a `OnDevice` wrapper whose `.device` says
`cuda:0` while its values live in a CPU tensor. Every torch call is checked before it
runs; any mix that CUDA rejects raises `DeviceMixError`:

- a compute op (arithmetic, matmul, cat, where, ...) with non-scalar tensors on two devices
  (0-dim CPU tensors are allowed beside device tensors, as CUDA allows them);
- indexing (`t[idx]`, `t[idx] = v`) a CPU tensor with device indices, or writing device
  values into a CPU tensor (or non-scalar CPU values into a device tensor);
  CPU indices into a device tensor are allowed, as CUDA allows them.

Explicit transfers (`.to`, `.cuda`, `.cpu`, `copy_`) are the only way across. The few
`torch.cuda.*` calls the engine makes are patched (`is_available`, `mem_get_info`, ...), and
`pin_memory` returns an ordinary CPU tensor.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda:0")
CPU = torch.device("cpu")
FREE_BYTES = 8 * 2**30
TOTAL_BYTES = 16 * 2**30


class DeviceMixError(RuntimeError):
    """A call mixed devices the way CUDA refuses."""


class OnDevice(torch.Tensor):
    """A tensor on the logical device: metadata says cuda:0, values are `elem` on the CPU."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, device: torch.device = CUDA):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.size(),
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            layout=elem.layout,
            device=device,
            requires_grad=elem.requires_grad,
        )
        r.elem = elem
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by calls that bypass the function layer (autograd internals, C++ module code):
        # same rule, checked at the aten level.
        _check_same(str(func), [*tree_flatten(args)[0], *tree_flatten(kwargs or {})[0]])
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs or {}))
        return tree_map(lambda t: OnDevice(t) if isinstance(t, torch.Tensor) else t, out)


def _unwrap(t):
    return t.elem if isinstance(t, OnDevice) else t


def device_of(t) -> torch.device:
    return CUDA if isinstance(t, OnDevice) else CPU


def _is_logical(device) -> bool:
    if isinstance(device, OnDevice):
        return True
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return False


def _check_same(what: str, values) -> torch.device | None:
    """The one device of the non-scalar tensors in `values` (0-dim CPU tensors go anywhere)."""
    devices = {device_of(t) for t in values if isinstance(t, torch.Tensor) and (isinstance(t, OnDevice) or t.dim() > 0)}
    if len(devices) > 1:
        raise DeviceMixError(f"{what}: tensors on {sorted(map(str, devices))} in one op (CUDA refuses this)")
    return devices.pop() if devices else None


def _index_tensors(index) -> list[torch.Tensor]:
    items = index if isinstance(index, tuple) else (index,)
    return [i for i in tree_flatten(list(items))[0] if isinstance(i, torch.Tensor)]


def _check_index(what: str, self_t, index, value=None) -> None:
    dev = device_of(self_t)
    for idx in _index_tensors(index):
        if device_of(idx) != dev and not (dev == CUDA and device_of(idx) == CPU):
            raise DeviceMixError(f"{what}: a {dev} tensor indexed with indices on {device_of(idx)} (CUDA refuses this)")
    if (
        isinstance(value, torch.Tensor)
        and device_of(value) != dev
        and not (device_of(value) == CPU and value.dim() == 0)
    ):
        raise DeviceMixError(f"{what}: values on {device_of(value)} written into a {dev} tensor (CUDA refuses this)")


_TRANSFERS = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu}
_UNWRAP_TO_PYTHON = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__bool__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.__repr__,
    torch.Tensor.__format__,
}


def _transfer_target(func, self_t, args, kwargs) -> torch.device:
    if func is torch.Tensor.cuda:
        return CUDA
    if func is torch.Tensor.cpu:
        return CPU
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return device_of(a)
        if isinstance(a, (str, torch.device)):
            try:
                return CUDA if torch.device(a).type == "cuda" else CPU
            except RuntimeError:
                continue
    return device_of(self_t)


def _is_getter(func, attr: str) -> bool:
    """`func` is the getter of the tensor property `attr` (what the mode receives for `t.attr`)."""
    return getattr(func, "__name__", None) == "__get__" and getattr(func, "__self__", None) is getattr(
        torch._C.TensorBase, attr
    )


def _strip_device(value):
    if isinstance(value, (str, torch.device)) and _is_logical(value):
        return "cpu"
    return value


class FakeCudaMode(TorchFunctionMode):
    """Runs every torch call on the CPU while tracking and checking logical devices."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", str(func))
        if func is torch._has_compatible_shallow_copy_type:  # Module.to: swap `.data` only within one device
            return isinstance(args[0], OnDevice) == isinstance(args[1], OnDevice) and func(*map(_unwrap, args))
        if _is_getter(func, "device"):
            return device_of(args[0])
        if _is_getter(func, "is_cuda"):
            return isinstance(args[0], OnDevice)
        if func in _TRANSFERS:
            return self._transfer(func, args, kwargs)
        if func is torch.Tensor.copy_:
            out = func(_unwrap(args[0]), _unwrap(args[1]), *args[2:], **kwargs)
            return args[0]
        if func is torch.Tensor.pin_memory or func is torch.Tensor.is_pinned:
            return args[0].clone() if func is torch.Tensor.pin_memory else False
        if func in _UNWRAP_TO_PYTHON:
            return func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if func is torch.Tensor.__getitem__:
            _check_index(name, args[0], args[1])
        elif func is torch.Tensor.__setitem__:
            _check_index(name, args[0], args[1], args[2])
        else:
            _check_same(name, [*tree_flatten(args)[0], *tree_flatten(kwargs)[0]])
        target = None
        if "device" in kwargs:
            target = CUDA if _is_logical(kwargs["device"]) else CPU
            kwargs["device"] = _strip_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if target is None:
            target = CUDA if any(isinstance(t, OnDevice) for t in inputs) else CPU
        raw_args, raw_kwargs = tree_map(_unwrap, args), tree_map(_unwrap, kwargs)
        out = func(*raw_args, **raw_kwargs)
        originals = {id(_unwrap(t)): t for t in inputs}
        return tree_map(lambda t: self._wrap(t, target, originals), out)

    @staticmethod
    def _wrap(t, target, originals):
        if not isinstance(t, torch.Tensor):
            return t
        if id(t) in originals:  # an in-place op returns its input: keep the caller's object
            return originals[id(t)]
        return OnDevice(t) if target == CUDA and not isinstance(t, OnDevice) else t

    @staticmethod
    def _transfer(func, args, kwargs):
        self_t, rest = args[0], args[1:]
        target = _transfer_target(func, self_t, rest, kwargs)
        rest = tuple(_unwrap(_strip_device(a)) for a in rest)
        kw = {k: _unwrap(_strip_device(v)) for k, v in kwargs.items()}
        if func is not torch.Tensor.to:
            rest, kw = (), {k: v for k, v in kw.items() if k in ("memory_format",)}
            func = torch.Tensor.to
        elem = _unwrap(self_t)
        out = func(elem, *rest, **kw)
        if device_of(self_t) != target and out.untyped_storage().data_ptr() == elem.untyped_storage().data_ptr():
            out = out.clone()  # a transfer copies
        if target == CUDA:
            return self_t if out is elem else OnDevice(out)
        return out


@contextlib.contextmanager
def fake_cuda():
    """Inside: `cuda:0` is the logical device; torch.cuda's queries answer for one 16 GiB GPU."""
    patches = [
        mock.patch("torch.cuda.is_available", return_value=True),
        mock.patch("torch.cuda.device_count", return_value=1),
        mock.patch("torch.cuda.mem_get_info", return_value=(FREE_BYTES, TOTAL_BYTES)),
        mock.patch("torch.cuda.empty_cache"),
        mock.patch("torch.cuda.synchronize"),
        mock.patch("torch.cuda.reset_peak_memory_stats"),
        mock.patch("torch.cuda.max_memory_allocated", return_value=0),
        mock.patch("torch.cuda.memory_allocated", return_value=0),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        stack.enter_context(FakeCudaMode())
        yield
