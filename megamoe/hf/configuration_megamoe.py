"""Hugging Face configuration of the ``megamoe`` architecture (self-contained: torch/transformers only).

This file is copied verbatim into every ``megamoe``-type export and loaded there with
``trust_remote_code=True``; importing :mod:`megamoe.hf` registers the same class with
``AutoConfig`` so no remote code is needed when megamoe is installed.

``mlp_types`` has one entry per block: ``"dense"`` (plain FFN), ``"learned"`` (top-k router),
``"hash"`` (token-id routing, Hash Layers) or ``"hash_moe"`` (DeepSeek-V4 hash-MoE:
``router.tid2eid`` [V, hash_moe_top_k] chooses, the learned ``router.weight`` weights). It is
deliberately not called ``layer_types``: transformers reads that name to pick sliding-window caches.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MegamoeConfig(PretrainedConfig):
    model_type = "megamoe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int = 688,
        expert_intermediate_size: int | None = None,
        activation: str = "swiglu",  # "swiglu" | "gelu"
        gelu_approximate: str = "tanh",  # dense FFN: torch.nn.functional.gelu(approximate=...), as native
        expert_gelu_approximate: str = "tanh",  # FFN / MPO experts
        norm: str = "rmsnorm",  # "rmsnorm" | "layernorm"
        norm_eps: float = 1e-5,
        position_embedding: str = "rope",  # "rope" | "learned"
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 2048,
        bias: bool = False,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        mlp_types: list[str] | None = None,
        num_experts: int = 0,
        # learned router
        num_experts_per_tok: int = 1,
        normalize_top_k: bool = True,
        top1_weight: str = "prob",  # "prob": combine weight p of the single expert; "one": weight 1
        learned_expert_type: str = "ffn",  # "ffn" | "mpo"
        router_expert_bias: bool = False,  # learned routers choose by probs + router.expert_bias
        # fine-grained routing (native moe.router.scoring / routed_scaling_factor / n_group /
        # topk_group): scores softmax | sigmoid | sqrtsoftplus, weights times the factor, and
        # DeepSeek-V3 group-limited top-k when n_group > 1 (0 = off)
        scoring_func: str = "softmax",
        routed_scaling_factor: float = 1.0,
        n_group: int = 0,
        topk_group: int = 0,
        # shared experts (native moe.shared_experts N > 0) in every MoE block, learned or hash:
        # one unbiased FFN of width N x W (0 = none), optionally scaled by sigmoid(x . w), w [1, D]
        shared_expert_intermediate_size: int = 0,
        shared_expert_gate: bool = False,
        # hash router
        hash_variant: str = "random",
        num_hashes: int = 1,
        bigram_prime: int = 7919,
        hash_start_id: int = 0,  # the "previous id" used at position 0 (bigram / previous variants)
        hash_expert_type: str = "ffn",
        hash_table_shape: list[int] | None = None,  # shape of each hash layer's table buffer (None: no table)
        # DeepSeek-V4 hash-MoE blocks (native moe.hash_moe): k experts per id from router.tid2eid [V, k],
        # weights = scoring_func scores of those k (/ their sum + 1e-20 when hash_moe_normalize) x routed_scaling_factor
        hash_moe_top_k: int = 0,
        hash_moe_normalize: bool = True,
        # MPO experts
        mpo_num_tensors: int = 5,
        mpo_central_index: int = 2,
        mpo_aux_names: list[str] | None = None,  # aux tensor names in chain order, central excluded
        mpo_transposed: bool = False,  # True: the contracted matrix is [in, out] and is transposed
        mpo_shapes: dict[str, list[list[int]]] | None = None,  # proj -> shape of each chain tensor
        use_cache: bool = True,
        bos_token_id: int | None = 1,
        eos_token_id: int | None = 2,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.intermediate_size = intermediate_size
        self.expert_intermediate_size = expert_intermediate_size or intermediate_size
        self.activation = activation
        self.gelu_approximate = gelu_approximate
        self.expert_gelu_approximate = expert_gelu_approximate
        self.norm = norm
        self.norm_eps = norm_eps
        self.position_embedding = position_embedding
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.bias = bias
        self.initializer_range = initializer_range
        self.mlp_types = list(mlp_types) if mlp_types is not None else ["dense"] * num_hidden_layers
        if len(self.mlp_types) != num_hidden_layers or set(self.mlp_types) - {"dense", "learned", "hash", "hash_moe"}:
            raise ValueError(f"mlp_types={self.mlp_types!r}: need {num_hidden_layers} entries of "
                             "'dense' | 'learned' | 'hash' | 'hash_moe'")
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.normalize_top_k = normalize_top_k
        self.top1_weight = top1_weight
        self.learned_expert_type = learned_expert_type
        self.router_expert_bias = router_expert_bias
        if scoring_func not in ("softmax", "sigmoid", "sqrtsoftplus"):
            raise ValueError(f"scoring_func={scoring_func!r}: need 'softmax' | 'sigmoid' | 'sqrtsoftplus'")
        self.scoring_func = scoring_func
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.shared_expert_gate = shared_expert_gate
        self.hash_variant = hash_variant
        self.num_hashes = num_hashes
        self.bigram_prime = bigram_prime
        self.hash_start_id = hash_start_id
        self.hash_expert_type = hash_expert_type
        self.hash_table_shape = list(hash_table_shape) if hash_table_shape is not None else None
        self.hash_moe_top_k = hash_moe_top_k
        self.hash_moe_normalize = hash_moe_normalize
        self.mpo_num_tensors = mpo_num_tensors
        self.mpo_central_index = mpo_central_index
        self.mpo_aux_names = list(mpo_aux_names) if mpo_aux_names is not None else [
            f"aux{k}" for k in range(mpo_num_tensors) if k != mpo_central_index]
        self.mpo_transposed = mpo_transposed
        self.mpo_shapes = {k: [list(s) for s in v] for k, v in (mpo_shapes or {}).items()}
        self.use_cache = use_cache
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
