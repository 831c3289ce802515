"""Model, MoE and parallel-layout configuration sections.

Defaults are Llama/Mixtral-like (RMSNorm, RoPE, SwiGLU, no biases, untied head) so that
models export to stock Hugging Face architectures when their MoE choices allow it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from megamoe.config import ConfigError, check

HashVariant = Literal[
    "random", "balanced", "bigram", "previous", "position", "clustered", "dispersed", "oracle_future"
]


@dataclass(kw_only=True)
class ModelConfig:
    """The decoder: sizes, attention, normalisation, positions, initialisation."""

    vocab_size: int = 32000
    """Embedding rows; at least the tokenizer's vocabulary, divisible by tensor_parallel."""
    hidden_size: int = 256
    """Model width D."""
    num_layers: int = 4
    """Decoder blocks L."""
    num_heads: int = 4
    """Attention heads (divides hidden_size and, for TP, is divisible by tensor_parallel)."""
    num_kv_heads: int | None = None
    """Key/value heads; null = num_heads (multi-head), fewer = grouped-query attention."""
    ffn_hidden_size: int = 688
    """Width F of the dense FFN (and of each expert unless moe.expert_ffn_hidden_size)."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """FFN activation (gelu is tanh-approximate)."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation of the pre-norm blocks and the final norm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    position_embedding: Literal["rope", "learned"] = "rope"
    """Rotary embeddings or a learned position table."""
    rope_theta: float = 10000.0
    """RoPE base."""
    max_position_embeddings: int = 2048
    """Longest sequence the model accepts (data.seq_length must not exceed it)."""
    tie_embeddings: bool = False
    """Share the token embedding with the LM head."""
    bias: bool = False
    """Biases in the attention and dense FFN linears."""
    init_std: float = 0.02
    """Std of the normal init; o_proj/down_proj use init_std / sqrt(2 L)."""
    activation_checkpointing: bool = False
    """Recompute each block in backward (saves activation memory, costs a forward)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size",
                     "max_position_embeddings"):
            check(getattr(self, name) > 0, name, getattr(self, name), "must be > 0")
        check(self.hidden_size % self.num_heads == 0, "num_heads", self.num_heads,
              f"must divide hidden_size={self.hidden_size}")
        if self.num_kv_heads is not None:
            check(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                  self.num_kv_heads, f"must be > 0 and divide num_heads={self.num_heads}")
        if self.position_embedding == "rope":
            check(self.head_dim % 2 == 0, "hidden_size", self.hidden_size,
                  "hidden_size/num_heads must be even for RoPE")
        check(self.norm_eps > 0, "norm_eps", self.norm_eps, "must be > 0")
        check(self.init_std > 0, "init_std", self.init_std, "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads


@dataclass(kw_only=True)
class RouterConfig:
    """Learned top-k router (Switch when top_k=1)."""

    top_k: int = 1
    """Experts per token (1 = Switch)."""
    capacity_factor: float = 1.25
    """Training capacity per expert, ceil(cf x tokens x top_k / E) on each rank; <= 0 = dropless."""
    eval_capacity_factor: float = 2.0
    """Capacity factor in eval mode; <= 0 = dropless."""
    drop_policy: Literal["position", "probability"] = "probability"
    """Who keeps a seat when an expert is over capacity: earlier tokens (position) or the
    highest router probability (probability)."""
    # Combine weight of each chosen expert (p_k: router probability, S: sum of the K chosen p):
    #   prob              p_k                  (Switch paper; ~1/E at init, so an upcycled layer
    #                                           outputs ~FFN/E)
    #   renormalize       p_k / S              (Mixtral; needs top_k >= 2: at k=1 it is the
    #                                           constant 1 and the router gets no gradient)
    #   straight_through  p_k / S.detach()     (value of renormalize, gradient of prob / S; at k=1
    #                                           p / p.detach() = 1, as RUCAIBox/MPO SwitchFFN)
    # Default straight_through: weights sum to 1 at any k, so an upcycled layer of identical
    # experts equals the dense FFN, while the router still learns through the combine.
    combine: Literal["prob", "renormalize", "straight_through"] = "straight_through"
    """Combine weight of each chosen expert: prob (p_k, Switch), renormalize (p_k / sum, Mixtral,
    top_k >= 2) or straight_through (value of renormalize, gradient of prob)."""
    # Router logits, softmax/top-k, combine weights and aux/z losses: fp32 whatever the model
    # dtype (bf16 rounding of logits flips top-k choices); "model" computes them in the input's
    # dtype (an ablation, not for training).
    dtype: Literal["fp32", "model"] = "fp32"
    """Precision of router logits, top-k and losses: fp32 whatever the model dtype, or the
    model's dtype (an ablation)."""
    aux_loss_coef: float = 0.01
    """Weight of the Switch load-balancing loss (micro-batch, this rank's tokens)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    jitter_eps: float = 0.0
    """Multiplicative U(1-eps, 1+eps) noise on the router input in training (0 = off)."""
    # Further balancing (megamoe/moe/balance.py), all off by default:
    seq_aux_loss_coef: float = 0.0
    """Weight of the DeepSeek-V3 sequence-level balance loss (0 = off)."""
    global_aux_loss_coef: float = 0.0
    """Weight of the global-batch balance loss, expert counts summed over DP first (0 = off)."""
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the probabilities for the
    # top-k choice only, moved by rate * sign(mean load - load) after each optimizer step. 0 = off
    # (and no bias buffer: a checkpoint saved with it needs it on to load, and vice versa).
    expert_bias_rate: float = 0.0
    """Aux-loss-free balancing (DeepSeek-V3): rate of the selection-only expert bias (0 = off)."""
    # Fine-grained routing (megamoe/moe/router.py): score of expert e from its logit l_e,
    #   softmax       exp(l_e) / sum_j exp(l_j)   (Switch, Mixtral)
    #   sigmoid       1 / (1 + exp(-l_e))         (DeepSeek-V3)
    #   sqrtsoftplus  sqrt(log(1 + exp(l_e)))     (DeepSeek-V4)
    # The combine weights above are built from these scores ('prob' = the raw score).
    scoring: Literal["softmax", "sigmoid", "sqrtsoftplus"] = "softmax"
    """Expert score from its logit: softmax (Switch, Mixtral), sigmoid (DeepSeek-V3),
    sqrtsoftplus (DeepSeek-V4)."""
    routed_scaling_factor: float = 1.0
    """Multiplies the combine weights (DeepSeek-V3: 2.5, V4: 1.5)."""
    # Group-limited top-k (DeepSeek-V3 node-limited routing): experts split into n_group
    # contiguous groups, each scored by the sum of its 2 best scores, the topk_group best groups
    # kept, top_k experts chosen inside them. n_group 0 or 1 = off.
    n_group: int = 0
    """Group-limited top-k: number of contiguous expert groups (0 or 1 = off)."""
    topk_group: int = 0
    """Group-limited top-k: how many best groups a token may choose from."""

    def __post_init__(self):
        check(self.top_k >= 1, "top_k", self.top_k, "must be >= 1")
        check(self.scoring in ("softmax", "sigmoid", "sqrtsoftplus"), "scoring", self.scoring,
              "must be one of 'softmax', 'sigmoid', 'sqrtsoftplus'")
        check(math.isfinite(self.routed_scaling_factor) and self.routed_scaling_factor > 0,
              "routed_scaling_factor", self.routed_scaling_factor, "must be a finite number > 0")
        check(self.n_group >= 0, "n_group", self.n_group, "must be >= 0 (0 or 1 = no group limit)")
        if self.n_group > 1:
            check(1 <= self.topk_group <= self.n_group, "topk_group", self.topk_group,
                  f"must be in [1, n_group={self.n_group}] (how many expert groups each token may use)")
        else:
            check(self.topk_group == 0, "topk_group", self.topk_group,
                  "is set but n_group is 0/1 (no groups): set n_group > 1 too, or topk_group=0")
        check(not (self.combine == "renormalize" and self.top_k == 1), "combine", self.combine,
              "at top_k=1 renormalising gives the constant weight 1 and no router gradient; use "
              "straight_through (value 1 with gradient) or prob")
        check(self.aux_loss_coef >= 0, "aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "z_loss_coef", self.z_loss_coef, "must be >= 0")
        check(0 <= self.jitter_eps < 1, "jitter_eps", self.jitter_eps, "must be in [0, 1)")
        for name in ("seq_aux_loss_coef", "global_aux_loss_coef", "expert_bias_rate"):
            v = getattr(self, name)
            check(math.isfinite(v) and v >= 0, name, v, "must be a finite number >= 0 (0 = off)")


@dataclass(kw_only=True)
class HashConfig:
    """Token-id routing (Hash Layers, Roller et al. 2021)."""

    variant: HashVariant = "random"
    """How a token id maps to an expert (moe.md lists the rules)."""
    num_hashes: int = 1
    """> 1: MultiHash, each hash picks a block of the expert's FFN width."""
    counts_file: str | None = None
    """Train-split unigram counts from tools/count_tokens.py; needed by 'balanced'."""
    embedding_checkpoint: str | None = None
    """Checkpoint whose token embeddings are clustered; needed by 'clustered' / 'dispersed'."""
    table_file: str | None = None
    """A prebuilt [num_hashes, K] int64 .npy (tools/build_hash_table.py) used instead of building
    the table (counts / checkpoint then not needed)."""
    seed: int = 1234
    """Seed of the random tables."""
    bigram_prime: int = 7919
    """Multiplier of the previous id in the bigram hash."""
    allow_oracle: bool = False
    """Permit 'oracle_future', which routes by the label: analysis only."""
    expert_type: Literal["ffn", "mpo"] = "ffn"
    """Experts of the hash layers: FFN or MPO."""

    def __post_init__(self):
        check(self.num_hashes >= 1, "num_hashes", self.num_hashes, "must be >= 1")
        if self.variant == "balanced" and self.table_file is None:
            check(self.counts_file is not None, "counts_file", self.counts_file,
                  "variant 'balanced' needs unigram counts: run tools/count_tokens.py and set moe.hash.counts_file")
        if self.variant in ("clustered", "dispersed") and self.table_file is None:
            check(self.embedding_checkpoint is not None, "embedding_checkpoint", self.embedding_checkpoint,
                  f"variant {self.variant!r} needs the checkpoint whose token embeddings are clustered")
        if self.variant == "oracle_future":
            check(self.allow_oracle, "allow_oracle", self.allow_oracle,
                  "variant 'oracle_future' routes by the next token (the label); set allow_oracle=true "
                  "to run it as an analysis, never for real training")


