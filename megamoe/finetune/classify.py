"""Multi-task sequence classification on a Hugging Face causal LM's decoder.

The decoder (``model.model``: Llama / Mixtral / megamoe) gives the final-norm hidden state
[B, S, D]; the LM head is never run. The example's representation (``pool``):

- ``"mean"`` (default): the mean of the hidden states over its real tokens (right padding is
  masked out; the model is causal, so padding never leaks into a real token's state). The
  standard read-out of a *frozen* encoder (a linear probe on mean-pooled states).
- ``"last"``: the hidden state at its last real token, as Hugging Face's
  ``LlamaForSequenceClassification`` does. Trap: with a frozen small causal LM and truncated
  inputs the last token is an arbitrary mid-sentence word whose state mostly predicts the next
  token; on the CPU suite's base a converged linear probe reads 0.51 task-average accuracy from
  it (0.48 majority class) against 0.61 from the mean (results/finetune.md, diagnosis).

All tasks share
one output layer of sum(C_t) classes; each example's logits outside its task's slice are masked
to -inf, so softmax cross-entropy over the masked row equals the task's own C_t-way
cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.finetune.inject import set_task_ids


def final_hidden(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, D] final-norm hidden states of an HF causal LM (PEFT-wrapped or not)."""
    out = model.model(input_ids=input_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


POOLS = ("mean", "last")


def pool_hidden(h_BSD: torch.Tensor, lengths: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, D] representation of right-padded examples with ``lengths`` real tokens (>= 1)."""
    if pool == "last":
        return h_BSD[torch.arange(h_BSD.shape[0]), lengths - 1]
    real_BS = (torch.arange(h_BSD.shape[1], device=h_BSD.device)[None] < lengths[:, None]).to(h_BSD.dtype)
    return (h_BSD * real_BS[..., None]).sum(1) / lengths[:, None].to(h_BSD.dtype)


class MultiTaskClassifier(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, hidden_size: int, num_classes: list[int], pool: str = "mean"):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool={pool!r}: must be one of {POOLS}")
        self.model, self.pool = model, pool
        self.head = torch.nn.Linear(hidden_size, sum(num_classes))
        torch.nn.init.normal_(self.head.weight, std=0.02)
        torch.nn.init.zeros_(self.head.bias)
        offsets = torch.tensor([0] + list(num_classes)).cumsum(0)
        mask_TC = torch.full((len(num_classes), sum(num_classes)), float("-inf"))
        for t in range(len(num_classes)):
            mask_TC[t, offsets[t]:offsets[t + 1]] = 0.0
        self.register_buffer("offsets", offsets[:-1], persistent=False)
        self.register_buffer("mask_TC", mask_TC, persistent=False)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Masked logits [B, sum(C)]; the class of example b is ``argmax - offsets[task_b]``."""
        set_task_ids(self.model, task_ids)
        h_BSD = final_hidden(self.model, input_ids).float()
        return self.head(pool_hidden(h_BSD, lengths, self.pool)) + self.mask_TC[task_ids]

    def loss(self, logits, labels, task_ids):
        return F.cross_entropy(logits, labels + self.offsets[task_ids])

    def predict(self, logits, task_ids):
        return logits.argmax(-1) - self.offsets[task_ids]
