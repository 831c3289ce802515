"""Canonical full ("unsharded") state dicts: the one mechanism behind tests, checkpoint
resharding and Hugging Face conversion.

``gather_full_state_dict(model)`` returns ``{canonical name: full tensor}`` on EVERY rank
(a collective: all ranks of the model must call it together). ``load_full_state_dict(model,
sd)`` takes the same mapping (e.g. produced under another TP/EP layout) and copies this
rank's shard into the model. Names and orientation are the ones in docs / common notes
(``[out, in]`` like ``nn.Linear``; expert index global).

How shards are found: module attribute names ARE the canonical names, so a dense parameter's
canonical key is its ``named_parameters`` name; a megatron-core TP parameter carries
``tensor_model_parallel=True`` and ``partition_dim`` (stride 1 everywhere here), so its full
tensor is the concatenation over TP ranks along that dim. MoE layers own their expert/EP
layout: any submodule with ``gather_full`` / ``load_full`` is delegated to.

``local_layout(model)`` (not collective) says which canonical elements each LOCAL tensor holds
(``Piece``: a box of a canonical tensor, possibly transposed locally), learned from the MoE
layers' own ``load_full``: universal checkpoints (megamoe/train/universal.py) write and read
through it, whatever the local expert layout.

Traps: non-persistent buffers (RoPE ``inv_freq``) and megatron's ``_extra_state`` are not
part of the contract; a tied LM head has no ``lm_head.weight`` (the key must be absent).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from megamoe import comm, parallel
from megamoe.errors import UserError


def _is_delegate(module: torch.nn.Module) -> bool:
    return hasattr(module, "gather_full") and hasattr(module, "load_full")


def _delegate_keys(module: torch.nn.Module, prefix: str) -> list[str]:
    """Canonical keys of an MoE layer without collectives: its own ``full_keys`` if it has one,
    else its local names with the local expert indices widened to all ``num_experts`` (module
    names are canonical names, experts keyed by global index)."""
    if hasattr(module, "full_keys"):
        return list(module.full_keys(prefix))
    names = [n for n, _ in module.named_parameters()]
    names += [n for n, _ in module.named_buffers() if _persistent(module, n)]
    keys: dict[str, None] = {}
    for name in names:
        m = re.match(r"(.*\bexperts)\.\d+\.(.*)", name)
        for e in range(module.num_experts) if m else [None]:
            keys[f"{prefix}{m.group(1)}.{e}.{m.group(2)}" if m else prefix + name] = None
    return list(keys)


def _persistent(module: torch.nn.Module, buffer_name: str) -> bool:
    *path, leaf = buffer_name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    return leaf not in owner._non_persistent_buffers_set


def _walk(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, object]]:
    """Yield ``(canonical name, tensor)`` for plain entries and ``(prefix, module)`` for MoE layers."""
    for name, p in module.named_parameters(recurse=False):
        yield prefix + name, p
    for name, b in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield prefix + name, b
    for name, child in module.named_children():
        if _is_delegate(child):
            yield prefix + name, child
        else:
            yield from _walk(child, f"{prefix}{name}.")


def _tp_dim(t: torch.Tensor) -> int | None:
    if getattr(t, "tensor_model_parallel", False) and parallel.tp_size() > 1:
        return t.partition_dim
    return None


def expected_keys(model: torch.nn.Module) -> list[str]:
    """The canonical keys the model holds (non-collective)."""
    keys = []
    for name, obj in _walk(model):
        keys.extend(_delegate_keys(obj, name + ".") if isinstance(obj, torch.nn.Module) else [name])
    return keys


@torch.no_grad()
def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full canonical tensors (detached CPU clones) on every rank. Collective over all ranks."""
    out: dict[str, torch.Tensor] = {}
    for name, obj in _walk(model):
        if isinstance(obj, torch.nn.Module):  # MoE layers gather on their device: bring them home too
            out.update({k: v.cpu() for k, v in obj.gather_full(name + ".").items()})
            continue
        t, dim = obj.detach(), _tp_dim(obj)
        if dim is not None:
            t = comm.all_gather_cat(t, dim, parallel.tp_group())
        out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of each canonical tensor into ``model`` (not collective).

    Strict: raises UserError naming missing and unexpected keys, and any shape mismatch. A
    pipeline stage's model (``model.part``) takes its own keys; the other stages' are expected."""
    expected = expected_keys(model)
    missing = [k for k in expected if k not in sd]
    part = getattr(model, "part", None)
    whole = part is None or (part.first and part.last and len(part.blocks) == model.cfg.num_layers)
    unexpected = sorted(set(sd) - set(expected)) if whole else []
    if missing or unexpected:
        raise UserError("state dict does not match the model built from the config: "
                        f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                        f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
                        "(is the model/moe config the one the checkpoint was saved with?)")
    for name, obj in _walk(model):
        if isinstance(obj, torch.nn.Module):
            prefix = name + "."
            obj.load_full(_Prefixed(sd, prefix), prefix)
            continue
        full, dim = sd[name], _tp_dim(obj)
        if dim is not None:
            if full.shape[dim] % parallel.tp_size():
                raise UserError(f"{name}: dim {dim} of shape {tuple(full.shape)} is not divisible by TP")
            full = full.chunk(parallel.tp_size(), dim=dim)[parallel.tp_rank()]
        if tuple(full.shape) != tuple(obj.shape):
            raise UserError(f"{name}: checkpoint shape {tuple(sd[name].shape)} does not fit the model "
                            f"(local shard {tuple(obj.shape)}, TP={parallel.tp_size()})")
        obj.copy_(full.to(obj.dtype))


@torch.no_grad()
def gather_full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Canonical full view of this rank's ``.grad`` tensors (zeros where a grad is None), by
    running :func:`gather_full_state_dict` with every parameter's data swapped for its grad.
    Collective. Buffers are left out. Meant for tests and debugging: what it returns is the
    LOCAL gradient (before any data-parallel reduction) of each parameter."""
    params = list(model.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p)
    try:
        sd = gather_full_state_dict(model)
    finally:
        for p, d in zip(params, saved):
            p.data = d
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v for k, v in sd.items() if v.is_floating_point() and k not in buffers}


