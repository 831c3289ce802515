"""ZeRO-1/2 reduce gradients in the order they become ready, so every rank must give every
parameter a gradient even when its local experts receive no tokens (a rank whose graph
skipped a parameter desynchronises the bucketed reduction: gloo size mismatch or mixed grads)."""

import pytest
import torch

from megamoe.moe.experts import BACKENDS

from megamoe.moe.experts import FFNExperts
from megamoe.moe.mpo import MPOExperts


def _experts(kind, backend):
    if kind == "mpo":
        return MPOExperts(16, 32, 4, num_tensors=3, seed=0, backend=backend)
    return FFNExperts(16, 32, 4, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "auto"])
@pytest.mark.parametrize("kind", ["ffn", "mpo"])
@pytest.mark.parametrize("counts", [[0, 0, 0, 0], [3, 0, 2, 0]])
def test_every_param_gets_a_gradient(kind, counts, backend):
    experts = _experts(kind, backend)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    y = experts(x, torch.tensor(counts))
    assert y.shape == (sum(counts), 16)
    (y.sum() + 0 * x.sum()).backward()
    missing = [n for n, p in experts.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    for slot, c in enumerate(counts):  # an empty expert's slice of the stacked gradient is zero
        if c == 0 and kind == "ffn":
            assert all(float(p.grad[slot].abs().sum()) == 0 for p in experts.parameters())
        elif kind == "ffn":
            assert all(float(p.grad[slot].abs().sum()) > 0 for p in experts.parameters())
