"""DeepSpeed engine set-up on top of megatron-core's process groups.

Steps: (1) adapt megatron-core ``parallel_state`` as DeepSpeed's ``mpu``; (2) hand
DeepSpeed the *same* expert-parallel / expert-data-parallel groups megatron-core built
(``deepspeed.utils.groups`` keyed ``ep_size_{EP}``) and assert their rank lists equal
DeepSpeed's own formula; (3) param groups: weight-decay exclusions, MPO central tensors with
their LR scale, then ``split_params_into_different_moe_groups_for_optimizer`` so expert
params (``allreduce=False``) are reduced over the expert-data-parallel group; (4) AdamW +
warmup/decay schedule; (5) ``deepspeed.initialize``.

Why a patch around ``deepspeed.initialize``: DeepSpeed enables its MoE code paths (expert
groups in the ZeRO optimizer, expert-aware grad norm) only when it finds an instance of its
own ``deepspeed.moe.layer.MoE`` in the model. megamoe's MoE layer is its own module (hash
routers, MPO experts, TP experts), so while the engine is constructed we make DeepSpeed's
``isinstance(module, MoE)`` also accept megamoe's MoE layers (they expose ``num_experts``).
After construction the symbol is restored, so DeepSpeed's own expert *checkpoint* files
(which assume its module layout) are not used; megamoe saves expert shards itself
(megamoe/train/checkpoint.py).

Grad norm: DeepSpeed's ZeRO-1/2 norm counts TP-replicated params on TP rank 0 only (params
megatron-core marks ``tensor_model_parallel`` count on every TP rank) and sums the expert
partitions over the DP group: every parameter is counted once. tests/train checks the norm
across layouts against one process. ZeRO-0 fp32 clips by the same norm (:func:`clip_inside_adamw`),
not by DeepSpeed's ZeRO-0 mean of per-rank norms.

Coupling check (:func:`check_deepspeed_moe`, run right after ``deepspeed.initialize``): the
patch above, the ``groups`` registry and the param-group keys ``moe`` / ``name`` are DeepSpeed
internals. If a DeepSpeed release stops honouring any of them, training would still run, but it
would average *different* experts over data parallelism (or never reduce them). So the engine
is asked what it actually built -- ``has_moe_layers``, its expert-parallel / expert-DP groups,
the optimizer's MoE param groups and, under ZeRO-1/2, the group each partition is reduced
over -- and any difference from megatron-core's groups is an error that names the DeepSpeed
version. Verified range: :data:`VERIFIED_DEEPSPEED` (keep pyproject.toml equal).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from megamoe import comm, parallel
from megamoe.config import ConfigError
from megamoe.moe.experts import misaligned_expert_weights
from megamoe.train.fragments import ensure_optimizer_state
from megamoe.utils import print0

# DeepSpeed releases whose MoE internals check_deepspeed_moe was verified against (pyproject.toml):
# 0.19.0 and 0.19.8 (the ends of the line), each passing tests/train/test_engine_checks.py and a
# 2-rank ZeRO-2 EP=2 training with saves. Widen it only after doing the same on the new release.
VERIFIED_DEEPSPEED = ">=0.19.0,<0.20"


class DeepSpeedCouplingError(RuntimeError):
    """DeepSpeed did not build the MoE reduction megamoe relies on (see check_deepspeed_moe)."""


class MegatronMPU:
    """The ``mpu`` interface DeepSpeed calls, answered from megatron-core's parallel_state."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self.ps = ps

    # Model parallel = TP x PP (the ranks of one model replica), ranked by the TP rank, as
    # DeepSpeed's own PipelineParallelGrid reports it: ZeRO's grad norm then sums every stage
    # once and counts a TP-replicated parameter on TP rank 0 of each stage (the norm over the
    # whole model; tools/experiments/pipeline_route_probe.py). At PP=1 this is the TP group.
    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size() * self.ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_model_parallel_group()

    def get_tensor_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_tensor_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_tensor_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()

    def get_tensor_model_parallel_src_rank(self):
        return self.ps.get_tensor_model_parallel_src_rank()

    def get_pipeline_model_parallel_world_size(self):
        return self.ps.get_pipeline_model_parallel_world_size()

    def get_pipeline_model_parallel_rank(self):
        return self.ps.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_group(self):
        return self.ps.get_pipeline_model_parallel_group()

    def get_data_parallel_rank(self):
        return self.ps.get_data_parallel_rank()

    def get_data_parallel_world_size(self):
        return self.ps.get_data_parallel_world_size()

    def get_data_parallel_group(self):
        return self.ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.get_data_parallel_group())


