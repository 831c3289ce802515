"""Put task-routed adapters into a Hugging Face causal LM (the one factory), freeze the rest,
drive the routing state, save / reload / merge adapters.

Fine-tuning runs on the HF model: a native megamoe checkpoint is exported first
(megamoe/finetune/base_model.py; the export computes what the native model computes,
tests/hf/test_parity.py). So every adapted projection is a plain ``nn.Linear`` and:

- ``lora`` is PEFT's ``LoraConfig`` (``lora_alpha=alpha``, no dropout) and ``poly`` PEFT's
  ``PolyConfig(poly_type="poly", n_splits)`` (MHR when ``num_splits > 1``) -- used outright,
  saved in PEFT format, loadable with ``PeftModel.from_pretrained`` on the HF export;
- ``cpoly``, ``tensorpoly1/2`` (``AdaptedLinear`` around the target linears) and ``mta`` (an
  ``MTALayer`` around every decoder layer) are megamoe's, saved as ``adapter.safetensors`` +
  ``megamoe_adapter.json`` and reloaded by :func:`load_adapters`.

Targets are the attribute names in ``cfg.targets()``; linears inside MoE experts / routers are
never adapted (experts are called through their weights, not as modules).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megamoe.errors import UserError
from megamoe.finetune.adapters import CPoly
from megamoe.finetune.base import AdaptedLinear, LowRankAdapter, TaskAdapter, routing_entropy
from megamoe.finetune.config import AdapterConfig
from megamoe.finetune.mta import MTA, MTALayer
from megamoe.finetune.tensorpoly import TensorPoly

PEFT_METHODS = ("lora", "poly")
SKIP = (".moe.", ".experts.", ".block_sparse_moe.", ".router.", ".gate.")
CONFIG_FILE, WEIGHTS_FILE = "megamoe_adapter.json", "adapter.safetensors"


@dataclass
class Injected:
    """What :func:`inject_adapters` did: the (mutated) model, PEFT's wrapper for lora/poly."""
    model: torch.nn.Module
    cfg: AdapterConfig
    peft_model: object | None = None
    task_holder: dict = field(default_factory=dict)

    def adapter_params(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if _is_adapter_name(n)]


def _is_adapter_name(n: str) -> bool:
    return ".adapter." in n or "lora_" in n or "poly_" in n


def target_linears(model: torch.nn.Module, cfg: AdapterConfig) -> list[str]:
    targets = cfg.targets()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
             and n.rsplit(".", 1)[-1] in targets and not any(s in f".{n}." for s in SKIP)]
    if not names:
        raise UserError(f"finetune.target_modules={list(cfg.target_modules)}: no such linear in the model")
    return names


def decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.ModuleList, int]:
    """The decoder's layer list and its hidden size (``config.hidden_size``)."""
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and n.endswith("layers"):
            return m, model.config.hidden_size
    raise UserError(f"{type(model).__name__}: no decoder 'layers' list found for MTA")


def build_adapter(cfg: AdapterConfig, in_features: int, out_features: int) -> LowRankAdapter:
    if cfg.method == "cpoly":
        return CPoly(cfg, in_features, out_features, private_skills=cfg.private_skills)
    if cfg.method in ("tensorpoly1", "tensorpoly2"):
        return TensorPoly(cfg, in_features, out_features)
    raise ValueError(cfg.method)


