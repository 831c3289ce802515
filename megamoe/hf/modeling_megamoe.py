"""Hugging Face model of the ``megamoe`` architecture (self-contained: torch/transformers only).

Copied verbatim into ``megamoe``-type exports (loaded with ``trust_remote_code=True``) and
registered with ``AutoModelForCausalLM`` when :mod:`megamoe.hf` is imported. It computes what
the native megamoe model computes in eval mode, written for clarity rather than speed (one
gather + matmul per expert used; MPO experts are contracted to dense matrices each forward).

Parameter names mirror megamoe's canonical state dict under ``model.`` (hash tables and MPO
tensors included), so export is a prefix rename.

Inference semantics, and where they differ from native *training*:
- learned routers are **dropless** here: every token reaches its top-k experts. The native
  model applies ``eval_capacity_factor`` in eval mode; the two agree whenever no token would
  be dropped (always when ``eval_capacity_factor <= 0`` or ``>= num_experts / top_k``). A
  capacity that depends on how many tokens share a batch cannot be honoured token by token
  during cached generation, so dropless is the only consistent choice.
- no router jitter, no aux / z losses (training-only).
- an expert bias (``config.router_expert_bias``: ``router.expert_bias`` [E], fp32, native
  ``moe.router.expert_bias_rate > 0``) is added to the probabilities for the top-k choice only;
  the combine weights are the unbiased probabilities (as DeepSeek-V3's ``e_score_correction_bias``).
- scoring (``config.scoring_func``): softmax, sigmoid (DeepSeek-V3) or sqrt(softplus) (DeepSeek-V4)
  scores; with ``n_group`` > 1 the choice is limited to the ``topk_group`` best of ``n_group``
  contiguous expert groups (a group's score: the sum of its 2 best biased scores; the others get
  -inf); combine weights are the unbiased scores of the chosen experts, renormalised by
  ``S + 1e-20`` when ``normalize_top_k``, times ``routed_scaling_factor`` (native router.py).
- shared experts (``config.shared_expert_intermediate_size`` > 0, native ``moe.shared_experts``)
  run beside the routed experts of every MoE block, learned or hash, and are added to their
  output, optionally scaled by ``sigmoid(x . shared_expert_gate.weight)`` (Qwen2-MoE).
- DeepSeek-V4 hash-MoE blocks (``"hash_moe"``, native ``moe.hash_moe``): experts
  ``router.tid2eid[input_ids]`` (k distinct per id), weights the ``scoring_func`` scores of those
  k from ``router.weight`` (fp32), / their sum + 1e-20 when ``hash_moe_normalize``, times
  ``routed_scaling_factor``; dropless, as native (transformers' ``DeepseekV4HashRouter``).
- hash routing needs token ids: current ids (``input_ids``), previous ids (``previous``
  and ``bigram`` variants) and positions (``position`` variant). During cached decoding the
  previous id of the first new token lies in the cache's past: :meth:`prepare_inputs_for_generation`
  passes it as ``prev_input_ids``; a manual cached forward must pass it too (else an error).
  Left-padded batches (with ``attention_mask``) get positions counted over real tokens only, so
  each row generates as it would alone -- except that previous-token hash routing sees the pad
  id, not id 0, as the "previous" id of a row's first real token.

Shape legend: B batch, S new tokens, L keys (past + new), T = B*S tokens, D width,
H / KV heads, E experts, K top-k, N hashes (MultiHash), F expert hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megamoe import MegamoeConfig

PROJS = ("gate_proj", "up_proj", "down_proj")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: MegamoeConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, S, hd]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Attention(nn.Module):
    def __init__(self, config: MegamoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.h, self.kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        d, b = config.hidden_size, config.bias
        self.q_proj = nn.Linear(d, self.h * self.hd, bias=b)
        self.k_proj = nn.Linear(d, self.kv * self.hd, bias=b)
        self.v_proj = nn.Linear(d, self.kv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.h * self.hd, d, bias=b)

    def forward(self, x_BSD, cos_sin, mask, cache: Cache | None):
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.kv, self.hd).transpose(1, 2)
        if cos_sin is not None:
            cos, sin = cos_sin
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, dim=1)
            v = v.repeat_interleave(self.h // self.kv, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=S > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.h * self.hd))


def activation(config: MegamoeConfig, gate, up, gelu_approximate: str):
    if config.activation == "swiglu":
        return F.silu(gate) * up
    return F.gelu(up, approximate=gelu_approximate)


class MLP(nn.Module):
    """Dense FFN (exact-erf GELU, biases when ``config.bias``); also one FFN expert
    (``experts.{e}``: never biased, tanh GELU -- both as in native megamoe)."""

    def __init__(self, config: MegamoeConfig, hidden: int, expert: bool = False, bias: bool | None = None):
        super().__init__()
        self.config = config
        self.gelu = config.expert_gelu_approximate if expert else config.gelu_approximate
        d, b = config.hidden_size, (config.bias and not expert) if bias is None else bias
        if config.activation == "swiglu":
            self.gate_proj = nn.Linear(d, hidden, bias=b)
        self.up_proj = nn.Linear(d, hidden, bias=b)
        self.down_proj = nn.Linear(hidden, d, bias=b)

    def forward(self, x):
        gate = self.gate_proj(x) if self.config.activation == "swiglu" else None
        return self.down_proj(activation(self.config, gate, self.up_proj(x), self.gelu))

    def weights(self, proj: str):
        lin = getattr(self, proj)
        return lin.weight, lin.bias


class MPOTensors(nn.Module):
    """Holds named MPO tensors as parameters (``central`` or ``aux{k}``)."""

    def __init__(self, shapes: dict[str, list[int]]):
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))


def mpo_contract(tensors):
    """Chain of local tensors ``(r_{k-1}, i_k, j_k, r_k)`` -> the ``(prod i, prod j)`` matrix
    (row index = (i_1, ..., i_n) in C order, column index = (j_1, ..., j_n))."""
    t = tensors[0][0]  # (i, j, r)
    for a in tensors[1:]:
        i0, j0, _ = t.shape
        _, i1, j1, r1 = a.shape
        t = torch.einsum("abr,rijs->aibjs", t, a).reshape(i0 * i1, j0 * j1, r1)
    return t[..., 0]


class MPOExperts(nn.Module):
    """``experts.{proj}.central`` (shared by the layer's experts) + ``experts.{e}.{proj}.aux{k}``."""

    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.config = config
        c, shapes = config.mpo_central_index, config.mpo_shapes
        projs = [p for p in PROJS if p in shapes]
        for p in projs:
            self.add_module(p, MPOTensors({"central": shapes[p][c]}))
        aux_pos = [k for k in range(config.mpo_num_tensors) if k != c]
        for e in range(config.num_experts):
            expert = nn.Module()
            for p in projs:
                expert.add_module(p, MPOTensors({n: shapes[p][k] for n, k in zip(config.mpo_aux_names, aux_pos)}))
            self.add_module(str(e), expert)

    def weights(self, e: int, proj: str):
        c = self.config.mpo_central_index
        aux = getattr(getattr(self, str(e)), proj)
        chain = [getattr(aux, n) for n in self.config.mpo_aux_names]
        chain.insert(c, getattr(self, proj).central)
        w = mpo_contract(chain)
        return (w.t() if self.config.mpo_transposed else w), None


class FFNExperts(nn.ModuleList):
    def __init__(self, config: MegamoeConfig):
        super().__init__([MLP(config, config.expert_intermediate_size, expert=True)
                          for _ in range(config.num_experts)])

    def weights(self, e: int, proj: str):
        return self[e].weights(proj)


def expert_ffn(config, experts, e: int, x_TD, block: tuple[int, int] | None = None):
    """Expert ``e`` on tokens ``x_TD``; ``block=(m, N)`` keeps only hidden block m of N (MultiHash)."""
    ws = {p: experts.weights(e, p) for p in PROJS if p != "gate_proj" or config.activation == "swiglu"}
    if block is not None:
        m, n = block
        f = ws["up_proj"][0].shape[0] // n
        rows = slice(m * f, (m + 1) * f)
        for p in ("gate_proj", "up_proj"):
            if p in ws:
                w, b = ws[p]
                ws[p] = (w[rows], None if b is None else b[rows])
        w, b = ws["down_proj"]
        ws["down_proj"] = (w[:, rows], b if m == 0 else None)
    gate = F.linear(x_TD, *ws["gate_proj"]) if "gate_proj" in ws else None
    h = activation(config, gate, F.linear(x_TD, *ws["up_proj"]), config.expert_gelu_approximate)
    return F.linear(h, *ws["down_proj"])


def make_experts(config, expert_type: str):
    return MPOExperts(config) if expert_type == "mpo" else FFNExperts(config)


class LearnedRouter(nn.Module):
    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        if getattr(config, "router_expert_bias", False):
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))


