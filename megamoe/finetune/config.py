"""Typed settings for the task-routed adapters (LoRA, Poly/MHR, C-Poly, TensorPoly, MTA).

One flat dataclass because every method shares ``num_tasks``/``rank``/``alpha``/targets and a
handful of method-specific knobs; each knob is validated only for the methods that read it.
Errors name the field (``ConfigError``), e.g. ``finetune.rank=0: must be >= 1``.

Decisions on the papers' open points (all are settings; defaults and why):
- C-Poly ``cpoly_route_private=True``: the private skills get learned assignment logits like
  the shared ones (the paper's single "skill assignment matrix" covers both).
- C-Poly ``cpoly_normalize="joint"``: shared and private weights are normalised together, so
  the task trades shared against private skills and with zero private skills it *is* Poly.
  ``"separate"`` normalises each group to 1 (private always weighs as much as all shared).
- TensorPoly: LoRA convention, the B side starts at zero. Because a Kronecker product of
  all-zero vectors has zero gradient, only the *last order's* vectors of B are zero; the
  others are random, so the gradient reaches the zero vectors at step 1.
- MTA ``mta_router="task"``: the router input is the task id (a learned logit table, as the
  whole suite routes at the task level); ``mta_router_init`` puts weight on the task's own
  adapter so stage 2 starts where stage 1 ended rather than from a uniform mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megamoe.config import check

METHODS = ("lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta")


@dataclass(kw_only=True)
class AdapterConfig:
    method: Literal["lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"] = "lora"
    num_tasks: int = 1
    # Which projections get an adapter: names of the native model's linears
    # (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or "all".
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank: int = 4                    # LoRA rank r (all LoRA-type methods)
    alpha: float = 8.0               # scaling alpha / r
    temperature: float = 1.0         # relaxed-Bernoulli (Gumbel-sigmoid) temperature, training only
    # Poly / MHR / C-Poly
    num_skills: int = 4              # shared skill inventory S
    num_splits: int = 1              # MHR blocks (1 = Poly); must divide in and out dims
    private_skills: int = 1          # C-Poly private skills per task (0 = Poly)
    cpoly_route_private: bool = True
    cpoly_normalize: Literal["joint", "separate"] = "joint"
    # TensorPoly / TLoRA
    tensor_order: int = 2            # N small vectors per Kronecker product
    tensor_components: int = 2       # K summed Kronecker products per factor row (TensorPoly-I routes over them)
    tensor_skills: int = 2           # TensorPoly-II: inventory size per order
    # MTA (ALTER)
    bottleneck: int = 16             # adapter width m (D -> m -> D)
    mta_router: Literal["task"] = "task"
    mta_router_init: float = 3.0     # initial logit of a task's own adapter (others 0)

    def __post_init__(self):
        check(self.method in METHODS, "method", self.method, "must be one of " + ", ".join(METHODS))
        check(self.num_tasks >= 1, "num_tasks", self.num_tasks, "must be >= 1")
        check(isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) > 0,
              "target_modules", self.target_modules, "must be a non-empty list of projection names or ['all']")
        bad = [t for t in self.target_modules if t not in TARGETS + ("all",)]
        check(not bad, "target_modules", self.target_modules, f"unknown {bad}; choose from {TARGETS + ('all',)}")
        check(self.rank >= 1, "rank", self.rank, "must be >= 1")
        check(self.alpha > 0, "alpha", self.alpha, "must be > 0")
        check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        check(self.num_skills >= 1, "num_skills", self.num_skills, "must be >= 1")
        check(self.num_splits >= 1, "num_splits", self.num_splits, "must be >= 1")
        check(self.private_skills >= 0, "private_skills", self.private_skills, "must be >= 0")
        check(self.tensor_order >= 1, "tensor_order", self.tensor_order, "must be >= 1")
        check(self.tensor_components >= 1, "tensor_components", self.tensor_components, "must be >= 1")
        check(self.tensor_skills >= 1, "tensor_skills", self.tensor_skills, "must be >= 1")
        check(self.bottleneck >= 1, "bottleneck", self.bottleneck, "must be >= 1")

    def targets(self) -> tuple[str, ...]:
        return TARGETS if "all" in self.target_modules else tuple(self.target_modules)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