def inject_adapters(model: torch.nn.Module, cfg: AdapterConfig) -> Injected:
    """Add ``cfg.method``'s adapters in place and freeze every other parameter."""
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    out = Injected(model, cfg)
    if cfg.method in PEFT_METHODS:
        import peft

        names = target_linears(model, cfg)
        if cfg.method == "lora":
            pcfg = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names,
                                   bias="none")
        else:
            pcfg = peft.PolyConfig(r=cfg.rank, target_modules=names, poly_type="poly", n_tasks=cfg.num_tasks,
                                   n_skills=cfg.num_skills, n_splits=cfg.num_splits)
        out.peft_model = peft.get_peft_model(model, pcfg)
        if cfg.method == "poly":
            _hook_poly_task_ids(model, out.task_holder)
    elif cfg.method == "mta":
        layers, D = decoder_layers(model)
        for i in range(len(layers)):
            layers[i] = MTALayer(layers[i], MTA(cfg, D).to(next(layers[i].parameters()).device))
    else:
        for name in target_linears(model, cfg):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            lin = getattr(parent, attr)
            adapter = build_adapter(cfg, lin.in_features, lin.out_features).to(lin.weight.device)  # base may be on a GPU
            setattr(parent, attr, AdaptedLinear(lin, adapter))
    model.train(was_training)  # new modules are created in train mode; keep the model's mode
    model._megamoe_injected = out
    return out


def _hook_poly_task_ids(model, holder: dict) -> None:
    """PEFT's Poly layers take ``task_ids`` as a forward kwarg (PolyModel injects it with
    temporary pre-hooks); here one persistent pre-hook per layer reads the current batch's ids."""
    from peft.tuners.poly.layer import Linear as PolyLinear

    def pre_hook(_, args, kwargs):
        kwargs["task_ids"] = holder["task_ids"]
        return args, kwargs

    for m in model.modules():
        if isinstance(m, PolyLinear):
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)


def adapters(model: torch.nn.Module) -> list[TaskAdapter]:
    return [m for m in model.modules() if isinstance(m, TaskAdapter)]


def set_task_ids(model: torch.nn.Module, task_ids: torch.Tensor) -> None:
    """Give every adapter the batch's task ids ([B] long) before the forward."""
    for a in adapters(model):
        a.task_ids = task_ids
    inj = getattr(model, "_megamoe_injected", None)
    if inj is not None:
        inj.task_holder["task_ids"] = task_ids


def set_mta_stage(model: torch.nn.Module, stage) -> None:
    """MTA stage ``"one"`` (all trainable), ``1`` (adapters only), ``2`` (router only)."""
    if stage not in ("one", 1, 2):
        raise UserError(f"MTA stage={stage!r}: must be 'one', 1 or 2")
    for a in adapters(model):
        if isinstance(a, MTA):
            a.stage = stage
            for p in a.adapter_params():
                p.requires_grad_(stage != 2)
            a.router_logits.requires_grad_(stage != 1)


@torch.no_grad()
def mean_routing_entropy(model: torch.nn.Module) -> float | None:
    """Mean over layers and tasks of the entropy (nats) of the eval-mode routing weights; None
    for methods without routing (LoRA)."""
    from peft.tuners.poly.layer import Linear as PolyLinear

    ents = []
    for m in model.modules():
        if isinstance(m, TaskAdapter) and (w := m.routing_weights()) is not None:
            ents.append(routing_entropy(w))
        elif isinstance(m, PolyLinear):
            for router in m.poly_router.values():
                w = torch.sigmoid(router.module_logits).view(router.n_tasks, router.n_splits, router.n_skills)
                ents.append(routing_entropy(w))
    return float(torch.stack(ents).mean()) if ents else None


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


# ----------------------------------------------------------------------------- save / load


