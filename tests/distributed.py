"""Spawn N gloo ranks on CPU and run a test function in each (OLMo-core style).

Usage in a test::

    def _body(rank, world, tmp_path):      # module-level, picklable
        layout = init_parallel(ParallelConfig(tensor_parallel=2))
        ...assert...

    def test_x(tmp_path):
        run_distributed(_body, world_size=2, args=(tmp_path,))

An exception in any rank fails the test with that rank's traceback. Each rank uses one
thread (2 cores, 2 ranks).
"""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from megamoe.parallel import free_port



def _entry(rank, world, port, fn, args, errq):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - report every failure to the parent
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        from megamoe.parallel import destroy_parallel

        destroy_parallel()


def run_distributed(fn, world_size: int = 2, args: tuple = (), timeout: float = 600.0) -> None:
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errq)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = []
    while not errq.empty():
        errors.append(errq.get())
    if errors:
        rank, tb = sorted(errors)[0]
        raise AssertionError(f"rank {rank} failed:\n{tb}")
    bad = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if bad:
        raise AssertionError(f"ranks exited abnormally (rank, exitcode): {bad}")
