"""Stacked experts (megamoe/moe/experts.py, mpo.py) against the per-expert reference.

The reference is the layout the stacked experts replaced, kept here only: one set of
canonical ``[out, in]`` weights per expert, one ``F.linear`` per slot (MultiHash block m of
expert e = rows/cols block m of its F), plain autograd; MPO experts contract each expert's
chain with :func:`megamoe.moe.mpo.contract` first. Both compute backends (the CPU loop
:class:`LoopGroupedMM` and ``torch._grouped_mm``, which runs on CPU in torch 2.13, slowly)
must equal it in outputs, input gradients and every weight gradient, single-process and at
EP=2 / TP=2 (2 gloo ranks), with and without MultiHash blocks and empty slots.

Tolerance (fp32, same products summed in other orders): atol 1e-6, rtol 1e-5 (values are
O(1e-2), so this is ~1e-5 relative at most; a wrong slot, block or transposed weight is O(1)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megamoe import comm, parallel
from megamoe.model.config import ModelConfig, MoEConfig, MPOConfig, ParallelConfig
from megamoe.moe import mpo
from megamoe.moe.experts import FFNExperts, LoopGroupedMM, activate
from megamoe.moe.layer import MoELayer
from megamoe.moe.mpo import MPOExperts
from tests.distributed import run_distributed

TOL = dict(atol=1e-6, rtol=1e-5)
D, FFN, E = 16, 32, 4
BACKENDS = ["loop", "grouped_mm"]


def _build(kind, activation="swiglu", blocks=1, backend="loop", dtype=None, **par):
    if kind == "mpo":
        return MPOExperts(D, FFN, E, activation, num_tensors=3, input_shape=[2, 4, 2], output_shape=[2, 8, 2],
                          num_blocks=blocks, seed=0, backend=backend, **par)
    return FFNExperts(D, FFN, E, activation, num_blocks=blocks, backend=backend, dtype=dtype, **par)


def _counts(slots: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(1, 6, (slots,), generator=g)
    c[1] = 0  # an empty slot in every case (and on both EP ranks: slots 1 and slots/2 + 1)
    c[slots // 2 + 1] = 0
    return c.tolist()


def _data(counts, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    R = sum(counts)
    return torch.randn(R, D, generator=g).to(dtype), torch.randn(R, D, generator=g).to(dtype)


def _reference(full: dict, kind, activation, blocks, counts, x_RD, dy_RD):
    """Per-expert loop on canonical weights, in float64. -> (y, dx, {canonical name: grad})."""
    full = {k: v.detach().double().requires_grad_() for k, v in full.items()}
    projs = ("gate_proj", "up_proj", "down_proj") if activation == "swiglu" else ("up_proj", "down_proj")
    if kind == "mpo":
        c = mpo.central_index(3)
        weights = {f"{e}.{p}.weight": mpo.contract([full[f"{p}.central"] if k == c else full[f"{e}.{p}.aux{k}"]
                                                    for k in range(3)])
                   for e in range(E) for p in projs}
    else:
        weights = {k[:-len(".weight")] + ".weight": v for k, v in full.items()}
    x = x_RD.detach().double().requires_grad_()
    outs, b = [], FFN // blocks
    for slot, x_rD in enumerate(torch.split(x, counts)):
        e, m = divmod(slot, blocks)
        w = {p: weights[f"{e}.{p}.weight"] for p in projs}
        sl = slice(m * b, (m + 1) * b)
        h = activate(F.linear(x_rD, w["gate_proj"][sl]) if "gate_proj" in w else None, F.linear(x_rD, w["up_proj"][sl]))
        outs.append(F.linear(h, w["down_proj"][:, sl]))
    y = torch.cat(outs)
    (y * dy_RD.double()).sum().backward()
    return y.detach(), x.grad, {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in full.items()}


def _canonical_grads(experts) -> dict:
    """The module's gradients under canonical names (gather_full with data := grad; collective)."""
    params = list(experts.parameters())
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad
    try:
        return experts.gather_full("")
    finally:
        for p, d in zip(params, saved):
            p.data = d


def _run(experts, counts, x_RD, dy_RD):
    x = x_RD.clone().requires_grad_()
    y = experts(x, torch.tensor(counts))
    (y * dy_RD).sum().backward()
    return y.detach(), x.grad


