"""Start-up validation of the whole layout, before anything expensive is built.

Each check raises :class:`ConfigError` naming the fields involved, so a wrong launch fails in
seconds with a message instead of hanging in a collective or failing deep in a forward:
world size vs TP x EP x DP, experts vs EP, batch sizes vs micro-batch x accumulation x DP,
sequence length vs positions, vocabulary vs tokenizer.
"""

from __future__ import annotations

from megamoe.config import ConfigError
from megamoe.model.pipeline_layout import check_pipeline_batches


def validate_layout(run, world_size: int, tokenizer_vocab: int | None = None) -> dict:
    """Returns {"dp", "gas", "tokens_per_step"}; raises ConfigError naming fields."""
    par, model, moe, train, data = run.parallel, run.model, run.moe, run.train, run.data
    tp, ep = par.tensor_parallel, par.expert_parallel
    if world_size % (tp * ep):
        raise ConfigError("parallel.tensor_parallel", tp,
                          f"world size {world_size} is not divisible by parallel.tensor_parallel x "
                          f"parallel.expert_parallel = {tp} x {ep}; launch a multiple of {tp * ep} ranks")
    dp = par.data_parallel(world_size)
    if moe.num_experts and moe.num_experts % ep:
        raise ConfigError("moe.num_experts", moe.num_experts, f"must be divisible by parallel.expert_parallel={ep}")
    if ep > 1 and not moe.num_experts:
        raise ConfigError("parallel.expert_parallel", ep, "needs moe.num_experts > 0")
    gas = check_pipeline_batches(par, train, dp)  # the accumulation, >= pipeline stages
    if data.seq_length > model.max_position_embeddings:
        raise ConfigError("data.seq_length", data.seq_length,
                          f"exceeds model.max_position_embeddings={model.max_position_embeddings}")
    if tokenizer_vocab is not None and tokenizer_vocab > model.vocab_size:
        raise ConfigError("model.vocab_size", model.vocab_size,
                          f"is smaller than the tokenizer's {tokenizer_vocab} pieces; set model.vocab_size >= "
                          f"{tokenizer_vocab}")
    if model.vocab_size % tp:
        raise ConfigError("model.vocab_size", model.vocab_size, f"must be divisible by parallel.tensor_parallel={tp}")
    if moe.num_experts and train.zero_stage == 3:
        raise ConfigError("train.zero_stage", 3,
                          "DeepSpeed ZeRO-3 does not support MoE layers; use train.zero_stage=2 for MoE models "
                          "(ZeRO-3 is for dense models, moe.num_experts=0)")
    if train.precision == "fp16" and not _has_cuda():
        raise ConfigError("train.precision", "fp16", "DeepSpeed supports fp16 only on GPUs; use bf16 or fp32 on CPU")
    return {"dp": dp, "gas": gas, "tokens_per_step": train.global_batch_size * data.seq_length}


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
