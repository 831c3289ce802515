"""Declarative key tables between megamoe's canonical full state dict and Hugging Face layouts.

Each table is a list of ``(canonical template, HF template)`` pairs with ``{LAYER}`` and
``{EXPERT}`` placeholders. ``to_hf`` / ``from_hf`` rename every key through the table and
raise on any key that no row matches, so no weight is ever dropped or left uninitialised in
silence (the failure mode of several Megatron converters).

Traps:
- Mixtral on disk: transformers 5.x *computes* with fused expert tensors
  (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F]) but
  ``save_pretrained`` writes, and every version loads, the legacy per-expert layout
  ``block_sparse_moe.experts.{e}.w1/w2/w3`` (w1 = gate, w3 = up, w2 = down). Exports write the
  legacy layout; imports accept both (:func:`unfuse_mixtral`).
- Qwen2-MoE on disk: the same story (fused ``mlp.experts.gate_up_proj`` in memory, per-expert
  ``mlp.experts.{e}.gate_proj/up_proj/down_proj`` in files; :func:`unfuse_qwen2_moe`). Its
  router is ``mlp.gate.weight`` and its dense blocks' FFN ``mlp.gate_proj.weight``: the
  anchored patterns keep them apart. Only q/k/v have biases (the export adds / drops zero
  biases around this table: :func:`qwen2_moe_biases`).
- The ``megamoe`` custom architecture mirrors the canonical names under ``model.`` so its
  table is a pure prefix (hash tables and MPO tensors included).
"""

from __future__ import annotations

import re
from typing import Iterable

import torch

from megamoe.errors import UserError

_ATTN = [
    ("layers.{LAYER}.attn_norm.weight", "model.layers.{LAYER}.input_layernorm.weight"),
    ("layers.{LAYER}.attn.q_proj.weight", "model.layers.{LAYER}.self_attn.q_proj.weight"),
    ("layers.{LAYER}.attn.k_proj.weight", "model.layers.{LAYER}.self_attn.k_proj.weight"),
    ("layers.{LAYER}.attn.v_proj.weight", "model.layers.{LAYER}.self_attn.v_proj.weight"),
    ("layers.{LAYER}.attn.o_proj.weight", "model.layers.{LAYER}.self_attn.o_proj.weight"),
    ("layers.{LAYER}.mlp_norm.weight", "model.layers.{LAYER}.post_attention_layernorm.weight"),
]
_QKV_BIAS = [(f"layers.{{LAYER}}.attn.{p}.bias", f"model.layers.{{LAYER}}.self_attn.{p}.bias")
             for p in ("q_proj", "k_proj", "v_proj")]
_DENSE_MLP = [(f"layers.{{LAYER}}.mlp.{p}.weight", f"model.layers.{{LAYER}}.mlp.{p}.weight")
              for p in ("gate_proj", "up_proj", "down_proj")]
# Llama attention_bias / mlp_bias (megamoe model.bias: every attention and dense FFN projection)
_LLAMA_BIAS = _QKV_BIAS + [("layers.{LAYER}.attn.o_proj.bias", "model.layers.{LAYER}.self_attn.o_proj.bias")] + [
    (f"layers.{{LAYER}}.mlp.{p}.bias", f"model.layers.{{LAYER}}.mlp.{p}.bias") for p in ("gate_proj", "up_proj",
                                                                                          "down_proj")]
