"""FFN experts (SwiGLU or GELU) held as stacked parameters and run as one grouped GEMM.

Legend: R rows grouped by slot, D width, F expert FFN width (Fl = this TP rank's share),
L local experts, n MultiHash blocks (1 otherwise), S = L * n local slots, K/N the inner and
outer dims of a grouped matmul.

Layout: three parameters ``gate_proj`` (SwiGLU only), ``up_proj``, ``down_proj``, each
``[L, Fl, D]``. gate/up are ``[out, in]`` per expert like ``nn.Linear``; down is stored as
``[in, out]`` (the transpose of its canonical ``[D, F]``) so that all three are sharded along
dim 1 and each (expert, block) slot is the contiguous row range of a ``view(S, Fl / n, D)``:
slot ``s = e * n + m`` is block m of local expert e, the dispatcher's slot order. The
canonical per-expert names (``{e}.gate_proj.weight`` ``[F, D]``, ``{e}.down_proj.weight``
``[D, F]``, ...) exist only in :meth:`FFNExperts.gather_full` / :meth:`FFNExperts.load_full`.

Compute (:func:`grouped_mm`), ``backend`` picks the kernel:
- ``grouped_mm``: ``torch._grouped_mm`` with int32 offsets = cumsum of per-slot counts, as
  torchtitan, Megatron-Core's GroupedMLP and transformers 5 do on CUDA. Its CUTLASS kernel
  (no host sync) takes bf16 on SM90/SM100 (H100/H200/B200); other dtypes or GPUs run torch's
  own per-group fallback inside the op (a host sync for the offsets), still correct.
- ``loop``: :class:`LoopGroupedMM`, one matmul per slot on views of the stacked weight, and in
  backward each slot's weight gradient written into its slice of ONE buffer of the weight's
  size (an empty slot's slice is zeroed). Indexing a stacked parameter per expert in plain
  autograd would instead materialise a full-size zero-padded gradient per expert (21x a dense
  FFN at E=64, platform.md). On these CPUs this loop beats torch 2.13's CPU ``_grouped_mm``
  (measured side by side in tools/bench_moe.py).
- ``auto`` (default): ``grouped_mm`` on CUDA, ``loop`` elsewhere and where ``_grouped_mm``'s
  16-byte stride alignment does not hold (:func:`grouped_mm_fits`; it would raise mid-step).
Both backends run every slot, empty or not, in one op per projection, so every rank produces
every expert gradient at the same point of backward, which ZeRO's ordered bucket reduction
needs (tests/moe/test_static_graph.py).

Parallelism:
- EP: this module holds only the experts of this EP rank (global ids ``expert_ids``).
- TP: F is sharded over the TP group (gate/up rows, down columns, like megatron's
  Column/RowParallelLinear): the input enters through megatron-core's
  ``copy_to_tensor_model_parallel_region`` (identity forward, all-reduce of the input
  gradient) and the partial outputs leave through ``reduce_from_tensor_model_parallel_region``.
  For MultiHash each of the n row blocks is sharded over TP separately (:func:`tp_rows`), so
  a rank's block m is a block of the canonical weight.
- Every stacked param carries DeepSpeed's MoE markers (``allreduce = False``,
  ``group_name = "ep_size_{ep}"``) so ZeRO reduces it only over the expert-data-parallel
  group, plus megatron's TP attributes (``partition_dim = 1``).

Init: every rank draws every expert's FULL canonical weights in a fixed order and keeps its
experts and slices, so a seed gives the same model whatever the EP/TP layout. down_proj uses
``output_std`` (the decoder passes std / sqrt(2 * num_layers), like the dense blocks' output
projections in megamoe/model/layers.py ``output_init``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megamoe import comm
from megamoe.errors import UserError
from megamoe.model.layers import ContiguousGrad

PROJS_SWIGLU = ("gate_proj", "up_proj", "down_proj")
PROJS_GELU = ("up_proj", "down_proj")
BACKENDS = ("auto", "loop", "grouped_mm")


def mark_expert_param(p: torch.Tensor, ep_size: int) -> None:
    """The attributes deepspeed.moe sets on expert params (see deepspeed/moe/experts.py)."""
    p.allreduce = False
    p.group_name = f"ep_size_{ep_size}"


def tp_rows(total: int, num_blocks: int, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Indices (along F) of the rows this TP rank holds: each of the n blocks is split in tp."""
    blk = total // num_blocks
    sub = blk // tp_size
    return torch.cat([torch.arange(m * blk + tp_rank * sub, m * blk + (tp_rank + 1) * sub)
                      for m in range(num_blocks)])