class HashRouter(nn.Module):
    def __init__(self, config: MegamoeConfig):
        super().__init__()
        if config.hash_table_shape is not None:
            self.register_buffer("table", torch.zeros(config.hash_table_shape, dtype=torch.long))


def expert_scores(logits_TE, scoring: str):
    if scoring == "sigmoid":
        return torch.sigmoid(logits_TE)
    if scoring == "sqrtsoftplus":
        return torch.sqrt(F.softplus(logits_TE))
    return logits_TE.softmax(dim=-1)


def group_limited_choice(choice_TE, n_group: int, topk_group: int):
    """-inf for experts outside the ``topk_group`` best of ``n_group`` contiguous groups (a
    group scored by the sum of its 2 best entries, DeepSeek-V3)."""
    T, E = choice_TE.shape
    grouped_TGC = choice_TE.view(T, n_group, E // n_group)
    kept_TJ = grouped_TGC.topk(2, dim=-1).values.sum(-1).topk(topk_group, dim=-1).indices
    keep_TG = torch.zeros(T, n_group, dtype=torch.bool, device=choice_TE.device).scatter_(1, kept_TJ, True)
    return grouped_TGC.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, E)


def combine_experts(cfg: MegamoeConfig, experts, x_TD, experts_TK, weights_TK):
    """sum_k weights_TK[t, k] * expert_{experts_TK[t, k]}(x_t), each expert run once on its tokens."""
    out_TD = torch.zeros_like(x_TD)
    for e in experts_TK.unique().tolist():
        tok, slot = torch.where(experts_TK == e)
        y = expert_ffn(cfg, experts, e, x_TD[tok]) * weights_TK[tok, slot, None].to(x_TD.dtype)
        out_TD.index_add_(0, tok, y)
    return out_TD


