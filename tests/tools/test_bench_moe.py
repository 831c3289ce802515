"""tools/bench_moe.py --quick: every case has the Switch layer's experts-only row, and the
routing overhead it reports is the layer minus that row, over the dense FFN, from the same rounds;
each goal is judged on the paired rounds' ratio of the two rows it names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_separates_routing_overhead_from_expert_matmuls(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_moe.py"), "--quick", "--threads", "1",
                        "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "b.json").read_text())
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_moe import EXPERTS_ONLY, paired_ratio, switch_name

    for key, case in res["cases"].items():
        rows = {r["impl"]: r for r in res["rows"] if f"E={r['E']} T={r['T']}" == key}
        auto = switch_name(case["auto_backend"], case["auto_backend"])
        want = (rows[auto]["seconds"] - rows[EXPERTS_ONLY]["seconds"]) / rows["dense FFN"]["seconds"]
        assert case["routing_overhead_vs_dense"] == pytest.approx(want, rel=1e-9)
        sw = rows[auto]["all_seconds"]
        g = case["goals"]["switch <= 1.0x dense"]
        assert g["value"] == pytest.approx(paired_ratio(sw, rows["dense FFN"]["all_seconds"])[0], rel=1e-9)
        assert g["verdict"] in ("met", "tie", "MISSED") and g["limit"] == 1.0
    assert "experts only (its counts)" in (tmp_path / "b.md").read_text()
