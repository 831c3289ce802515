"""megamoe.utils: keep_freed_cpu_memory, checked through glibc's own accounting (mallinfo2),
not timing: a large tensor must come from the reusable heap, not a fresh mmap; and
return_freed_cpu_memory, checked through the process's resident size; the benchmarks' ratio
statistics; and the one transformers deprecation that PEFT triggers, filtered precisely."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, torch
from megamoe.utils import keep_freed_cpu_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
took = keep_freed_cpu_memory()
t = torch.ones(16 * 2**20)  # 64 MiB, over glibc's default mmap threshold
mmapped = libc.mallinfo2().hblkhd  # bytes held in mmapped chunks
# 2.7 GiB at the top of the heap freed at once (untouched, so nothing is paged in), as the E=64
# model's gradients are: a finite trim threshold (the old 2 GiB - 1) gives it back to the OS and
# the next step faults it in. Raw malloc/free: torch would leave small chunks above the blocks.
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
blocks = [libc.malloc(900 * 2**20) for _ in range(3)]
for b in blocks:
    libc.free(b)
print(took, mmapped, libc.mallinfo2().arena)  # arena: bytes the heap still holds
"""


def _probe(env_value: str) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "MEGAMOE_CPU_MALLOC_CACHE": env_value})
    took, mmapped, heap = out.stdout.split()
    return took, int(mmapped), int(heap)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt only")
def test_keep_freed_cpu_memory_serves_large_tensors_from_the_heap_and_never_trims_it():
    took, mmapped_kept, heap_kept = _probe("1")
    off, mmapped_default, heap_default = _probe("0")
    assert (took, off) == ("True", "False")
    assert mmapped_default >= 64 * 2**20  # glibc's default: a fresh mmap, page-faulted on each use
    assert mmapped_kept < 64 * 2**20  # heap memory, reused after free without a new mapping
    assert heap_kept >= 2700 * 2**20  # never trimmed, however much one step frees
    assert heap_default < 2**30  # glibc's default trims it


TRIM_PROBE = r"""
import os, torch
from megamoe.utils import keep_freed_cpu_memory, return_freed_cpu_memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

assert keep_freed_cpu_memory()
base = rss()
t = torch.ones(64 * 2**20)  # 256 MiB, touched
del t
kept = rss() - base
return_freed_cpu_memory()
print(kept, rss() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim only")
def test_return_freed_cpu_memory_gives_the_kept_heap_back():
    out = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "MEGAMOE_CPU_MALLOC_CACHE": "1"})
    kept, after = map(int, out.stdout.split())
    assert kept >= 200 * 2**20  # the freed tensor stays resident in the heap
    assert after <= 56 * 2**20  # ...until it is given back


def test_ratio_statistics_and_goal_verdicts():
    import math

    from megamoe.utils import goal_verdict, mean_se, ratio_median_se

    mean, se = mean_se([1.0, 2.0, 3.0])
    assert (mean, se) == (2.0, pytest.approx(1 / math.sqrt(3)))
    assert math.isnan(mean_se([5.0])[1])
    rounds = [0.98, 1.0, 1.02, 0.99, 1.01, 1.0, 0.97, 1.03, 1.0, 0.99, 1.01, 0.46]  # one slow spell
    med, se = ratio_median_se(rounds)
    assert med == 1.0 and 0 < se < 0.01  # the outlier moves neither (the mean is 0.955)
    assert ratio_median_se(rounds) == (med, se)  # seeded: reproducible
    assert math.isnan(ratio_median_se([1.1])[1])
    assert goal_verdict(0.99, 0.05, 1.0) == "met"
    assert goal_verdict(1.05, 0.03, 1.0) == "tie"  # 1.05 - 2 x 0.03 = 0.99 <= 1.0
    assert goal_verdict(1.07, 0.03, 1.0) == "MISSED"
    assert goal_verdict(1.01, float("nan"), 1.0) == "MISSED"  # one round: no SE, no tie


def test_peft_wrapping_prints_no_transformers_deprecation_and_megamoe_never_reads_the_attribute():
    """megamoe.utils.filter_dependency_warnings hides transformers' FutureWarning about
    ``is_gradient_checkpointing``, which PEFT's ``PeftModel`` reads on every wrap; the filter
    must hide no megamoe call of it."""
    import ast
    import warnings
    from pathlib import Path

    import peft
    import transformers

    import megamoe  # noqa: F401  (installs the filters)

    def reads_it(path):  # an attribute access, or the name as a string (getattr), not prose
        return any(isinstance(n, ast.Attribute) and n.attr == "is_gradient_checkpointing"
                   or isinstance(n, ast.Constant) and n.value == "is_gradient_checkpointing"
                   for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))))

    root = Path(__file__).resolve().parents[1]
    assert not [p for d in ("megamoe", "tools", "pretrain") for p in (root / d).rglob("*.py") if reads_it(p)]
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")  # what a console shows, before megamoe's filters (re-added below)
        from megamoe.utils import filter_dependency_warnings

        filter_dependency_warnings()
        peft.get_peft_model(transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)], [str(w.message) for w in seen]


def test_processes_sharing_a_cache_claim_each_run_once(tmp_path):
    """Processes sharing a result cache (tools/finetune.py, tools/experiments): a run another
    process holds is skipped, a finished run is not redone, ``todo`` overrides "not done" (a stale
    result to rerun), and a killed holder's claim is gone (flock dies with its process)."""
    from megamoe.utils import claim

    run = tmp_path / "final__poly__lr0.01__n100__s0.json"
    with claim(run, wait=False) as mine:
        assert mine
        with claim(run, wait=False) as other:  # a second open file: as another process sees it
            assert not other
        run.write_text("{}")
    with claim(run, wait=False) as mine:
        assert not mine  # done
    with claim(run, wait=True, todo=lambda: True) as mine:
        assert mine  # done but stale
    held = tmp_path / "final__lora__lr0.01__n100__s0.json"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                               str(held) + ".lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with claim(held, wait=False) as mine:
            assert not mine
    finally:
        holder.kill()
        holder.wait()
    with claim(held, wait=False) as mine:
        assert mine
