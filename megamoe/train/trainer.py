"""The pretraining loop: set-up, then ``step -> log -> (eval) -> (save) -> (stop?)``.

Everything around the loop is a small piece in its own file: layout checks (layout.py),
DeepSpeed engine (engine.py, ds_config.py), checkpoints (checkpoint.py), metrics
(metrics.py), signals (signals.py), start-up report (report.py).

One optimizer step = ``gas`` micro-batches through ``engine.forward/backward`` then
``engine.step()`` (DeepSpeed scales the loss by 1/gas and reduces at the boundary).

Traps:
- Non-finite loss: every rank must still run backward (ZeRO reduces in backward hooks; a rank
  skipping it hangs the others). NaN/inf gradients make DeepSpeed's ZeRO optimizer skip the
  update (``engine.was_step_applied()`` is False); we count such steps and abort after
  ``train.max_nonfinite_in_a_row`` in a row.
- Reported losses are means over micro-batches and over DP ranks (TP ranks hold equal values).
- The data order is a function of consumed samples only (megamoe/data/sampler.py), so a
  resume with another DP size continues the same global sample stream.
"""

from __future__ import annotations

import itertools
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from megamoe import comm, parallel
from megamoe.config import to_dict
from megamoe.errors import UserError
from megamoe.moe.balance import ExpertBiasBalancer
from megamoe.train import checkpoint as ckpt
from megamoe.train.ds_config import build_ds_config
from megamoe.train.engine import build_engine
from megamoe.train.layout import validate_layout
from megamoe.train.metrics import MetricsLogger, moe_scalars
from megamoe.train.report import (current_rss_mb, flops_per_token, measure_peak_flops, param_counts,
                                  peak_memory_mb, startup_report)
from megamoe.train.signals import StopFlag
from megamoe.utils import print0, progress


def set_matmul_precision(train) -> str | None:
    """TF32 for fp32 training on CUDA unless ``train.allow_tf32`` is false (torch's default is full
    fp32 matmuls). Returns the precision set, None where nothing applies (CPU, bf16, fp16)."""
    if not torch.cuda.is_available() or train.precision != "fp32":
        return None
    precision = "high" if train.allow_tf32 else "highest"
    torch.set_float32_matmul_precision(precision)
    return precision


def _dp_mean(values: list[float]) -> list[float]:
    return comm.floats_mean(values, parallel.dp_group())


def _to_device(batch: dict, device) -> dict:
    # non_blocking only overlaps when the source is pinned: build_loader pins on CUDA.
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _sum_stats_over_dp(stats: list) -> list:
    """tokens_per_expert summed over DP ranks (each rank routes its own micro-batch)."""
    g = parallel.dp_group()
    if g is None or parallel.dp_size() == 1:
        return stats
    for s in stats:
        tpe = getattr(s, "tokens_per_expert", None)
        if tpe is not None:
            s.tokens_per_expert = comm.all_reduce(torch.as_tensor(tpe).detach().float().cpu().clone(), "sum", g)
    return stats


def evaluate(engine, loader_factory, eval_iters: int, device, pipeline=None) -> dict:
    """Mean lm loss / ppl over the first ``eval_iters`` micro-batches of each DP rank, plus the
    perplexity of the best unigram model of the same tokens (fitted on them). ``pipeline``: a
    PipelineRunner, which runs them m at a time through the stages."""
    engine.eval()
    batches = list(itertools.islice(loader_factory(), eval_iters))
    if not batches:
        engine.train()
        raise UserError("the valid split produced no batches; give it more data (data.split) or lower train.eval_iters")
    with torch.no_grad():
        if pipeline is not None:
            terms = torch.cat([pipeline.evaluate(batches[k:k + pipeline.m]) for k in range(0, len(batches), pipeline.m)])
        else:
            rows = []
            for batch in batches:
                batch = _to_device(batch, device)
                out = engine(batch["input_ids"], batch["labels"], batch["loss_mask"])
                rows.append(torch.stack([out.lm_loss.float(), out.aux_loss.float(), out.z_loss.float()]))
            terms = torch.stack(rows)
    engine.train()
    lm, aux, z = _dp_mean(terms.double().mean(0).tolist())
    counts = sum(torch.bincount(b["labels"][b["loss_mask"] > 0].cpu(), minlength=engine.module.cfg.vocab_size).double()
                 for b in batches)
    counts = comm.all_reduce(counts, "sum", parallel.dp_group())
    p = counts / counts.sum()
    nz = p[p > 0]
    unigram_nll = float(-(nz * nz.log()).sum())
    return {"lm_loss": lm, "ppl": math.exp(min(lm, 50.0)), "aux_loss": aux, "z_loss": z,
            "unigram_ppl": math.exp(unigram_nll), "tokens": int(counts.sum())}


