"""Config mapping: megamoe ModelConfig/MoEConfig <-> LlamaConfig / MixtralConfig / Qwen2MoeConfig /
MegamoeConfig, and the choice of export target.

Target rules (``choose_target``): a model exports to a *stock* architecture only when that
architecture computes exactly what megamoe computes:

- ``llama``: no MoE blocks, SwiGLU, RMSNorm, RoPE (biases allowed: Llama has attention_bias
  and mlp_bias).
- ``mixtral``: every block an MoE block with the learned router, FFN SwiGLU experts, RMSNorm,
  RoPE, no biases, ``top_k >= 2`` with ``router.combine`` renormalize or straight_through
  (same value). Mixtral always renormalises the top-k weights, so a top-1 (Switch) model goes
  to ``megamoe`` (its ``top1_weight`` says whether the weight is p or 1). Mixtral is
  dropless: a native eval capacity that drops tokens is the one documented difference.
- ``qwen2_moe``: learned softmax top-k router (any k; ``norm_topk_prob`` = combine renormalize /
  straight_through, False for prob), FFN SwiGLU experts, a *gated* shared expert in every MoE
  block (``moe.shared_experts`` N x width W is one FFN of width N*W =
  ``shared_expert_intermediate_size``; ``sigmoid(x . w)``, w [1, D]), any dense/MoE pattern
  (``mlp_only_layers``), no expert bias. Qwen2-MoE has biases on q/k/v only: a bias-free model
  exports zero q/k/v biases (``qkv_bias=True``, what every Qwen2-MoE loader expects; adding 0.0
  is exact), a ``model.bias`` model only when its o_proj and dense-FFN biases are all zero (an
  imported Qwen checkpoint). Dropless, as Mixtral. Transformers computes the router logits in
  the weights' dtype and the softmax in fp32: equal to native in an fp32 export.
- ``megamoe``: everything else (hash layers, MPO experts, GELU, LayerNorm, learned positions,
  ungated shared experts, expert bias, top-1 without shared experts).

Training-only settings (capacity, drop policy, aux / z / sequence / global-batch loss
coefficients, expert-bias rate, the N x W split of shared experts) do not change inference; every
export records them under ``megamoe_native`` in config.json and :func:`from_hf_config` restores
them, so export -> import gives back the same MoEConfig.
"""

from __future__ import annotations

import torch

from megamoe.errors import UserError
from megamoe.model.config import ModelConfig, MoEConfig, RouterConfig

TARGETS = ("llama", "mixtral", "qwen2_moe", "megamoe")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "megamoe": "MegamoeForCausalLM"}


def _common_stock_gaps(m: ModelConfig) -> list[str]:
    gaps = []
    if m.activation != "swiglu":
        gaps.append(f"model.activation={m.activation!r} (needs swiglu)")
    if m.norm != "rmsnorm":
        gaps.append(f"model.norm={m.norm!r} (needs rmsnorm)")
    if m.position_embedding != "rope":
        gaps.append(f"model.position_embedding={m.position_embedding!r} (needs rope)")
    return gaps


def nonzero_extra_biases(sd: dict[str, torch.Tensor] | None) -> list[str]:
    """Bias tensors Qwen2-MoE cannot hold (o_proj, dense FFN) that are not all zero (all of them
    when the weights are unknown)."""
    if sd is None:
        return ["(weights not given)"]
    extra = [k for k in sd if k.endswith(".bias") and (".attn.o_proj." in k or ".mlp." in k)]
    return sorted(k for k in extra if bool(sd[k].any()))