@dataclass(kw_only=True)
class HashMoEConfig:
    """DeepSeek-V4 hash-MoE (megamoe/moe/hash_moe.py), beside the Hash Layers paper's hash layers:
    the first ``layers`` MoE blocks choose their k experts from a frozen table ``tid2eid`` [V, k]
    (k distinct experts per token id); the learned gate (``moe.router.weight``, scored by
    ``moe.router.scoring``) weights them, times ``moe.router.routed_scaling_factor``."""

    layers: int = 0
    """How many leading MoE blocks are hash-MoE routed (DeepSeek-V4: 3); 0 = off."""
    top_k: int | None = None
    """Distinct experts per token id; null = moe.router.top_k."""
    # random: k distinct experts per id, seeded; balanced: greedy over (id, slot) pairs by the
    # train-split unigram counts (tools/count_tokens.py), each id's k slots on distinct experts.
    variant: Literal["random", "balanced"] = "random"
    """Table construction: seeded random, or balanced by the train-split unigram counts."""
    counts_file: str | None = None
    """Unigram counts from tools/count_tokens.py; needed by 'balanced'."""
    table_file: str | None = None
    """A prebuilt [V, k] int64 .npy used instead of building the table."""
    seed: int = 1234
    """Seed of the random table."""
    # Combine weight of chosen expert j: s_j / sum of the k chosen s (normalize=true, DeepSeek-V4's
    # norm_topk_prob) or s_j, times routed_scaling_factor; s = the gate's score of every expert.
    normalize: bool = True
    """Normalise the gate's scores of the k chosen experts to sum 1 (DeepSeek-V4's norm_topk_prob)."""

    def __post_init__(self):
        check(self.layers >= 0, "layers", self.layers, "must be >= 0 (the number of leading MoE blocks; 0 = off)")
        check(self.top_k is None or self.top_k >= 1, "top_k", self.top_k, "must be >= 1 (or null: moe.router.top_k)")
        if self.layers and self.variant == "balanced" and self.table_file is None:
            check(self.counts_file is not None, "counts_file", self.counts_file,
                  "variant 'balanced' needs unigram counts: run tools/count_tokens.py and set moe.hash_moe.counts_file")