def _close(got, want, what, **tol):
    torch.testing.assert_close(got.double(), want.double(), **(tol or TOL), msg=lambda m: f"{what}: {m}")


# ---- single process ----

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,activation,blocks", [("ffn", "swiglu", 1), ("ffn", "gelu", 1), ("ffn", "swiglu", 2),
                                                     ("mpo", "swiglu", 1), ("mpo", "gelu", 2)])
def test_stacked_equals_per_expert_reference(kind, activation, blocks, backend):
    torch.manual_seed(0)
    experts = _build(kind, activation, blocks, backend)
    counts = _counts(E * blocks, seed=blocks)
    x, dy = _data(counts)
    y, dx = _run(experts, counts, x, dy)
    y_ref, dx_ref, g_ref = _reference(experts.gather_full(""), kind, activation, blocks, counts, x, dy)
    _close(y, y_ref, "output")
    _close(dx, dx_ref, "input grad")
    grads = _canonical_grads(experts)
    assert grads.keys() == g_ref.keys()
    for k in g_ref:
        _close(grads[k], g_ref[k], f"grad {k}")


def test_loop_and_grouped_mm_agree_bitwise_in_layout():
    """The two backends on the same module: same stacked gradient layout (no hidden copy or
    transposition) and values equal to fp32 rounding; every slice of one gradient buffer."""
    torch.manual_seed(0)
    experts = _build("ffn", blocks=2)
    counts = _counts(E * 2, seed=3)
    x, dy = _data(counts)
    res = {}
    for backend in BACKENDS:
        experts.backend = backend
        experts.zero_grad(set_to_none=True)
        y, dx = _run(experts, counts, x, dy)
        res[backend] = (y, dx, {n: p.grad.clone() for n, p in experts.named_parameters()})
        for n, p in experts.named_parameters():
            assert p.grad.shape == p.shape and p.grad.stride() == p.stride(), (backend, n)
    (y0, dx0, g0), (y1, dx1, g1) = res.values()
    _close(y0, y1, "output")
    _close(dx0, dx1, "input grad")
    for n in g0:
        _close(g0[n], g1[n], n)