def load_weights(model, path: str) -> None:
    """Load canonical weights into this rank's shards, one tensor at a time: a ``.safetensors``
    file (a checkpoint's model.safetensors, a convert_from_hf output) or a checkpoint directory
    (a save_dir or one global_stepN; its fp32 masters are read from the shards)."""
    from megamoe.hf.checkpoint_reader import open_canonical
    from megamoe.model.state_dict import load_full_state_dict

    with open_canonical(path, what="train.init_from") as sd:
        load_full_state_dict(model, sd)


def _loss_scale(optimizer) -> float:
    for name in ("loss_scale", "cur_scale"):
        v = getattr(optimizer, name, None)
        if isinstance(v, (int, float)) or torch.is_tensor(v):
            return float(v)
    return 1.0


def _central_grad_mask(model, moe_cfg):
    """MPO central-tensor update rule (megamoe/moe/grad_mask.py): hooks mask each rank's local
    gradient, which equals masking the reduced gradient (linear reduction, same mask on all
    ranks); 'skip' also keeps the central tensors' masters and optimizer state out of skipped
    steps (``engine_step``). 'freeze' takes the central tensors out of the optimizer."""
    if not moe_cfg.num_experts or moe_cfg.mpo.grad_mask == "none":
        return None
    from megamoe.moe.grad_mask import CentralGradMask, is_central

    centrals = [p for n, p in model.named_parameters() if is_central(n)]
    return CentralGradMask(centrals, moe_cfg.mpo) if centrals else None