@dataclass(kw_only=True)
class MPOConfig:
    """Matrix-product-operator experts with one central tensor shared across a layer's experts."""

    num_tensors: int = 5
    """Tensors in each MPO chain (the middle one is the shared central tensor)."""
    input_shape: list[int] = field(default_factory=list)
    """Factorisation of hidden_size, one factor per tensor; empty = chosen automatically."""
    output_shape: list[int] = field(default_factory=list)
    """Factorisation of the expert FFN width, one factor per tensor; empty = chosen automatically."""
    max_bond_dim: int = 0
    """Truncate the bond dimensions to this (0 = exact, no truncation)."""
    grad_mask: Literal["none", "skip", "bernoulli", "freeze"] = "none"
    """Central-tensor update rule: none; skip (the MPOE paper: with probability p a step leaves the
    central tensors and their optimizer state untouched); bernoulli (element-wise gradient mask); freeze."""
    grad_mask_p: float = 0.5
    """Probability p of the skip / bernoulli rule."""
    grad_mask_seed: int = 4321
    """Seed of the mask draws (the same on every rank)."""
    central_lr_scale: float = 1.0
    """Learning rate of the central tensors = train.lr x this."""

    def __post_init__(self):
        check(self.num_tensors >= 2, "num_tensors", self.num_tensors, "must be >= 2")
        for name in ("input_shape", "output_shape"):
            shape = getattr(self, name)
            check(not shape or len(shape) == self.num_tensors, name, shape,
                  f"must have num_tensors={self.num_tensors} factors (or be empty for automatic)")
            check(all(s >= 1 for s in shape), name, shape, "factors must be >= 1")
        check(self.max_bond_dim >= 0, "max_bond_dim", self.max_bond_dim, "must be >= 0 (0 = exact)")
        check(0.0 <= self.grad_mask_p <= 1.0, "grad_mask_p", self.grad_mask_p, "must be in [0, 1]")
        check(self.central_lr_scale >= 0, "central_lr_scale", self.central_lr_scale, "must be >= 0")