def _ranks(group) -> list[int]:
    return list(dist.get_process_group_ranks(group))


def setup_expert_groups(ep: int) -> dict:
    """Register megatron-core's EP / expert-DP groups with ``deepspeed.utils.groups``.

    Returns the rank lists ``{"ep": [...], "expert_dp": [...]}`` of this rank. Raises if
    DeepSpeed's own layout formula would have produced different groups (it would then
    reduce expert grads over ranks that hold different experts).
    """
    from deepspeed.utils import groups

    name = f"ep_size_{ep}"
    ep_group = parallel.ep_group()
    edp_group = parallel.expert_dp_group()
    ep_ranks, edp_ranks = _ranks(ep_group), _ranks(edp_group)
    world, tp = dist.get_world_size(), parallel.tp_size()
    # with the pipeline size: else DeepSpeed's expert-DP groups would span stages (pipeline.md)
    ds_ep, ds_edp = groups._get_expert_parallel_ranks(world, tp, ep, parallel.pp_size(), False)
    rank = dist.get_rank()
    mine_ep = next(list(r) for r in ds_ep if rank in r)
    mine_edp = next(list(r) for r in ds_edp if rank in r)
    if (mine_ep, mine_edp) != (ep_ranks, edp_ranks):
        raise RuntimeError(f"rank {rank}: megatron-core expert groups EP={ep_ranks} expert-DP={edp_ranks} differ "
                           f"from DeepSpeed's EP={mine_ep} expert-DP={mine_edp}; refusing to train")
    groups._EXPERT_PARALLEL_GROUP[name] = ep_group
    groups._EXPERT_PARALLEL_GROUP_RANKS[name] = ep_ranks
    groups._EXPERT_DATA_PARALLEL_GROUP[name] = edp_group
    groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = edp_ranks
    groups.expert_tensor_parallel_world_size = tp
    return {"ep": ep_ranks, "expert_dp": edp_ranks}


def is_expert_param(p) -> bool:
    return getattr(p, "allreduce", True) is False


def moe_modules(model) -> list:
    """Top-most modules that own expert params and expose ``num_experts`` (megamoe MoE layers)."""
    found = []
    for name, m in model.named_modules():
        if any(name.startswith(f + ".") for f, _ in found):
            continue
        if hasattr(m, "num_experts") and any(is_expert_param(p) for p in m.parameters()):
            found.append((name, m))
    return [m for _, m in found]


@contextlib.contextmanager
def _deepspeed_sees_moe(model):
    """Make ``isinstance(m, deepspeed.moe.layer.MoE)`` true for megamoe MoE layers while the
    engine is constructed (see module docstring)."""
    import deepspeed.runtime.engine as ds_engine

    ours = {id(m) for m in moe_modules(model)}
    real = ds_engine.MoE

    class _Meta(type):
        def __instancecheck__(cls, obj):
            return isinstance(obj, real) or id(obj) in ours

    class _MoEOrMegamoe(metaclass=_Meta):
        pass

    ds_engine.MoE = _MoEOrMegamoe
    try:
        yield
    finally:
        ds_engine.MoE = real


def _is_norm(name: str) -> bool:
    return "norm" in name.split(".")[-2] if "." in name else False


