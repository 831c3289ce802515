"""CUDA's and NCCL's rules, checked on a CPU run: a host-sync counter and a strict-NCCL mode.

megamoe's CI has no GPU and the GPU machine it borrows has one, so NCCL's and CUDA's rules
must be enforced where gloo and the CPU would let a violation pass.

:class:`HostSyncCounter` (a ``TorchDispatchMode``, so autograd's backward and activation
recompute are counted) counts the calls that make a CUDA host wait for the device:
``.item()`` / ``bool()`` / ``int()`` of a tensor, ``.tolist()`` / ``.cpu()`` / ``.numpy()``
(patched while counting: on CPU they skip the dispatcher), ``nonzero``, ``masked_select``,
boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ``bincount`` /
``unique`` (their output size is data), and tensors built from host data (``torch.tensor``).
Each count records the innermost megamoe line, so a failing budget names it; data loading
(host tensors by design) is not counted. tests/moe/test_host_syncs.py and
tests/train/test_host_syncs.py hold the budget.

Strict-NCCL mode (:func:`enable_strict_nccl`, on when ``MEGAMOE_STRICT_NCCL=1``; the test
suite sets it for every rank it starts), three rules:

1. **No host tensor reaches a collective.** NCCL takes CUDA tensors only. Every tensor built
   from host data without a device (``torch.tensor(...)``, ``torch.zeros(n)``, ``.cpu()``, ...;
   on a GPU run these are CPU tensors) is tagged, the tag follows ops whose tensor inputs are
   all tagged, and a raw ``torch.distributed`` collective that receives a tagged tensor raises.
   ``megamoe.comm`` is the sanctioned path: it moves a host control scalar to the group's
   device itself, so its calls pass (its own placement rule is tested with CUDA mocked in
   tests/test_comm.py). Module buffers and parameters are not tagged (``module.to(device)``
   moves them on a GPU run), nor is what ``.to(...)`` returns; a CPU run's ``.cpu()`` returns
   its input, so only a copy is tagged. The tagging is a rehearsal, not a proof: a host tensor
   that passes through an op with a device tensor loses its tag.
2. **Every rank of a group issues the same collectives in the same order.** torch's own
   check: ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` wraps each process group in c10d's
   ``ProcessGroupWrapper``, which compares each collective's fingerprint (sequence number,
   op, shapes, dtypes) over the group before running it and raises on the first mismatch,
   where NCCL would hang or corrupt silently.
3. **A short collective timeout** (``MEGAMOE_STRICT_NCCL_TIMEOUT_S``, default 120 s, against
   gloo's 30 minutes), so one rank working alone while the others wait in a collective fails
   the run instead of passing slowly.

Trap: the mode is process-wide and thread-local (torch's function-mode stack): collectives
issued from another thread are not checked for host tensors (the fingerprint check still
applies).
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ENV = "MEGAMOE_STRICT_NCCL"
TIMEOUT_ENV = "MEGAMOE_STRICT_NCCL_TIMEOUT_S"
_PACKAGE = os.path.dirname(os.path.abspath(__file__))

# ---- host syncs -------------------------------------------------------------------------------
_aten = torch.ops.aten
_DATA_SIZED = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.masked_select.default,
               _aten.bincount.default, _aten._unique2.default, _aten.unique_dim.default,
               _aten.unique_consecutive.default, _aten.lift_fresh.default}
_HOST_COPIES = ("tolist", "cpu", "numpy")  # Tensor methods that never reach the dispatcher on CPU


def _is_sync(func, args, kwargs) -> bool:
    if func in _DATA_SIZED:
        return True
    if func is _aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    return False


_HOST_SIDE = os.path.join("torch", "utils", "data", "")  # data loading: host tensors by design, no device


def _where() -> str | None:
    """``file:line`` of the innermost megamoe frame of the caller (or the innermost frame); None
    inside data loading, whose tensors are the host's own (no device to wait for)."""
    frames = [f for f in traceback.extract_stack()[:-1] if f.filename != __file__]
    if any(_HOST_SIDE in f.filename for f in frames):
        return None
    for f in reversed(frames):
        if f.filename.startswith(_PACKAGE):
            return f"{os.path.relpath(f.filename, os.path.dirname(_PACKAGE))}:{f.lineno}"
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as c: ...``; then ``c.total`` and ``c.sites`` ({"file:line op": n}).

    A dispatch mode, so autograd's backward and activation recompute are counted too (a
    function mode is cleared inside the engine); ``.tolist()`` / ``.cpu()`` / ``.numpy()``,
    which skip the dispatcher on CPU tensors, are counted by patching them while it is active."""

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()
        self._saved = {}
        self._depth = 0

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def _count(self, what: str) -> None:
        where = _where()
        if where is not None:
            self.sites[f"{where} {what}"] += 1

    def __enter__(self):
        for name in _HOST_COPIES:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def patched(t, *a, _original=original, _name=name, **k):
                if self._depth == 0:  # a function mode re-enters the patched method once more: count once
                    self._count(_name)
                self._depth += 1
                try:
                    return _original(t, *a, **k)
                finally:
                    self._depth -= 1

            setattr(torch.Tensor, name, patched)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._count(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)


# ---- strict NCCL ------------------------------------------------------------------------------
_FACTORIES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.linspace, torch.rand, torch.randn, torch.randint, torch.eye}
_HOST = "_megamoe_host"  # attribute set on tensors that a GPU run would hold on the host


class HostTensorTagger(TorchFunctionMode):
    """Tags tensors made on the host (see the module docstring, rule 1)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _FACTORIES:
            host = kwargs.get("device") is None and not (func in (torch.tensor, torch.as_tensor) and args
                                                         and isinstance(args[0], torch.Tensor))
        elif func is torch.Tensor.to and (kwargs.get("device") is not None
                                          or any(isinstance(a, (torch.device, str)) for a in args[1:])):
            _untag(out)  # moved to a device (on a GPU run, the model's)
            return out
        elif func is torch.Tensor.cpu:
            host = out is not args[0]  # a CPU run's .cpu() returns its input: tagging it would tag a device tensor
        else:
            inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            host = bool(inputs) and all(getattr(a, _HOST, False) for a in inputs)
        if host:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                    try:
                        setattr(t, _HOST, True)
                    except (AttributeError, RuntimeError):  # e.g. tensors without a __dict__
                        pass
        return out


