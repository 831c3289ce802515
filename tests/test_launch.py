"""launch/: the GPU launchers run here only against stub ``deepspeed`` / ``srun`` / ``scontrol``
executables that print their arguments, so each script's exact command line and its one-line
errors are checked on CPU (the scripts cannot rot between GPU runs)."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stubs(tmp_path):
    """A PATH with bash's basics and stubs that print ``<name> <args>`` and exit 0."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name in ("deepspeed", "srun"):
        (bin_ / name).write_text(f'#!/bin/sh\necho "{name} $*"\n')
    (bin_ / "scontrol").write_text('#!/bin/sh\nprintf "node-a\\nnode-b\\n"\n')
    for p in bin_.iterdir():
        p.chmod(0o755)
    return {"PATH": f"{bin_}:/usr/bin:/bin", "HOME": str(tmp_path)}


def _run(script, args, env):  # from another directory: each script cds to the checkout itself
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=env["HOME"], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch")))
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / script)]).returncode == 0


def test_single_node_command_and_errors(stubs):
    r = _run("single_node_gpus.sh", ["configs/moe_8x.yaml", "train.lr=1e-4"], {**stubs, "NGPUS": "8"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("deepspeed --num_gpus 8 --master_port 29500 pretrain/pretrain_moe.py "
                                "--config configs/moe_8x.yaml train.lr=1e-4")
    r = _run("single_node_gpus.sh", ["configs/moe_8x.yaml"], stubs)  # no NGPUS, no nvidia-smi
    assert r.returncode == 2 and r.stderr == "error: nvidia-smi not found: set NGPUS=N (on CPU use launch/cpu_demo.sh)\n"
    r = _run("single_node_gpus.sh", ["configs/moe_8x.yaml"], {**stubs, "NGPUS": "0"})
    assert r.returncode == 2 and r.stderr.startswith("error: NGPUS=0: no GPU") and not r.stdout


def test_multi_node_command_and_missing_hostfile(stubs, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    r = _run("multi_node_hostfile.sh", ["configs/moe_8x.yaml"], {**stubs, "HOSTFILE": str(hostfile)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"deepspeed --hostfile {hostfile} --master_addr node-a --master_port 29500 "
                                "pretrain/pretrain_moe.py --config configs/moe_8x.yaml")
    r = _run("multi_node_hostfile.sh", ["configs/moe_8x.yaml"], {**stubs, "HOSTFILE": str(tmp_path / "none")})
    assert r.returncode == 2 and r.stderr == f"error: hostfile {tmp_path / 'none'} not found (copy launch/hostfile.example)\n"


def test_slurm_runs_one_task_per_gpu_and_resumes(stubs):
    env = {**stubs, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_CPUS_PER_TASK": "12",
           "CONFIG": "configs/moe_8x.yaml"}
    r = _run("slurm.sbatch", ["parallel.expert_parallel=8"], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ("srun --kill-on-bad-exit=1 --cpu-bind=cores .venv/bin/python pretrain/pretrain_moe.py "
                                "--config configs/moe_8x.yaml train.load=auto parallel.expert_parallel=8")
    header = (ROOT / "launch" / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@300" in header and "#SBATCH --requeue" in header
    assert os.path.isfile(ROOT / "configs" / "moe_8x.yaml")
