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

Traps: non-persistent buffers (RoPE ``inv_freq``) and megatron's ``_extra_state`` are not
part of the contract; a tied LM head has no ``lm_head.weight`` (the key must be absent).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

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
        if isinstance(obj, torch.nn.Module):
            out.update(obj.gather_full(name + "."))
            continue
        t, dim = obj.detach(), _tp_dim(obj)
        if dim is not None:
            t = comm.all_gather_cat(t, dim, parallel.tp_group())
        out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy this rank's shard of each canonical tensor into ``model`` (not collective).

    Strict: raises UserError naming missing and unexpected keys, and any shape mismatch."""
    expected = expected_keys(model)
    missing = [k for k in expected if k not in sd]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError("state dict does not match the model built from the config: "
                        f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                        f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
                        "(is the model/moe config the one the checkpoint was saved with?)")
    for name, obj in _walk(model):
        if isinstance(obj, torch.nn.Module):
            prefix = name + "."
            obj.load_full({k: v for k, v in sd.items() if k.startswith(prefix)}, prefix)
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
