"""tools/estimate.py against reality: parameter counts equal the built model's (every layout of
test_layouts builds one), and per-rank memory is within 15% of a measured CPU run's peak
resident memory above the framework baseline (fp32, ZeRO-2, one process)."""

import json

from tests.train.helpers import launch, tiny_config, write_config
from tools.estimate import estimate


def test_estimate_memory_and_params_vs_measured(tiny_data, tmp_path):
    from megamoe.run_config import load_run_config

    cfg = tiny_config(*tiny_data, tmp_path / "run", **{
        "model.vocab_size": 8000, "model.hidden_size": 256, "model.num_layers": 4, "model.num_heads": 4,
        "model.ffn_hidden_size": 688, "model.max_position_embeddings": 256, "moe.expert_type": "ffn",
        "moe.num_experts": 8, "moe.hash.expert_type": "ffn", "data.seq_length": 128, "train.micro_batch_size": 8,
        "train.global_batch_size": 8, "train.train_steps": 3, "train.eval_iters": 1, "train.save_full_model": False})
    path = write_config(cfg, tmp_path / "mem.yaml")
    rc, log = launch(path, 1, [], launcher="python")
    assert rc == 0, log[-3000:]
    summary = json.loads((tmp_path / "run" / "logs" / "summary.json").read_text())
    est = estimate(load_run_config(path), world=1)
    assert est["params"]["total"] == summary["params"]["total"]
    assert est["params"]["active"] == summary["params"]["active"]
    measured = summary["memory_mb"]["peak"] - summary["memory_mb"]["baseline"]
    predicted = est["memory_bytes_per_rank"]["total"] / 2**20
    assert abs(predicted - measured) / measured < 0.15, (predicted, measured)
