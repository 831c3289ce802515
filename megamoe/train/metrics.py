"""Rank-0 metric sinks: TensorBoard scalars and histograms, ``metrics.jsonl``, ``summary.json``,
and the loss-curve PNG. Other ranks get a no-op logger.

``metrics.jsonl`` holds one JSON object per logged step (the same scalars as TensorBoard);
evaluation records carry ``"split": "valid"``. ``summary.json`` is written atomically at the
end. Expert-load histograms: per MoE layer, the fraction of routed tokens per expert,
written as a TensorBoard histogram (one bucket per expert) and as numbers in the jsonl.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megamoe.utils import atomic_path, atomic_write_text, is_rank0


def moe_scalars(stats: list, layer_ids: list[int] | None = None) -> dict:
    """Per-layer scalars from the model's ``moe_stats`` (duck-typed: tokens_per_expert,
    dropped_fraction, router_entropy). Returns {name: float|list}."""
    out = {}
    for j, s in enumerate(stats):
        i = layer_ids[j] if layer_ids and j < len(layer_ids) else j
        tpe = getattr(s, "tokens_per_expert", None)
        if tpe is not None:
            t = torch.as_tensor(tpe).detach().float().cpu()
            total = float(t.sum()) or 1.0
            out[f"moe/layer{i}/expert_load"] = (t / total).tolist()
            out[f"moe/layer{i}/max_load"] = float(t.max() / (total / t.numel()))
        for name in ("dropped_fraction", "router_entropy", "lb_loss", "seq_lb_loss", "global_lb_loss"):
            v = getattr(s, name, None)
            if v is not None:
                out[f"moe/layer{i}/{name}"] = float(torch.as_tensor(v).detach().float().mean())
    return out


class MetricsLogger:
    def __init__(self, log_dir: str | Path, tensorboard: bool = True, resume: bool = False, start_step: int = 0):
        self.enabled = is_rank0()
        self.log_dir = Path(log_dir)
        self.tb = None
        self.history: list[dict] = []
        if not self.enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / "metrics.jsonl"
        if resume and path.is_file():  # keep the records up to the checkpoint we resumed from
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= start_step:
                    self.history.append(rec)
            # rewrite atomically: a crash here must not lose the records before the checkpoint
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.jsonl = open(path, "a" if resume else "w")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.log_dir / "tensorboard"))

    def log(self, step: int, values: dict, split: str = "train") -> None:
        if not self.enabled:
            return
        rec = {"step": step, "split": split, **values}
        self.history.append(rec)
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        if self.tb is None:
            return
        for k, v in values.items():
            tag = f"{split}/{k}" if not k.startswith("moe/") else k
            if isinstance(v, list):
                t = torch.tensor(v)
                # one histogram bucket per expert: values are expert indices weighted by load
                self.tb.add_histogram_raw(tag, min=0, max=len(v) - 1, num=float(t.sum()), sum=float(
                    (t * torch.arange(len(v))).sum()), sum_squares=float((t * torch.arange(len(v)) ** 2).sum()),
                    bucket_limits=[i + 0.5 for i in range(len(v))], bucket_counts=v, global_step=step)
            elif isinstance(v, (int, float)):
                self.tb.add_scalar(tag, v, step)

    def summary(self, values: dict) -> None:
        if self.enabled:
            atomic_write_text(self.log_dir / "summary.json", json.dumps(values, indent=2) + "\n")

    def plot(self) -> Path | None:
        """Loss curves (train loss, lm loss, valid loss) to ``loss_curve.png``."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        tr = [r for r in self.history if r["split"] == "train" and "lm_loss" in r]
        va = [r for r in self.history if r["split"] == "valid" and "lm_loss" in r]
        if tr:
            ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss", lw=1)
            ax.plot([r["step"] for r in tr], [r["lm_loss"] for r in tr], label="train lm loss", lw=1)
        if va:
            ax.plot([r["step"] for r in va], [r["lm_loss"] for r in va], "o-", label="valid lm loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
        out = self.log_dir / "loss_curve.png"
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
