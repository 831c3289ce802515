"""Dispatcher permutation on hand-worked index tables (one process)."""

import pytest
import torch

from megamoe.moe.dispatcher import Dispatcher


def test_hand_worked_permutation_and_combine():
    # T=4 tokens, K=2 choices, E=3 experts; pair (t=3,k=1) is dropped.
    ids = torch.tensor([[1, 0], [1, 2], [0, 1], [2, 2]])
    keep = torch.tensor([[True, True], [True, True], [True, True], [True, False]])
    w = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.9, 0.1], [0.5, 0.5]])
    x = torch.arange(4.0).view(4, 1) * torch.ones(4, 2) + torch.tensor([0.0, 10.0])  # row t = [t, t+10]
    d = Dispatcher(num_slots=3)
    x_R, counts, plan = d.dispatch(x, ids, w, keep)
    # expert 0: tokens 0, 2; expert 1: tokens 0, 1, 2; expert 2: tokens 1, 3 (stable = token order)
    assert counts.tolist() == [2, 3, 2]
    assert plan.pair_N.tolist() == [1, 4, 0, 2, 5, 3, 6]  # flat token * K + choice; pair 7 dropped
    assert (plan.pair_N // 2).tolist() == [0, 2, 0, 1, 2, 1, 3]
    torch.testing.assert_close(x_R[:, 0], torch.tensor([0.0, 2, 0, 1, 2, 1, 3]))
    # identity experts: y = sum of kept weights * x (token 3 keeps only 0.5 of itself)
    y = d.combine(x_R, plan)
    torch.testing.assert_close(y, x * torch.tensor([1.0, 1.0, 1.0, 0.5]).view(4, 1))


def test_all_dropped_token_gets_zero_and_gradients_flow():
    ids = torch.tensor([[0], [1], [0]])
    keep = torch.tensor([[True], [False], [True]])
    w = torch.tensor([[1.0], [1.0], [2.0]], requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    d = Dispatcher(num_slots=2)
    x_R, counts, plan = d.dispatch(x, ids, w, keep)
    assert counts.tolist() == [2, 0]
    y = d.combine(x_R * 3.0, plan)
    assert torch.equal(y[1], torch.zeros(5))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([3.0, 0.0, 6.0]).view(3, 1).expand(3, 5))
    torch.testing.assert_close(w.grad, torch.stack([3 * x[0].sum(), torch.tensor(0.0), 3 * x[2].sum()]).detach().view(3, 1))


def test_combine_weights_and_sums_in_fp32_cast_once():
    """bf16 expert outputs, fp32 router weights: the products and their sum over K stay fp32 (the
    old combine cast the weights to bf16 and summed with a bf16 index_add, rounding three times)."""
    g = torch.Generator().manual_seed(0)
    T, K, E, D = 64, 2, 4, 32
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g)
    x = torch.randn(T, D, generator=g).bfloat16()
    d = Dispatcher(num_slots=E)
    x_R, _, plan = d.dispatch(x, ids, w, torch.ones(T, K, dtype=torch.bool), dropless=True)
    y = d.combine(x_R, plan)  # identity experts
    assert y.dtype == torch.float32
    expected = x.float() * w[:, :1] + x.float() * w[:, 1:]
    assert torch.equal(y, expected)  # exactly the fp32 arithmetic, no bf16 rounding in between
    bf16_combine = (x * w[:, :1].bfloat16() + x * w[:, 1:].bfloat16()).float()
    assert (bf16_combine - expected).abs().max() > 1e-3  # what the fp32 combine removes


def test_combine_gradients_match_autograd_in_float64():
    """The hand-written backward of the fp32 weighted sum, against autograd of the plain formula."""
    from torch.autograd import gradcheck

    from megamoe.moe.dispatcher import WeightedSum

    y = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(WeightedSum.apply, (y, w))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it)")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
def test_combine_is_bit_equal_across_runs_in_deterministic_mode(device):
    """No atomic scatter-add: two runs give the same bits (forward and gradients) under
    ``torch.use_deterministic_algorithms`` (on CUDA index_copy has a deterministic kernel; the old
    index_add had to accumulate colliding rows). bf16 outputs on CUDA, where atomics reorder."""
    T, K, E, D = (48, 2, 4, 16) if device == "cpu" else (4096, 2, 8, 256)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16

    def run():
        g = torch.Generator(device=device).manual_seed(1)
        ids = torch.randint(0, E, (T, K), generator=g, device=device)
        w = torch.rand(T, K, generator=g, device=device).requires_grad_()
        x = torch.randn(T, D, generator=g, device=device).to(dtype).requires_grad_()
        keep = torch.rand(T, K, generator=g, device=device) > 0.2
        d = Dispatcher(num_slots=E)
        x_R, _, plan = d.dispatch(x, ids, w, keep)
        y = d.combine(x_R * 2.0, plan)
        y.pow(2).sum().backward()
        return y.detach(), x.grad, w.grad

    torch.use_deterministic_algorithms(True)
    try:
        first, second = run(), run()
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
