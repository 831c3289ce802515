"""megamoe.model.layers: at TP=1 ColumnLinear/RowLinear skip megatron-core's autograd function
and must give its exact outputs and gradients (bit for bit: same matmuls), with a bias, with
``skip_bias_add`` and with a supplied (tied) weight. TP=2 goes through megatron's path; the
2-rank equivalence tests (test_parallel_equivalence.py) cover it."""

import pytest
import torch
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megamoe.model.layers import ColumnLinear, RowLinear, ensure_parallel, mp_config


def _pair(fast_cls, megatron_cls, **kw):
    ensure_parallel()
    torch.manual_seed(0)
    fast = fast_cls(24, 40, config=mp_config(), init_method=torch.nn.init.normal_, **kw)
    torch.manual_seed(0)
    ref = megatron_cls(24, 40, config=mp_config(), init_method=torch.nn.init.normal_, **kw)
    if fast.bias is not None:  # megatron zero-inits biases: make them count
        for m in (fast, ref):
            with torch.no_grad():
                m.bias.copy_(torch.linspace(-1, 1, 40))
    assert type(fast).forward is not megatron_cls.forward
    return fast, ref


def _run(layer, x, weight=None):
    x = x.clone().requires_grad_()
    out, out_bias = layer(x) if weight is None else layer(x, weight=weight)
    g = torch.linspace(-2, 2, out.numel()).view_as(out)
    out.backward(g)
    grads = [p.grad for p in layer.parameters()] + ([weight.grad] if weight is not None else [])
    return out, out_bias, x.grad, grads


@pytest.mark.parametrize("kind,kw", [("column", dict(bias=True, gather_output=False)),
                                     ("column", dict(bias=True, gather_output=False, skip_bias_add=True)),
                                     ("column", dict(bias=False, gather_output=False)),
                                     ("row", dict(bias=True, input_is_parallel=True, skip_bias_add=False)),
                                     ("row", dict(bias=True, input_is_parallel=True, skip_bias_add=True))])
def test_one_rank_linear_equals_megatron(kind, kw):
    fast, ref = _pair(*((ColumnLinear, ColumnParallelLinear) if kind == "column" else (RowLinear, RowParallelLinear)),
                      **kw)
    x_SBD = torch.randn(5, 3, 24)
    a, b = _run(fast, x_SBD), _run(ref, x_SBD)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))
    assert len(a[3]) == len(b[3]) and all(p is q is None or torch.equal(p, q) for p, q in zip(a[3], b[3]))
    assert a[3][0] is not None  # the weight's gradient at least


def test_tied_weight_is_supplied_at_call():
    fast, ref = _pair(ColumnLinear, ColumnParallelLinear, bias=False, gather_output=False,
                      skip_weight_param_allocation=True)
    assert fast.weight is None
    x_SBD = torch.randn(5, 3, 24)
    w_fast, w_ref = (torch.randn(40, 24, generator=torch.Generator().manual_seed(1)).requires_grad_()
                     for _ in range(2))
    a, b = _run(fast, x_SBD, w_fast), _run(ref, x_SBD, w_ref)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) and torch.equal(a[3][-1], b[3][-1])
    with pytest.raises(RuntimeError, match="needs a weight"):
        fast(x_SBD)
