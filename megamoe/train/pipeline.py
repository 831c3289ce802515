"""Pipeline parallelism: torch.distributed.pipelining's schedules run megamoe's stages, and the
rank's DeepSpeed engine stays the optimizer, ZeRO-1 partitioner, clipper and checkpointer.

The route and why (issue 27; megamoe/model/pipeline_layout.py has the full design note, and
tools/experiments/pipeline_route_probe.py the toy that proved it against one process):

- Each rank builds only its stage's pieces (``build_model(part=...)``): its blocks under their
  model-wide names, the embedding on the first stage, final norm and head on the last. The
  rank's chunks (V of them, interleaved: chunk c on stage c % P) are :class:`StageChunk`
  views over that one model, which the engine wraps.
- ``PipelineStage`` gets the plain chunk module, never the engine: DeepSpeed's output hooks
  would scale each stage by 1/GAS. The schedule runs every forward and backward
  (``Schedule1F1B`` at V=1, ``ScheduleInterleaved1F1B`` at V>1) and divides the gradients by
  the m micro-batches (``scale_grads``), then :meth:`PipelineRunner.train_step` calls
  ``engine.step()`` once (``managed_gradient_accumulation: false``): reduce over the stage's
  DP / expert-DP ranks, clip by the norm over all stages (the mpu reports TP x PP as the
  model-parallel group), update.
- What travels between stages, per micro-batch: the residual stream [S(/TP), B, D]; the token
  ids, labels and loss mask (integers, no gradient): hash layers and hash-MoE blocks on any
  stage route by their own micro-batch's ids, positions are recomputed from the sequence
  length, never from hidden states; and a float pair (aux, z), the balance and z losses summed
  over the blocks so far. The last stage's output is ``[lm, aux, z]`` and the loss is their sum,
  as at PP=1 (``loss = lm + aux + z``), so every router gets the same gradient scaling.
- Expert-bias counts (``ExpertBiasBalancer``), per-layer MoE logging and the MPO grad mask run
  on each rank for the layers it holds; the bias update reduces over the stage's DP group,
  the ranks that hold those layers.
- Tied embeddings: the last stage holds a copy (same seed, same checkpoint entry); the two
  copies' gradients are summed over megatron-core's embedding group before ``engine.step()``,
  and the later copy is marked ``ds_pipe_replicated`` so the norm counts it once.

Traps:
- Static shapes: ``input_args`` / ``output_args`` are given, else torch's shape inference runs
  each stage on placeholder tensors (an id-indexed table on stage 2 crashed on them), also
  running the EP all-to-all out of order.
- EP inside a stage: the ranks of an EP group are the same stage of different DP replicas; they
  run the same schedule, so they issue their all-to-alls in the same order.
- Every stage reads the data loader (same DP rank, same batches); the first stage uses the ids,
  every stage the labels and mask it carries. The loss mask travels as uint8: megamoe's masks
  are 0/1 (megamoe/data/gpt.py).
"""

from __future__ import annotations

import torch

from megamoe import comm, parallel
from megamoe.model.gpt import GPT, ModelPart
from megamoe.model.pipeline_layout import PipelineLayout, split_blocks


def stage_layout(run) -> PipelineLayout:
    return split_blocks(run.model, run.moe, run.parallel, run.data.seq_length)


def model_part(layout: PipelineLayout, stage: int) -> ModelPart:
    return ModelPart(blocks=tuple(layout.stage_blocks(stage)), first=layout.has_embedding(stage),
                     last=layout.has_head(stage))


class StageChunk(torch.nn.Module):
    """Consecutive blocks of the stage's model, as one pipeline chunk. Registers the modules it
    runs (so the schedule scales exactly their gradients) but shares them with the model the
    engine wraps. ``sink(chunk_index, moe_stats)`` receives each forward's MoE statistics."""

    def __init__(self, model: GPT, index: int, blocks, first: bool, last: bool, sink):
        super().__init__()
        self.index, self.first, self.last = index, first, last
        self.blocks = torch.nn.ModuleList(model.layers[i] for i in blocks)
        if first:
            self.embed, self.pos_embed = model.embed, model.pos_embed
        if last:
            self.final_norm, self.lm_head = model.final_norm, model.lm_head
            if model.cfg.tie_embeddings and not first:
                self.tied_embed = model.embed
        self._model = (model,)  # a tuple: not registered twice
        self._sink = sink

    def forward(self, *args):
        model = self._model[0]
        if self.first:
            ids_BS, labels_BS, mask_BS = args
            x_SBD = model.embed_tokens(ids_BS.t())
            terms_2 = torch.zeros(2, dtype=torch.float32, device=x_SBD.device)
        else:
            x_SBD, ids_BS, labels_BS, mask_BS, terms_2 = args
        rope, routing = model.routing_inputs(ids_BS.t(), labels_BS.t())
        x_SBD, stats = model.run_blocks(x_SBD, self.blocks, rope, routing)
        aux, z = model.loss_terms(stats, x_SBD)
        terms_2 = terms_2 + torch.stack([aux, z])
        self._sink(self.index, stats)
        if not self.last:
            return x_SBD, ids_BS, labels_BS, mask_BS, terms_2
        lm = model._lm_loss(model.head_logits(x_SBD), labels_BS.t(), mask_BS.t())
        return torch.cat([lm.float().reshape(1), terms_2])  # [lm, aux, z]