@dataclass(kw_only=True)
class MoEConfig:
    """Which blocks are sparse and how. ``layers`` and ``every`` pick the MoE blocks;
    ``hash_layers`` (a subset) use token-id routing instead of the learned router."""

    num_experts: int = 0
    """Routed experts per MoE block E (0 = dense model)."""
    layers: list[int] | None = None
    """Explicit indices of the MoE blocks (or use every)."""
    every: int = 0
    """Every k-th block is MoE (blocks k-1, 2k-1, ...; 1 = all blocks; 0 = off)."""
    hash_layers: list[int] = field(default_factory=list)
    """Blocks routed by token id (moe.hash) instead of the learned router; added to the MoE blocks."""
    expert_type: Literal["ffn", "mpo"] = "ffn"
    """Experts of the learned-router blocks: FFN or MPO (moe.mpo)."""
    expert_ffn_hidden_size: int | None = None
    """Width of each routed expert; null = model.ffn_hidden_size."""
    # Shared experts (DeepSeekMoE / Qwen2-MoE): N always-on FFN experts beside the routed ones in
    # every MoE block, run as one unbiased FFN of width N x shared_expert_ffn_hidden_size (the sum
    # of N FFNs is one FFN over their concatenated hidden units), TP-sharded like the dense FFN.
    shared_experts: int = 0
    """Always-on shared experts beside the routed ones in every MoE block (DeepSeekMoE, Qwen2-MoE)."""
    shared_expert_ffn_hidden_size: int | None = None
    """Width of each shared expert; null = the routed experts' width."""
    shared_expert_gate: bool = False
    """Scale the shared output by sigmoid(x . w) (Qwen2-MoE)."""
    router: RouterConfig = field(default_factory=RouterConfig)
    """The learned router."""
    hash: HashConfig = field(default_factory=HashConfig)
    """Token-id routing of moe.hash_layers (Hash Layers)."""
    hash_moe: HashMoEConfig = field(default_factory=HashMoEConfig)
    """DeepSeek-V4 hash-MoE of the leading MoE blocks."""
    mpo: MPOConfig = field(default_factory=MPOConfig)
    """MPO experts."""

    def __post_init__(self):
        check(self.num_experts >= 0, "num_experts", self.num_experts, "must be >= 0 (0 = dense)")
        check(self.every >= 0, "every", self.every, "must be >= 0")
        check(self.shared_experts >= 0, "shared_experts", self.shared_experts, "must be >= 0 (0 = none)")
        check(self.shared_expert_ffn_hidden_size is None or self.shared_expert_ffn_hidden_size > 0,
              "shared_expert_ffn_hidden_size", self.shared_expert_ffn_hidden_size, "must be > 0 (or null)")
        check(not (self.layers is not None and self.every), "layers", self.layers,
              "set either layers (explicit list) or every (every k-th block), not both")
        if self.num_experts:
            check(self.router.top_k <= self.num_experts, "router.top_k", self.router.top_k,
                  f"must be <= num_experts={self.num_experts}")
            g = self.router.n_group
            if g > 1:
                check(self.num_experts % g == 0, "router.n_group", g,
                      f"must divide num_experts={self.num_experts} (experts split into equal groups)")
                per_group = self.num_experts // g
                check(per_group >= 2, "router.n_group", g,
                      f"groups of num_experts/n_group={per_group} expert: a group's score is the sum of "
                      "its 2 best experts, so each group needs >= 2")
                reach = self.router.topk_group * per_group
                check(self.router.top_k <= reach, "router.top_k", self.router.top_k,
                      f"must be <= topk_group x num_experts/n_group = {self.router.topk_group} x "
                      f"{per_group} = {reach} (the experts of the chosen groups)")
            if self.hash_moe.layers:
                k = self.hash_moe_top_k
                field_ = "hash_moe.top_k" if self.hash_moe.top_k is not None else "router.top_k"
                check(k <= self.num_experts, field_, k,
                      f"hash-MoE picks k distinct experts per token id: must be <= num_experts={self.num_experts}")
                check(not (k == 1 and self.hash_moe.normalize), "hash_moe.normalize", self.hash_moe.normalize,
                      f"at k=1 ({field_}) normalising gives the constant weight routed_scaling_factor and "
                      "the gate no gradient; set hash_moe.normalize=false or k >= 2")

    @property
    def hash_moe_top_k(self) -> int:
        return self.hash_moe.top_k if self.hash_moe.top_k is not None else self.router.top_k

    def hash_moe_layer_indices(self, num_layers: int) -> list[int]:
        """The first ``hash_moe.layers`` MoE blocks (DeepSeek-V4's leading hash-MoE layers)."""
        return self.moe_layer_indices(num_layers)[: self.hash_moe.layers] if self.hash_moe.layers else []

    def routing_kind(self, layer: int, num_layers: int) -> str:
        """How MoE block ``layer`` routes: 'hash' (the Hash Layers paper), 'hash_moe'
        (DeepSeek-V4) or 'learned'; for reports."""
        if layer in self.hash_layers:
            return "hash"
        return "hash_moe" if layer in self.hash_moe_layer_indices(num_layers) else "learned"

    def moe_layer_indices(self, num_layers: int) -> list[int]:
        if not self.num_experts:
            return []
        if self.layers is not None:
            chosen = list(self.layers)
        elif self.every:
            chosen = list(range(self.every - 1, num_layers, self.every))
        else:
            chosen = []
        return sorted(set(chosen) | set(self.hash_layers))


