"""Dispatcher permutation on hand-worked index tables (one process)."""

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
    assert plan.token_idx_N.tolist() == [0, 2, 0, 1, 2, 1, 3]
    torch.testing.assert_close(plan.weights_N, torch.tensor([0.4, 0.9, 0.6, 0.7, 0.1, 0.3, 0.5]))
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
