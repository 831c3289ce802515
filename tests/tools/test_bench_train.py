"""tools/bench_train.py's timing schedule for implementations too big to hold together (E=64 on
a 24 GB machine): blocks alternate ABBA, one model is alive at a time, and a block can run in a
fresh process of the script itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))


def test_blocks_alternate_abba_and_pair_by_position():
    from bench_train import time_blocks

    calls = []

    def run_block(impl, n):
        calls.append((impl, n))
        return [float(len(calls))] * n

    times = time_blocks(["megamoe", "transformers"], rounds=10, per_block=4, run_block=run_block)
    assert calls == [("megamoe", 4), ("transformers", 4), ("transformers", 4), ("megamoe", 4),
                     ("megamoe", 2), ("transformers", 2)]
    # round i of megamoe pairs with round i of transformers: neighbouring blocks
    assert times["megamoe"] == [1.0] * 4 + [4.0] * 4 + [5.0] * 2
    assert times["transformers"] == [2.0] * 4 + [3.0] * 4 + [6.0] * 2


def test_one_implementation_is_built_once():
    from bench_train import time_blocks

    calls = []
    times = time_blocks(["megamoe"], rounds=10, per_block=4, run_block=lambda i, n: calls.append(n) or [0.0] * n)
    assert calls == [10] and len(times["megamoe"]) == 10


def test_block_worker_times_one_implementation_in_its_own_process():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--arch", "flags", "--only", "e64",
                        "--hidden", "32", "--layers", "1", "--heads", "4", "--vocab", "128", "--seq", "16",
                        "--micro-batch", "2", "--ffn", "64", "--threads", "1", "--warmup", "1", "--rounds", "3",
                        "--block-worker", "transformers"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    result = json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert len(result["step_s_rounds"]) == 3 and all(t > 0 for t in result["step_s_rounds"])
    assert 0.1 < result["peak_rss_gib"] < 64 and result["major_faults"] >= 0  # GiB, not KiB or bytes
    assert "matmul peak" not in p.stdout  # the parent measures it, once


def test_markdown_lists_each_block_with_its_memory():
    from bench_train import to_markdown

    row = {"case": "e64", "experts": 64, "total": 1e9, "blocks": [
        {"impl": "megamoe", "step_s_rounds": [5.0, 6.0, 9.0], "peak_rss_gib": 20.56, "major_faults": 183},
        {"impl": "transformers", "killed": "SIGKILL"},
        {"impl": "transformers", "step_s_rounds": [5.5], "peak_rss_gib": 21.47, "major_faults": 17}]}
    md = to_markdown({"matmul_peak_flops": 1e11, "device": "cpu", "threads": 2, "steps": 1, "warmup": 3,
                      "date": "now", "rows": [row]})
    assert "| 1 | megamoe | 6.00 | 20.6 | 183 |" in md and "| 3 | transformers | 5.50 | 21.5 | 17 |" in md
    assert "| 2 | transformers | killed (SIGKILL), run again | - | - |" in md


def _fake_worker(returncodes):
    """subprocess.run stand-in: the block worker exits with each of ``returncodes`` in turn."""
    import types

    calls = []

    def run(cmd, **_):
        rc = returncodes[len(calls)]
        calls.append(cmd)
        out = 'RESULT {"step_s_rounds": [1.0], "peak_rss_gib": 2.0, "major_faults": 0}' if rc == 0 else ""
        return types.SimpleNamespace(returncode=rc, stdout=out, stderr="")
    return run, calls


def test_a_block_killed_by_the_oom_killer_runs_once_more(monkeypatch):
    import pytest

    import bench_train

    run, calls = _fake_worker([-9, 0])
    monkeypatch.setattr(bench_train.subprocess, "run", run)
    blocks = []
    assert bench_train.block_in_fresh_process([], "e64", "megamoe", 1, blocks) == [1.0]
    assert len(calls) == 2 and [b.get("killed") for b in blocks] == ["SIGKILL", None]

    for codes, why in (([-9, -9], "SIGKILL again"), ([1], "exit status 1")):  # no third try, no retry of a crash
        run, calls = _fake_worker(codes)
        monkeypatch.setattr(bench_train.subprocess, "run", run)
        with pytest.raises(SystemExit, match=why):
            bench_train.block_in_fresh_process([], "e64", "megamoe", 1, [])
        assert len(calls) == len(codes)


def test_unknown_case_or_zero_rounds_stops_before_any_measurement(capsys):
    """--only bogus was a KeyError traceback after the peak measurement; --rounds 0 silently
    ran the default 24."""
    import pytest

    from bench_train import main

    for argv, msg in ((["--only", "dense,bogus"], "--only dense,bogus: the cases are demo, dense, e8, e64"),
                      (["--device", "cuda", "--only", "demo"], "the cases with --arch flags are dense, e8, e64"),
                      (["--rounds", "0"], "--rounds 0: must be >= 1")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert msg in str(e.value)
    assert "matmul peak" not in capsys.readouterr().out