@dataclass(kw_only=True)
class ParallelConfig:
    """Layout: world = tensor_parallel x pipeline_parallel x data_parallel; expert_parallel
    divides data_parallel (experts are sharded over EP ranks taken from the data-parallel ranks,
    as in DeepSpeed-MoE and Megatron-core); expert params are replicated over DP / EP ranks.
    Pipeline stages: megamoe/model/pipeline_layout.py (the split), megamoe/train/pipeline.py (the schedules)."""

    tensor_parallel: int = 1
    """Tensor-parallel size TP (megatron-core layers; keep it inside a node)."""
    expert_parallel: int = 1
    """Expert-parallel size EP: experts sharded over EP of the data-parallel ranks; divides
    moe.num_experts and the data-parallel size."""
    sequence_parallel: bool = False
    """Split the residual stream and norms over the TP ranks along the sequence (needs TP > 1)."""
    pipeline_parallel: int = 1
    """Pipeline stages PP: blocks split over PP ranks in order, embedding on the first, head and
    loss on the last; 1F1B (interleaved with virtual_stages > 1), ZeRO-1, bf16 or fp32."""
    virtual_stages: int = 1
    """Chunks per stage for interleaved 1F1B (stage s holds chunks s, s+PP, ...); 1 = plain 1F1B."""
    pipeline_layout: list[int] | None = None
    """Blocks per chunk in model order, PP x virtual_stages counts summing to model.num_layers
    (chunk c runs on stage c % PP; a count may be 0); null = pipeline_split decides."""
    timeout_minutes: float = 30.0
    """How long a collective waits for the slowest rank before the run fails (every process group:
    torch's default is 10 min for NCCL). No rank works alone for minutes: a save's consolidation
    is shared by all ranks. Raise it for a slow shared filesystem or a first index build of a huge
    corpus (rank 0 builds, the others wait)."""
    pipeline_split: Literal["balanced", "uniform"] = "balanced"
    """Without pipeline_layout: 'balanced' evens the chunks' estimated FLOPs (MoE blocks and the
    head weigh more); 'uniform' gives each chunk num_layers / (PP x virtual_stages) blocks."""

    def __post_init__(self):
        check(self.tensor_parallel >= 1, "tensor_parallel", self.tensor_parallel, "must be >= 1")
        check(self.expert_parallel >= 1, "expert_parallel", self.expert_parallel, "must be >= 1")
        check(not self.sequence_parallel or self.tensor_parallel > 1, "sequence_parallel",
              self.sequence_parallel, "needs tensor_parallel > 1")
        check(self.pipeline_parallel >= 1, "pipeline_parallel", self.pipeline_parallel, "must be >= 1")
        check(self.timeout_minutes > 0, "timeout_minutes", self.timeout_minutes, "must be > 0")
        check(self.virtual_stages >= 1, "virtual_stages", self.virtual_stages, "must be >= 1")
        check(self.virtual_stages == 1 or self.pipeline_parallel > 1, "virtual_stages", self.virtual_stages,
              "interleaving needs pipeline_parallel > 1")
        chunks = self.pipeline_parallel * self.virtual_stages
        if self.pipeline_layout is not None:
            check(len(self.pipeline_layout) == chunks, "pipeline_layout", self.pipeline_layout,
                  f"needs pipeline_parallel x virtual_stages = {chunks} block counts, one per chunk")
            check(all(n >= 0 for n in self.pipeline_layout), "pipeline_layout", self.pipeline_layout,
                  "block counts must be >= 0")

    def data_parallel(self, world_size: int) -> int:
        """DP = world / (TP x PP); raises naming the field when the world does not divide."""
        tp, pp = self.tensor_parallel, self.pipeline_parallel
        check(world_size % tp == 0, "parallel.tensor_parallel", tp, f"must divide the world size {world_size}")
        check(world_size % (tp * pp) == 0, "parallel.pipeline_parallel", pp,
              f"world size {world_size} must be divisible by tensor_parallel x pipeline_parallel = {tp} x {pp}")
        dp = world_size // (tp * pp)
        check(dp % self.expert_parallel == 0, "parallel.expert_parallel", self.expert_parallel,
              f"must divide the data-parallel size {dp} (world {world_size} / tensor_parallel "
              f"{tp}" + (f" / pipeline_parallel {pp}" if pp > 1 else "") +
              "); world size must be divisible by TP x EP" + (" x PP" if pp > 1 else ""))
        return dp


