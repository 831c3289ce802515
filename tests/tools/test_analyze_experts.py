"""tools/analyze_experts.py on a checkpoint trained at EP=2 (read in one process), checked
against independent computations; text input under the data pipeline's UTF-8 rules (also for
tools/evaluate.py --text-file)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train.helpers import ROOT, launch, make_dataset, tiny_config, write_config

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, then rests {i} times."
                   for i in range(40))


def _tool(name, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def ep2_checkpoint(tmp_path_factory):
    """A hash + MPO-Switch model trained 2 steps on 2 ranks with expert parallelism 2 (ZeRO-2)."""
    tmp = tmp_path_factory.mktemp("ana")
    prefix, tok = make_dataset(tmp / "data", n_docs=200)
    cfg = tiny_config(prefix, tok, tmp / "run", **{"parallel.expert_parallel": 2, "train.train_steps": 2,
                                                   "moe.router.capacity_factor": 1.0})
    code, out = launch(write_config(cfg, tmp / "c.yaml"), 2, timeout=300)
    assert code == 0, out[-3000:]
    text = tmp / "t.txt"
    text.write_text(TEXT)
    return tmp / "run" / "ckpt", text, tok, cfg


def test_nmi():
    from tools.analyze_experts import nmi

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (5000,), generator=g)
    assert nmi(a, a, 4, 4) == pytest.approx(1.0)
    assert nmi(a, (a + 1) % 4, 4, 4) == pytest.approx(1.0)  # a relabelling agrees fully
    assert nmi(a, torch.randint(0, 4, (5000,), generator=g), 4, 4) < 0.01
    assert nmi(a, torch.zeros_like(a), 4, 4) == 0.0


def test_analyze_ep2_checkpoint_in_one_process(ep2_checkpoint, tmp_path):
    from megamoe.data.tokenizer import load_sentencepiece
    from megamoe.hf.checkpoint_reader import load_checkpoint
    from tools.evaluate import _text_batches

    ckpt, text, tok, cfg = ep2_checkpoint
    r = _tool("analyze_experts", "--checkpoint", ckpt, "--text-file", text, "--output", tmp_path / "a",
              "--micro-batch-size", 4)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "a" / "analysis.json").read_text())
    for png in ("load.png", "agreement.png", "entropy_position.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    assert set(res["layers"]) == {"0", "1", "2"} and res["layers"]["0"]["kind"] == "hash"
    # hash layer: its load is the bincount of the checkpoint's table over the analysed tokens
    table = load_checkpoint(ckpt).state_dict["layers.0.moe.router.table"][0]
    ids = torch.cat([b["input_ids"].reshape(-1) for b in _text_batches(str(text), tok, cfg["data"]["seq_length"], 4, 50)])
    want = torch.bincount(table[ids], minlength=4).double() / len(ids)
    assert res["layers"]["0"]["tokens"] == len(ids)
    assert res["layers"]["0"]["load"] == [round(float(x), 5) for x in want]
    sp = load_sentencepiece(tok)
    for e, fav in enumerate(res["layers"]["0"]["top_tokens"]):  # a hash expert's tokens are its own
        assert all(int(table[t["id"]]) == e and t["share_of_token"] == 1.0 for t in fav)
        assert all(t["token"] == sp.id_to_piece(t["id"]) for t in fav)
    for li in ("1", "2"):
        layer = res["layers"][li]
        assert len(layer["router_entropy_by_position"]) == cfg["data"]["seq_length"]
        assert all(0 <= h <= math.log(4) + 1e-6 for h in layer["router_entropy_by_position"])
        assert 0 <= layer["dropped_fraction_eval"] <= layer["dropped_fraction_train_capacity"] <= 1
        assert sum(layer["load"]) == pytest.approx(1.0, abs=1e-4)
    assert "router_entropy_by_position" not in res["layers"]["0"]
    nmi = res["agreement_nmi"]
    assert all(nmi[a][a] == 1.0 and nmi[a][b] == nmi[b][a] for a in nmi for b in nmi)


def test_text_input_follows_the_utf8_rules(ep2_checkpoint, tmp_path, capsys):
    """A binary file is refused with the byte offset (it used to be evaluated as text with
    replacement characters); --skip-invalid drops the undecodable lines."""
    ckpt, text, _, _ = ep2_checkpoint
    bad = tmp_path / "bad.txt"
    bad.write_bytes(TEXT.encode()[:300] + b"\n\xff\xfe\x00binary\n" + TEXT.encode()[300:])
    offset = len(TEXT.encode()[:300]) + 1
    r = _tool("analyze_experts", "--checkpoint", ckpt, "--text-file", bad, "--output", tmp_path / "o")
    assert r.returncode == 2 and f"invalid UTF-8 at byte offset {offset}" in r.stderr and "--skip-invalid" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o" / "analysis.json").exists()
    r = _tool("evaluate", "--checkpoint", ckpt, "--text-file", bad, "--output", tmp_path / "e")
    assert r.returncode == 2 and f"invalid UTF-8 at byte offset {offset}" in r.stderr, r.stderr[-2000:]
    from megamoe.errors import UserError
    from tools.evaluate import read_text_file

    with pytest.raises(UserError, match=f"byte offset {offset}"):
        read_text_file(str(bad))
    kept = read_text_file(str(bad), skip_invalid=True)
    assert kept == TEXT[:300] + "\n" + TEXT[300:] and "skipped 1 line(s)" in capsys.readouterr().err
    assert read_text_file(str(text)) == TEXT
