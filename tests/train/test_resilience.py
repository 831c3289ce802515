"""SIGTERM -> finish the step, save, exit 0, and the checkpoint resumes; SIGKILL in the middle
of a save leaves `latest` on the previous complete checkpoint, which resumes; non-finite
losses are skipped and abort the run after K in a row."""

import json
import os
import signal
import time

from tests.train.helpers import launch, read_metrics


def _wait_for_steps(log_dir, n, proc, timeout=120):
    path = log_dir / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout:
        assert proc.poll() is None, "run ended before the signal"
        if path.is_file() and sum(1 for _ in path.open()) >= n:
            return
        time.sleep(0.2)
    raise AssertionError("no progress")


def _worker_pid(root_pid: int, rank: int) -> int:
    """PID of the training process with RANK=rank among root_pid's descendants."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"pretrain_moe.py" in cmd and f"RANK={rank}".encode() in env and os.getsid(int(pid)) == root_pid:
            return int(pid)
    raise AssertionError(f"rank {rank} process not found")


def test_signal_saves_resumable_checkpoint(tiny_moe, tmp_path, signum=signal.SIGTERM):
    """The signal reaches only rank 1 (as when a scheduler signals one task): all ranks stop after
    the same step, save, and the deepspeed launcher exits 0. (SIGUSR1 takes the same path:
    megamoe/train/signals.py registers one handler for both.)"""
    cfg, init = tiny_moe
    args = ["parallel.expert_parallel=2", f"train.init_from={init}", f"train.save_dir={tmp_path}/ckpt",
            f"train.log_dir={tmp_path}/logs", "train.train_steps=400"]
    proc = launch(cfg, 2, args, wait=False, log=tmp_path / "run.log", launcher="deepspeed")
    _wait_for_steps(tmp_path / "logs", 2, proc)
    os.kill(_worker_pid(proc.pid, 1), signum)
    proc.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    tag = (tmp_path / "ckpt" / "latest").read_text()
    step = int(tag.removeprefix("global_step"))
    assert 2 <= step < 400 and (tmp_path / "ckpt" / tag / "COMPLETE").is_file()
    assert "signal" in log
    rc, log = launch(cfg, 2, args + ["train.load=auto", f"train.train_steps={step + 1}"])
    assert rc == 0, log[-3000:]
    steps = [r["step"] for r in read_metrics(tmp_path / "logs") if r["split"] == "train"]
    assert steps == list(range(1, step + 2))


def test_sigkill_during_save_resumes_from_previous(tiny_moe, tmp_path):
    cfg, init = tiny_moe
    args = [f"train.init_from={init}", f"train.save_dir={tmp_path}/ckpt", f"train.log_dir={tmp_path}/logs",
            "train.save_interval=3", "train.train_steps=8"]
    env_before = os.environ.get("MEGAMOE_CRASH_IN_SAVE")
    os.environ["MEGAMOE_CRASH_IN_SAVE"] = "2"  # killed inside the save at step 6
    try:
        rc, log = launch(cfg, 1, args, launcher="python")
    finally:
        os.environ.pop("MEGAMOE_CRASH_IN_SAVE") if env_before is None else None
    assert rc == -signal.SIGKILL, log[-2000:]
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "latest").read_text() == "global_step3"
    assert (ckpt / "global_step6").is_dir() and not (ckpt / "global_step6" / "COMPLETE").exists()
    rc, log = launch(cfg, 1, args + ["train.load=auto"], launcher="python")
    assert rc == 0, log[-3000:]
    assert "resumed from" in log
    assert (ckpt / "latest").read_text() == "global_step8"
    assert (ckpt / "global_step6" / "COMPLETE").is_file()
    summary = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert summary["step"] == 8 and summary["finished"]


def test_nonfinite_steps_skipped_then_abort(tiny_moe, tmp_path):
    """lr=1e30 blows the weights up: non-finite steps are skipped and counted, and the run stops
    with a clear error after train.max_nonfinite_in_a_row of them."""
    cfg, init = tiny_moe
    rc, log = launch(cfg, 1, [f"train.init_from={init}", f"train.save_dir={tmp_path}/ckpt",
                              f"train.log_dir={tmp_path}/logs", "train.lr=1e30", "train.min_lr=0",
                              "train.warmup_steps=0", "train.grad_clip=0", "train.max_nonfinite_in_a_row=3"],
                     launcher="python")
    assert rc == 2, log[-3000:]
    assert "3 optimizer steps in a row had a non-finite loss" in log