def test_auto_keeps_grouped_mm_off_shapes_it_rejects(monkeypatch):
    """``torch._grouped_mm`` needs 16-byte row strides (checked on CPU as on CUDA): D=18 in fp32
    (72 bytes) raises mid-step, so ``auto`` must pick the loop for it on an H100 too."""
    from megamoe.moe.experts import grouped_mm_fits, resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    d, f, slots = 18, 32, 4
    experts = FFNExperts(d, f, slots, backend="grouped_mm")
    counts = torch.tensor([2, 0, 3, 1])
    x = torch.randn(6, d)
    with pytest.raises(RuntimeError, match="16 bytes"):
        experts(x, counts)
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert not grouped_mm_fits((d, f), torch.float32)
    assert resolve_backend("auto", cuda, (d, f), torch.bfloat16) == "loop"  # 36 bytes
    assert resolve_backend("auto", cuda, (20, 32), torch.bfloat16) == "loop"  # 40 bytes
    assert resolve_backend("auto", cuda, (24, 32), torch.bfloat16) == "grouped_mm"
    # F / blocks is a slot's row width: 2 blocks of 36 bf16 rows are 72 bytes
    assert resolve_backend("auto", cuda, (64, 72 // 2), torch.bfloat16) == "loop"
    experts.backend = "auto"
    y = experts(x, counts)
    assert y.shape == (6, d) and torch.isfinite(y).all()


@pytest.mark.parametrize("capability, dtype, expected", [
    ((9, 0), torch.bfloat16, "grouped_mm"),  # H100 / H200: the CUTLASS kernel
    ((10, 0), torch.bfloat16, "grouped_mm"),  # B200
    ((9, 0), torch.float32, "loop"),  # fp32 / fp16: torch's per-group fallback, host syncs inside
    ((9, 0), torch.float16, "loop"),
    ((8, 0), torch.bfloat16, "loop"),  # A100: no kernel for SM80
    ((12, 0), torch.bfloat16, "loop"),
])
def test_auto_picks_grouped_mm_only_for_bf16_on_sm90_sm100(monkeypatch, capability, dtype, expected):
    from megamoe.moe.experts import resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_backend("auto", torch.device("cuda"), (64, 128), dtype) == expected
    assert resolve_backend("auto", torch.device("cpu"), (64, 128), dtype) == "loop"


def test_grouped_mm_group_limit(monkeypatch):
    """At most 1024 groups per ``torch._grouped_mm`` call: ``auto`` takes the loop beyond, an
    explicit ``grouped_mm`` is refused naming the fields to change."""
    from megamoe.errors import UserError
    from megamoe.moe.experts import GROUPED_MM_MAX_GROUPS, resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda, widths = torch.device("cuda"), (64, 128)
    assert resolve_backend("auto", cuda, widths, torch.bfloat16, GROUPED_MM_MAX_GROUPS) == "grouped_mm"
    assert resolve_backend("auto", cuda, widths, torch.bfloat16, GROUPED_MM_MAX_GROUPS + 1) == "loop"
    assert resolve_backend("grouped_mm", cuda, widths, torch.bfloat16, GROUPED_MM_MAX_GROUPS) == "grouped_mm"
    with pytest.raises(UserError, match="1025 expert slots.*parallel.expert_parallel"):
        resolve_backend("grouped_mm", cuda, widths, torch.bfloat16, GROUPED_MM_MAX_GROUPS + 1)


def test_loop_weight_grad_is_one_buffer():
    """LoopGroupedMM hands autograd ONE weight gradient of the stacked shape, written slot by
    slot (the fix for the 21x of indexing a stacked parameter per expert)."""
    w = torch.randn(3, 8, 4, requires_grad=True)
    x = torch.randn(7, 8, requires_grad=True)
    seen = []
    view = w[:, :, :]
    view.register_hook(lambda g: seen.append(g))
    LoopGroupedMM.apply(x, view, [2, 0, 5]).sum().backward()
    assert len(seen) == 1 and seen[0].shape == (3, 8, 4)
    torch.testing.assert_close(w.grad[0], x[:2].detach().t() @ torch.ones(2, 4), atol=1e-6, rtol=1e-6)
    assert float(w.grad[1].abs().sum()) == 0


@pytest.mark.parametrize("kind,blocks", [("ffn", 1), ("ffn", 2), ("mpo", 2)])
def test_load_full_then_gather_full_round_trips(kind, blocks):
    """Random canonical tensors in, the same out (the layout conversion is invertible), and the
    keys are ``full_keys`` (what load_full_state_dict checks without collectives)."""
    experts = _build(kind, blocks=blocks)
    g = torch.Generator().manual_seed(4)
    sd = {k: torch.randn(v.shape, generator=g) for k, v in experts.gather_full("").items()}
    assert sorted(sd) == sorted(experts.full_keys(""))
    experts.load_full(sd, "")
    for k, v in experts.gather_full("").items():
        assert torch.equal(v, sd[k]), k


def test_backend_is_validated():
    from megamoe.errors import UserError

    with pytest.raises(UserError, match="experts backend 'cuda'"):
        FFNExperts(D, FFN, E, backend="cuda")


@pytest.mark.parametrize("kind", ["ffn", "mpo"])
def test_down_proj_depth_scaled(kind):
    """Expert down_proj at std / sqrt(2 * num_layers) like the dense output projections;
    gate/up at std. (The old init drew down_proj at std: the ratio below was 1.)"""
    cfg = ModelConfig(vocab_size=50, hidden_size=64, ffn_hidden_size=128, num_heads=2, num_layers=8, init_std=0.02)
    moe = MoEConfig(num_experts=8, every=1, expert_type=kind, mpo=MPOConfig(num_tensors=3))
    torch.manual_seed(0)
    layer = MoELayer(cfg, moe, 0)
    if kind == "mpo":  # the contracted W of every expert
        std = {p: layer.experts.weights(p).detach().std().item() for p in layer.experts.projs}
    else:
        sd = layer.gather_full("")
        std = {p: torch.stack([v for k, v in sd.items() if k.endswith(f"{p}.weight")]).std().item()
               for p in ("gate_proj", "up_proj", "down_proj")}
    want = 0.02 / math.sqrt(2 * 8)
    tol = 0.05 if kind == "ffn" else 0.25  # MPO: one expert's W, entries are correlated products
    assert abs(std["down_proj"] / want - 1) < tol, std
    assert abs(std["up_proj"] / 0.02 - 1) < tol and abs(std["gate_proj"] / 0.02 - 1) < tol, std


# ---- 2 gloo ranks: EP=2 and TP=2, MultiHash blocks ----

def _parallel_body(rank, world, tp, ep, cases, full_refs):
    parallel.init_parallel(ParallelConfig(tensor_parallel=tp, expert_parallel=ep))
    par = dict(ep_size=ep, ep_rank=parallel.ep_rank(), ep_group=parallel.ep_group())
    for (kind, activation, blocks, backend), (full, counts, x, dy, ref) in zip(cases, full_refs):
        kw = dict(par, tp_size=tp, tp_rank=parallel.tp_rank(), tp_group=parallel.tp_group()) if kind == "ffn" else par
        experts = _build(kind, activation, blocks, backend, **kw)
        experts.load_full(full, "")
        y_ref, dx_ref, g_ref = ref
        if ep > 1:  # this rank's experts get the rows of its slots (the dispatcher's job)
            S = len(counts) // ep
            first = sum(counts[:rank * S])
            counts = counts[rank * S:(rank + 1) * S]
            rows = slice(first, first + sum(counts))
            x, dy, y_ref, dx_ref = x[rows], dy[rows], y_ref[rows], dx_ref[rows]
        y, dx = _run(experts, counts, x, dy)
        what = f"{kind} {activation} blocks={blocks} {backend} tp={tp} ep={ep}"
        _close(y, y_ref, f"{what} output")
        _close(dx, dx_ref, f"{what} input grad")
        for n, p in experts.named_parameters():  # replicated params: sum the ranks' shares
            if getattr(p, "allreduce", True) and ep > 1:
                comm.all_reduce_(p.grad, group=parallel.dp_group())
        grads = _canonical_grads(experts)
        assert grads.keys() == g_ref.keys(), what
        for k in g_ref:
            _close(grads[k], g_ref[k], f"{what} grad {k}")


def _parallel(tp, ep, cases):
    refs = []
    for i, (kind, activation, blocks, backend) in enumerate(cases):
        torch.manual_seed(i)
        full = _build(kind, activation, blocks).gather_full("")
        counts = _counts(E * blocks, seed=10 + i)
        x, dy = _data(counts, seed=20 + i)
        refs.append((full, counts, x, dy, _reference(full, kind, activation, blocks, counts, x, dy)))
    run_distributed(_parallel_body, 2, args=(tp, ep, cases, refs))


PAR_CASES = [(kind, "swiglu", blocks, backend) for kind in ("ffn", "mpo") for blocks in (1, 2) for backend in BACKENDS]


def test_expert_parallel_2_equals_per_expert_reference():
    _parallel(1, 2, PAR_CASES)


def test_tensor_parallel_2_equals_per_expert_reference():
    _parallel(2, 1, [c for c in PAR_CASES if c[0] == "ffn"] + [("ffn", "gelu", 2, "loop")])


# ---- CUDA: torch._grouped_mm (what "auto" picks there) against the loop ----

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh runs it)")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kind,blocks", [("ffn", 1), ("ffn", 2), ("mpo", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_grouped_mm_equals_loop(kind, blocks, dtype):
    """Same module, same data on the GPU: ``auto`` (grouped_mm) vs the loop, and both vs the
    float64 reference. fp32: TF32 off, the tolerance of TOL x 10; bf16: inputs and weights
    are rounded to bf16, tolerance 2e-2 relative to the output scale."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    experts = _build(kind, blocks=blocks).cuda().to(dtype)
    counts = _counts(E * blocks, seed=5)
    x, dy = (t.cuda().to(dtype) for t in _data(counts))
    out = {}
    for backend in ("auto", "loop"):
        experts.backend = backend
        experts.zero_grad(set_to_none=True)
        y, dx = _run(experts, counts, x, dy)
        out[backend] = (y.float().cpu(), dx.float().cpu(), {k: v.float().cpu() for k, v in _canonical_grads(experts).items()})
    full = {k: v.float().cpu() for k, v in experts.gather_full("").items()}
    ref = _reference(full, kind, "swiglu", blocks, counts, x.float().cpu(), dy.float().cpu())
    for backend, (y, dx, grads) in out.items():
        for got, want, what in [(y, ref[0], "output"), (dx, ref[1], "input grad")] + \
                [(grads[k], ref[2][k], k) for k in ref[2]]:
            scale = want.abs().max().item() or 1.0
            tol = dict(atol=1e-5 * scale + 1e-6, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2 * scale, rtol=2e-2)
            _close(got, want, f"{backend} {dtype} {what}", **tol)