def is_host_tensor(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
                "isend", "irecv")
_COMM = os.path.join(_PACKAGE, "comm.py")
_state: dict = {}


class HostTensorInCollective(RuntimeError):
    pass


_TORCH = os.path.dirname(torch.__file__)


def _caller_file() -> str:
    """The first file up the stack outside torch and this module (torch's function-mode handling
    re-enters a wrapped collective from its own frames)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename == __file__
                                 or frame.f_code.co_filename.startswith(_TORCH)):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _checked(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _caller_file() != _COMM:  # megamoe.comm places its tensors itself
            hosts = [t for t in tree_flatten((args, kwargs))[0] if is_host_tensor(t)]
            if hosts:
                raise HostTensorInCollective(
                    f"strict NCCL: torch.distributed.{name} got a tensor built on the host "
                    f"({tuple(hosts[0].shape)} {hosts[0].dtype}) at {_where()}; NCCL rejects CPU tensors: create it "
                    "on the model's device, or send it through megamoe.comm, which places it")
        return fn(*args, **kwargs)

    return wrapper


def strict_nccl_requested() -> bool:
    return os.environ.get(ENV, "0") not in ("", "0")


def strict_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "120")))


def prepare_strict_nccl() -> None:
    """Before ``init_process_group``: groups made from now on get c10d's fingerprint wrapper."""
    dist.set_debug_level(dist.DebugLevel.DETAIL)


def enable_strict_nccl(host_tensors_refused: bool = True) -> None:
    """Rules 1 and 3 for this process (rule 2 comes from :func:`prepare_strict_nccl`). Idempotent.
    ``host_tensors_refused=False`` for a world that is gloo on a GPU machine too (evaluation,
    export: ``init_cpu_parallel``), where host tensors are what its collectives take."""
    if _state.get("enabled") or not host_tensors_refused:
        _state["enabled"] = _state.get("enabled", False) or host_tensors_refused
        return
    _state["enabled"] = True
    wrappers: dict[int, object] = {}  # one wrapper per function: c10d's P2POp checks `op in [isend, irecv]`
    for name in _COLLECTIVES:
        for module in (dist, dist.distributed_c10d):
            fn = getattr(module, name, None)
            if fn is not None and not getattr(fn, "_megamoe_checked", False):
                if id(fn) not in wrappers:
                    wrappers[id(fn)] = _checked(name, fn)
                    wrappers[id(fn)]._megamoe_checked = True
                setattr(module, name, wrappers[id(fn)])
    _untag_module_buffers()
    _state["tagger"] = HostTensorTagger()
    _state["tagger"].__enter__()


def _untag(t) -> None:
    if isinstance(t, torch.Tensor) and getattr(t, _HOST, False):
        setattr(t, _HOST, False)


def _untag_module_buffers() -> None:
    """A module's buffers are built on the host on a GPU run too, and ``module.to(device)`` moves
    them; a CPU run's models are never moved, so a buffer (a hash table, an expert bias) is model
    state, not a host tensor."""
    register_buffer, setattr_ = torch.nn.Module.register_buffer, torch.nn.Module.__setattr__

    def register(self, name, tensor, persistent=True):
        _untag(tensor)
        return register_buffer(self, name, tensor, persistent)

    def assign(self, name, value):
        setattr_(self, name, value)
        if isinstance(value, torch.Tensor) and name in self.__dict__.get("_buffers", ()):
            _untag(value)

    torch.nn.Module.register_buffer, torch.nn.Module.__setattr__ = register, assign


def strict_nccl_enabled() -> bool:
    return bool(_state.get("enabled"))