def check_model_layout(model: ModelConfig, moe: MoEConfig, parallel: ParallelConfig) -> None:
    """Cross-section checks that name full field paths. Called by the top-level config."""
    tp, ep = parallel.tensor_parallel, parallel.expert_parallel
    if model.num_heads % tp:
        raise ConfigError("model.num_heads", model.num_heads, f"must be divisible by parallel.tensor_parallel={tp}")
    if model.kv_heads % tp:
        raise ConfigError("model.num_kv_heads", model.kv_heads, f"must be divisible by parallel.tensor_parallel={tp}")
    if model.vocab_size % tp:
        raise ConfigError("model.vocab_size", model.vocab_size,
                          f"must be divisible by parallel.tensor_parallel={tp} (pad the vocabulary)")
    if model.ffn_hidden_size % tp:
        raise ConfigError("model.ffn_hidden_size", model.ffn_hidden_size,
                          f"must be divisible by parallel.tensor_parallel={tp}")
    if moe.num_experts and not moe.moe_layer_indices(model.num_layers):
        raise ConfigError("moe.num_experts", moe.num_experts,
                          "no block is sparse: also set moe.layers (list), moe.every (k) or moe.hash_layers")
    if not moe.num_experts and moe.hash_moe.layers:
        raise ConfigError("moe.hash_moe.layers", moe.hash_moe.layers,
                          "hash-MoE routes MoE blocks but num_experts is 0: set moe.num_experts > 0")
    if moe.num_experts and moe.hash_moe.layers:
        moe_blocks = moe.moe_layer_indices(model.num_layers)
        if moe.hash_moe.layers > len(moe_blocks):
            raise ConfigError("moe.hash_moe.layers", moe.hash_moe.layers,
                              f"exceeds the {len(moe_blocks)} MoE blocks {moe_blocks} "
                              "(moe.layers / every / hash_layers)")
        both = sorted(set(moe.hash_moe_layer_indices(model.num_layers)) & set(moe.hash_layers))
        if both:
            raise ConfigError("moe.hash_moe.layers", moe.hash_moe.layers,
                              f"the leading MoE blocks {both} are also paper hash layers (moe.hash_layers): a block "
                              "is routed one way; shorten hash_moe.layers or move the hash layers after them")
    if not moe.num_experts and (moe.layers or moe.hash_layers):
        raise ConfigError("moe.num_experts", moe.num_experts,
                          "moe.layers / moe.hash_layers are set but num_experts is 0: set num_experts > 0")
    if moe.num_experts:
        ffn = moe.expert_ffn_hidden_size or model.ffn_hidden_size
        if ffn % tp:
            raise ConfigError("moe.expert_ffn_hidden_size", ffn, f"must be divisible by parallel.tensor_parallel={tp}")
        shared = moe.shared_experts * (moe.shared_expert_ffn_hidden_size or ffn)
        if shared % tp:
            raise ConfigError("moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size or ffn,
                              f"the shared FFN width shared_experts x this = {shared} must be divisible by "
                              f"parallel.tensor_parallel={tp}")
        if moe.hash_layers and ffn % (moe.hash.num_hashes * tp):
            raise ConfigError("moe.hash.num_hashes", moe.hash.num_hashes,
                              f"MultiHash splits the expert FFN width {ffn} into num_hashes blocks, each "
                              f"split over parallel.tensor_parallel={tp}: num_hashes x TP must divide it")
        if moe.num_experts % ep:
            raise ConfigError("moe.num_experts", moe.num_experts,
                              f"must be divisible by parallel.expert_parallel={ep}")
        for i in moe.moe_layer_indices(model.num_layers):
            if not 0 <= i < model.num_layers:
                raise ConfigError("moe.layers", i, f"block indices must be in [0, {model.num_layers})")
        if moe.mpo.input_shape and math.prod(moe.mpo.input_shape) != model.hidden_size:
            raise ConfigError("moe.mpo.input_shape", moe.mpo.input_shape,
                              f"product must equal model.hidden_size={model.hidden_size}")
        if moe.mpo.output_shape and math.prod(moe.mpo.output_shape) != ffn:
            raise ConfigError("moe.mpo.output_shape", moe.mpo.output_shape,
                              f"product must equal the expert FFN width {ffn}")
    elif ep > 1:
        raise ConfigError("parallel.expert_parallel", ep, "needs moe.num_experts > 0")