# ---- where each local element lives in the canonical tensors (universal checkpoints) ----------

class _Prefixed(Mapping):
    """The entries of ``sd`` under ``prefix``, looked up lazily (``sd`` may build its values on
    demand, one tensor at a time: see :func:`local_layout` and the checkpoint reader)."""

    def __init__(self, sd, prefix: str):
        self.sd, self.prefix = sd, prefix
        self._keys = [k for k in sd.keys() if k.startswith(prefix)]

    def __getitem__(self, k):
        if not k.startswith(self.prefix):
            raise KeyError(k)
        return self.sd[k]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


class LazyDict(Mapping):
    """``{key: fn(key)}`` computed on access (nothing is kept)."""

    def __init__(self, keys, fn):
        self._keys, self.fn = list(keys), fn
        self._set = set(self._keys)

    def __getitem__(self, k):
        if k not in self._set:
            raise KeyError(k)
        return self.fn(k)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)


@dataclass(frozen=True)
class Piece:
    """Local flat elements ``[start, stop)`` of one local tensor hold ``canonical[key][box]``
    in C order. ``box`` lists, per canonical dim, the index runs ``(a, b)`` it covers."""

    key: str
    start: int
    stop: int
    box: tuple
    shape: tuple  # full canonical shape
    perm: tuple = ()  # canonical dims in the order the local tensor lays them out (() = identity)

    @property
    def local_box_shape(self) -> tuple:
        order = self.perm or range(len(self.box))
        return tuple(sum(b - a for a, b in self.box[d]) for d in order)

    def fingerprint(self, lo: int, hi: int) -> int:
        """63-bit id of the sub-range [lo, hi) of this piece (equal on ranks holding the same)."""
        h = hashlib.blake2b(repr((self.key, self.box, self.perm, lo, hi)).encode(), digest_size=8).digest()
        return int.from_bytes(h, "little") >> 1


@dataclass
class LocalTensor:
    name: str  # local name (``named_parameters`` / ``named_buffers``)
    tensor: torch.Tensor
    is_param: bool
    pieces: list


def _runs(idx: torch.Tensor) -> tuple:
    """Sorted unique indices -> ((a, b), ...) runs."""
    idx = idx.tolist()
    out, a = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + [None]):
        if cur != prev + 1:
            out.append((a, prev + 1))
            a = cur
    return tuple(out)


def _present(coord: torch.Tensor, n: int) -> torch.Tensor:
    """Sorted distinct values of ``coord`` (all in [0, n)): ``torch.unique`` without its sort,
    which took half of a 1 B MoE's checkpoint set-up (tens of millions of coordinates a layer)."""
    seen = torch.zeros(n, dtype=torch.bool)
    seen[coord] = True
    return seen.nonzero().flatten()


def box_indices(box: tuple) -> list[torch.Tensor]:
    return [torch.cat([torch.arange(a, b) for a, b in runs]) for runs in box]


