"""Typed settings for the task-routed adapters (LoRA, Poly/MHR, C-Poly, TensorPoly, MTA).

One flat dataclass because every method shares ``num_tasks``/``rank``/``alpha``/targets and a
handful of method-specific knobs; each knob is validated only for the methods that read it.
Errors name the field (``ConfigError``), e.g. ``finetune.rank=0: must be >= 1``.

Decisions on the papers' open points (all are settings; defaults and why):
- Scaling: one ``alpha`` for every LoRA-family method, delta = (alpha / rank) B A x. Default
  alpha = 1, the official Poly/MHR/TensorPoly scale 1/r (PEFT ``tuners/poly/layer.py``, mttl
  ``mttl/models/poly.py``); LoRA gets the same through PEFT's ``lora_alpha``.
- Routing logits train in their own AdamW group at ``routing_lr`` = 0.1, no weight decay
  (mttl ``mttl/arguments.py`` ``module_logits_learning_rate: float = 0.1``, used by
  ``mttl/models/get_optimizer.py``). At a shared 3e-3 they move < 1 in 300 steps against
  relaxed-Bernoulli noise of sd ~1.8, so routing never leaves uniform.
- C-Poly private skills (``cpoly_normalize``): ``"separate"`` (default) normalises the shared
  weights to 1 and the private weights to 1 on their own, so with one private skill the task
  always gets its private LoRA at full weight beside the shared mixture (the paper's two
  allocation matrices, task-common and task-specific). ``"joint"`` normalises shared and
  private together (with S=4, P=1 the private skill starts at 1/5 of the weight) and with zero
  private skills is Poly. ``cpoly_route_private``: private skills get learned logits too
  (none are made with ``"separate"`` and P=1, where they would never get a gradient).
- TensorPoly-I/II follow mttl branch ``zs_code`` ``mttl/models/poly.py`` (``PolyLoRATensor``,
  ``PolyLoRATensorOrder``): leaves of length ceil(d^(1/order)), a LayerNorm([rank, m^2]) after
  each pairwise leaf product, order in {1, 2, 4}, ``num_skills`` tensor-rank components, and
  the official init (``tensor_init="official"``: not a no-op). ``"zero"`` (megamoe's, not in
  mttl) zeroes B's LayerNorm affine (or B's leaves at order 1) so the adapter starts as a
  no-op; it is refused at order 4, where B = kron(0, 0) is a saddle with every gradient 0.
- MTA (ALTER): one bottleneck adapter per task on every decoder layer's output hidden state,
  mixed by a task-level router (``mta_router="task"``, a learned [T, T] logit table);
  ``mta_router_init`` puts weight on the task's own adapter so stage 2 starts where stage 1
  ended rather than from a uniform mixture.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megamoe.config import check

METHODS = ("lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta")


@dataclass(kw_only=True)
class AdapterConfig:
    """Task-routed adapters on a frozen base (the module docstring gives the defaults' reasons)."""

    method: Literal["lora", "poly", "cpoly", "tensorpoly1", "tensorpoly2", "mta"] = "lora"
    """Adapter method."""
    num_tasks: int = 1
    """Tasks T (set by tools/finetune.py from the task list)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Projections that get an adapter: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj, or all."""
    rank: int = 4
    """LoRA rank r of every LoRA-family method."""
    alpha: float = 1.0
    """Scale alpha / r of every LoRA-family method (1 = the official Poly 1/r)."""
    routing_lr: float = 0.1
    """AdamW learning rate of the routing logits (mttl's module_logits_learning_rate)."""
    relaxed_bernoulli: bool = True
    """Sample the routing in training (Poly); false = sigmoid (TensorPoly's best setting)."""
    temperature: float = 1.0
    """Relaxed-Bernoulli (Gumbel-sigmoid) temperature, training only."""
    # Poly / MHR / C-Poly
    num_skills: int = 4
    """Shared skill inventory S (Poly, MHR, C-Poly; TensorPoly's tensor-rank components)."""
    num_splits: int = 1
    """MHR blocks (1 = Poly); must divide the in and out dims."""
    private_skills: int = 1
    """C-Poly private skills per task (0 = Poly)."""
    cpoly_route_private: bool = True
    """C-Poly: private skills get learned routing logits too."""
    cpoly_normalize: Literal["joint", "separate"] = "separate"
    """C-Poly: normalise shared and private weights separately (private at full weight) or jointly."""
    # TensorPoly-I/II (skills = num_skills tensor-rank components / per-order inventory)
    tensor_order: int = 4
    """TensorPoly leaves per Kronecker product (official best: 4)."""
    tensor_init: Literal["official", "zero"] = "official"
    """TensorPoly init: the official one (not a no-op) or zero (a no-op start; orders 1 and 2 only)."""
    # MTA (ALTER)
    bottleneck: int = 16
    """MTA adapter width m (D -> m -> D)."""
    mta_router: Literal["task"] = "task"
    """MTA router input: the task id (a learned [T, T] logit table)."""
    mta_router_init: float = 3.0
    """MTA: initial logit of a task's own adapter (the others start at 0)."""

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
        check(self.num_skills >= (0 if self.method == "cpoly" else 1), "num_skills", self.num_skills,
              "must be >= 1 (>= 0 for cpoly: 0 = private LoRA per task only)")
        check(self.method != "cpoly" or self.num_skills + self.private_skills >= 1, "private_skills",
              self.private_skills, "cpoly needs num_skills + private_skills >= 1")
        check(self.num_splits >= 1, "num_splits", self.num_splits, "must be >= 1")
        check(self.private_skills >= 0, "private_skills", self.private_skills, "must be >= 0")
        check(self.routing_lr > 0, "routing_lr", self.routing_lr, "must be > 0")
        check(self.cpoly_normalize in ("joint", "separate"), "cpoly_normalize", self.cpoly_normalize,
              "must be 'joint' or 'separate'")
        check(self.tensor_order in (1, 2, 4), "tensor_order", self.tensor_order,
              "must be 1, 2 or 4 (the orders the official TensorPoly code builds)")
        check(self.tensor_init in ("official", "zero"), "tensor_init", self.tensor_init, "must be 'official' or 'zero'")
        check(not (self.method.startswith("tensorpoly") and self.tensor_init == "zero" and self.tensor_order == 4),
              "tensor_init", self.tensor_init, "zero at tensor_order=4 makes B = kron(0, 0), a saddle where every "
              "adapter gradient is 0: use tensor_init=official, or tensor_order 1 or 2")
        if self.method == "poly":  # PEFT's PolyRouter: relaxed Bernoulli at temperature 1, scale 1/r
            check(self.temperature == 1.0 and self.relaxed_bernoulli and self.alpha == 1.0, "method", self.method,
                  "runs PEFT's Poly (temperature 1, relaxed Bernoulli, scale 1/r); for other settings use "
                  "method cpoly with private_skills=0")
        check(self.bottleneck >= 1, "bottleneck", self.bottleneck, "must be >= 1")

    def targets(self) -> tuple[str, ...]:
        return TARGETS if "all" in self.target_modules else tuple(self.target_modules)


TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