def activate(h_gate: torch.Tensor | None, h_up: torch.Tensor) -> torch.Tensor:
    return F.silu(h_gate) * h_up if h_gate is not None else F.gelu(h_up, approximate="tanh")


def _gather(t: torch.Tensor, group, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    return comm.all_gather(t, group)


def grouped_mm_fits(widths: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` takes operands whose rows are ``widths`` elements long: it
    requires every matrix's leading stride to be a multiple of 16 bytes (its CUTLASS kernel's
    alignment, checked on CPU too: "strides should be multiple of 16 bytes"). The experts' rows
    are D (x, y, down's rows) and F / TP / blocks (one slot's hidden rows), e.g. D=36 in bf16
    (72 bytes) does not fit."""
    size = torch.empty((), dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)


GROUPED_MM_MAX_GROUPS = 1024  # torch._grouped_mm's CUTLASS kernel takes at most this many groups


def grouped_mm_is_fast(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs its CUTLASS kernel here: bf16 on compute capability
    9.x / 10.x (H100, H200, B200). Any other dtype or GPU (fp32, fp16, bf16 on an A100) takes
    torch's fallback, a loop over groups inside the op that reads the offsets back to the
    host (about 9 host syncs per layer), slower than megamoe's own loop."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return False
    return torch.cuda.get_device_capability(device)[0] in (9, 10)


def resolve_backend(backend: str, device: torch.device, widths: tuple[int, ...] = (),
                    dtype: torch.dtype = torch.float32, num_slots: int = 1) -> str:
    """``auto``: ``grouped_mm`` where it is fast (:func:`grouped_mm_is_fast`), the row widths fit its
    alignment (:func:`grouped_mm_fits`) and the slots are within its group limit; ``loop``
    otherwise (any shape, any count). An explicit ``grouped_mm`` over the limit is refused."""
    if backend not in BACKENDS:
        raise UserError(f"experts backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        fast = grouped_mm_is_fast(device, dtype) and grouped_mm_fits(widths, dtype)
        return "grouped_mm" if fast and num_slots <= GROUPED_MM_MAX_GROUPS else "loop"
    if backend == "grouped_mm" and num_slots > GROUPED_MM_MAX_GROUPS:
        raise UserError(f"{num_slots} expert slots on one rank (moe.num_experts / parallel.expert_parallel x "
                        f"MultiHash blocks) exceed torch._grouped_mm's {GROUPED_MM_MAX_GROUPS} groups: raise "
                        "parallel.expert_parallel, or use the loop backend")
    return backend


def misaligned_expert_weights(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Names of the FFN expert weights that ``torch._grouped_mm`` could be given (their rows fit
    :func:`grouped_mm_fits`) whose storage does not start on a 16-byte boundary. DeepSpeed's
    ZeRO-1/2 and bf16 optimizers make every parameter a view into one flat buffer per param
    group, packed without padding, so a parameter of a size that is not a multiple of 8
    elements (an MPO core, say) shifts every parameter after it; megamoe/train/engine.py
    ``param_groups`` orders each group so those come last. The trainer asserts this list is
    empty at start-up; the CPU kernel does not check alignment, CUDA's fails at the first step."""
    bad = []
    for name, m in model.named_modules():
        if isinstance(m, FFNExperts):
            widths = (m.hidden, m.ffn // m.tp_size // m.num_blocks)
            if grouped_mm_fits(widths, dtype):
                bad += [f"{name}.{p}" for p in m.projs if getattr(m, p).data_ptr() % 16]
    return bad


class LoopGroupedMM(torch.autograd.Function):
    """``y[rows of s] = x[rows of s] @ w_SKN[s]`` for every slot s; see the module docstring.

    ``w_SKN`` may be a strided view (e.g. a transposed ``[S, N, K]`` stack): the weight
    gradient buffer is ``empty_like(w_SKN)`` (same strides), so it flows back through the
    view ops to the parameter without a copy."""

    @staticmethod
    def forward(ctx, x_RK: torch.Tensor, w_SKN: torch.Tensor, splits: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x_RK, w_SKN)
        ctx.splits = splits
        y_RN = x_RK.new_empty(x_RK.shape[0], w_SKN.shape[2])
        start = 0
        for s, n in enumerate(splits):
            if n:
                torch.mm(x_RK[start:start + n], w_SKN[s], out=y_RN[start:start + n])
            start += n
        return y_RN

    @staticmethod
    def backward(ctx, dy_RN: torch.Tensor):
        x_RK, w_SKN = ctx.saved_tensors
        dx_RK = torch.empty_like(x_RK) if ctx.needs_input_grad[0] else None
        dw_SKN = torch.empty_like(w_SKN) if ctx.needs_input_grad[1] else None
        start = 0
        for s, n in enumerate(ctx.splits):
            rows = slice(start, start + n)
            if dx_RK is not None and n:
                torch.mm(dy_RN[rows], w_SKN[s].t(), out=dx_RK[rows])
            if dw_SKN is not None:
                if n:
                    torch.mm(x_RK[rows].t(), dy_RN[rows], out=dw_SKN[s])
                else:
                    dw_SKN[s].zero_()
            start += n
        return dx_RK, dw_SKN, None


def grouped_mm(x_RK: torch.Tensor, w_SKN: torch.Tensor, counts_S: torch.Tensor | list[int],
               backend: str) -> torch.Tensor:
    """One matmul per slot over rows grouped by slot. ``counts_S``: a tensor for
    ``grouped_mm`` (offsets stay on device), a list of ints for ``loop``."""
    if backend == "grouped_mm":
        offs = counts_S.to(device=x_RK.device).cumsum(0).to(torch.int32)
        return ContiguousGrad.apply(torch._grouped_mm(x_RK.to(w_SKN.dtype), w_SKN, offs=offs))
    return LoopGroupedMM.apply(x_RK.to(w_SKN.dtype), w_SKN, counts_S)


def expert_ffn(x_RD: torch.Tensor, counts_S: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
               w_down: torch.Tensor, num_blocks: int, backend: str, host_counts_S: list[int] | None = None
               ) -> torch.Tensor:
    """The FFN of every slot on stacked ``[L, F', D]`` weights (module docstring layout).
    ``host_counts_S``: the counts on the host where the dispatcher already read them (the loop
    needs host ints; reading ``counts_S`` again would be a second host sync)."""
    S, D = w_up.shape[0] * num_blocks, w_up.shape[2]
    backend = resolve_backend(backend, x_RD.device, (D, w_up.shape[1] // num_blocks), w_up.dtype, S)
    if backend == "grouped_mm":
        counts = counts_S
    else:
        counts = host_counts_S if host_counts_S is not None else counts_S.tolist()

    def slots(w):  # [L, F', D] -> [S, F' / n, D], a view
        return w.view(S, -1, D)

    h_up = grouped_mm(x_RD, slots(w_up).transpose(1, 2), counts, backend)
    h_gate = grouped_mm(x_RD, slots(w_gate).transpose(1, 2), counts, backend) if w_gate is not None else None
    return grouped_mm(activate(h_gate, h_up), slots(w_down), counts, backend)


class FFNExperts(nn.Module):
    def __init__(self, hidden: int, ffn: int, num_experts: int, activation: str = "swiglu", *,
                 num_blocks: int = 1, ep_size: int = 1, ep_rank: int = 0, tp_size: int = 1, tp_rank: int = 0,
                 tp_group=None, ep_group=None, init_std: float = 0.02, output_std: float | None = None,
                 dtype=None, backend: str = "auto"):
        super().__init__()
        assert num_experts % ep_size == 0 and ffn % (num_blocks * tp_size) == 0
        self.hidden, self.ffn, self.num_experts, self.num_blocks = hidden, ffn, num_experts, num_blocks
        self.swiglu = activation == "swiglu"
        self.projs = PROJS_SWIGLU if self.swiglu else PROJS_GELU
        self.ep_size, self.ep_rank, self.ep_group = ep_size, ep_rank, ep_group
        self.tp_size, self.tp_rank, self.tp_group = tp_size, tp_rank, tp_group
        resolve_backend(backend, torch.device("cpu"))
        self.backend = backend
        n_local = num_experts // ep_size
        self.expert_ids = list(range(ep_rank * n_local, (ep_rank + 1) * n_local))
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        rows = tp_rows(ffn, num_blocks, tp_size, tp_rank)
        for proj in self.projs:
            p = nn.Parameter(torch.empty(n_local, ffn // tp_size, hidden, dtype=dtype))
            mark_expert_param(p, ep_size)
            set_tensor_model_parallel_attributes(p, True, 1, 1)
            self.register_parameter(proj, p)
        stds = {proj: init_std for proj in self.projs}
        stds["down_proj"] = init_std if output_std is None else output_std
        for e in range(num_experts):
            # Every expert's FULL canonical weights on every rank, in a fixed order (module docstring).
            full = {proj: torch.empty(self._canonical_shape(proj), dtype=dtype).normal_(std=stds[proj])
                    for proj in self.projs}
            if e in self.expert_ids:
                with torch.no_grad():
                    for proj in self.projs:
                        getattr(self, proj)[e - self.expert_ids[0]].copy_(self._to_local(proj, full[proj], rows))
        if tp_size > 1:
            from megatron.core.tensor_parallel import mappings

            self._enter = lambda x: mappings.copy_to_tensor_model_parallel_region(x, group=tp_group)
            self._leave = lambda y: mappings.reduce_from_tensor_model_parallel_region(y, group=tp_group)
        else:
            self._enter = self._leave = lambda t: t

    def _canonical_shape(self, proj: str) -> tuple[int, int]:
        return (self.hidden, self.ffn) if proj == "down_proj" else (self.ffn, self.hidden)

    @staticmethod
    def _to_local(proj: str, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Canonical ``[out, in]`` -> this rank's ``[Fl, D]`` rows (``rows`` moves to ``w``'s device:
        index ops reject an index on another device, and the module's tensors may be on CUDA)."""
        rows = rows.to(w.device)
        return w.t().index_select(0, rows) if proj == "down_proj" else w.index_select(0, rows)

    def forward(self, x_RD: torch.Tensor, counts_L: torch.Tensor, host_counts_L: list[int] | None = None
                ) -> torch.Tensor:
        ws = [getattr(self, p) if p in self.projs else None for p in PROJS_SWIGLU]
        return self._leave(expert_ffn(self._enter(x_RD), counts_L, *ws, self.num_blocks, self.backend,
                                      host_counts_L))

    # ---- full (unsharded) state dict, canonical names ----
    def full_keys(self, prefix: str) -> list[str]:
        return [f"{prefix}{e}.{proj}.weight" for e in range(self.num_experts) for proj in self.projs]

    def gather_full(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {}
        rows = [tp_rows(self.ffn, self.num_blocks, self.tp_size, r) for r in range(self.tp_size)]
        n_local = len(self.expert_ids)
        for proj in self.projs:
            local = getattr(self, proj).detach()  # [L, Fl, D]
            full = local.new_empty(n_local, self.ffn, self.hidden)
            for r, shard in enumerate(_gather(local, self.tp_group, self.tp_size)):
                full.index_copy_(1, rows[r].to(full.device), shard)  # the index on the tensors' device
            for r, block in enumerate(_gather(full, self.ep_group, self.ep_size)):
                for i, w in enumerate(block):
                    out[f"{prefix}{r * n_local + i}.{proj}.weight"] = (w.t() if proj == "down_proj" else w).contiguous()
        return out

    def load_full(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        rows = tp_rows(self.ffn, self.num_blocks, self.tp_size, self.tp_rank)
        with torch.no_grad():
            for proj in self.projs:
                param = getattr(self, proj)
                for i, e in enumerate(self.expert_ids):
                    key = f"{prefix}{e}.{proj}.weight"
                    if tuple(sd[key].shape) != self._canonical_shape(proj):
                        raise UserError(f"{key}: checkpoint shape {tuple(sd[key].shape)}, the model expects "
                                        f"{self._canonical_shape(proj)} (is the config the one it was saved with?)")
                    param[i].copy_(self._to_local(proj, sd[key], rows))
