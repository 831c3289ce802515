"""tools/bench_train.py's timing schedule: implementations too big to hold together (E=64 on a
24 GB machine) are built in turn, in ABBA blocks, and never two at once, so their rounds pair
by position within neighbouring blocks."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]


def _fakes(log: list, live: set):
    def make(name):
        def build(run, seq, mbs, device):
            assert not live, f"{name} built while {live} is alive (both would not fit)"
            live.add(name)
            log.append(f"build {name}")

            def close():
                live.discard(name)
            return (lambda: log.append(f"step {name}")), close
        return build
    return {"megamoe": make("megamoe"), "transformers": make("transformers")}


def test_blocks_alternate_abba_and_hold_one_model_at_a_time():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import time_interleaved

    log, live = [], set()
    args = SimpleNamespace(device="cpu", rounds=10, block_rounds=4, warmup=1, steps=1)
    times, _ = time_interleaved(_fakes(log, live), None, 0, 0, args, together=False)
    assert {k: len(v) for k, v in times.items()} == {"megamoe": 10, "transformers": 10}
    builds = [line.split()[1] for line in log if line.startswith("build")]
    assert builds == ["megamoe", "transformers", "transformers", "megamoe", "megamoe", "transformers"]
    # each block: warm-up, then its rounds (4, 4, then the 2 left)
    steps_per_build = [block.count("step") for block in " ".join(log).split("build")[1:]]
    assert steps_per_build == [1 + 4, 1 + 4, 1 + 4, 1 + 4, 1 + 2, 1 + 2]
    assert not live


def test_one_implementation_is_built_once():
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_train import time_interleaved

    log, live = [], set()
    impls = {"megamoe": _fakes(log, live)["megamoe"]}
    args = SimpleNamespace(device="cpu", rounds=10, block_rounds=4, warmup=1, steps=1)
    times, _ = time_interleaved(impls, None, 0, 0, args, together=False)
    assert len(times["megamoe"]) == 10 and log.count("build megamoe") == 1
