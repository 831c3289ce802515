"""Parameter and FLOP accounting from the config alone (before anything is built).

Definitions (one place, used by the trainer's MFU and by the tests against built models):

- ``total``: unique trainable parameters of the full (unsharded) model. A tied LM head counts
  once; an MPO central tensor counts once per layer; hash tables are buffers, not parameters.
- ``active``: parameters that touch one token in a forward pass: everything outside the MoE
  experts, plus per MoE layer the router and K experts (K = top_k; 1 for hash routing —
  MultiHash's N blocks together are one expert's worth; for MPO experts the shared central
  tensor plus K experts' auxiliary tensors). Embedding rows are counted in full (as is
  conventional), although a token reads one row.
- ``active_nonembedding``: ``active`` minus the token and position embedding tables.
- FLOPs per token for training = ``6 * matmul_params + 12 * num_layers * hidden_size *
  seq_len`` (the PaLM/Megatron convention; the second term is attention scores and values).
  ``matmul_params`` is ``active_nonembedding`` plus the LM head ``V * D`` when the head is tied
  (the head is a matmul per token either way), and for MPO experts it counts each expert matrix
  at its dense size ``D * F`` (experts are contracted back to a dense W before the matmul; the
  contraction itself is amortised over the tokens of a batch and not counted).
  Forward only: ``2 * matmul_params + 4 * num_layers * hidden_size * seq_len``.
  This reproduces the anchor in platform.md (Llama D=512: LM head counted, input table not).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from megamoe.model.config import ModelConfig, MoEConfig


@dataclass(frozen=True)
class Accounting:
    total: int
    active: int
    active_nonembedding: int
    embedding: int
    matmul_params: int
    num_layers: int
    hidden_size: int

    def flops_per_token(self, seq_len: int) -> float:
        """Training (forward + backward) FLOPs per token."""
        return 6.0 * self.matmul_params + 12.0 * self.num_layers * self.hidden_size * seq_len

    def forward_flops_per_token(self, seq_len: int) -> float:
        return 2.0 * self.matmul_params + 4.0 * self.num_layers * self.hidden_size * seq_len

    def as_dict(self, seq_len: int | None = None) -> dict:
        d = asdict(self)
        if seq_len is not None:
            d.update(flops_per_token=self.flops_per_token(seq_len),
                     forward_flops_per_token=self.forward_flops_per_token(seq_len))
        return d


def _norm(cfg: ModelConfig) -> int:
    return cfg.hidden_size * (2 if cfg.norm == "layernorm" else 1)


def _attention(cfg: ModelConfig) -> int:
    D, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    n = D * q + 2 * D * kv + q * D
    return n + (q + 2 * kv + D if cfg.bias else 0)


def ffn_params(cfg: ModelConfig, ffn_hidden_size: int) -> int:
    """One dense FFN (or one FFN expert): gate (SwiGLU only), up, down, optional biases."""
    D, F = cfg.hidden_size, ffn_hidden_size
    n_in = 2 if cfg.activation == "swiglu" else 1
    return n_in * D * F + F * D + ((n_in * F + D) if cfg.bias else 0)


def _mpo_params(cfg: ModelConfig, moe: MoEConfig, ffn: int) -> tuple[int, int]:
    """(central, auxiliary per expert) entries of one MPO expert set, all projections; the
    factorisation is the one megamoe.moe.mpo.MPOExperts picks (configured or automatic)."""
    from megamoe.moe.mpo import factorize, num_params

    m = moe.mpo
    d_shape = list(m.input_shape) or factorize(cfg.hidden_size, m.num_tensors)
    f_shape = list(m.output_shape) or factorize(ffn, m.num_tensors)
    projs = ["up", "down"] + (["gate"] if cfg.activation == "swiglu" else [])
    central = aux = 0
    for proj in projs:
        c, a = num_params(*((d_shape, f_shape) if proj == "down" else (f_shape, d_shape)), m.max_bond_dim)
        central, aux = central + c, aux + a
    return central, aux


def moe_layer_params(cfg: ModelConfig, moe: MoEConfig, index: int) -> tuple[int, int, int]:
    """(total, active, matmul-equivalent) parameters of MoE block ``index``'s FFN part
    (router + experts + shared experts; experts have no biases)."""
    E, D = moe.num_experts, cfg.hidden_size
    ffn = moe.expert_ffn_hidden_size or cfg.ffn_hidden_size
    is_hash = index in moe.hash_layers
    router = 0 if is_hash else E * D  # hash tables are buffers
    # experts touched per token: top-k; a hash layer's N hashes each pick one expert for one
    # 1/N block, so N experts are touched but together they compute one expert's worth.
    k = moe.hash_moe_top_k if index in moe.hash_moe_layer_indices(cfg.num_layers) else moe.router.top_k
    touched = moe.hash.num_hashes if is_hash else k
    dense_equiv = ffn_params(_no_bias(cfg), ffn)
    compute = dense_equiv if is_hash else k * dense_equiv
    expert_type = moe.hash.expert_type if is_hash else moe.expert_type
    # shared experts: one always-on FFN of width N x W (+ the optional [1, D] gate)
    router += ffn_params(_no_bias(cfg), moe.shared_experts * (moe.shared_expert_ffn_hidden_size or ffn)) + (
        D if moe.shared_expert_gate else 0) if moe.shared_experts else 0
    if expert_type == "mpo":
        central, aux = _mpo_params(cfg, moe, ffn)
        return router + central + E * aux, router + central + touched * aux, router + compute
    per_expert_active = dense_equiv if is_hash else compute
    return router + E * dense_equiv, router + per_expert_active, router + compute


def _no_bias(cfg: ModelConfig) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, bias=False)


def block_params(cfg: ModelConfig, moe: MoEConfig, index: int) -> tuple[int, int, int]:
    """(total, active, matmul-equivalent) parameters of transformer block ``index``: its two
    norms, attention and dense FFN or MoE part. The pipeline split weighs blocks by these."""
    block = 2 * _norm(cfg) + _attention(cfg)
    if index in moe.moe_layer_indices(cfg.num_layers):
        t, a, m = moe_layer_params(cfg, moe, index)
    else:
        t = a = m = ffn_params(cfg, cfg.ffn_hidden_size)
    return block + t, block + a, block + m


def account(cfg: ModelConfig, moe: MoEConfig | None = None) -> Accounting:
    moe = moe or MoEConfig()
    D, V = cfg.hidden_size, cfg.vocab_size
    embedding = V * D + (cfg.max_position_embeddings * D if cfg.position_embedding == "learned" else 0)
    head = 0 if cfg.tie_embeddings else V * D
    total = active = matmul = 0
    for i in range(cfg.num_layers):
        t, a, m = block_params(cfg, moe, i)
        total += t
        active += a
        matmul += m
    tail = _norm(cfg) + head
    total += embedding + tail
    active_nonembedding = active + tail
    return Accounting(total=total, active=active_nonembedding + embedding, active_nonembedding=active_nonembedding,
                      embedding=embedding, matmul_params=matmul + _norm(cfg) + V * D, num_layers=cfg.num_layers,
                      hidden_size=D)
