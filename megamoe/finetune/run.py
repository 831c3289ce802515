"""Fine-tune one method on the multi-task suite and evaluate it (tools/finetune.py calls this).

``method`` is an adapter method with optional overrides (``"lora:rank=16"``;
megamoe.finetune.config.METHODS), ``"head"`` (frozen base, only the classification head
trains: the floor every adapter must beat) or ``"mta_one"`` (MTA trained in one stage, the
baseline for ALTER's two stages). ``"mta"`` is two-stage at *equal adapter steps*: ``steps``
steps of stage 1 (adapters, each example on its own task's adapter), then ``mta_stage2_steps``
steps of stage 2 (router and head only) on top; ``mta_one`` trains adapters and router together
for ``steps`` steps.

Optimizer: AdamW, two groups (megamoe.finetune.base.param_groups): adapters + head at ``lr``,
routing logits at ``cfg.routing_lr`` (0.1, mttl's default). Gradient clipping 1.0.
Schedule (``schedule="linear"``, the default): every group's lr rises linearly over the first
6% of the steps and then decays linearly towards 0, mttl's default (``mttl/arguments.py``
``TrainingArgs``: ``scheduler="linear_decay_with_warmup"``, ``warmup_proportion=0.06``; its
scheduler scales every optimizer group, the routing logits' included). Each MTA stage is its own
schedule (stage 2 starts a fresh warmup/decay over its steps). ``"constant"`` keeps the lr
fixed: the final iterate then carries the full step noise (on the CPU suite a head-only run at
constant lr moved by 0.04 task-average accuracy between two seeds and sat below the majority
class).

Data parallel: under DeepSpeed (``dp=True``, launched with ``deepspeed``/``torchrun``), every
rank draws the same global batch of indices and takes its contiguous share; the engine averages
gradients, so the update equals one process on the whole batch (the routing noise differs:
each rank draws its own relaxed-Bernoulli samples; with ``relaxed_bernoulli=False`` or LoRA
the runs agree to float tolerance, tests/finetune/test_dp.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable

import torch

from megamoe.errors import UserError
from megamoe.finetune.base import param_groups
from megamoe.finetune.classify import MultiTaskClassifier
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.data import TaskSplit
from megamoe.finetune.inject import (
    count_params,
    inject_adapters,
    mean_routing_entropy,
    set_mta_stage,
)

RUN_METHODS = ("head", "lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta", "mta_one")
SCHEDULES = ("linear", "constant")


def routing_learned(entropy: list) -> bool | None:
    """The suite's validity check: task-skill routing learned iff its mean entropy fell during
    training ([start, end]; None for arms without routing). Every routed arm is checked, MTA's
    included: one-stage MTA's routing entropy rises, and that must show."""
    if entropy is None or entropy[0] is None or entropy[1] is None:
        return None
    return entropy[1] < entropy[0] - 1e-3
WARMUP_PROPORTION = 0.06  # mttl TrainingArgs.warmup_proportion


def lr_factor(step: int, total: int, schedule: str = "linear") -> float:
    """Multiplier of every group's lr at 0-based ``step`` of ``total``: linear warmup over
    ceil(6%) of the steps to 1 (reached at step warmup - 1), then linear decay; the first step
    gets 1 / warmup and the last 1 / (total - warmup + 1), both positive (HF's lambda gives step 0
    lr 0 and the last step lr 0: two wasted steps)."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, math.ceil(WARMUP_PROPORTION * total))
    if step < warmup:
        return (step + 1) / warmup
    return (total - step) / (total - warmup + 1)


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lora:rank=16/alpha=2"`` -> ("lora", {"rank": 16, "alpha": 2}); values parsed as YAML, but
    ``target_modules=all`` or ``=q_proj+v_proj`` (an arm list is comma-separated) become lists."""
    import yaml

    name, _, rest = spec.partition(":")
    if name not in RUN_METHODS:
        raise UserError(f"method {spec!r}: unknown {name!r}; choose from {', '.join(RUN_METHODS)}")
    overrides = {}
    for item in filter(None, rest.split("/")):
        k, eq, v = item.partition("=")
        if not eq or k not in AdapterConfig.__dataclass_fields__:
            raise UserError(f"method {spec!r}: {item!r} is not FIELD=VALUE with an AdapterConfig field")
        overrides[k] = yaml.safe_load(v)
        if k == "target_modules" and isinstance(overrides[k], str):  # "all" or "q_proj+v_proj": no commas in an arm
            overrides[k] = overrides[k].split("+")
    return name, overrides