class Trainer:
    def __init__(self, run):
        self.run = run
        t = run.train
        self.layout = parallel.init_parallel(run.parallel)
        world = self.layout.world
        info = validate_layout(run, world)
        self.info = info
        parallel.seed_everything(t.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        set_matmul_precision(t)

        import deepspeed  # noqa: F401  (imported before the baseline below)

        from megamoe.data import build_datasets, build_loader
        from megamoe.model.gpt import build_model

        # memory of the framework alone, before data/model: tools/estimate.py's check subtracts it
        self.baseline_mb = current_rss_mb()

        self._build_loader = build_loader
        dp = self.layout.dp
        valid_samples = t.eval_iters * t.micro_batch_size * dp
        self.train_ds, self.valid_ds, _ = build_datasets(
            run.data, t.train_steps * t.global_batch_size, valid_samples, 0, model_vocab_size=run.model.vocab_size)
        self.load_dir = ckpt.resolve_load_dir(t.load, t.save_dir)
        # a resume takes hash tables (and every other tensor) from the checkpoint, not from files
        self.pipeline_layout = part = None
        if self.layout.pp > 1:  # this rank builds its stage only (megamoe/train/pipeline.py)
            from megamoe.train.pipeline import model_part, stage_layout

            self.pipeline_layout = stage_layout(run)
            part = model_part(self.pipeline_layout, parallel.pp_rank())
        model = build_model(run.model, run.moe, run.parallel, build_tables=not self.load_dir, part=part)
        if part is not None:
            from megamoe.train.pipeline import mark_tied_copy

            mark_tied_copy(model, self.pipeline_layout, parallel.pp_rank())
        if t.init_from and not self.load_dir:
            load_weights(model, t.init_from)
        self.grad_mask = _central_grad_mask(model, run.moe)
        self.expert_bias = ExpertBiasBalancer(model)  # moe.router.expert_bias_rate > 0 (balance.py)
        self.counts = param_counts(model, run)
        self.fpt = flops_per_token(self.counts, run)
        self.ds_config = build_ds_config(t, dp, has_moe=bool(run.moe.num_experts), pipeline=part is not None)
        self.engine, self.optimizer, self.scheduler = build_engine(model, run, self.layout, self.ds_config)
        self.pipeline = None
        if part is not None:
            from megamoe.train.pipeline import PipelineRunner

            self.pipeline = PipelineRunner(self.engine.module, self.engine, run, self.pipeline_layout, info["gas"],
                                           self.device, self.expert_bias)
        self.config_dict = to_dict(run)
        ckpt.prepare(self.engine)  # collective, once: which canonical pieces this rank saves

        self.step, self.consumed = 0, 0
        self._saved_step = None
        self.nonfinite_total = 0
        if self.load_dir:
            state = ckpt.load(self.engine, self.load_dir, self.config_dict, self.scheduler)
            self.step = int(state["step"])
            self.consumed = int(state["consumed_samples"])
            self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.peak = measure_peak_flops(t.precision)  # MFU against the training dtype's matmul peak
        self.metrics = MetricsLogger(t.log_dir, t.tensorboard, resume=self.load_dir is not None,
                                     start_step=self.step)
        print0(startup_report(run, self.layout, info, self.counts, self.fpt, self.peak, self.ds_config,
                              self.step, self.load_dir))

    # ---- pieces -------------------------------------------------------------------------
    def _valid_loader(self):
        t = self.run.train
        return self._build_loader(self.valid_ds, t.micro_batch_size, t.micro_batch_size * self.layout.dp,
                                  parallel.dp_rank(), self.layout.dp, 0)

    def save(self) -> str:
        t = self.run.train
        state = {"step": self.step, "consumed_samples": self.consumed, "nonfinite_total": self.nonfinite_total,
                 "dp_size": self.layout.dp, "config": self.config_dict}
        tag = ckpt.save(self.engine, t.save_dir, self.step, state, self.config_dict, t.keep_last,
                        full_model=t.save_full_model, scheduler=self.scheduler)
        self._saved_step = self.step
        return tag

    def train_step(self, it) -> dict:
        """One optimizer step over ``gas`` micro-batches. Returns DP-averaged scalars."""
        if self.pipeline is not None:
            return self._pipeline_step(it)
        engine, gas = self.engine, self.info["gas"]
        if self.grad_mask is not None:
            self.grad_mask.set_step(self.step)  # all micro-batches of a step share one mask
        sums = None  # (loss, lm, aux, z) summed over micro-batches, on the device: no host sync in the loop
        stats = []
        for micro in range(gas):
            batch = _to_device(next(it), self.device)
            out = engine(batch["input_ids"], batch["labels"], batch["loss_mask"])
            self.expert_bias.add(out.moe_stats)
            vals = torch.stack([x.detach().float() for x in (out.loss, out.lm_loss, out.aux_loss, out.z_loss)])
            sums = vals if sums is None else sums + vals  # a non-finite value keeps the sum non-finite
            engine.backward(out.loss)
            if micro == gas - 1 and self.run.train.zero_stage == 0:
                self._zero0_guard(not bool(torch.isfinite(sums).all()))
            self._engine_step()
            stats = out.moe_stats
        return self._step_result(sums, stats, self.run.moe.moe_layer_indices(self.run.model.num_layers))

    def _pipeline_step(self, it) -> dict:
        """The same step through the pipeline schedule: every micro-batch's forward and backward
        on every stage, then one ``engine.step()`` (megamoe/train/pipeline.py)."""
        if self.grad_mask is not None:
            self.grad_mask.set_step(self.step)
        sums = self.pipeline.forward_backward([next(it) for _ in range(self.info["gas"])])
        if self.run.train.zero_stage == 0:
            self._zero0_guard(not bool(torch.isfinite(sums).all()))
        self._engine_step()
        return self._step_result(sums, self.pipeline.moe_stats(), self.pipeline.moe_layer_ids())

    def _engine_step(self) -> None:
        if self.grad_mask is not None:  # grad_mask=skip: the central tensors sit out skipped steps
            self.grad_mask.engine_step(self.engine)
        else:
            self.engine.step()

    def _step_result(self, sums: torch.Tensor, stats: list, stat_layers: list[int]) -> dict:
        engine, gas = self.engine, self.info["gas"]
        sums = sums.tolist()  # the step's one read of the losses
        nonfinite = not all(math.isfinite(v) for v in sums)
        loss, lm, aux, z, bad = _dp_mean([s / gas for s in sums] + [float(nonfinite)])
        norm = engine.get_global_grad_norm()  # None where no norm is taken (ZeRO-0 without clipping)
        norm = float(norm) if norm is not None else float("nan")
        applied = engine.was_step_applied() if hasattr(engine, "was_step_applied") else True
        bad_norm = self.run.train.zero_stage > 0 and not math.isfinite(norm)
        self.expert_bias.step(apply=not (bad > 0 or not applied or bad_norm))  # collective; same on all ranks
        return {"loss": loss, "lm_loss": lm, "aux_loss": aux, "z_loss": z, "grad_norm": norm,
                "skipped": bool(bad > 0 or not applied or bad_norm), "stats": stats, "stat_layers": stat_layers}

    def _moe_scalars(self, r: dict) -> dict:
        """Per-layer MoE scalars of every layer: each pipeline stage logs the layers it holds,
        gathered to every rank (rank 0 writes them)."""
        vals = moe_scalars(_sum_stats_over_dp(r["stats"]), r["stat_layers"])
        if self.pipeline is None:
            return vals
        merged = {}
        for part in comm.all_gather_object(vals, parallel.pp_group()):
            merged.update(part)
        return merged

    def _zero0_guard(self, nonfinite: bool) -> None:
        """ZeRO-0 has no overflow check outside fp16: if any rank saw a non-finite loss or
        gradient, every rank zeroes its gradients so the NaNs never reach the weights (AdamW
        still applies its momentum and weight decay for that step)."""
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        local = nonfinite or (bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))
        if comm.any_rank(local):
            for g in grads:
                g.zero_()

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> dict:
        t, run = self.run.train, self.run
        stop = StopFlag()
        loader = self._build_loader(self.train_ds, t.micro_batch_size, t.global_batch_size, parallel.dp_rank(),
                                    self.layout.dp, self.consumed, run.data.num_workers)
        it = iter(loader)
        bar = progress(total=t.train_steps, initial=self.step, desc="train", unit="step")
        in_a_row, steps_this_run, last_eval = 0, 0, None
        start_time = time.perf_counter()
        tokens_per_step = self.info["tokens_per_step"]
        stopped_by = None
        self.engine.train()
        while self.step < t.train_steps:
            t0 = time.perf_counter()
            r = self.train_step(it)
            dt = time.perf_counter() - t0
            self.step += 1
            steps_this_run += 1
            self.consumed += t.global_batch_size
            if r["skipped"]:
                self.nonfinite_total += 1
                in_a_row += 1
                if in_a_row >= t.max_nonfinite_in_a_row:
                    raise UserError(
                        f"{in_a_row} optimizer steps in a row had a non-finite loss or gradient norm (step "
                        f"{self.step}, loss={r['loss']}, grad_norm={r['grad_norm']}); aborting. Lower train.lr, "
                        "use train.precision=fp32/bf16, or raise train.max_nonfinite_in_a_row")
            else:
                in_a_row = 0
            if self.step % t.log_interval == 0 or self.step == t.train_steps:
                tok_s = tokens_per_step / dt
                flops = self.fpt * tok_s
                vals = {k: r[k] for k in ("loss", "lm_loss", "aux_loss", "z_loss", "grad_norm")}
                vals.update(lr=self.scheduler.get_last_lr()[0] if self.scheduler else t.lr,
                            loss_scale=_loss_scale(self.optimizer),
                            tokens_per_s=tok_s, tflops=flops / 1e12 / self.layout.world,
                            mfu=flops / (self.peak * self.layout.world), step_time_s=dt,
                            mem_mb=peak_memory_mb(), skipped_total=self.nonfinite_total,
                            consumed_samples=self.consumed)
                vals.update(self._moe_scalars(r))
                self.metrics.log(self.step, vals)
                bar.set_postfix(loss=f"{r['lm_loss']:.3f}", tok_s=f"{tok_s:.0f}")
            bar.update(1)
            if t.eval_interval and self.step % t.eval_interval == 0 and self.step < t.train_steps:
                last_eval = evaluate(self.engine, self._valid_loader, t.eval_iters, self.device, self.pipeline)
                self.metrics.log(self.step, last_eval, split="valid")
            if stop.any_rank():
                stopped_by = f"signal {stop.signum or 'on another rank'}"
            elif t.exit_after_steps and steps_this_run >= t.exit_after_steps:
                stopped_by = "train.exit_after_steps"
            periodic = t.save_interval and self.step % t.save_interval == 0
            if stopped_by or periodic:
                tag = self.save()
                print0(f"\nsaved checkpoint {Path(t.save_dir) / tag}" + (f" ({stopped_by})" if stopped_by else ""))
            if stopped_by:
                break
        bar.close()
        stop.restore()
        finished = self.step >= t.train_steps
        result = {"step": self.step, "consumed_samples": self.consumed, "finished": finished,
                  "stopped_by": stopped_by, "nonfinite_steps": self.nonfinite_total,
                  "wall_s": time.perf_counter() - start_time}
        if finished:
            if self._saved_step != self.step:
                self.save()
            last_eval = evaluate(self.engine, self._valid_loader, t.eval_iters, self.device, self.pipeline)
            self.metrics.log(self.step, last_eval, split="valid")
        train_recs = [h for h in self.metrics.history if h["split"] == "train"]
        result.update(
            valid=last_eval, params=self.counts, layout=vars(self.layout),
            memory_mb={"baseline": self.baseline_mb, "peak": peak_memory_mb(),
                       # every rank's [baseline, peak]: pipeline stages differ (tools/estimate.py checks each)
                       "per_rank": [t.tolist() for t in comm.all_gather(
                           torch.tensor([self.baseline_mb, peak_memory_mb()], dtype=torch.float64))]},
            final_train_lm_loss=train_recs[-1]["lm_loss"] if train_recs else None,
            checkpoint=str(Path(t.save_dir) / (ckpt.read_latest(t.save_dir) or "")),
            tensorboard=str(Path(t.log_dir) / "tensorboard"), metrics=str(Path(t.log_dir) / "metrics.jsonl"))
        if t.plot:
            png = self.metrics.plot()
            result["loss_curve"] = str(png) if png else None
        self.metrics.summary(result)
        self.metrics.close()
        return result


