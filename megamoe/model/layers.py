"""Building blocks shared by the decoder: megatron-core TP layer factories, norms, RoPE.

Parallelism enters only here, through the *choice* of layer: every projection is a
megatron-core ``ColumnParallelLinear`` (output dim sharded over TP) or ``RowParallelLinear``
(input dim sharded, output summed over TP). At TP=1 they are plain linears (:class:`ColumnLinear`
and :class:`RowLinear` call ``F.linear``), so the model code reads as single-device code.

Traps:
- megatron-core layers need its ``parallel_state`` even for one process; :func:`ensure_parallel`
  creates a world of one (gloo) when nothing was initialised.
- ``use_cpu_initialization=True`` builds the FULL master weight from the global torch RNG on
  every rank and keeps this rank's slice, so a model built with the same seed is the same
  model at any TP size (only true for layers that use it; our norms init to ones).
- Under sequence parallelism the residual stream is split along S over the TP ranks, so
  parameters applied to it (the norm weights) get only a partial gradient per rank;
  :func:`sync_sequence_parallel_grad` adds a hook that sums it over TP.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

from megamoe import comm, parallel
from megamoe.model.config import ModelConfig


def ensure_parallel() -> None:
    """Initialise a world of one (TP=EP=DP=1, gloo: :func:`megamoe.parallel.init_cpu_parallel`)
    when the caller did not call ``init_parallel``."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        parallel.init_cpu_parallel()


def mp_config() -> ModelParallelConfig:
    """megatron-core's layer config for the current process groups (CPU init, fp32 master).

    Its own ``sequence_parallel`` stays off: megatron's fused sequence-parallel path allocates a
    CUDA buffer. We apply sequence parallelism around the TP layers instead (see
    :func:`sequence_parallel_fns`)."""
    tp = parallel.tp_size()
    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=parallel.ep_size(),
        sequence_parallel=False,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


def _identity(x):
    return x


def _all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    return comm.all_gather_cat(x, 0, group)


def _slice_dim0(x: torch.Tensor, group) -> torch.Tensor:
    n = dist.get_world_size(group)
    return x.chunk(n, dim=0)[dist.get_rank(group)].contiguous()


class _GatherSequence(torch.autograd.Function):
    """All-gather along S; backward keeps this rank's slice (the gradient is already complete)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _slice_dim0(grad, ctx.group), None


class _SplitSequence(torch.autograd.Function):
    """Keep this rank's slice along S; backward all-gathers."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _slice_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_dim0(grad, ctx.group), None


class ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous, once, where a strided
    gradient would otherwise be copied twice or rejected:
    - attention's output: it runs in [B, S] inside and hands back a transposed [S, B] view,
      whose gradient megatron-core's linear backward would copy twice (the 3-D ``matmul`` for
      the input gradient, then ``.contiguous()`` for the weight's);
    - torch's ``_grouped_mm`` backward raises "Invalid strides" on an expanded gradient (``y.sum()``).
    """

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.new_empty(g.shape) if g.numel() == 0 else g.contiguous()  # 0 rows: strides (0, 0)


def sequence_parallel_fns(sequence_parallel: bool):
    """``(enter, leave)`` around a tensor-parallel sub-layer whose input is the residual stream.

    With sequence parallelism the residual stream is this rank's S/TP slice. ``enter``
    all-gathers the sequence; since the TP layer behind it already all-reduces its input
    gradient (megatron's copy-to-TP region), the gather's backward only keeps this rank's slice.
    ``leave`` keeps this rank's slice of the (already TP-reduced) output; its backward
    all-gathers. Compared with megatron's fused reduce-scatter path this moves about twice the
    bytes, but it runs anywhere: megatron-core's own sequence-parallel mappings allocate their
    buffers with ``torch.cuda.current_device()`` and fail on CPU, hence these two small autograd
    functions. Activation memory between sub-layers is still divided by TP.
    Without sequence parallelism both are the identity."""
    if not sequence_parallel or parallel.tp_size() == 1:
        return _identity, _identity
    group = parallel.tp_group()
    return (lambda x: _GatherSequence.apply(x, group)), (lambda x: _SplitSequence.apply(x, group))


def normal_init(std: float):
    return lambda w: torch.nn.init.normal_(w, mean=0.0, std=std)


def output_init(cfg: ModelConfig):
    """Megatron/GPT-2 scaled init for projections that write into the residual stream:
    std / sqrt(2 * num_layers), so the residual variance does not grow with depth."""
    return normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers))


def _one_rank_linear(layer, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """megatron-core's ``(output, output_bias)`` from a plain ``F.linear``, for one TP rank."""
    if layer.skip_bias_add:
        return torch.nn.functional.linear(x, weight), layer.bias
    return torch.nn.functional.linear(x, weight, layer.bias), None


class ColumnLinear(ColumnParallelLinear):
    """megatron-core's ``ColumnParallelLinear``; with one TP rank, a plain ``F.linear``.

    At TP=1 megatron's forward still runs its own autograd function (copy-to-TP region, a 3-D
    matmul, a backward that reshapes and re-multiplies) for the same numbers: the dense
    bench_train model's fwd+bwd took 1/0.9926 as long through it (paired median of 24 rounds,
    +- 0.002), gradients bit-equal either way. Trap: only TP=1 takes the shortcut; megatron's
    gradient-accumulation fusion and sequence parallelism stay off in :func:`mp_config`, so
    nothing else of megatron's path is skipped."""

    def forward(self, input_, weight=None, runtime_gather_output=None):
        if self.tp_group.size() > 1:
            return super().forward(input_, weight, runtime_gather_output)
        if weight is None and self.weight is None:
            raise RuntimeError("ColumnLinear built with skip_weight_param_allocation needs a weight")
        return _one_rank_linear(self, input_, self.weight if weight is None else weight)


class RowLinear(RowParallelLinear):
    """megatron-core's ``RowParallelLinear``; with one TP rank, a plain ``F.linear`` (see
    :class:`ColumnLinear`)."""

    def forward(self, input_):
        if self.tp_group.size() > 1:
            return super().forward(input_)
        return _one_rank_linear(self, input_, self.weight)


def column_linear(in_dim: int, out_dim: int, cfg: ModelConfig, mp: ModelParallelConfig, init=None,
                  **kw) -> ColumnLinear:
    return ColumnLinear(in_dim, out_dim, config=mp, init_method=init or normal_init(cfg.init_std),
                        bias=cfg.bias, gather_output=False, tp_group=parallel.tp_group(), **kw)


def row_linear(in_dim: int, out_dim: int, cfg: ModelConfig, mp: ModelParallelConfig, init=None) -> RowLinear:
    return RowLinear(in_dim, out_dim, config=mp, init_method=init or output_init(cfg), bias=cfg.bias,
                     input_is_parallel=True, skip_bias_add=False, tp_group=parallel.tp_group())


class RMSNorm(torch.nn.Module):
    """RMSNorm in Hugging Face Llama's order: normalise in fp32, cast back to the input dtype,
    then scale by ``weight``. (``torch.nn.RMSNorm`` does not promise this cast order in bf16,
    and exported models must match HF bit for bit where possible.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def build_norm(cfg: ModelConfig) -> torch.nn.Module:
    """RMSNorm (weight only) or LayerNorm (weight and bias); both init to the identity."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return torch.nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)


def _allreduce_over_tp(grad: torch.Tensor) -> torch.Tensor:
    return comm.all_reduce_(grad.clone(), "sum", parallel.tp_group())


def sync_sequence_parallel_grad(param: torch.nn.Parameter) -> None:
    """Sum ``param``'s gradient over TP (a replicated parameter applied to a sequence shard).

    The hook runs on each backward contribution before it is accumulated into ``.grad``, so it
    composes with gradient accumulation and with DeepSpeed's post-accumulation hooks."""
    param.sequence_parallel = True
    param.register_hook(_allreduce_over_tp)


class RotaryEmbedding(torch.nn.Module):
    """Llama/HF-convention RoPE ("rotate_half": the two halves of each head are the pair), so
    q/k projection weights map to Hugging Face Llama/Mixtral without permutation.

    Trap: the frequencies are recomputed in fp32 on each call instead of living in a buffer,
    because DeepSpeed's bf16 mode casts every buffer to bf16, which would round the angles."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [S, 1, head_dim] (broadcast over batch and heads of [B, S, h, hd])."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        inv_freq = 1.0 / self.theta ** exponent
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