def method_config(spec: str, base_cfg: AdapterConfig, num_tasks: int) -> tuple[str, AdapterConfig | None]:
    """The run's method name and its AdapterConfig (None for ``head``). Overrides apply on top
    of ``base_cfg``; ``alpha`` is shared, so a ``rank`` override keeps scale = alpha / rank."""
    method, overrides = parse_method(spec)
    if method == "head":
        return method, None
    try:
        cfg = dataclasses.replace(base_cfg, **overrides, method="mta" if method == "mta_one" else method,
                                  num_tasks=num_tasks)
    except TypeError as e:
        raise UserError(f"method {spec!r}: {e}") from None
    return method, cfg


def finetune_device() -> torch.device:
    """Where fine-tuning runs: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _batch(data: TaskSplit, idx: torch.Tensor, device: torch.device):
    """The examples ``idx`` (host tensors, as the split is kept) on the model's ``device``."""
    S = int(data.lengths[idx].max())
    return tuple(t.to(device) for t in (data.ids[idx, :S], data.lengths[idx], data.labels[idx], data.tasks[idx]))


@torch.no_grad()
def evaluate(clf: MultiTaskClassifier, data: TaskSplit, batch_size: int = 128) -> torch.Tensor:
    """[N] bool on the CPU: is each test example right (eval mode: sigmoid routing, no noise)."""
    clf.eval()
    right, device = [], next(clf.parameters()).device
    for start in range(0, len(data.labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data.labels)))
        ids, lengths, labels, tasks = _batch(data, idx, device)
        right.append((clf.predict(clf(ids, lengths, tasks), tasks) == labels).cpu())
    clf.train()
    return torch.cat(right)


def per_task_acc(right: torch.Tensor, tasks: torch.Tensor, num_tasks: int) -> list[float]:
    correct = torch.zeros(num_tasks).index_add_(0, tasks, right.float())
    count = torch.zeros(num_tasks).index_add_(0, tasks, torch.ones_like(right, dtype=torch.float))
    return (correct / count.clamp(min=1)).tolist()


class _Plain:
    """One process: AdamW + clip, the reference the DeepSpeed path must match."""

    def __init__(self, module, groups, clip):
        self.module, self.clip = module, clip
        self.opt = torch.optim.AdamW(groups)

    def set_lr_factor(self, f: float):
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * f

    def __call__(self, *a):
        return self.module(*a)

    def step(self, loss):
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.clip)
        self.opt.step()


class _DeepSpeed:
    def __init__(self, module, groups, clip, micro_batch):
        import deepspeed

        from megamoe.utils import skip_deepspeed_shm_op

        skip_deepspeed_shm_op()  # before DeepSpeed's comm backend starts (see its docstring)
        opt = torch.optim.AdamW(groups)
        ds_cfg = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
                  "gradient_clipping": clip, "zero_optimization": {"stage": 0}, "steps_per_print": 10 ** 9,
                  "wall_clock_breakdown": False}
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_cfg)

    def set_lr_factor(self, f: float):
        for g in self.engine.optimizer.param_groups:
            g["lr"] = g["base_lr"] * f

    def __call__(self, *a):
        return self.engine(*a)

    def step(self, loss):
        self.engine.backward(loss)
        self.engine.step()