def save_adapters(inj: Injected, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Adapters only (never the base). LoRA / Poly: PEFT format (``adapter_config.json`` +
    ``adapter_model.safetensors``); the others: safetensors + ``megamoe_adapter.json``.
    ``extra`` (e.g. the task list and classification head) goes into ``extra.safetensors`` /
    ``megamoe_finetune.json`` beside them. Written to a temp dir and renamed."""
    from safetensors.torch import save_file

    from megamoe.utils import atomic_path

    out_dir = Path(out_dir)
    with atomic_path(out_dir) as tmp:
        tmp = Path(tmp)
        tmp.mkdir(parents=True)
        if inj.peft_model is not None:
            inj.peft_model.save_pretrained(str(tmp))
        else:
            sd = {n: p.detach().contiguous() for n, p in inj.model.state_dict(keep_vars=True).items()
                  if ".adapter." in n}
            save_file(sd, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(inj.cfg), indent=2) + "\n")
        if extra:
            tensors = {k: v.detach().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
            if tensors:
                save_file(tensors, str(tmp / "extra.safetensors"))
            meta = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
            (tmp / "megamoe_finetune.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_adapters(model: torch.nn.Module, adapter_dir: str | Path) -> Injected:
    """Re-create saved adapters on a fresh base model and load their weights."""
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    if (d / "adapter_config.json").is_file():
        import peft

        pm = peft.PeftModel.from_pretrained(model, str(d))
        cfg = pm.peft_config["default"]
        acfg = AdapterConfig(method="lora" if isinstance(cfg, peft.LoraConfig) else "poly",
                             num_tasks=getattr(cfg, "n_tasks", 1), rank=cfg.r,
                             alpha=float(getattr(cfg, "lora_alpha", 1.0)))
        inj = Injected(model, acfg, pm)
        if acfg.method == "poly":
            _hook_poly_task_ids(model, inj.task_holder)
        model._megamoe_injected = inj
        return inj
    if not (d / CONFIG_FILE).is_file():
        raise UserError(f"{d}: neither a PEFT adapter (adapter_config.json) nor a megamoe one ({CONFIG_FILE})")
    cfg = AdapterConfig(**json.loads((d / CONFIG_FILE).read_text()))
    inj = inject_adapters(model, cfg)
    missing = set(n for n in model.state_dict() if ".adapter." in n)
    sd = load_file(str(d / WEIGHTS_FILE))
    model.load_state_dict(sd, strict=False)
    if missing != set(sd):
        raise UserError(f"{d / WEIGHTS_FILE}: adapter tensors do not match the model "
                        f"({len(missing ^ set(sd))} differ): saved for another base?")
    return inj


@torch.no_grad()
def merge_adapters(inj: Injected, task: int | None = None) -> torch.nn.Module:
    """Fold the adapters into the base linears where the algebra allows and return the plain
    model: LoRA always (PEFT ``merge_and_unload``); Poly / C-Poly / TensorPoly for one ``task``
    (its eval-mode routing fixes A and B, so W + scale B A is exact); MTA never (a nonlinear
    bottleneck)."""
    cfg = inj.cfg
    if cfg.method == "mta":
        raise UserError("MTA adapters cannot be merged: the bottleneck adapter is nonlinear")
    if cfg.method == "lora":
        return inj.peft_model.merge_and_unload()
    if task is None:
        raise UserError(f"{cfg.method} adapters differ per task: merge one task (task=...)")
    model = inj.model
    if cfg.method == "poly":
        from peft.tuners.poly.layer import Linear as PolyLinear

        for name, m in list(model.named_modules()):
            if isinstance(m, PolyLinear):
                base = m.get_base_layer()
                for a in m.poly_lora_A:
                    router, r = m.poly_router[a], m.r[a]
                    w = torch.sigmoid(router.module_logits[task]).view(router.n_splits, router.n_skills)
                    w = w / (w.sum(-1, keepdim=True) + 1e-12)
                    A = torch.einsum("qs,qsdr->qdr", w, m.poly_lora_A[a]).reshape(m.in_features, r)
                    B = torch.einsum("qs,qsrd->qrd", w, m.poly_lora_B[a]).transpose(0, 1).reshape(r, m.out_features)
                    base.weight += (A @ B / r).t().to(base.weight.dtype)
        return inj.peft_model.unload()  # swaps each Poly layer for its (now merged) base linear
    for name, m in list(model.named_modules()):
        if isinstance(m, AdaptedLinear):
            m.base.weight += m.adapter.task_delta_weight(task).to(m.base.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, m.base)
    return model