def param_groups(model, train, moe_cfg) -> list[dict]:
    """AdamW param groups: decay / no-decay, MPO central tensors (lr x central_lr_scale),
    then split by expert group for DeepSpeed MoE reduction."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    buckets: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")[-1]
        no_decay = ((train.no_decay_norms and _is_norm(name))
                    or (train.no_decay_biases and leaf == "bias")
                    or (train.no_decay_embeddings and name.split(".")[0] in ("embed", "pos_embed")))
        central = leaf == "central"
        buckets.setdefault((no_decay, central), []).append(p)
    scale = moe_cfg.mpo.central_lr_scale if moe_cfg is not None else 1.0
    groups = []
    for (no_decay, central), params in sorted(buckets.items()):
        groups.append({"params": params, "weight_decay": 0.0 if no_decay else train.weight_decay,
                       "lr": train.lr * (scale if central else 1.0),
                       "name": f"{'nodecay' if no_decay else 'decay'}{'_central' if central else ''}"})
    if any(is_expert_param(p) for g in groups for p in g["params"]):
        groups = list(split_params_into_different_moe_groups_for_optimizer(groups))
    for g in groups:  # 16-byte alignment inside ZeRO's flat buffers (experts.misaligned_expert_weights)
        g["params"] = sorted(g["params"], key=lambda p: p.numel() % 8 != 0)
    return groups


def lr_lambda(train):
    """Multiplier of each group's base LR at optimizer step ``s``: linear warmup, then
    cosine/linear decay to ``min_lr`` at ``train_steps`` (constant after)."""
    floor = train.min_lr / train.lr

    def f(s: int) -> float:
        if train.warmup_steps and s < train.warmup_steps:
            return (s + 1) / train.warmup_steps
        if train.lr_decay == "constant":
            return 1.0
        span = max(1, train.train_steps - train.warmup_steps)
        t = min(1.0, (s - train.warmup_steps) / span)
        if train.lr_decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return floor + (1 - floor) * (1 - t)

    return f


def build_engine(model, run_cfg, layout, ds_config: dict):
    """Returns (engine, optimizer, scheduler)."""
    import deepspeed

    train = run_cfg.train
    has_moe = bool(moe_modules(model))
    if has_moe and train.zero_stage == 3:
        raise ConfigError("train.zero_stage", 3,
                          "ZeRO-3 partitions parameters, which DeepSpeed does not support for MoE models "
                          "(expert parameters are already sharded by expert parallelism); use train.zero_stage=2 "
                          "(or 1/0) for MoE models; ZeRO-3 is for dense models (moe.num_experts=0)")
    if has_moe:
        setup_expert_groups(layout.ep)
    groups = param_groups(model, train, run_cfg.moe)
    # Fused AdamW exists for CUDA and (torch >= 2.4) CPU: one kernel over all tensors instead of
    # a Python loop; on CPU it cut the step of a 180 M-parameter model from 241 to 99 ms.
    optimizer = torch.optim.AdamW(groups, lr=train.lr, betas=(train.adam_beta1, train.adam_beta2),
                                  eps=train.adam_eps, weight_decay=train.weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train))
    # ZeRO replaces each group's params by flat partitions: record what each group held now.
    planned = [(g.get("name"), bool(g.get("moe")), [is_expert_param(p) for p in g["params"]]) for g in groups]
    ctx = _deepspeed_sees_moe(model) if has_moe else contextlib.nullcontext()
    with ctx:
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=MegatronMPU(),
            config=ds_config, dist_init_required=False)
    if layout.dp == 1 and train.zero_stage == 0:
        # One data-parallel rank: DeepSpeed would still flatten every gradient into buckets and
        # all-reduce them over the one-rank group, then copy them back (0.36 s of a 4.3 s step of
        # tools/bench_train.py's 58 M-parameter dense CPU model, and most of megamoe's deficit
        # against the plain AdamW loop there). ZeRO-1/2 reduce through their own optimizer path.
        assert hasattr(engine, "enable_backward_allreduce"), "deepspeed no longer has enable_backward_allreduce"
        engine.enable_backward_allreduce = False
    if train.zero_stage == 0 and train.precision == "fp32" and train.grad_clip > 0:
        clip_inside_adamw(engine)
    if layout.pp > 1:
        pipeline_grad_norm(engine)
    # AdamW's moments now, before the first step's activations (fragments.ensure_optimizer_state)
    ensure_optimizer_state(engine.optimizer)
    dtype = next(engine.module.parameters()).dtype
    bad = misaligned_expert_weights(engine.module, dtype)
    if bad:
        raise RuntimeError(f"expert weights {bad} are not 16-byte aligned in DeepSpeed's flat {dtype} buffers: "
                           "torch._grouped_mm would fail at the first CUDA step (param_groups' ordering broke)")
    if has_moe:
        c = check_deepspeed_moe(engine, model, layout.ep, planned)
        print0(f"deepspeed {c['deepspeed']}: {c['moe_layers']} MoE layers seen, experts reduced over expert-DP "
               f"ranks {c['expert_dp']} (group {c['group']}), dense params over DP ranks {c['dp']}: checked")
    return engine, optimizer, scheduler


def clip_inside_adamw(engine) -> None:
    """ZeRO-0 fp32: gradient clipping by the global norm, the scaling done inside the fused AdamW.

    DeepSpeed clips there with ``deepspeed.runtime.utils.clip_grad_norm_``: a norm, then a
    multiply over every gradient (a read and a write of all of them) right before AdamW reads
    them again. Here the coefficient ``min(1, max_norm / (norm + 1e-6))`` goes to the fused AdamW
    as ``grad_scale``, which divides each gradient by it as it reads it (the hook torch's
    GradScaler uses to unscale). E=64 bench model (1.15 B params): ``engine.step()`` 574 instead
    of 642 ms (medians of 15 alternating steps). Also records the norm for
    ``engine.get_global_grad_norm()``, which DeepSpeed leaves empty at ZeRO-0.

    The norm is the global one, every element counted once: each gradient's fp32 2-norm, counted
    on TP rank 0 unless the parameter is TP-sharded, summed over TP; expert gradients are also
    summed over the expert-parallel group (each EP rank holds other experts). That is the norm
    DeepSpeed's ZeRO-1/2 and its bf16 optimizer (``get_norm_with_moe_layers``) clip by, and the
    one a single process computes. It departs from DeepSpeed's ZeRO-0 fp32 ``clip_grad_norm_``,
    which averages each DP rank's own norm "due to the presence of moe params": with EP > 1 that
    mean is not the norm of any gradient, so EP=2 clipped differently from one process. At EP=1
    the two are the same number (tests/train/test_engine_checks.py: bit-equal to DeepSpeed at one
    rank; EP=2 on 2 ranks equals one process).
    Trap: dividing by ``1/coef`` is not bit-equal to multiplying by ``coef``; the result
    differs from DeepSpeed's in the last bits (the test bounds it). bf16/fp16 and ZeRO-1/2 keep
    DeepSpeed's own clipping, already one pass inside their optimizers."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    opt = _base_optimizer(engine.optimizer)
    for attr in ("clip_fp32_gradients", "gradient_clipping", "_global_grad_norm", "mpu"):
        assert hasattr(engine, attr), f"deepspeed no longer has engine.{attr}"
    assert opt.defaults.get("fused"), "grad_scale needs the fused AdamW"
    mpu = engine.mpu
    tp_rank0 = mpu.get_model_parallel_rank() == 0

    def squared_norm(params) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None and (tp_rank0 or is_model_parallel_parameter(p))
                 and not getattr(p, "ds_pipe_replicated", False)]  # a tied copy on the last stage: counted once
        return (torch.stack([g.detach().float().norm(2) for g in grads]).pow(2).sum() if grads
                else torch.zeros((), device=engine.device))

    params = list(engine.module.parameters())
    dense = [p for p in params if not is_expert_param(p)]
    experts = [p for p in params if is_expert_param(p)]

    def clip_fp32_gradients():
        sq = comm.all_reduce(torch.stack([squared_norm(dense), squared_norm(experts)]), "sum",
                             mpu.get_model_parallel_group())
        norm = (sq[0] + comm.all_reduce(sq[1], "sum", parallel.ep_group())).sqrt()
        coef = torch.clamp(engine.gradient_clipping() / (norm + 1e-6), max=1.0)
        opt.grad_scale = (1.0 / coef).float().reshape(())
        engine._global_grad_norm = norm.item()

    engine.clip_fp32_gradients = clip_fp32_gradients


