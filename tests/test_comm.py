"""megamoe.comm: the one module that issues collectives.

- An AST scan fails on any torch.distributed collective elsewhere under megamoe/.
- The device choice is tested with CUDA mocked: under an NCCL group a CPU tensor must be moved
  to the current CUDA device before the collective and the result must come back to the CPU.
- The autograd all-to-all is checked on 2 gloo ranks against the exchange done by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megamoe import comm
from tests.distributed import run_distributed

PACKAGE = Path(__file__).resolve().parents[1] / "megamoe"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "gather", "gather_object",
    "scatter", "scatter_object_list", "reduce", "all_to_all", "all_to_all_single", "barrier",
    "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def bypasses(path: Path) -> list[str]:
    """``file:line what`` for every collective that does not go through megamoe.comm."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {"torch.distributed"}  # names bound to torch.distributed in this file
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "torch.distributed" and a.asname:
                    aliases.add(a.asname)
                if a.name.startswith("torch.distributed.nn"):
                    found.append(f"{path}:{node.lineno} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch.distributed"):
            if node.module.startswith("torch.distributed.nn") or node.module.endswith("_functional_collectives"):
                found.append(f"{path}:{node.lineno} from {node.module} import ...")
            for a in node.names:
                if a.name in COLLECTIVES:
                    found.append(f"{path}:{node.lineno} from {node.module} import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            for a in node.names:
                if a.name == "distributed":
                    aliases.add(a.asname or "distributed")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if _dotted(node.func.value) in aliases:
                found.append(f"{path}:{node.lineno} {_dotted(node.func)}")
    return found


def test_no_collective_bypasses_comm():
    offenders = [hit for p in sorted(PACKAGE.rglob("*.py")) if p.name != "comm.py" or p.parent != PACKAGE
                 for hit in bypasses(p)]
    assert not offenders, "collectives must go through megamoe.comm:\n" + "\n".join(offenders)


def test_scan_catches_a_bypass(tmp_path):
    f = tmp_path / "bad.py"
    f.write_text("import torch.distributed as dist\nimport torch\n"
                 "def f(t):\n    dist.all_reduce(t)\n    torch.distributed.barrier()\n"
                 "from torch.distributed.nn.functional import all_to_all_single\n")
    assert {int(h.split(":")[1].split()[0]) for h in bypasses(f)} == {4, 5, 6}


@pytest.fixture
def fake_nccl(monkeypatch):
    """An initialised 2-rank world whose groups are NCCL, on a machine without CUDA: records the
    device of every tensor handed to a collective and every .to() move."""
    seen = {"collective": [], "moves": []}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kwargs):
        dev = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if dev is not None and dev.type == "cuda":
            seen["moves"].append(("to", str(dev)))
            out = self.clone()
            out.fake_cuda = True  # stand-in for a CUDA copy
            return out
        if dev is not None:
            seen["moves"].append(("to", str(dev)))
            return self.clone()
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)

    def record(name):
        def f(*args, **kwargs):
            tensors = [a for a in args if torch.is_tensor(a)] + [x for a in args if isinstance(a, list)
                                                                for x in a if torch.is_tensor(x)]
            seen["collective"].append((name, all(getattr(t, "fake_cuda", False) for t in tensors[-1:])))
        return f

    for name in ("all_reduce", "all_gather", "all_to_all_single", "barrier"):
        monkeypatch.setattr(dist, name, record(name))
    return seen


def test_comm_device_by_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for backend, want in (("nccl", "cuda:1"), ("gloo", "cpu")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, b=backend: b)
        assert str(comm.comm_device(None, torch.zeros(1))) == want
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert comm.comm_device(None, torch.zeros(1)).type == "cpu"  # multi-backend takes it where it is


def test_cpu_control_tensors_go_to_cuda_under_nccl(fake_nccl):
    out = comm.all_reduce(torch.tensor([1.0]), "max")
    assert fake_nccl["collective"] == [("all_reduce", True)]
    assert fake_nccl["moves"] == [("to", "cuda:3"), ("to", "cpu")]
    assert out.device.type == "cpu"
    fake_nccl["moves"].clear()
    comm.any_rank(True)
    comm.floats_mean([1.0, 2.0])
    comm.exchange_counts(torch.tensor([1, 2]), None)
    assert [c for c in fake_nccl["collective"]] == [("all_reduce", True)] * 3 + [("all_to_all_single", True)]
    assert fake_nccl["moves"].count(("to", "cuda:3")) == 3


def test_nccl_barrier_names_the_device(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setattr(dist, "barrier", lambda group=None, device_ids=None: calls.append(device_ids))
    comm.barrier()
    assert calls == [[5]]


def test_single_process_is_a_no_op():
    t = torch.tensor([2.0])
    assert comm.all_reduce(t) is t and comm.all_gather(t) == [t] and comm.any_rank(False) is False


def test_set_device_precedes_process_group(monkeypatch):
    """init_distributed binds the rank's GPU before it creates the world group."""
    from megamoe import parallel

    order = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: order.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: order.append(("init", kw.get("backend"))))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "1")
    parallel.init_distributed()
    assert order == [("set_device", 1), ("init", "nccl")]


def test_loader_pins_memory_only_with_cuda(monkeypatch):
    from megamoe.data.gpt import build_loader

    ds = [{"tokens": torch.zeros(4, dtype=torch.long), "labels": torch.zeros(4, dtype=torch.long),
           "loss_mask": torch.ones(4)} for _ in range(4)]
    assert build_loader(ds, 2, 2).pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_loader(ds, 2, 2).pin_memory is True


def _all_to_all_worker(rank: int, world: int):
    from megamoe.parallel import init_distributed

    init_distributed("gloo")
    # rank r sends (r + 1) * (i + 1) rows to rank i; rows carry (sender, index) so the order is checked
    in_splits = [(rank + 1) * (i + 1) for i in range(world)]
    out_splits = [(j + 1) * (rank + 1) for j in range(world)]
    x = torch.arange(sum(in_splits), dtype=torch.float64).unsqueeze(1).repeat(1, 2) + 100 * rank
    x.requires_grad_(True)
    y = comm.all_to_all_single(x, out_splits, in_splits, None)
    expect = []
    for j in range(world):  # what rank j sends to me: its rows of chunk `rank`
        sj = [(j + 1) * (i + 1) for i in range(world)]
        start = sum(sj[:rank])
        expect.append(torch.arange(start, start + sj[rank], dtype=torch.float64) + 100 * j)
    torch.testing.assert_close(y[:, 0], torch.cat(expect), rtol=0, atol=0)
    w = torch.arange(y.shape[0], dtype=torch.float64).unsqueeze(1) + 1000 * rank
    (y * w).sum().backward()
    # d/dx of sum(y * w) = w routed back to the sender's row
    back = torch.empty_like(x[:, 0])
    back_rows = comm.all_to_all_single(w[:, 0].unsqueeze(1), in_splits, out_splits, None)[:, 0]
    back.copy_(back_rows)
    torch.testing.assert_close(x.grad[:, 0], back, rtol=0, atol=0)
    assert x.grad[:, 1].equal(x.grad[:, 0])


def test_all_to_all_autograd_two_ranks():
    run_distributed(_all_to_all_worker, world_size=2)