def tensorboard_command() -> str:
    """``tensorboard`` where it is on PATH, else the one beside this Python: ``make demo`` runs
    ``.venv/bin/python`` without activating the venv, and the printed command must work verbatim."""
    if shutil.which("tensorboard"):
        return "tensorboard"
    exe = Path(sys.executable).parent / "tensorboard"
    return str(exe.relative_to(Path.cwd())) if exe.is_relative_to(Path.cwd()) else str(exe)


def print_summary(result: dict) -> None:
    v = result.get("valid") or {}
    lines = ["", "=" * 78, "megamoe pretraining summary",
             f"steps            {result['step']} ({'finished' if result['finished'] else 'stopped: ' + str(result['stopped_by'])})"]
    if v:
        lines += [f"valid lm loss    {v['lm_loss']:.4f}  ({v['tokens']} tokens)",
                  f"valid perplexity {v['ppl']:.2f}   (model)",
                  f"unigram ppl      {v['unigram_ppl']:.2f}   (best unigram model of the same tokens)"]
    lines += [f"checkpoint       {result['checkpoint']}",
              f"tensorboard      {tensorboard_command()} --logdir {result['tensorboard']}",
              f"metrics          {result['metrics']}",
              f"loss curve       {result.get('loss_curve')}", "=" * 78]
    print0("\n".join(lines))