def pipeline_grad_norm(engine) -> None:
    """ZeRO-1 under pipeline parallelism: the global grad norm with ONE all-reduce over the
    model-parallel group (TP x PP) per step.

    DeepSpeed's ``scaled_global_norm`` all-reduces each param group's norm over that group, one
    collective per group. Stages hold different param groups (a stage without central tensors,
    or without the embedding, has fewer), so the stages issued different numbers of collectives
    and the run hung in the first step (found by tools/experiments/estimate_check.py's PP=2
    variant: 5 groups on one stage, 4 on the other). Here each rank sums the squared norms of
    all its partitions (DeepSpeed's rules: a tied copy marked ``ds_pipe_replicated`` skipped,
    a TP-replicated parameter counted on TP rank 0), then one all-reduce over the full DP group
    (expert partitions included: their sum over DP is every expert's once, as in DeepSpeed's
    per-group path, whose expert-DP averaging then changes nothing) and one over TP x PP.
    A non-finite norm is returned as inf, as ``combine_grad_norm_groups`` does."""
    from deepspeed.runtime.utils import is_model_parallel_parameter

    opt = engine.optimizer
    for attr in ("scaled_global_norm", "bit16_groups", "averaged_gradients", "params_in_partition",
                 "dp_process_group", "model_parallel_rank", "device"):
        assert hasattr(opt, attr), f"deepspeed's ZeRO optimizer no longer has {attr}"
    model_parallel = engine.mpu.get_model_parallel_group()

    def scaled_global_norm(norm_type=2):
        assert norm_type == 2, "only the L2 norm"
        squares = [torch.zeros((), dtype=torch.float32, device=opt.device)]
        for i in range(len(opt.bit16_groups)):
            grads = [g for g in opt.averaged_gradients[i] if not getattr(g, "_zero_padding", False)]
            for g, p in zip(grads, opt.params_in_partition[i]):
                if getattr(p, "ds_pipe_replicated", False):
                    continue
                if is_model_parallel_parameter(p) or opt.model_parallel_rank == 0:
                    squares.append(g.detach().float().pow(2).sum())
        total = comm.all_reduce(torch.stack(squares).sum(), "sum", opt.dp_process_group)
        total = comm.all_reduce(total, "sum", model_parallel).sqrt()
        return torch.where(torch.isfinite(total), total, torch.full_like(total, float("inf")))

    opt.scaled_global_norm = scaled_global_norm


