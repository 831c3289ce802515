"""This rank's share of each parameter's fp32 master and AdamW moments, whatever the ZeRO stage.

A :class:`Fragment` is a flat element range ``[start, stop)`` of one LOCAL (TP/EP-shard)
parameter that this rank's optimizer owns, with ``get(state)`` / ``set(state, values)`` for
``weight`` (fp32 master), ``exp_avg``, ``exp_avg_sq`` and the AdamW step count. Nothing here
communicates: it reads the same DeepSpeed fields that ``deepspeed.utils.safe_get_full_fp32_param``
/ ``safe_get_full_optimizer_state`` reduce over the DP group (``_hp_mapping`` for ZeRO-1/2 and
the bf16 optimizer, ``get_local_fp32_param`` for ZeRO-3), one fragment per rank. Expert params
are partitioned over the expert-data-parallel group by the same code (their param groups carry
that group), so nothing is special about them here.

Traps:
- DeepSpeed creates AdamW's state lazily at the first step (and links the fragments' views to
  it then); megamoe creates it when it builds the engine (:func:`ensure_optimizer_state`).
- DeepSpeed's own fragment views of the moments (``_hp_mapping.optim_fragment``, read by
  ``safe_get_full_optimizer_state``) are linked once, right after the FIRST param group's
  optimizer step (ZeRO-1/2 step one group at a time), so every other group's fragments stay
  empty (DeepSpeed 0.19.8). We therefore narrow the flat AdamW state ourselves, with the
  fragment's ``hp_fragment_address``, for every group.
- Fused AdamW keeps ``step`` as a float32 tensor on the parameter's device.
- Setting the master alone is not enough: the low-precision module weight is written too.
"""

from __future__ import annotations

import torch


def _inner(opt):
    return getattr(opt, "optimizer", opt)


def flat_partitions(opt):
    for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
        if hasattr(opt, name):
            return getattr(opt, name)
    return None


