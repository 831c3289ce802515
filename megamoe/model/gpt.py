"""The decoder: embedding -> pre-norm blocks (attention, FFN or MoE) -> final norm -> LM head.

Contract (used by the trainer, tests, checkpoints and HF export)::

    model = build_model(model_cfg, moe_cfg)          # after init_parallel, or alone (world of one)
    out = model(input_ids[B,S], labels[B,S] | None, loss_mask[B,S] | None)
    out.logits   [B, S, V/TP]  this rank's vocabulary shard
    out.lm_loss  mean vocab-parallel CE over loss_mask tokens (labels < 0 are masked too)
    out.aux_loss sum over MoE layers of coef x balance losses (Switch, sequence, global; 0 for
                 dense / hash)
    out.z_loss   sum over MoE layers of coef x router z-loss
    out.loss     lm_loss + aux_loss + z_loss (None without labels)
    out.moe_stats  one MoEStats per MoE layer, in block order

Layout: the residual stream is [S, B, D] inside (megatron-core's convention, which its
sequence-parallel collectives split along dim 0); inputs and logits are [B, S, ...] outside.
Under sequence parallelism the residual stream (and the norms) hold [S/TP, B, D]; the input of
every sub-layer (attention, MLP, MoE, LM head) is all-gathered to the full sequence and its
output split back (layers.sequence_parallel_fns). So an MoE layer sees the full sequence, the
same tokens on every TP rank, matching the full-sequence RoutingContext.

Pipeline parallelism (megamoe/train/pipeline.py): ``build_model(..., part=ModelPart(...))``
builds only one stage's pieces: its blocks (kept under their model-wide names ``layers.{i}``,
so checkpoints, exports and resharding across stages go by name), the embedding on the first
stage, the final norm and head on the last (and, with tied embeddings, a copy of the embedding
there). The stage runs them through :meth:`GPT.embed_tokens`, :meth:`GPT.run_blocks` and
:meth:`GPT.head_logits`, the same code :meth:`GPT.forward` runs. Every piece draws its initial
weights from its own seed (:func:`_part_seed`), so block ``i`` starts equal whichever stage
builds it, and a PP=2 run starts from the PP=1 run's weights.

Losses are per-rank means: under data/expert parallelism each rank's lm_loss and aux loss are
computed on its own micro-batch (the LB loss on that rank's tokens, as in DeepSpeed-MoE and
Switch), and the gradient averaging over DP is the engine's job.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch.utils.checkpoint import checkpoint

from megamoe import parallel
from megamoe.model.attention import Attention
from megamoe.model.config import ModelConfig, MoEConfig, ParallelConfig
from megamoe.model.layers import (
    ColumnLinear,
    RotaryEmbedding,
    build_norm,
    ensure_parallel,
    mp_config,
    normal_init,
    sequence_parallel_fns,
    sync_sequence_parallel_grad,
)
from megamoe.model.mlp import MLP
from megamoe.moe.dispatcher import recompute_contexts


# The id used as "previous token" at position 0 by previous-token / bigram hash routing (the
# model has no BOS id of its own; 0 is also what a packed sequence start would most often see
# as "unknown"). HF export re-implements routing with the same constant.
PREV_TOKEN_AT_START = 0


@dataclass(frozen=True)
class ModelPart:
    """What one pipeline stage builds: ``blocks`` (model-wide indices), the embedding
    (``first``), the final norm and head (``last``). ``None`` for ``part`` = the whole model."""

    blocks: tuple[int, ...]
    first: bool
    last: bool


class BlockSet(torch.nn.ModuleDict):
    """The blocks a model (or a pipeline stage) holds, keyed by their model-wide index, so their
    parameters are named ``layers.{i}.…`` whichever stage holds them. Iterates over the blocks
    (not the keys) and indexes by int, like the ``ModuleList`` of the whole model."""

    def __iter__(self):
        return iter(self.values())

    def __getitem__(self, index):
        return super().__getitem__(str(index))

    def indices(self) -> list[int]:
        return [int(k) for k in self.keys()]


def _part_seed(base: int, part: int) -> int:
    """The seed of one piece of the model (0 = embeddings, 1 + i = block i, -1 = head)."""
    return (base * 1_000_003 + part) % (2**63 - 1)


@contextmanager
def _seeded(base: int, part: int):
    """Draw this piece's weights from its own seed, leaving the global CPU generator as it was
    (megatron-core's CPU init draws every full weight from it; every rank draws the same)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_part_seed(base, part))
        yield


@dataclass
class ModelOutput:
    logits: torch.Tensor
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    loss: torch.Tensor | None
    moe_stats: list = field(default_factory=list)


class Block(torch.nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))`` where ffn is a dense MLP
    (``self.mlp``) or an MoE layer (``self.moe``); the attribute names are the canonical ones.
    ``enter``/``leave`` are the sequence-parallel gather/split (identity without SP)."""

    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, index: int, mp, sequence_parallel: bool,
                 build_tables: bool = True):
        super().__init__()
        self.attn_norm = build_norm(cfg)
        self.attn = Attention(cfg, mp)
        self.mlp_norm = build_norm(cfg)
        self.mlp = self.moe = None
        if index in moe_cfg.moe_layer_indices(cfg.num_layers):
            from megamoe.moe.layer import MoELayer

            self.moe = MoELayer(cfg, moe_cfg, index, build_tables=build_tables)
        else:
            self.mlp = MLP(cfg, mp)
        self._enter, self._leave = sequence_parallel_fns(sequence_parallel)

    def forward(self, x_SBD: torch.Tensor, rope, routing):
        x_SBD = x_SBD + self._leave(self.attn(self._enter(self.attn_norm(x_SBD)), rope))
        h_SBD = self._enter(self.mlp_norm(x_SBD))
        if self.moe is None:
            return x_SBD + self._leave(self.mlp(h_SBD)), None
        y_SBD, stats = self.moe(h_SBD, routing)
        return x_SBD + self._leave(y_SBD), stats


class GPT(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, moe_cfg: MoEConfig, sequence_parallel: bool = False,
                 build_tables: bool = True, part: ModelPart | None = None):
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe_cfg
        self.part = part or ModelPart(blocks=tuple(range(cfg.num_layers)), first=True, last=True)
        first, last = self.part.first, self.part.last
        mp = mp_config()
        group = parallel.tp_group()
        base = int(torch.randint(0, 2**62, ()))  # one draw of the global generator: the run's seed
        self.embed = self.pos_embed = self.final_norm = self.lm_head = None
        if first or (last and cfg.tie_embeddings):  # the last stage's copy holds the tied head's weight
            with _seeded(base, 0):
                self.embed = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                    init_method=normal_init(cfg.init_std), config=mp, tp_group=group)
                if cfg.position_embedding == "learned" and first:
                    self.pos_embed = torch.nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
                    torch.nn.init.normal_(self.pos_embed.weight, std=cfg.init_std)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.position_embedding == "rope" else None
        self.layers = BlockSet()
        for i in self.part.blocks:
            with _seeded(base, 1 + i):
                self.layers[str(i)] = Block(cfg, moe_cfg, i, mp, sequence_parallel, build_tables)
        if last:
            with _seeded(base, -1):
                self.final_norm = build_norm(cfg)
                self.lm_head = ColumnLinear(cfg.hidden_size, cfg.vocab_size, config=mp,
                                            init_method=normal_init(cfg.init_std), bias=False, gather_output=False,
                                            skip_weight_param_allocation=cfg.tie_embeddings, tp_group=group)
        self._enter, self._leave = sequence_parallel_fns(sequence_parallel)
        self.sequence_parallel = sequence_parallel and parallel.tp_size() > 1
        if self.sequence_parallel:  # norms act on this rank's sequence slice: sum their grads over TP
            norms = [n for n in [self.final_norm] if n is not None] + \
                [n for b in self.layers for n in (b.attn_norm, b.mlp_norm)]
            for p in [p for n in norms for p in n.parameters()]:
                sync_sequence_parallel_grad(p)

    # ---- the pieces a pipeline stage runs (forward runs them all) ----------------------------
    def embed_tokens(self, ids_SB: torch.Tensor) -> torch.Tensor:
        """Token (+ learned position) embedding -> the residual stream [S(/TP), B, D]."""
        S = ids_SB.shape[0]
        if S > self.cfg.max_position_embeddings:
            raise ValueError(f"sequence length {S} > model.max_position_embeddings={self.cfg.max_position_embeddings}")
        x_SBD = self.embed(ids_SB)
        if self.pos_embed is not None:
            x_SBD = x_SBD + self.pos_embed.weight[:S, None, :]
        if self.sequence_parallel and S % parallel.tp_size():
            raise ValueError(f"sequence parallelism needs the sequence length {S} divisible by TP={parallel.tp_size()}")
        return self._leave(x_SBD)

    def routing_inputs(self, ids_SB: torch.Tensor, labels_SB: torch.Tensor | None):
        """(rope, routing context) for a full sequence of ``ids_SB``: what every block needs
        besides the residual stream; a pipeline stage rebuilds it from the ids and labels that
        travel with its micro-batch."""
        rope = self.rope(ids_SB.shape[0], ids_SB.device) if self.rope is not None else None
        return rope, self._routing(ids_SB, labels_SB)

    def run_blocks(self, x_SBD: torch.Tensor, blocks, rope, routing) -> tuple[torch.Tensor, list]:
        """The ``blocks`` (held by this model, in order); returns the stream and their MoEStats."""
        stats = []
        for block in blocks:
            if self.cfg.activation_checkpointing and self.training:
                x_SBD, st = checkpoint(block, x_SBD, rope, routing, use_reentrant=False,
                                       context_fn=recompute_contexts)
            else:
                x_SBD, st = block(x_SBD, rope, routing)
            if st is not None:
                stats.append(st)
        return x_SBD, stats

    def head_logits(self, x_SBD: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: this rank's vocabulary shard of the logits [S, B, V/TP]."""
        x_SBD = self._enter(self.final_norm(x_SBD))
        return self.lm_head(x_SBD, weight=self.embed.weight if self.cfg.tie_embeddings else None)[0]

    @staticmethod
    def loss_terms(stats: list, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(aux, z): the balance and z losses of ``stats``, fp32 (losses stay fp32 under bf16)."""
        zero = torch.zeros((), dtype=torch.float32, device=like.device)
        return sum((s.balance_loss for s in stats), zero), sum((s.z_loss_coef * s.z_loss for s in stats), zero)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None) -> ModelOutput:
        if not (self.part.first and self.part.last):
            raise RuntimeError("this model holds one pipeline stage; megamoe.train.pipeline runs it")
        ids_SB = input_ids.t()
        x_SBD = self.embed_tokens(ids_SB)
        rope, routing = self.routing_inputs(ids_SB, None if labels is None else labels.t())
        x_SBD, stats = self.run_blocks(x_SBD, self.layers, rope, routing)
        logits_SBV = self.head_logits(x_SBD)
        aux, z = self.loss_terms(stats, logits_SBV)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self._lm_loss(logits_SBV, labels.t(), None if loss_mask is None else loss_mask.t())
            loss = lm_loss + aux + z
        return ModelOutput(logits=logits_SBV.transpose(0, 1), lm_loss=lm_loss, aux_loss=aux, z_loss=z, loss=loss,
                           moe_stats=stats)

    @staticmethod
    def _lm_loss(logits_SBV, labels_SB, mask_SB):
        valid = labels_SB >= 0
        mask = valid.float() if mask_SB is None else mask_SB.float() * valid
        labels_SB = labels_SB.clamp(min=0).contiguous()
        logits_SBV = logits_SBV.float()  # the loss in fp32 under bf16
        if parallel.tp_size() == 1:
            # One vocabulary shard: torch's fused cross-entropy. megatron's works in place (so it
            # needs a copy of the logits, 262 MB a step for the bench_train models) and makes
            # several more passes over them; the loss is the same log-sum-exp minus the label logit.
            loss_SB = torch.nn.functional.cross_entropy(logits_SBV.flatten(0, 1), labels_SB.flatten(),
                                                        reduction="none").view_as(labels_SB)
        else:
            loss_SB = vocab_parallel_cross_entropy(logits_SBV.clone(), labels_SB)  # in place: keep the logits
        return (loss_SB * mask).sum() / mask.sum().clamp(min=1.0)

    def _routing(self, ids_SB, labels_SB):
        """Token-level routing inputs, [S, B] like the residual stream (full sequence, also
        under sequence parallelism). ``prev`` at position 0 is :data:`PREV_TOKEN_AT_START`;
        ``next`` is the label when labels are given (they are the next ids; ignored labels < 0
        become 0), else the shifted input with :data:`PREV_TOKEN_AT_START` at the end."""
        if all(b.moe is None for b in self.layers):
            return None
        from megamoe.moe.layer import RoutingContext

        pad = torch.full_like(ids_SB[:1], PREV_TOKEN_AT_START)
        prev_SB = torch.cat([pad, ids_SB[:-1]], dim=0)
        next_SB = labels_SB.clamp(min=0) if labels_SB is not None else torch.cat([ids_SB[1:], pad], dim=0)
        pos_SB = torch.arange(ids_SB.shape[0], device=ids_SB.device)[:, None].expand_as(ids_SB)
        return RoutingContext(token_ids=ids_SB, prev_token_ids=prev_SB, next_token_ids=next_SB, positions=pos_SB)


def build_model(model_cfg: ModelConfig, moe_cfg: MoEConfig | None = None,
                parallel_cfg: ParallelConfig | None = None, build_tables: bool = True,
                part: ModelPart | None = None) -> GPT:
    """Build the decoder for the current process groups (a world of one if none were set up).

    Seed torch identically on every rank before calling: megatron-core's CPU init draws each
    full weight from the global RNG and keeps this rank's slice. ``parallel_cfg`` is only read
    for ``sequence_parallel``; the TP/EP sizes come from the initialised groups.
    ``build_tables=False`` leaves hash tables zero (no counts/embedding/table files are read):
    for a resume, which loads them from the checkpoint. ``part``: one pipeline stage's pieces."""
    ensure_parallel()
    moe_cfg = moe_cfg or MoEConfig()
    return GPT(model_cfg, moe_cfg, sequence_parallel=bool(parallel_cfg and parallel_cfg.sequence_parallel),
               build_tables=build_tables, part=part)
