"""Small shared helpers: atomic file output, rank-aware printing and progress bars, and the
one place where known dependency warnings are filtered."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. A crash or exception leaves no file at ``path`` that
    could be mistaken for a complete output (the temporary name starts with ``.tmp-``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_dir() and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def claim(result: str | Path, wait: bool = False, todo=None) -> Iterator[bool]:
    """Hold an advisory lock (flock on ``<result>.lock``) while this process computes ``result``,
    so that processes sharing a result cache split its runs instead of repeating them.

    Yields True when the run is this process's to do: ``todo()`` (default: ``result`` does not
    exist), checked once the lock is held, since another process may have finished it meanwhile.
    Yields False when it is done, or (``wait`` False) when another process holds it. The kernel
    drops an flock when its holder exits, even killed, so no claim outlives its process (the
    empty ``.lock`` files stay). Local filesystems only: flock over NFS is not reliable.
    """
    result = Path(result)
    result.parent.mkdir(parents=True, exist_ok=True)
    with open(result.with_name(result.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield todo() if todo is not None else not result.exists()


def rank() -> int:
    """Global rank from the launcher's environment (works before torch.distributed init)."""
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def progress(iterable=None, **kwargs):
    """tqdm bar with ETA on rank 0 only (disabled elsewhere)."""
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", not is_rank0())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def filter_dependency_warnings() -> None:
    """Drop the dependency warnings every start-up printed on every rank, matched precisely.

    Called once from ``megamoe/__init__.py``, i.e. before megamoe imports megatron-core or
    DeepSpeed, so each rank's console shows none of them. Each filter matches one message from
    one package; anything else (including new warnings from the same packages) still shows.

    - megatron-core 0.16 warns "Transformer Engine and Apex are not installed" four times at
      ``import megatron.core`` (its optimizer, clip_grads and FSDP mixed-precision modules fall
      back to torch). megamoe uses none of those modules: it takes megatron-core's process
      groups, TP layers and datasets, and its own torch AdamW / DeepSpeed ZeRO, so the fallback
      changes nothing here.
    - DeepSpeed 0.19.8's ZeRO-1/2 all-gathers updated partitions with
      ``torch.distributed.all_gather_into_tensor`` (deepspeed/comm/torch.py), which torch 2.13
      deprecates in favour of ``all_gather_single`` (a FutureWarning per rank, first seen at the
      first optimizer step). It is DeepSpeed's call to update, not ours: megamoe's own
      collectives all go through megamoe/comm.py, which does not use that function
      (tests/train/test_engine_checks.py checks it), so this filter hides no megamoe call.
    - transformers 5 deprecates ``PreTrainedModel.is_gradient_checkpointing`` (a FutureWarning
      from transformers.modeling_utils). PEFT 0.21 reads it with ``getattr`` each time it wraps
      a model (peft/peft_model.py), so every fine-tuning run printed it. megamoe never reads the
      attribute (tests/test_utils.py checks it); PEFT is the one to update.
    """
    warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed",
                            category=UserWarning, module=r"megatron(\.|_fsdp)")
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning, module=r"torch\.distributed\.")
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers\.modeling_utils")


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-loading its CPU shared-memory all-reduce op
    (``deepspeed.ops.comm.deepspeed_shm_comm_op``). Call before DeepSpeed's communication
    backend starts (``deepspeed.initialize`` / ``deepspeed.init_distributed``).

    Why: DeepSpeed's torch backend loads that op at every start on CPU, through torch's
    ``cpp_extension`` build, which holds ``~/.cache/torch_extensions/.../deepspeed_shm_comm/lock``
    while it checks the build. A process killed inside that window (a SIGKILL, a timeout, an
    OOM kill; a wide window on a loaded machine) leaves the lock behind, and from then on every
    DeepSpeed start on the machine sleeps forever waiting for it, printing nothing (seen here:
    every 2-rank run hung at start-up until the lock was deleted). The op serves only
    ``inference_all_reduce`` (DeepSpeed's inference tensor parallelism); training collectives,
    megamoe's and DeepSpeed's engine's, go through torch.distributed, so nothing uses it.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of returning it to the OS.

    Why: torch's CPU allocator has no cache. Every buffer over glibc's mmap threshold (a few
    MiB, dynamic up to 32 MiB) is a fresh ``mmap`` and its first write page-faults every 4 KiB
    page. A 32 MiB copy then takes 14 ms instead of 5 (measured on these CPUs), and a step
    allocates such buffers dozens of times: the MPO experts' contracted weights, every large
    activation and gradient. Setting ``M_MMAP_THRESHOLD`` to 1 GiB serves them from the heap,
    and ``M_TRIM_THRESHOLD`` = -1 (mallopt(3): "disables trimming completely") keeps the heap at
    the step's peak (:func:`return_freed_cpu_memory` gives it back). Trap: a finite trim
    threshold (it was 2 GiB - 1, the largest ``int``) is crossed whenever a step frees more than
    that at once -- the E=64 bench model frees 4.4 GB of gradients per step -- and the next step
    page-faulted all of it again: 540 k faults, 3-5 s of system time per 7 s step. This is what the
    jemalloc/tcmalloc ``LD_PRELOAD`` of Intel's PyTorch CPU launcher does; ``mallopt`` needs no
    preload and no re-exec. It applies to allocations made after the call, so call it at
    start-up (:func:`megamoe.parallel.init_distributed` does, on CPU-only machines). Set ``MEGAMOE_CPU_MALLOC_CACHE=0`` to keep glibc's defaults.
    Returns whether it took effect (False off glibc, or when turned off)."""
    if os.environ.get("MEGAMOE_CPU_MALLOC_CACHE", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_trim_threshold, ctypes.c_int(-1))
                and libc.mallopt(m_mmap_threshold, ctypes.c_int(2**30)))


def return_freed_cpu_memory() -> None:
    """Give the heap's free memory back to the OS (glibc ``malloc_trim``), for when a process
    that keeps freed memory (:func:`keep_freed_cpu_memory`) is done with a large model and
    something else needs the RAM: tools/bench_train.py frees a 180 M-parameter pair of models
    and then starts 2 ranks, which the kernel's OOM killer stopped while the parent still held
    its peak heap. A no-op off glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(ctypes.c_size_t(0))
    except (OSError, AttributeError):
        pass


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); the SE is nan below 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def ratio_median_se(ratios: list[float], resamples: int = 2000) -> tuple[float, float]:
    """Median of paired ratios (e.g. per-round time_a / time_b of interleaved rounds) and its
    standard error by bootstrap (fixed seed: the same rounds give the same answer). The median,
    not the mean: on a shared VM a slow spell of several seconds hits one side of one or two
    rounds (0.46x among rounds of 0.9-1.1x), which moved a geometric mean by 7% between reruns
    and the median by 0.3%."""
    import random
    import statistics

    if len(ratios) < 2:
        return statistics.median(ratios), float("nan")
    rng = random.Random(0)
    medians = [statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples)]
    return statistics.median(ratios), statistics.stdev(medians)


def goal_verdict(value: float, se: float, limit: float) -> str:
    """'met' when ``value <= limit``, 'tie' when above it by at most 2 SE (the measurement
    cannot tell them apart), else 'MISSED'."""
    if value <= limit:
        return "met"
    return "tie" if se == se and value - 2 * se <= limit else "MISSED"