def ensure_optimizer_state(opt) -> None:
    """Create zero AdamW moments (step 0) where DeepSpeed has not yet: the state torch's lazy
    init would create in the first step, so the steps are bit-identical
    (tests/train/test_engine_checks.py).

    ``build_engine`` calls it, not only a resume: memory that lives for the whole run (8 bytes
    per parameter) must be allocated before the first step's activations and gradients, not
    among them. Allocated lazily in the first step, it lands in the holes the freed activations
    leave, the next step's transient memory no longer fits around it, and the heap grows once
    more by a varying amount. Measured on tools/bench_train.py's E=64 model (1.15 B params,
    ZeRO-0 fp32, CPU, glibc keeping freed memory): a flat 19.05 GiB peak from the first step,
    against 19.4-22.8 GiB lazily (at 22.8 GiB on a 23.5 GiB machine a block thrashed at 44-57 s
    per step and another was OOM-killed); the live memory between steps is 13.0 GiB either way.
    A resume then sets the checkpoint's moments into these tensors in place, and an
    out-of-memory shows before the first step.

    DeepSpeed's ZeRO-0 fp16/bf16 optimizers (``FP16_Optimizer``, ``FP16_UnfusedOptimizer``)
    create the state themselves, by stepping AdamW once with zero gradients at construction
    (deepspeed/runtime/fp16/*.py ``initialize_optimizer_states``). That step leaves the moments
    zero but counts step 1, so the first real step's bias correction is step 2's (Adam's first
    update 0.74x its size), and it applies one decoupled weight decay to the fp32 masters (by
    lr x weight_decay at the scheduler's first lr). Both are undone here: the step goes back to
    0 and the masters to the model's low-precision values they were copied from, so ZeRO-0
    bf16 starts where every other stage does."""
    inner, flats = _inner(opt), flat_partitions(opt)
    _undo_zero_gradient_step(opt, inner)
    targets = flats if flats is not None else [p for g in inner.param_groups for p in g["params"]]
    for t in targets:
        st = inner.state[t]
        if "exp_avg" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=t.device)
            st["exp_avg"] = torch.zeros_like(t, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(t, memory_format=torch.preserve_format)


def _undo_zero_gradient_step(opt, inner) -> None:
    pairs = None
    if hasattr(opt, "fp32_groups_flat") and hasattr(opt, "fp16_groups_flat"):  # FP16_Optimizer
        pairs = zip(opt.fp32_groups_flat, opt.fp16_groups_flat)
    elif hasattr(opt, "fp32_groups") and hasattr(opt, "fp16_groups"):  # FP16_UnfusedOptimizer
        pairs = ((m, p) for ms, ps in zip(opt.fp32_groups, opt.fp16_groups) for m, p in zip(ms, ps))
    if pairs is None:
        return
    for master, param in pairs:
        st = inner.state.get(master, {})
        if "exp_avg" not in st:
            continue
        if st["exp_avg"].any() or st["exp_avg_sq"].any():  # not a zero-gradient step: leave it
            raise RuntimeError("DeepSpeed's fp16/bf16 optimizer holds nonzero AdamW moments at "
                               "construction; megamoe expected its zero-gradient initial step")
        st["step"] = torch.zeros_like(st["step"]) if torch.is_tensor(st["step"]) else 0
        master.data.copy_(param.data.view_as(master))


class Fragment:
    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def get(self, state: str):  # 1-D fp32 view/copy of [start, stop), or None (no such state yet)
        raise NotImplementedError

    def set(self, state: str, values: torch.Tensor) -> None:
        raise NotImplementedError

    def _state(self) -> dict:
        """The optimizer state dict (AdamW's) that holds this fragment's step and moments."""
        raise NotImplementedError

    def step(self):
        s = self._state().get("step")
        return None if s is None else float(s)

    def set_step(self, value: float) -> None:
        st = self._state()
        st["step"] = torch.full_like(st["step"], value) if torch.is_tensor(st.get("step")) else value


class _HP(Fragment):
    """ZeRO-1/2 and the bf16 optimizer: ``param._hp_mapping`` views into the flat partition."""

    def __init__(self, opt, p):
        a = p._hp_mapping.lp_fragment_address
        super().__init__(a.start, a.start + a.numel)
        self.opt, self.p, self.map = opt, p, p._hp_mapping

    def get(self, state):
        if state == "weight":
            return self.map.get_hp_fragment()
        v = self._state().get(state)
        a = self.map.hp_fragment_address
        return None if v is None else v.narrow(0, a.start, a.numel)

    def set(self, state, values):
        self.get(state).data.copy_(values)

    def _state(self):
        return _inner(self.opt).state[flat_partitions(self.opt)[self.map.param_group_index]]



class _Z3(Fragment):
    """ZeRO-3: this rank's partition of the flattened parameter (the last one is padded)."""

    def __init__(self, opt, p):
        n = p.ds_tensor.ds_numel
        r = opt._get_param_partition_rank(p)
        super().__init__(min(n * r, p.ds_numel), min(n * (r + 1), p.ds_numel))
        self.opt, self.p, self.part = opt, p, n

    def get(self, state):
        key = None if state == "weight" else state
        group, _, _ = self.opt.grad_position[self.opt.get_param_id(self.p)]
        if key and key not in _inner(self.opt).state[self.opt.fp32_partitioned_groups_flat[group]]:
            return None
        return self.opt.get_local_fp32_param(self.p, key)[: self.stop - self.start]

    def set(self, state, values):
        full = torch.zeros(self.part, dtype=torch.float32, device=values.device)
        full[: values.numel()] = values
        self.opt.set_local_hp_param(full, self.p, None if state == "weight" else state)
        if state == "weight":
            self.p.ds_tensor.data.copy_(full.to(self.p.ds_tensor.dtype))

    def _state(self):
        group, _, _ = self.opt.grad_position[self.opt.get_param_id(self.p)]
        return _inner(self.opt).state[self.opt.fp32_partitioned_groups_flat[group]]



class _Plain(Fragment):
    """No ZeRO partitioning (ZeRO-0 in fp32): the module param is the master."""

    def __init__(self, opt, p):
        super().__init__(0, p.numel())
        self.opt, self.p = opt, p

    def get(self, state):
        if state == "weight":
            return self.p.detach().reshape(-1).float()
        v = _inner(self.opt).state.get(self.p, {}).get(state)
        return None if v is None else v.reshape(-1)

    def set(self, state, values):
        if state == "weight":
            self.p.data.copy_(values.view_as(self.p))
        else:
            _inner(self.opt).state[self.p][state].copy_(values.view_as(self.p))

    def _state(self):
        return _inner(self.opt).state[self.p]


def fragment(opt, p) -> Fragment | None:
    """This rank's fragment of parameter ``p`` (None if it owns none)."""
    if hasattr(p, "ds_id"):
        return _Z3(opt, p)
    if hasattr(p, "_hp_mapping"):
        return _HP(opt, p) if p._hp_mapping is not None else None
    return _Plain(opt, p)