def _base_optimizer(opt):
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, BF16_Optimizer, ...)."""
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def check_deepspeed_moe(engine, model, ep: int, planned: list[tuple]) -> dict:
    """Assert DeepSpeed recognised megamoe's MoE layers and reduces experts over expert-DP.

    ``planned``: ``(name, moe, [is_expert_param per param])`` of each param group handed to
    ``deepspeed.initialize``. Checks, all against megatron-core's groups on this rank:

    1. ``engine.has_moe_layers`` and one ``engine.num_experts`` entry per megamoe MoE layer;
    2. every expert param is named for group ``ep_size_{ep}`` (DeepSpeed's reduction key);
    3. ``engine.expert_parallel_group`` / ``engine.expert_data_parallel_group`` and
       ``engine.data_parallel_group`` hold megatron-core's EP / expert-DP / DP rank lists;
    4. the param groups holding expert params hold only them and are ``moe=True`` with
       ``name=ep_size_{ep}``; the optimizer DeepSpeed steps still has those groups, in order;
    5. ZeRO-1/2: each MoE group's partition is reduced over expert-DP, every other over DP.

    Returns a summary (rank lists, group names); raises :class:`DeepSpeedCouplingError`
    listing every mismatch.
    """
    import deepspeed

    name = f"ep_size_{ep}"
    want_ep, want_edp = _ranks(parallel.ep_group()), _ranks(parallel.expert_dp_group())
    want_dp = _ranks(parallel.dp_group())
    bad: list[str] = []

    layers = moe_modules(model)
    if not getattr(engine, "has_moe_layers", False):
        bad.append("engine.has_moe_layers is False: DeepSpeed did not see megamoe's MoE layers "
                   "(the isinstance patch of deepspeed.runtime.engine.MoE no longer takes effect)")
    got_e = list(getattr(engine, "num_experts", []) or [])
    if got_e != [m.num_experts for m in layers]:
        bad.append(f"engine.num_experts={got_e}, megamoe has {[m.num_experts for m in layers]}")
    wrong = sorted({getattr(p, "group_name", None) for m in layers for p in m.parameters()
                    if is_expert_param(p)} - {name})
    if wrong:
        bad.append(f"expert params carry group_name {wrong}, expected {name!r}")

    def group_ranks(attr: str, d: bool):
        g = getattr(engine, attr, None)
        g = g.get(name) if d and isinstance(g, dict) else (None if d else g)
        return _ranks(g) if g is not None else None

    for attr, is_dict, want in (("expert_parallel_group", True, want_ep),
                                ("expert_data_parallel_group", True, want_edp),
                                ("data_parallel_group", False, want_dp)):
        got = group_ranks(attr, is_dict)
        if got != want:
            key = f"engine.{attr}" + (f"[{name!r}]" if is_dict else "")
            bad.append(f"{key} ranks={got}, megatron-core's are {want}")

    for i, (gname, moe, flags) in enumerate(planned):
        if any(flags) and not (all(flags) and moe and gname == name):
            bad.append(f"param group {i} ({gname!r}, moe={moe}) holds {sum(flags)}/{len(flags)} expert params; "
                       f"split_params_into_different_moe_groups_for_optimizer should give moe=True, name={name!r}, "
                       "expert params only")
        elif moe and not any(flags) and flags:
            bad.append(f"param group {i} ({gname!r}) is moe=True but holds no expert params")
    if not any(moe for _, moe, _ in planned):
        bad.append("no param group is marked moe=True")
    base = _base_optimizer(engine.optimizer)
    stepped = [(g.get("name"), bool(g.get("moe"))) for g in getattr(base, "param_groups", [])]
    if stepped != [(n, m) for n, m, _ in planned]:
        bad.append(f"the optimizer DeepSpeed steps has param groups (name, moe)={stepped}, "
                   f"megamoe built {[(n, m) for n, m, _ in planned]}")
    reduce_over = getattr(engine.optimizer, "real_dp_process_group", None)  # ZeRO-1/2
    if reduce_over is not None:
        for i, (gname, moe, _) in enumerate(planned[:len(reduce_over)]):
            got, want = _ranks(reduce_over[i]), (want_edp if moe else want_dp)
            if got != want:
                bad.append(f"ZeRO reduces param group {i} ({gname!r}, moe={moe}) over ranks {got}, "
                           f"expected {'expert-DP' if moe else 'DP'} {want}")
    if bad:
        raise DeepSpeedCouplingError(
            f"rank {dist.get_rank()}: DeepSpeed {deepspeed.__version__} does not reduce megamoe's experts as "
            f"megamoe expects (verified with deepspeed{VERIFIED_DEEPSPEED}); refusing to train, because "
            "expert gradients would be averaged over the wrong ranks:\n  - " + "\n  - ".join(bad))
    return {"deepspeed": deepspeed.__version__, "group": name, "ep": want_ep, "expert_dp": want_edp,
            "dp": want_dp, "moe_layers": len(layers),
            "moe_param_groups": [i for i, (_, moe, _) in enumerate(planned) if moe]}
