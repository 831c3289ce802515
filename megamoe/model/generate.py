"""Greedy decoding by full recomputation (no KV cache): simple, exact, and the reference the
Hugging Face parity tests compare ``generate(do_sample=False)`` against.

Works at any TP size: the vocabulary-sharded logits of the last position are gathered over TP
before the argmax, so every TP rank picks the same token. Call on all ranks of a TP group.
Build the model without sequence parallelism for decoding: the growing context length is
rarely divisible by TP (sequence parallelism is a training-memory setting anyway).
"""

from __future__ import annotations

import torch

from megamoe import comm, parallel


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` [B, S]; returns [B, S + n].

    Stops early when every row has produced ``eos_token_id`` (rows that finished keep getting
    ``eos_token_id``). The context is cut to the last ``max_position_embeddings`` tokens."""
    was_training = model.training
    model.eval()
    ids = input_ids
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    max_len = model.cfg.max_position_embeddings
    try:
        for _ in range(max_new_tokens):
            logits_BV = model(ids[:, -max_len:]).logits[:, -1, :]
            logits_BV = comm.all_gather_cat(logits_BV, -1, parallel.tp_group())  # vocab-sharded under TP
            nxt = logits_BV.argmax(dim=-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos_token_id is not None and bool(done.all()):
                break
    finally:
        model.train(was_training)
    return ids