class LearnedMoE(nn.Module):
    """Top-k routing, dropless (see the module docstring for capacity)."""

    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.config = config
        self.router = LearnedRouter(config)
        self.experts = make_experts(config, config.learned_expert_type)

    def forward(self, x_BSD, ids):
        cfg, (B, S, D) = self.config, x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        scores_TE = expert_scores(logits_TE, cfg.scoring_func)
        choice_TE = scores_TE
        bias_E = getattr(self.router, "expert_bias", None)
        if bias_E is not None:  # biased choice, unbiased weights
            choice_TE = scores_TE + bias_E.float()
        if cfg.n_group > 1:
            choice_TE = group_limited_choice(choice_TE, cfg.n_group, cfg.topk_group)
        experts_TK = choice_TE.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights_TK = scores_TE.gather(1, experts_TK)
        if cfg.num_experts_per_tok > 1 and cfg.normalize_top_k:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.num_experts_per_tok == 1 and cfg.top1_weight == "one":
            weights_TK = torch.ones_like(weights_TK)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        return combine_experts(cfg, self.experts, x_TD, experts_TK, weights_TK).view(B, S, D)


class HashMoE(nn.Module):
    """Token-id routing: one expert per token (per hash for MultiHash), no capacity, no drops."""

    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.config = config
        self.router = HashRouter(config)
        self.experts = make_experts(config, config.hash_expert_type)

    KEYS = {"random": "cur", "balanced": "cur", "clustered": "cur", "dispersed": "cur", "bigram": "cur",
            "previous": "prev", "position": "pos"}

    def route(self, ids):
        """ids: dict with cur / prev / pos, each [B, S] long -> expert ids [B, S, N] (N hashes).
        ``table[m, key]`` is hash m's expert; bigram adds ``(P * prev) % E`` (mod E)."""
        cfg, E, v = self.config, self.config.num_experts, self.config.hash_variant
        if v not in self.KEYS:
            raise ValueError(f"hash variant {v!r} cannot run in the exported model (it needs future tokens)")
        experts_BSN = self.router.table[:, ids[self.KEYS[v]]].permute(1, 2, 0)
        if v == "bigram":
            experts_BSN = (experts_BSN + ((cfg.bigram_prime * ids["prev"]) % E)[..., None]) % E
        return experts_BSN

    def forward(self, x_BSD, ids):
        cfg, (B, S, D) = self.config, x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        experts_TN = self.route(ids).reshape(B * S, -1)
        n = experts_TN.shape[1]
        out_TD = torch.zeros_like(x_TD)
        for m in range(n):
            for e in experts_TN[:, m].unique().tolist():
                tok = torch.where(experts_TN[:, m] == e)[0]
                y = expert_ffn(cfg, self.experts, e, x_TD[tok], (m, n) if n > 1 else None)
                out_TD.index_add_(0, tok, y)
        return out_TD.view(B, S, D)