def finetune_method(spec: str, build_base: Callable[[], torch.nn.Module], hidden_size: int,
                    num_classes: list[int], train: TaskSplit, test: TaskSplit | None, adapter_cfg: AdapterConfig,
                    steps: int, batch_size: int, lr: float, seed: int = 0, mta_stage2_steps: int | None = None,
                    dp: bool = False, on_model: Callable | None = None, pool: str = "mean",
                    schedule: str = "linear", valid: TaskSplit | None = None, init_state: dict | None = None,
                    keep_state: bool = False) -> dict:
    """Train ``spec`` from a fresh base; return accuracies, sizes, routing entropy, per-example
    correctness (``right``: a '0'/'1' string over the test set, for paired comparisons), and
    ``adapters_moved``: did any adapter parameter change (False flags a dead arm, e.g. a
    saddle at init; None for ``head``).

    ``test`` / ``valid``: the splits evaluated after training (``per_task_acc``, ``avg_acc``,
    ``right`` from test; the same with a ``valid_`` prefix from validation). Either may be None:
    a selection run evaluates validation only, so the test split is read only by final runs.
    ``init_state``: trainable tensors (adapters + head, by name) loaded before training, e.g.
    skills learned on other tasks (few-shot transfer); ``keep_state``: return them as
    ``result["state"]`` (not JSON: the caller saves or drops it).
    ``pool``: the classifier's read-out (megamoe.finetune.classify); ``schedule``: see above.
    ``on_model(clf, injected)`` is called after training (e.g. to save the adapters)."""
    from megamoe.utils import progress

    T = len(num_classes)
    method, cfg = method_config(spec, adapter_cfg, T)
    torch.manual_seed(seed)
    base = build_base()
    inj = None
    if cfg is None:
        for p in base.parameters():
            p.requires_grad_(False)
        adapter_params = 0
    else:
        inj = inject_adapters(base, cfg)
        adapter_params = sum(p.numel() for p in inj.adapter_params())
    if schedule not in SCHEDULES:
        raise UserError(f"schedule={schedule!r}: choose from {', '.join(SCHEDULES)}")
    device = finetune_device()
    clf = MultiTaskClassifier(base, hidden_size, num_classes, pool=pool).to(device)  # before the optimizer
    if init_state is not None:
        own = dict(clf.named_parameters())
        with torch.no_grad():
            for n, t in init_state.items():
                own[n].copy_(t)
    two_stage = method == "mta"
    stage2 = (steps // 2 if mta_stage2_steps is None else mta_stage2_steps) if two_stage else 0
    if two_stage:
        set_mta_stage(base, 1)
    groups = param_groups(clf, lr, cfg.routing_lr if cfg else lr)
    # Stage 2 trains the MTA router: put it in the optimizer now (frozen until then: no grad,
    # so AdamW leaves it alone).
    if two_stage:
        routers = [p for n, p in clf.named_parameters() if n.endswith("router_logits")]
        groups.append({"params": routers, "lr": cfg.routing_lr, "weight_decay": 0.0, "name": "mta_router"})
    for g in groups:
        g["base_lr"] = g["lr"]
    world, rank = 1, 0
    if dp:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} must be a multiple of the {world} data-parallel ranks")
        stepper = _DeepSpeed(clf, groups, 1.0, batch_size // world)
    else:
        stepper = _Plain(clf, groups, 1.0)
    trainable, total = count_params(clf)
    if two_stage:  # count what either stage trains
        trainable = sum(p.numel() for n, p in clf.named_parameters() if p.requires_grad or n.endswith("router_logits"))
    ent0 = mean_routing_entropy(base) if cfg else None
    start = [p.detach().clone() for p in inj.adapter_params()] if inj is not None else []
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for step in progress(range(steps + stage2), desc=spec):
        if two_stage and step == steps:
            set_mta_stage(base, 2)
        stage_step, stage_total = (step, steps) if step < steps else (step - steps, stage2)
        stepper.set_lr_factor(lr_factor(stage_step, stage_total, schedule))
        idx = torch.randint(len(train.labels), (batch_size,), generator=gen)
        idx = idx.view(world, -1)[rank]
        ids, lengths, labels, tasks = _batch(train, idx, device)
        loss = clf.loss(stepper(ids, lengths, tasks), labels, tasks)
        stepper.step(loss)
        losses.append(loss.item())
    train_s = time.time() - t0
    ent1 = mean_routing_entropy(base) if cfg else None
    moved = max((float((p.detach() - p0).abs().max()) for p, p0 in zip(inj.adapter_params(), start) if p.numel()),
                default=0.0) if inj is not None else None
    out = {}
    for prefix, split in (("", test), ("valid_", valid)):
        if split is not None:
            right = evaluate(clf, split)
            present = set(split.tasks.tolist())  # a held-out task's run evaluates that task only: None elsewhere
            acc = [a if t in present else None for t, a in enumerate(per_task_acc(right, split.tasks, T))]
            out |= {f"{prefix}per_task_acc": acc, f"{prefix}avg_acc": sum(a for a in acc if a is not None) / len(present),
                    f"{prefix}right": "".join("1" if r else "0" for r in right.tolist())}
    if on_model is not None:
        on_model(clf, inj)
    if keep_state:
        out["state"] = {n: p.detach().clone() for n, p in clf.named_parameters()
                        if p.requires_grad or n.endswith("router_logits")}
    tail = max(1, len(losses) // 10)
    learned = routing_learned([ent0, ent1])
    return out | {"method": spec, "adapter_params": adapter_params,
                  "trainable_params": trainable, "total_params": total, "first_loss": losses[0] if losses else None,
                  "final_loss": sum(losses[-tail:]) / tail if losses else None, "train_s": train_s,
                  "adapter_steps": steps, "stage2_steps": stage2, "pool": pool, "schedule": schedule,
                  "routing_entropy": [ent0, ent1], "routing_learned": learned, "adapter_max_change": moved,
                  "adapters_moved": None if moved is None else moved > 0}