def _pieces_of(ix: torch.Tensor, keys: list[str], offsets: torch.Tensor, shapes: dict, what: str) -> list[Piece]:
    """Split a local tensor's canonical flat indices (``offset[key] + flat``) into box pieces."""
    ix = ix.reshape(-1).long()
    if ix.numel() == 0:
        return []
    if bool((ix < 0).any()):
        raise RuntimeError(f"{what}: load_full left some elements unwritten; the canonical mapping is incomplete")
    kid = torch.searchsorted(offsets, ix, right=True) - 1
    cuts = torch.nonzero(kid[1:] != kid[:-1]).flatten() + 1
    bounds = [0] + cuts.tolist() + [ix.numel()]
    pieces = []
    for s, e in zip(bounds, bounds[1:]):
        k = int(kid[s])
        key, shape = keys[k], shapes[keys[k]]
        c = ix[s:e] - offsets[k]
        coords, rem = [], c
        for n in reversed(shape):
            coords.append(rem % n)
            rem = rem // n
        coords.reverse()
        box = tuple(_runs(_present(x, n)) for x, n in zip(coords, shape)) if shape else ()
        idx, strides = box_indices(box), [int(torch.Size(shape[d + 1:]).numel()) for d in range(len(shape))]
        perm = None
        for cand in itertools.permutations(range(len(shape))):  # locally the box may be transposed
            expect = torch.zeros(1, dtype=torch.long)
            for d in cand:
                expect = (expect[:, None] + idx[d][None, :] * strides[d]).reshape(-1)
            if expect.numel() == c.numel() and torch.equal(expect, c):
                perm = cand
                break
        if perm is None:
            raise RuntimeError(f"{what}: elements {s}..{e} of the local tensor are not a (transposed) box of {key}; "
                               "the universal checkpoint cannot describe this layout")
        pieces.append(Piece(key, s, e, box, tuple(shape), perm))
    return pieces


@contextlib.contextmanager
def _no_comm_gather():
    """comm.all_gather returns ``[t] * group size`` without communicating: enough to learn the
    canonical SHAPES (every rank of a TP/EP group holds equally shaped shards)."""
    real = comm.all_gather
    comm.all_gather = lambda t, group=None: [t] * comm.group_size(group)
    try:
        yield
    finally:
        comm.all_gather = real


def _local_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor, bool]]:
    out = [(n, p, True) for n, p in module.named_parameters()]
    out += [(n, b, False) for n, b in module.named_buffers() if _persistent(module, n)]
    return out


@torch.no_grad()
def _delegate_layout(module: torch.nn.Module, prefix: str) -> list[LocalTensor]:
    """Index trick, layout-agnostic and without collectives: fill every canonical tensor with
    ``offset + arange`` (float64, exact to 2**53), let the module's own ``load_full`` copy its
    shard into float64 stand-ins of its tensors, and read back where each element came from.

    Trap: the canonical shapes come from one ``gather_full`` with communication switched off,
    which holds this layer's (local-expert) tensors once: done once per run and cached."""
    if hasattr(module, "full_shapes"):
        shapes = {k: tuple(v) for k, v in module.full_shapes(prefix).items()}
    else:
        with _no_comm_gather():
            shapes = {k: tuple(v.shape) for k, v in module.gather_full(prefix).items()}
    keys = list(shapes)
    sizes = [int(torch.Size(shapes[k]).numel()) for k in keys]
    starts = [0]
    for n in sizes[:-1]:
        starts.append(starts[-1] + n)
    offsets = torch.tensor(starts, dtype=torch.long)
    where = {k: i for i, k in enumerate(keys)}
    fill = LazyDict(keys, lambda k: (torch.arange(sizes[where[k]], dtype=torch.float64)
                                     + starts[where[k]]).view(shapes[k]))
    local = _local_tensors(module)
    saved = [t.data for _, t, _ in local]
    for _, t, _ in local:
        t.data = torch.full(t.shape, -1.0, dtype=torch.float64)
    try:
        module.load_full(fill, prefix)
        ix = [t.data for _, t, _ in local]
    finally:
        for (_, t, _), d in zip(local, saved):
            t.data = d
    return [LocalTensor(prefix + n, t, is_p, _pieces_of(x, keys, offsets, shapes, prefix + n))
            for (n, t, is_p), x in zip(local, ix)]


def local_shape(t: torch.Tensor) -> tuple:
    """Shape of this rank's (TP/EP) shard; ZeRO-3 keeps it in ``ds_shape``."""
    return tuple(getattr(t, "ds_shape", t.shape))


@torch.no_grad()
def local_layout(model: torch.nn.Module) -> list[LocalTensor]:
    """For every local tensor (parameter or persistent buffer): the canonical pieces it holds.
    Not collective. Dense tensors are described from their TP attributes; MoE layers by
    :func:`_delegate_layout`, so the result does not depend on how experts are laid out."""
    out = []
    for name, obj in _walk(model):
        if isinstance(obj, torch.nn.Module):
            out.extend(_delegate_layout(obj, name + "."))
            continue
        shape, dim = list(local_shape(obj)), _tp_dim(obj)
        box = [((0, n),) for n in shape]
        if dim is not None:
            n, r = shape[dim], parallel.tp_rank()
            box[dim] = ((r * n, (r + 1) * n),)
            shape[dim] = n * parallel.tp_size()
        numel = int(torch.Size(local_shape(obj)).numel())
        is_param = isinstance(obj, torch.nn.Parameter)
        piece = Piece(name, 0, numel, tuple(box), tuple(shape), tuple(range(len(shape))))
        out.append(LocalTensor(name, obj, is_param, [piece] if numel else []))
    return out