class HashMoERouter(nn.Module):
    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.num_experts, config.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(config.vocab_size, config.hash_moe_top_k, dtype=torch.long))


class HashMoEV4(nn.Module):
    """DeepSeek-V4 hash-MoE (native megamoe/moe/hash_moe.py): the table chooses, the gate weights."""

    def __init__(self, config: MegamoeConfig):
        super().__init__()
        self.config = config
        self.router = HashMoERouter(config)
        self.experts = make_experts(config, config.learned_expert_type)

    def forward(self, x_BSD, ids):
        cfg, (B, S, D) = self.config, x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        logits_TE = F.linear(x_TD.float(), self.router.weight.float())
        experts_TK = self.router.tid2eid[ids["cur"].reshape(-1)]
        weights_TK = expert_scores(logits_TE, cfg.scoring_func).gather(1, experts_TK)
        if cfg.hash_moe_normalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor
        return combine_experts(cfg, self.experts, x_TD, experts_TK, weights_TK).view(B, S, D)


def add_shared_expert(moe: nn.Module, config: MegamoeConfig) -> None:
    """Shared experts of an MoE block (native ``moe.shared_experts`` N > 0): ``moe.shared_expert``,
    one dense-style FFN of width N x W *without* biases whatever ``config.bias`` (the sum of N
    FFNs is one FFN over their concatenated hidden units), and with ``config.shared_expert_gate``
    ``moe.shared_expert_gate`` [1, D] scaling it by ``sigmoid(x . w)`` per token (Qwen2-MoE)."""
    if config.shared_expert_intermediate_size:
        moe.shared_expert = MLP(config, config.shared_expert_intermediate_size, bias=False)
        if config.shared_expert_gate:
            moe.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)


def shared_expert_output(moe: nn.Module, x_BSD):
    """The shared experts' output on ``x_BSD`` (None when the block has none)."""
    if getattr(moe, "shared_expert", None) is None:
        return None
    s_BSD = moe.shared_expert(x_BSD)
    if getattr(moe, "shared_expert_gate", None) is not None:
        s_BSD = torch.sigmoid(moe.shared_expert_gate(x_BSD)) * s_BSD
    return s_BSD