_ENDS = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("final_norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

LLAMA_KEYS: list[tuple[str, str]] = _ENDS + _ATTN + _DENSE_MLP + _LLAMA_BIAS

MIXTRAL_KEYS: list[tuple[str, str]] = _ENDS + _ATTN + [
    ("layers.{LAYER}.moe.router.weight", "model.layers.{LAYER}.block_sparse_moe.gate.weight"),
    ("layers.{LAYER}.moe.experts.{EXPERT}.gate_proj.weight",
     "model.layers.{LAYER}.block_sparse_moe.experts.{EXPERT}.w1.weight"),
    ("layers.{LAYER}.moe.experts.{EXPERT}.up_proj.weight",
     "model.layers.{LAYER}.block_sparse_moe.experts.{EXPERT}.w3.weight"),
    ("layers.{LAYER}.moe.experts.{EXPERT}.down_proj.weight",
     "model.layers.{LAYER}.block_sparse_moe.experts.{EXPERT}.w2.weight"),
]

QWEN2_MOE_KEYS: list[tuple[str, str]] = _ENDS + _ATTN + _QKV_BIAS + _DENSE_MLP + [
    ("layers.{LAYER}.moe.router.weight", "model.layers.{LAYER}.mlp.gate.weight"),
    *[(f"layers.{{LAYER}}.moe.experts.{{EXPERT}}.{p}.weight", f"model.layers.{{LAYER}}.mlp.experts.{{EXPERT}}.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")],
    *[(f"layers.{{LAYER}}.moe.shared_expert.{p}.weight", f"model.layers.{{LAYER}}.mlp.shared_expert.{p}.weight")
      for p in ("gate_proj", "up_proj", "down_proj")],
    ("layers.{LAYER}.moe.shared_expert_gate.weight", "model.layers.{LAYER}.mlp.shared_expert_gate.weight"),
]

# megamoe custom architecture: canonical names under "model." (lm_head stays at the top).
MEGAMOE_KEYS: list[tuple[str, str]] = [
    ("lm_head.{REST}", "lm_head.{REST}"),
    ("{REST}", "model.{REST}"),
]

TABLES = {"llama": LLAMA_KEYS, "mixtral": MIXTRAL_KEYS, "qwen2_moe": QWEN2_MOE_KEYS, "megamoe": MEGAMOE_KEYS}

_FIELDS = {"LAYER": r"(?P<LAYER>\d+)", "EXPERT": r"(?P<EXPERT>\d+)", "REST": r"(?P<REST>.+)"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"(\{[A-Z]+\})", template)
    return re.compile("".join(_FIELDS[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _rename(keys: Iterable[str], rows: list[tuple[str, str]], what: str) -> dict[str, str]:
    compiled = [(_compile(src), dst) for src, dst in rows]
    out = {}
    for key in keys:
        for pattern, dst in compiled:
            m = pattern.match(key)
            if m:
                out[key] = dst.format(**m.groupdict())
                break
        else:
            raise UserError(f"{what}: tensor {key!r} has no entry in the conversion table; "
                            "the target architecture cannot express this model")
    return out


def _flip(rows):
    return [(hf, canon) for canon, hf in rows]


def to_hf(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """Canonical names -> HF names of ``arch`` ('llama' | 'mixtral' | 'qwen2_moe' | 'megamoe')."""
    names = _rename(state_dict, TABLES[arch], f"export to {arch}")
    return {names[k]: v for k, v in state_dict.items()}


def from_hf(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """HF names of ``arch`` -> canonical names (Mixtral / Qwen2-MoE fused tensors are split first)."""
    state_dict = unfuse(state_dict, arch)
    names = _rename(state_dict, _flip(TABLES[arch]), f"import from {arch}")
    return {names[k]: v for k, v in state_dict.items()}


_FUSED = re.compile(r"model\.layers\.(\d+)\.mlp\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight)$")


def unfuse_mixtral(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite transformers-5 fused Mixtral tensors into the legacy per-expert layout.

    ``gate_up_proj[e]`` is ``cat([gate_e, up_e], dim=0)`` (the model splits it with
    ``chunk(2, dim=-1)`` after the matmul), so rows ``[:F]`` are w1 and ``[F:]`` are w3.
    """
    out = {}
    for key, value in state_dict.items():
        m = _FUSED.match(key)
        if not m:
            out[key] = value
            continue
        layer, kind = m.groups()
        base = f"model.layers.{layer}.block_sparse_moe"
        if kind == "gate.weight":
            out[f"{base}.gate.weight"] = value
        else:
            names = {"gate": "w1", "up": "w3", "down": "w2"}
            _unfuse_experts(out, value, kind == "experts.down_proj", lambda e, w: f"{base}.experts.{e}.{names[w]}.weight")
    return out


def _unfuse_experts(out: dict, value: torch.Tensor, is_down: bool, name_of) -> None:
    """Fused ``gate_up_proj`` [E, 2F, D] (rows: gate then up) or ``down_proj`` [E, D, F] ->
    ``out[name_of(e, 'gate' | 'up' | 'down')]`` per expert."""
    if is_down:
        for e in range(value.shape[0]):
            out[name_of(e, "down")] = value[e].clone()
        return
    gate, up = value.chunk(2, dim=1)
    for e in range(value.shape[0]):
        out[name_of(e, "gate")] = gate[e].clone()
        out[name_of(e, "up")] = up[e].clone()


def unfuse(state_dict: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The on-disk (per-expert) layout of ``arch`` for a state dict in either layout."""
    return {"mixtral": unfuse_mixtral, "qwen2_moe": unfuse_qwen2_moe}.get(arch, dict)(state_dict)


_FUSED_QWEN = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def unfuse_qwen2_moe(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers-5 fused Qwen2-MoE experts (``gate_up_proj`` [E, 2F, D] = cat(gate, up) per
    expert, ``down_proj`` [E, D, F]) -> ``experts.{e}.gate_proj/up_proj/down_proj.weight``."""
    out = {}
    for key, value in state_dict.items():
        m = _FUSED_QWEN.match(key)
        if not m:
            out[key] = value
            continue
        base, kind = m.groups()
        _unfuse_experts(out, value, kind == "down_proj", lambda e, w: f"{base}.{e}.{w}_proj.weight")
    return out


def qwen2_moe_biases(sd: dict[str, torch.Tensor], bias: bool) -> dict[str, torch.Tensor]:
    """Canonical weights -> the biases a Qwen2-MoE file holds: q/k/v only. A bias-free model gets
    zero q/k/v biases (exact: adding 0.0 changes no value); a ``model.bias`` model drops its
    o_proj / dense-FFN biases, which the export has checked are all zero
    (:func:`megamoe.hf.configs.nonzero_extra_biases`)."""
    if bias:
        return {k: v for k, v in sd.items()
                if not (k.endswith(".bias") and (".attn.o_proj." in k or ".mlp." in k))}
    out = dict(sd)
    for k, v in sd.items():
        m = re.fullmatch(r"(layers\.\d+\.attn\.[qkv]_proj)\.weight", k)
        if m:
            out[f"{m.group(1)}.bias"] = torch.zeros(v.shape[0], dtype=v.dtype)
    return out
