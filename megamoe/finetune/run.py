"""Fine-tune one method on the multi-task suite and evaluate it (used by tools/finetune.py).

``method`` is an adapter method (optionally with overrides, ``"lora:rank=16"``) (megamoe.finetune.config.METHODS), ``"head"`` (frozen base,
only the classification head trains: the floor every adapter must beat) or ``"mta_one"``
(MTA trained in one stage, the baseline for ALTER's two stages). ``"mta"`` is two-stage:
the first ``mta_stage1_frac`` of the steps train adapters with each example on its own
task's adapter, the rest train only the router (and the head).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from megamoe.finetune.classify import MultiTaskClassifier
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.data import TaskSplit
from megamoe.finetune.inject import count_params, inject_adapters, set_mta_stage
from megamoe.utils import progress

RUN_METHODS = ("head", "lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta", "mta_one")


def parse_method(spec: str) -> tuple[str, dict]:
    """``"lora:rank=16/alpha=32"`` -> ("lora", {"rank": 16, "alpha": 32}); values parsed as YAML."""
    import yaml

    from megamoe.errors import UserError

    name, _, rest = spec.partition(":")
    if name not in RUN_METHODS:
        raise UserError(f"method {spec!r}: unknown {name!r}; choose from {', '.join(RUN_METHODS)}")
    overrides = {}
    for item in filter(None, rest.split("/")):
        k, eq, v = item.partition("=")
        if not eq or k not in AdapterConfig.__dataclass_fields__:
            raise UserError(f"method {spec!r}: {item!r} is not FIELD=VALUE with an AdapterConfig field")
        overrides[k] = yaml.safe_load(v)
    return name, overrides


def _batch(data: TaskSplit, idx: torch.Tensor):
    S = int(data.lengths[idx].max())
    return data.ids[idx, :S], data.lengths[idx], data.labels[idx], data.tasks[idx]


@torch.no_grad()
def evaluate(clf: MultiTaskClassifier, data: TaskSplit, num_tasks: int, batch_size: int = 64) -> list[float]:
    """Per-task accuracy (eval mode: sigmoid routing, no noise)."""
    clf.eval()
    correct, count = torch.zeros(num_tasks), torch.zeros(num_tasks)
    for start in range(0, len(data.labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data.labels)))
        ids, lengths, labels, tasks = _batch(data, idx)
        pred = clf.predict(clf(ids, lengths, tasks), tasks)
        correct.index_add_(0, tasks, (pred == labels).float())
        count.index_add_(0, tasks, torch.ones_like(tasks, dtype=torch.float))
    clf.train()
    return (correct / count.clamp(min=1)).tolist()


def finetune_method(method: str, build_base: Callable[[], torch.nn.Module], hidden_size: int,
                    num_classes: list[int], train: TaskSplit, test: TaskSplit, adapter_cfg: AdapterConfig,
                    steps: int, batch_size: int, lr: float, seed: int = 0, mta_stage1_frac: float = 0.5) -> dict:
    """Train ``method`` for ``steps`` steps from a fresh base; return accuracies and sizes."""
    spec, (method, overrides) = method, parse_method(method)
    torch.manual_seed(seed)
    base = build_base()
    T = len(num_classes)
    if method == "head":
        for p in base.parameters():
            p.requires_grad_(False)
        adapter_params = 0
    else:
        cfg = dataclasses.replace(adapter_cfg, **overrides,
                                  method="mta" if method == "mta_one" else method, num_tasks=T)
        ads = inject_adapters(base, cfg)
        adapter_params = sum(p.numel() for a in ads for p in a.parameters())
    clf = MultiTaskClassifier(base, hidden_size, num_classes)
    stage1_steps = int(steps * mta_stage1_frac) if method == "mta" else 0
    if method == "mta":
        set_mta_stage(base, 1)

    def make_opt():
        return torch.optim.AdamW([p for p in clf.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    opt = make_opt()
    trainable, total = count_params(clf)
    gen = torch.Generator().manual_seed(seed)
    t0, losses = time.time(), []
    for step in progress(range(steps), desc=method):
        if method == "mta" and step == stage1_steps:
            set_mta_stage(base, 2)
            opt = make_opt()  # fresh state: stage-1 moments belong to parameters now frozen
        idx = torch.randint(len(train.labels), (batch_size,), generator=gen)
        ids, lengths, labels, tasks = _batch(train, idx)
        loss = clf.loss(clf(ids, lengths, tasks), labels, tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in clf.parameters() if p.requires_grad], 1.0)
        opt.step()
        losses.append(loss.item())
    acc = evaluate(clf, test, T)
    tail = max(1, steps // 10)
    return {"method": spec, "per_task_acc": acc, "avg_acc": sum(acc) / T, "adapter_params": adapter_params,
            "trainable_params": trainable, "total_params": total, "first_loss": losses[0] if losses else None,
            "final_loss": sum(losses[-tail:]) / tail if losses else None, "train_s": time.time() - t0}
