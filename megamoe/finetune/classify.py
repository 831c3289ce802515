"""Multi-task sequence classification on a Hugging Face causal LM's decoder.

The decoder (``model.model``: Llama / Mixtral / megamoe) gives the final-norm hidden state
[B, S, D]; the LM head is never run. The example's representation is the hidden state at its
last real token (the model is causal, so right padding does not leak into it). All tasks share
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


class MultiTaskClassifier(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, hidden_size: int, num_classes: list[int]):
        super().__init__()
        self.model = model
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
        h_BSD = final_hidden(self.model, input_ids)
        pooled_BD = h_BSD[torch.arange(h_BSD.shape[0]), lengths - 1]
        return self.head(pooled_BD.float()) + self.mask_TC[task_ids]

    def loss(self, logits, labels, task_ids):
        return F.cross_entropy(logits, labels + self.offsets[task_ids])

    def predict(self, logits, task_ids):
        return logits.argmax(-1) - self.offsets[task_ids]