class PipelineRunner:
    """Runs one optimizer step (or one evaluation) of this rank's stage through the schedule."""

    def __init__(self, model: GPT, engine, run, layout: PipelineLayout, micro_batches: int, device,
                 expert_bias=None):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.model, self.engine, self.run, self.layout = model, engine, run, layout
        self.m, self.device, self.expert_bias = micro_batches, device, expert_bias
        self.stage = parallel.pp_rank()
        P, n_chunks = layout.stages, len(layout.chunks)
        moe_blocks = [i for i in model.layers.indices() if model.layers[i].moe is not None]
        self._moe_slots = {c.index: [moe_blocks.index(i) for i in c.blocks if i in moe_blocks]
                           for c in layout.stage_chunks(self.stage)}
        self.chunks = [StageChunk(model, c.index, c.blocks, c.index == 0, c.index == n_chunks - 1, self._sink)
                       for c in layout.stage_chunks(self.stage)]
        self.first = self.chunks[0].first
        self.last = self.chunks[-1].last
        self.last_stats: dict[int, list] = {}
        self._terms: list[torch.Tensor] = []
        mb, S, D = run.train.micro_batch_size, run.data.seq_length, run.model.hidden_size
        S_local = S // parallel.tp_size() if model.sequence_parallel else S
        dtype = next(model.parameters()).dtype  # the engine's (bf16 under bf16)
        dev = device

        def ints():
            return torch.zeros(mb, S, dtype=torch.long, device=dev)

        inputs = (ints(), ints(), torch.zeros(mb, S, dtype=torch.uint8, device=dev))
        carried = (torch.zeros(S_local, mb, D, dtype=dtype, device=dev, requires_grad=True), ints(), ints(),
                   inputs[2], torch.zeros(2, dtype=torch.float32, device=dev, requires_grad=True))
        out_last = torch.zeros(3, dtype=torch.float32, device=dev, requires_grad=True)
        group = parallel.pp_group()
        self.stages = [PipelineStage(ch, ch.index, n_chunks, dev, group=group,
                                     input_args=inputs if ch.first else carried,
                                     output_args=out_last if ch.last else carried)
                       for ch in self.chunks]
        if layout.virtual_stages == 1:
            self.schedule = Schedule1F1B(self.stages[0], n_microbatches=micro_batches, loss_fn=self._loss,
                                         scale_grads=True)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, n_microbatches=micro_batches, loss_fn=self._loss,
                                                    scale_grads=True)
        self.tied = None
        if run.model.tie_embeddings and P > 1 and (self.first or self.last):
            self.tied = model.embed.weight

    # ---- hooks the chunks and the schedule call ----------------------------------------------
    def _sink(self, chunk_index: int, stats: list) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation
        if self.expert_bias:
            self.expert_bias.add(stats, positions=self._moe_slots[chunk_index])
        self.last_stats[chunk_index] = stats

    def _loss(self, output_3: torch.Tensor, target) -> torch.Tensor:
        self._terms.append(output_3.detach())
        return output_3.sum()

    # ---- one step ----------------------------------------------------------------------------
    def _run(self, batches: list[dict], evaluate: bool) -> torch.Tensor:
        """The schedule over ``batches`` (m micro-batch dicts); returns each micro-batch's
        [lm, aux, z] as [m, 3], equal on every rank of the pipeline (reduced over it)."""
        self._terms = []
        ids = torch.cat([b["input_ids"] for b in batches]).to(self.device, non_blocking=True)
        labels = torch.cat([b["labels"] for b in batches]).to(self.device, non_blocking=True)
        mask = (torch.cat([b["loss_mask"] for b in batches]) > 0).to(torch.uint8).to(self.device, non_blocking=True)
        args = (ids, labels, mask) if self.first else ()
        kwargs = {"target": labels, "losses": []} if self.last else {}
        if evaluate:
            with torch.no_grad():
                self.schedule.eval(*args, **kwargs)
        else:
            self.schedule.step(*args, return_outputs=False, **kwargs)
        terms_M3 = torch.stack(self._terms) if self._terms else torch.zeros(len(batches), 3, device=self.device)
        return comm.all_reduce(terms_M3, "sum", parallel.pp_group())

    def forward_backward(self, batches: list[dict]) -> torch.Tensor:
        """Every micro-batch's forward and backward, gradients in ``.grad`` (mean over the
        micro-batches) and the tied copies' gradients summed. Returns [loss, lm, aux, z] summed
        over the micro-batches, on every rank (the trainer's non-finite check needs it)."""
        sums_3 = self._run(batches, evaluate=False).sum(0)
        if self.tied is not None and self.tied.grad is not None:
            comm.all_reduce_(self.tied.grad, "sum", parallel.embedding_group())
        return torch.cat([sums_3.sum().reshape(1), sums_3])

    def evaluate(self, batches: list[dict]) -> torch.Tensor:
        """[len(batches), 3]: each micro-batch's [lm, aux, z], forward only. Fewer batches than
        the schedule's m are padded with the last one (its rows are dropped)."""
        pad = self.m - len(batches)
        return self._run(batches + [batches[-1]] * pad, evaluate=True)[:len(batches)]

    def moe_stats(self) -> list:
        """The last micro-batch's MoE statistics of this rank's layers, in block order."""
        return [st for c in sorted(self.last_stats) for st in self.last_stats[c]]

    def moe_layer_ids(self) -> list[int]:
        return [i for i in self.model.layers.indices() if self.model.layers[i].moe is not None]


def mark_tied_copy(model: GPT, layout: PipelineLayout, stage: int) -> None:
    """The last stage's copy of a tied embedding counts once in norms and parameter counts."""
    if model.cfg.tie_embeddings and layout.stages > 1 and layout.has_head(stage) and not layout.has_embedding(stage):
        model.embed.weight.ds_pipe_replicated = True