class Block(nn.Module):
    def __init__(self, config: MegamoeConfig, layer_idx: int):
        super().__init__()
        self.kind = config.mlp_types[layer_idx]
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        if self.kind == "dense":
            self.mlp = MLP(config, config.intermediate_size)
        else:
            self.moe = {"learned": LearnedMoE, "hash": HashMoE, "hash_moe": HashMoEV4}[self.kind](config)
            add_shared_expert(self.moe, config)

    def forward(self, x, cos_sin, mask, cache, ids):
        x = x + self.attn(self.attn_norm(x), cos_sin, mask, cache)
        h = self.mlp_norm(x)
        if self.kind == "dense":
            return x + self.mlp(h)
        y, s = self.moe(h, ids), shared_expert_output(self.moe, h)
        return x + (y if s is None else y + s)  # native order: (routed + shared), then the residual


class MegamoePreTrainedModel(PreTrainedModel):
    config_class = MegamoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _keep_in_fp32_modules_strict = ["expert_bias"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (RMSNorm, nn.LayerNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
        elif isinstance(module, (LearnedRouter, HashMoERouter, MPOTensors)):
            for p in module.parameters(recurse=False):
                p.normal_(0.0, std)


class MegamoeModel(MegamoePreTrainedModel):
    def __init__(self, config: MegamoeConfig):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding == "learned":
            self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = make_norm(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, prev_input_ids=None, **kwargs):
        cfg, (B, S) = self.config, input_ids.shape
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None and attention_mask is not None and not bool(attention_mask.all()):
            # left padding: count only real tokens, as if each row were fed without its pads
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + S]
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=input_ids.device)[None].expand(B, S)
        if prev_input_ids is None:
            if past and "hash" in cfg.mlp_types and cfg.hash_variant in ("previous", "bigram"):
                raise ValueError("hash routing by the previous token needs prev_input_ids (the id before each "
                                 "new token) when a cache is used; generate() passes it automatically")
            start = torch.full_like(input_ids[:, :1], cfg.hash_start_id)
            prev_input_ids = torch.cat([start, input_ids[:, :-1]], dim=1)
        ids = {"cur": input_ids, "prev": prev_input_ids, "pos": position_ids}
        x = self.embed(input_ids)
        cos_sin = None
        if cfg.position_embedding == "learned":
            x = x + self.pos_embed(position_ids)
        else:
            cos_sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        mask = self._mask(attention_mask, B, S, past, x.device)
        for layer in self.layers:
            x = layer(x, cos_sin, mask, past_key_values, ids)
        return self.final_norm(x), past_key_values

    @staticmethod
    def _mask(attention_mask, B, S, past, device):
        """None -> plain causal SDPA (the native path); else a bool mask [B, 1, S, L]."""
        L = past + S
        padded = attention_mask is not None and not bool(attention_mask[:, :L].all())
        if not padded and past == 0:
            return None
        q_pos = torch.arange(past, L, device=device)[:, None]
        mask = (torch.arange(L, device=device)[None] <= q_pos)[None, None].expand(B, 1, S, L)
        if padded:
            mask = mask & attention_mask[:, None, None, :L].bool()
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: attend anywhere (ignored)
        return mask


class MegamoeForCausalLM(MegamoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MegamoeConfig):
        super().__init__(config)
        self.model = MegamoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed

    def set_input_embeddings(self, value):
        self.model.embed = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                labels=None, use_cache=None, prev_input_ids=None, logits_to_keep=0, **kwargs):
        h, past_key_values = self.model(input_ids, attention_mask, position_ids, past_key_values,
                                        use_cache, prev_input_ids)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, past_key_values=past_key_values, **kwargs)
        new = inputs["input_ids"].shape[1]
        full = torch.cat([torch.full_like(input_ids[:, :1], self.config.hash_start_id), input_ids], dim=1)
        inputs["prev_input_ids"] = full[:, -new - 1:-1]
        return inputs


__all__ = ["MegamoeForCausalLM", "MegamoeModel", "MegamoePreTrainedModel"]