def target_gaps(target: str, m: ModelConfig, moe: MoEConfig, sd: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Why ``target`` cannot express the model ([] when it can). ``sd`` (canonical weights) is
    read only for qwen2_moe with ``model.bias`` (are the biases Qwen2-MoE lacks all zero?)."""
    if target == "megamoe":
        if moe.num_experts and moe.hash_layers and moe.hash.variant == "oracle_future":
            return ["moe.hash.variant='oracle_future' routes by the next token, which does not exist at "
                    "inference (analysis-only variant)"]
        return []
    moe_layers = moe.moe_layer_indices(m.num_layers)
    gaps = _common_stock_gaps(m)
    if target == "llama":
        if moe_layers:
            gaps.append(f"MoE blocks {moe_layers} (Llama is dense)")
        return gaps
    if target == "qwen2_moe":
        return gaps + _qwen2_moe_gaps(m, moe, moe_layers, sd)
    if target != "mixtral":
        raise UserError(f"--target {target!r}: choose one of auto, {', '.join(TARGETS)}")
    if m.bias:
        gaps.append("model.bias=true (Mixtral has no biases)")
    if not moe_layers:
        gaps.append("no MoE blocks (dense model: use llama)")
    elif moe_layers != list(range(m.num_layers)):
        gaps.append(f"MoE only in blocks {moe_layers} of {m.num_layers} (Mixtral needs every block MoE)")
    if moe.hash_layers:
        gaps.append(f"hash routing in blocks {sorted(moe.hash_layers)} (Mixtral has only a learned router)")
    if moe.expert_type != "ffn":
        gaps.append(f"moe.expert_type={moe.expert_type!r} (Mixtral experts are dense SwiGLU FFNs)")
    if moe_layers and moe.router.top_k == 1:
        gaps.append("moe.router.top_k=1: Switch scales the expert output by its router probability, "
                    "Mixtral always renormalises the top-k weights (weight 1.0 for k=1)")
    elif moe_layers and moe.router.combine == "prob":
        gaps.append("moe.router.combine=prob (Mixtral always renormalises the top-k weights)")
    if moe_layers and moe.shared_experts:
        gaps.append(f"moe.shared_experts={moe.shared_experts} (Mixtral has no shared experts)")
    if moe_layers and moe.router.expert_bias_rate > 0:
        gaps.append("moe.router.expert_bias_rate>0 (Mixtral chooses experts without a bias)")
    gaps += fine_grained_gaps(moe, "Mixtral") if moe_layers else []
    return gaps


def _qwen2_moe_gaps(m: ModelConfig, moe: MoEConfig, moe_layers: list[int], sd) -> list[str]:
    if not moe_layers:
        return ["no MoE blocks (dense model: use llama)"]
    gaps = []
    if m.bias:
        extra = nonzero_extra_biases(sd)
        if extra:
            gaps.append(f"model.bias=true with nonzero {', '.join(extra[:3])} (Qwen2-MoE has biases on q/k/v only)")
    if moe.hash_layers:
        gaps.append(f"hash routing in blocks {sorted(moe.hash_layers)} (Qwen2-MoE has only a learned router)")
    if moe.expert_type != "ffn":
        gaps.append(f"moe.expert_type={moe.expert_type!r} (Qwen2-MoE experts are dense SwiGLU FFNs)")
    if not moe.shared_experts:
        gaps.append("moe.shared_experts=0 (every Qwen2-MoE block has a shared expert)")
    elif not moe.shared_expert_gate:
        gaps.append("moe.shared_expert_gate=false (Qwen2-MoE always scales its shared expert by a sigmoid gate)")
    if moe.router.expert_bias_rate > 0:
        gaps.append("moe.router.expert_bias_rate>0 (Qwen2-MoE chooses experts without a bias)")
    return gaps + fine_grained_gaps(moe, "Qwen2-MoE")


def fine_grained_gaps(moe: MoEConfig, arch: str) -> list[str]:
    """Router settings only the megamoe architecture computes (softmax, no factor, no groups)."""
    r, gaps = moe.router, []
    if r.scoring != "softmax":
        gaps.append(f"moe.router.scoring={r.scoring!r} ({arch} scores experts by softmax)")
    if r.routed_scaling_factor != 1.0:
        gaps.append(f"moe.router.routed_scaling_factor={r.routed_scaling_factor} ({arch} has no weight scale)")
    if r.n_group > 1:
        gaps.append(f"moe.router.n_group={r.n_group} ({arch} has no group-limited top-k)")
    if moe.hash_moe.layers:
        gaps.append(f"moe.hash_moe.layers={moe.hash_moe.layers} ({arch} has no hash-MoE routing)")
    return gaps


def choose_target(requested: str, m: ModelConfig, moe: MoEConfig, sd: dict[str, torch.Tensor] | None = None) -> str:
    if requested == "auto":
        for t in TARGETS:
            if not target_gaps(t, m, moe, sd):
                return t
        raise UserError("; ".join(target_gaps("megamoe", m, moe)))
    gaps = target_gaps(requested, m, moe, sd)
    if gaps:
        raise UserError(f"--target {requested} cannot express this model: " + "; ".join(gaps)
                        + ". Use --target auto (picks megamoe when no stock architecture fits).")
    return requested


def _special(tok_ids: dict | None) -> dict:
    tok_ids = tok_ids or {}
    return {"bos_token_id": tok_ids.get("bos"), "eos_token_id": tok_ids.get("eos"), "pad_token_id": tok_ids.get("pad")}


def _llama_like(m: ModelConfig, tok_ids) -> dict:
    return dict(vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
                num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
                hidden_act="silu", max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std, **_special(tok_ids))


def hf_config(target: str, m: ModelConfig, moe: MoEConfig, sd: dict[str, torch.Tensor], tok_ids=None):
    """The transformers config object of ``target`` for this model (``sd``: canonical state dict,
    read for hash-table and MPO tensor shapes)."""
    if target == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(intermediate_size=m.ffn_hidden_size, attention_bias=m.bias, mlp_bias=m.bias,
                           architectures=["LlamaForCausalLM"], **_llama_like(m, tok_ids))
    if target == "mixtral":
        from transformers import MixtralConfig

        r = moe.router
        return MixtralConfig(intermediate_size=moe.expert_ffn_hidden_size or m.ffn_hidden_size,
                             num_local_experts=moe.num_experts, num_experts_per_tok=r.top_k,
                             router_aux_loss_coef=r.aux_loss_coef, router_jitter_noise=r.jitter_eps,
                             output_router_logits=False, sliding_window=None, architectures=["MixtralForCausalLM"],
                             megamoe_native=native_record(moe), **_llama_like(m, tok_ids))
    if target == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        r, F = moe.router, moe.expert_ffn_hidden_size or m.ffn_hidden_size
        moe_layers = moe.moe_layer_indices(m.num_layers)
        common = _llama_like(m, tok_ids)
        common.pop("head_dim")  # Qwen2-MoE derives it: hidden_size / num_attention_heads
        return Qwen2MoeConfig(intermediate_size=m.ffn_hidden_size, moe_intermediate_size=F,
                              shared_expert_intermediate_size=moe.shared_experts * (moe.shared_expert_ffn_hidden_size
                                                                                    or F),
                              num_experts=moe.num_experts, num_experts_per_tok=r.top_k,
                              norm_topk_prob=r.combine != "prob", decoder_sparse_step=1,
                              mlp_only_layers=[i for i in range(m.num_layers) if i not in moe_layers],
                              qkv_bias=True, use_sliding_window=False, router_aux_loss_coef=r.aux_loss_coef,
                              output_router_logits=False, architectures=["Qwen2MoeForCausalLM"],
                              megamoe_native=native_record(moe), **common)
    return megamoe_config(m, moe, sd, tok_ids)


# Router fields that do not change inference (kept by exports, restored by imports).
TRAINING_ROUTER_FIELDS = ("capacity_factor", "eval_capacity_factor", "drop_policy", "dtype", "aux_loss_coef",
                          "z_loss_coef", "jitter_eps", "seq_aux_loss_coef", "global_aux_loss_coef",
                          "expert_bias_rate", "combine")


def native_record(moe: MoEConfig) -> dict:
    """What config.json keeps of the native MoE settings inference does not need."""
    return {"router": {k: getattr(moe.router, k) for k in TRAINING_ROUTER_FIELDS},
            "shared_experts": moe.shared_experts, "shared_expert_ffn_hidden_size": moe.shared_expert_ffn_hidden_size}


def megamoe_config(m: ModelConfig, moe: MoEConfig, sd: dict[str, torch.Tensor], tok_ids=None):
    from megamoe.hf.configuration_megamoe import MegamoeConfig
    from megamoe.model.gpt import PREV_TOKEN_AT_START
    from megamoe.moe.mpo import central_index

    moe_layers = moe.moe_layer_indices(m.num_layers)
    types = ["dense"] * m.num_layers
    for i in moe_layers:
        types[i] = "hash" if i in moe.hash_layers else "learned"
    for i in moe.hash_moe_layer_indices(m.num_layers):  # DeepSeek-V4 hash-MoE (megamoe/moe/hash_moe.py)
        types[i] = "hash_moe"
    table_shape = mpo_shapes = None
    for i in moe_layers:
        key = f"layers.{i}.moe.router.table"
        if key in sd:
            table_shape = list(sd[key].shape)
        if f"layers.{i}.moe.experts.up_proj.central" in sd:
            mpo_shapes = {}
            for proj in ("gate_proj", "up_proj", "down_proj"):
                c = sd.get(f"layers.{i}.moe.experts.{proj}.central")
                if c is None:
                    continue
                n = moe.mpo.num_tensors
                chain = [sd[f"layers.{i}.moe.experts.0.{proj}.aux{k}"] if k != central_index(n) else c
                         for k in range(n)]
                mpo_shapes[proj] = [list(t.shape) for t in chain]
    r, h, n = moe.router, moe.hash, moe.mpo.num_tensors
    cfg = MegamoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.kv_heads, intermediate_size=m.ffn_hidden_size,
        expert_intermediate_size=moe.expert_ffn_hidden_size or m.ffn_hidden_size, activation=m.activation,
        gelu_approximate="tanh", expert_gelu_approximate="tanh", norm=m.norm, norm_eps=m.norm_eps,
        position_embedding=m.position_embedding, rope_theta=m.rope_theta,
        max_position_embeddings=m.max_position_embeddings, bias=m.bias, tie_word_embeddings=m.tie_embeddings,
        initializer_range=m.init_std, mlp_types=types, num_experts=moe.num_experts, num_experts_per_tok=r.top_k,
        normalize_top_k=r.combine != "prob", top1_weight="prob" if r.combine == "prob" else "one",
        learned_expert_type=moe.expert_type,
        router_expert_bias=any(f"layers.{i}.moe.router.expert_bias" in sd for i in moe_layers),
        scoring_func=r.scoring, routed_scaling_factor=r.routed_scaling_factor, n_group=r.n_group,
        topk_group=r.topk_group,
        shared_expert_intermediate_size=moe.shared_experts * (moe.shared_expert_ffn_hidden_size or
                                                              moe.expert_ffn_hidden_size or m.ffn_hidden_size),
        shared_expert_gate=moe.shared_expert_gate,
        hash_variant=h.variant, num_hashes=h.num_hashes, bigram_prime=h.bigram_prime,
        hash_start_id=PREV_TOKEN_AT_START, hash_expert_type=h.expert_type, hash_table_shape=table_shape,
        hash_moe_top_k=moe.hash_moe_top_k if moe.hash_moe.layers else 0, hash_moe_normalize=moe.hash_moe.normalize,
        mpo_num_tensors=n, mpo_central_index=central_index(n), mpo_shapes=mpo_shapes, **_special(tok_ids))
    cfg.auto_map = {"AutoConfig": "configuration_megamoe.MegamoeConfig",
                    "AutoModelForCausalLM": "modeling_megamoe.MegamoeForCausalLM"}
    cfg.architectures = ["MegamoeForCausalLM"]
    # What the native config said about capacity, kept for the record (inference is dropless).
    cfg.native_eval_capacity_factor = r.eval_capacity_factor
    cfg.megamoe_native = native_record(moe)
    return cfg


# ---------------------------------------------------------------- import (HF -> megamoe)

def _get(cfg: dict, key: str, default=None):
    return cfg.get(key, default) if cfg.get(key) is not None else default


IMPORTABLE = ("llama", "mixtral", "qwen2_moe")


def from_hf_config(cfg: dict, source: str) -> tuple[str, ModelConfig, MoEConfig]:
    """config.json dict of a Llama, Mixtral or Qwen2-MoE checkpoint -> (arch, ModelConfig,
    MoEConfig). Refuses features megamoe does not model, naming the config field. Qwen2-MoE's
    q/k/v biases are decided by their values (:func:`megamoe.hf.import_.import_hf`); here its
    ``model.bias`` is False. A ``megamoe_native`` record (megamoe's own exports) restores the
    training-only router settings and the shared experts' N x W split."""
    arch = cfg.get("model_type")
    if arch not in IMPORTABLE:
        raise UserError(f"{source}: model_type={arch!r}; convert_from_hf reads {', '.join(map(repr, IMPORTABLE))} "
                        "checkpoints")

    def refuse(field, value, why):
        raise UserError(f"{source}: {field}={value!r} is not supported ({why})")

    if _get(cfg, "hidden_act", "silu") != "silu":
        refuse("hidden_act", cfg["hidden_act"], "megamoe's SwiGLU uses silu")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse("rope_parameters.rope_type", rope.get("rope_type"), "only plain RoPE is implemented")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    if _get(cfg, "head_dim", D // H) != D // H:
        refuse("head_dim", cfg["head_dim"], f"megamoe uses hidden_size / num_attention_heads = {D // H}")
    bias = bool(cfg.get("attention_bias", False))
    if bool(cfg.get("mlp_bias", False)) != bias:
        refuse("mlp_bias", cfg.get("mlp_bias"), "megamoe has one bias switch for attention and MLP")
    if arch == "mixtral" and bias:
        refuse("attention_bias", True, "megamoe's experts have no biases")
    if arch == "qwen2_moe":
        if cfg.get("use_sliding_window") or "sliding_attention" in (cfg.get("layer_types") or []):
            refuse("use_sliding_window", True, "megamoe attention is full causal attention")
    else:
        window = cfg.get("sliding_window")
        if window is not None and window < cfg.get("max_position_embeddings", 0):
            refuse("sliding_window", window, "megamoe attention is full causal attention")
    model = ModelConfig(
        vocab_size=cfg["vocab_size"], hidden_size=D, num_layers=cfg["num_hidden_layers"], num_heads=H,
        num_kv_heads=_get(cfg, "num_key_value_heads", H), ffn_hidden_size=cfg["intermediate_size"],
        activation="swiglu", norm="rmsnorm", norm_eps=_get(cfg, "rms_norm_eps", 1e-6), position_embedding="rope",
        rope_theta=float(theta), max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)), bias=bias,
        init_std=_get(cfg, "initializer_range", 0.02))
    if arch == "llama":
        return arch, model, MoEConfig()
    record = cfg.get("megamoe_native") or {}
    k = cfg["num_experts_per_tok"]
    if arch == "mixtral":  # Mixtral renormalises the top-k (weight 1 at k = 1)
        router = _router(k, True, record, aux_loss_coef=_get(cfg, "router_aux_loss_coef", 0.01),
                         jitter_eps=_get(cfg, "router_jitter_noise", 0.0))
        moe = MoEConfig(num_experts=cfg["num_local_experts"], every=1, expert_ffn_hidden_size=cfg["intermediate_size"],
                        router=router)
        return arch, model, moe
    E, L = _get(cfg, "num_experts", 0), model.num_layers
    step, dense = _get(cfg, "decoder_sparse_step", 1), set(_get(cfg, "mlp_only_layers", []))
    layers = [i for i in range(L) if E > 0 and i not in dense and (i + 1) % step == 0]
    if not layers:
        return arch, model, MoEConfig()
    width = _get(cfg, "shared_expert_intermediate_size", 0)
    if width <= 0:
        refuse("shared_expert_intermediate_size", width, "a megamoe shared expert has width > 0; every Qwen2-MoE "
               "block adds sigmoid(x . w) x shared_expert(x)")
    n, w = record.get("shared_experts"), record.get("shared_expert_ffn_hidden_size")
    moe_ffn = cfg["moe_intermediate_size"]
    if not (isinstance(n, int) and n >= 1 and n * (w or moe_ffn) == width):  # no (or a stale) record: one of width
        n, w = 1, width
    router = _router(k, bool(cfg.get("norm_topk_prob", False)), record,
                     aux_loss_coef=_get(cfg, "router_aux_loss_coef", 0.001))
    moe = MoEConfig(num_experts=E, **({"every": 1} if len(layers) == L else {"layers": layers}),
                    expert_ffn_hidden_size=moe_ffn, shared_experts=n, shared_expert_ffn_hidden_size=w,
                    shared_expert_gate=True, router=router)
    return arch, model, moe


def _router(k: int, normalized: bool, record: dict, **stock) -> RouterConfig:
    """Top-k router of a stock MoE: ``normalized`` top-k weights (renormalize, or straight_through
    at k = 1: the same value) or plain probabilities (prob); dropless. The record's training-only
    fields win over the defaults; its combine only when it gives the same inference weights."""
    combine = ("renormalize" if k > 1 else "straight_through") if normalized else "prob"
    fields = {"eval_capacity_factor": 0.0, **stock}
    rec = {f: v for f, v in (record.get("router") or {}).items() if f in TRAINING_ROUTER_FIELDS}
    if (rec.get("combine") != "prob") == normalized and (rec.get("combine") != "renormalize" or k > 1):
        combine = rec.get("combine", combine)
    rec.pop("combine", None)
    rec.pop("expert_bias_rate", None)  # stock files hold no expert bias (exports to them refuse one)
    return RouterConfig(top_k=k, combine=combine, **{**fields, **rec})


def human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.{1 if n / div < 100 else 0}f}{unit}"
    return str(n)
