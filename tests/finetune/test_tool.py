"""tools/finetune.py end to end on a tiny native checkpoint and synthetic task files: the
``--quick`` suite (results json/md/png, bootstrap intervals, claims, routing check), resuming
from the per-run cache, and ``--save`` whose LoRA loads with PEFT on the HF export."""

import json
import random
import time

import pytest

from tools import finetune as tool

from ..hf.common import train_spm
from .common import native_checkpoint

WORDS = "alpha beta gamma delta river stone cloud fire music law ship bread".split()


def _tasks(d):
    """Two tasks over the same kind of text: which of two words comes first; how many 'fire'."""
    d.mkdir()
    rng = random.Random(0)
    manifest = {}
    for task, labels in (("order", ["a", "b"]), ("count", ["0", "1", "2"])):
        rows = []
        for i in range(400):
            words = [rng.choice(WORDS) for _ in range(8)]
            if task == "order":
                y = int(words.index("river") < words.index("stone")) if "river" in words and "stone" in words \
                    else int("river" in words)
            else:
                y = min(2, words.count("fire"))
            rows.append({"text": " ".join(words), "label": y, "split": "test" if i % 4 == 0 else "train",
                         "id": f"{task}/{i}"})
        (d / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        manifest[task] = {"labels": labels}
    (d / "SOURCES.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tool")
    spm = train_spm(tmp / "spm")  # 400 pieces
    ckpt = native_checkpoint(tmp / "ckpt", vocab=400)
    _tasks(tmp / "tasks")
    return tmp, spm, ckpt


def test_quick_suite_and_resume(setup):
    tmp, spm, ckpt = setup
    argv = ["--base", str(ckpt), "--quick", "--tasks", "order,count", "--task-dir", str(tmp / "tasks"),
            "--tokenizer", str(spm), "--seq-len", "12", "--batch-size", "16", "--cache", str(tmp / "cache"),
            "--out", str(tmp / "res" / "ft")]
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    assert e.value.code == 0
    first = time.time() - t0
    assert first < 180, f"--quick took {first:.0f} s"
    res = json.loads((tmp / "res" / "ft.json").read_text())
    arms = tool.QUICK_ARMS.split(",")
    assert res["complete"] and res["done"] == len(arms) * 2 + len(arms) * 2  # 2 seeds, and 2 lrs on validation
    assert set(res["selection"]) == set(arms)
    for sel in res["selection"].values():  # the chosen lr is the best on validation
        assert sel["chosen"] == max(sel["valid"], key=lambda lr_acc: lr_acc[1])[0]
    rows = res["summary"]["rows"]
    assert {r["arm"] for r in rows} == set(arms)
    for r in rows:
        lo, hi = r["avg_ci"]
        assert r["seeds"] == 2 and lo <= r["avg"] + 1e-9 and r["avg"] <= hi + 1e-9
        assert r["lr"] == res["selection"][r["arm"]]["chosen"]
        assert (r["routing_learned"] is not None) == (r["arm"] in ("poly", "cpoly", "tensorpoly1", "mta", "mta_one"))
        assert r["adapters_moved"] is (None if r["arm"] == "head" else True)
    claims = {c["claim"] for c in res["summary"]["claims"]}
    assert claims == {"modular > shared LoRA (mean of Poly, C-Poly, TensorPoly-I, MTA two-stage)", "MTA two-stage > one-stage",
                      "validity: shared LoRA r=16 > head only"}
    from megamoe.stats import WORDS
    assert all(c["word"] in WORDS and c["seeds"] == 2 for c in res["summary"]["claims"])
    # selection runs never read the test split: their cached results hold validation only
    cached = list((tmp / "cache").glob("*/select__*.json"))
    assert len(cached) == len(arms) * 2 and not any("right" in json.loads(f.read_text()) for f in cached)
    md = (tmp / "res" / "ft.md").read_text()
    assert "## 100 training examples per task" in md and "chosen on validation" in md
    assert (tmp / "res" / "ft.png").stat().st_size > 1000
    t0 = time.time()  # resume: everything is cached
    with pytest.raises(SystemExit):
        tool.main(argv)
    assert time.time() - t0 < first / 2
    assert json.loads((tmp / "res" / "ft.json").read_text())["summary"]["rows"] == rows


def test_quick_transfer_to_a_held_out_task(setup):
    """--transfer: skills learned on the other task, then the held-out task alone with k examples,
    against LoRA and head-only trained on it alone; rows and claims cover the held-out task only."""
    tmp, spm, ckpt = setup
    argv = ["--base", str(ckpt), "--quick", "--transfer", "count", "--tasks", "order,count", "--task-dir",
            str(tmp / "tasks"), "--tokenizer", str(spm), "--seq-len", "12", "--batch-size", "16", "--cache",
            str(tmp / "cache_t"), "--out", str(tmp / "res" / "tr")]
    with pytest.raises(SystemExit) as e:
        tool.main(argv)
    assert e.value.code == 0
    res = json.loads((tmp / "res" / "tr.json").read_text())
    assert res["complete"] and res["sizes"] == [16]
    rows = {r["arm"]: r for r in res["summary"]["rows"]}
    assert set(rows) == set(tool.QUICK_TRANSFER_ARMS.split(","))
    for r in rows.values():
        assert r["per_task"][0] is None and 0 <= r["per_task"][1] <= 1 and r["avg"] == pytest.approx(r["per_task"][1])
    assert len(list((tmp / "cache_t").glob("*/prior__*.pt"))) == 2  # skills once per seed, reused per lr and k
    assert {c["claim"] for c in res["summary"]["claims"]} == {tool.TRANSFER_CLAIMS[0][0], tool.TRANSFER_CLAIMS[3][0]}
    assert "few-shot transfer" in (tmp / "res" / "tr.md").read_text()


def test_save_lora_loads_with_peft(setup):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from megamoe.finetune.base_model import load_base

    tmp, spm, ckpt = setup
    out = tmp / "saved"
    with pytest.raises(SystemExit) as e:
        tool.main(["--base", str(ckpt), "--arms", "lora", "--sizes", "50", "--seeds", "0", "--steps", "5",
                   "--max-test", "20", "--tasks", "order,count", "--task-dir", str(tmp / "tasks"), "--tokenizer",
                   str(spm), "--seq-len", "12", "--cache", str(tmp / "cache2"), "--save", str(out)])
    assert e.value.code == 0
    meta = json.loads((out / "megamoe_finetune.json").read_text())
    assert meta["tasks"] == ["order", "count"] and (out / "extra.safetensors").is_file()
    hf = load_base(ckpt).hf_dir
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(hf)), str(out))
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in pm.named_parameters())  # trained, not init
    with pytest.raises(SystemExit) as e:
        tool.main(["--base", str(ckpt), "--arms", "lora,poly", "--save", str(tmp / "x"), "--tasks", "order",
                   "--task-dir", str(tmp / "tasks"), "--tokenizer", str(spm)])
    assert e.value.code != 0
    del torch


@pytest.mark.parametrize("argv, msg", [(["--sizes", "0"], "--sizes '0': expected integers >= 1"),
                                       (["--sizes", "a,b"], "--sizes 'a,b': expected a comma list of integers"),
                                       (["--seeds=-1"], "--seeds '-1': expected integers >= 0"),
                                       (["--steps", "0"], "--steps 0: must be >= 1"),
                                       (["--lr-grid", "x"], "--lr-grid 'x': expected a comma list of numbers"),
                                       (["--transfer", "nope"], "--transfer 'nope': give tasks of --tasks, leaving "
                                                                "at least one to learn skills on")])
def test_bad_numbers_stop_with_one_line_before_loading_anything(argv, msg, capsys):
    """--sizes 0 was a ValueError traceback from deep inside the run."""
    with pytest.raises(SystemExit) as e:
        tool.main(["--base", "does-not-matter", "--arms", "lora", *argv])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {msg}\n"


def test_default_arms_build_and_equal_size_arms_match_cpoly():
    """Every default arm is a valid spec (the paper arms' target_modules=all once failed only when
    the full suite reached them), and Poly / private LoRA get C-Poly's adapter parameters."""
    from megamoe.finetune.config import AdapterConfig
    from megamoe.finetune.inject import inject_adapters
    from megamoe.finetune.run import method_config

    from .common import tiny_llama

    T, base = 8, AdapterConfig(rank=4, num_skills=4, bottleneck=4, target_modules=["q_proj", "v_proj"])
    counts = {}
    for arm in tool.default_arms(T, base).split(","):
        method, cfg = method_config(tool.split_lr(arm)[0], base, T)
        if cfg is not None:
            inj = inject_adapters(tiny_llama(), cfg)
            counts[arm] = sum(p.numel() for n, p in inj.model.named_parameters()
                              if p.requires_grad and "logits" not in n)
    poly_eq, private_eq = tool.equal_size_arms(T, base)
    assert counts["cpoly"] == counts[poly_eq] == counts[private_eq]  # 12 rank-4 modules per projection


def test_validation_is_carved_from_train_fixed_and_disjoint(setup, tmp_path):
    """Splits (issue 29): validation comes from the train rows, is the same for every seed and
    never overlaps the training draw; test is the task's own test rows; Brown passages are carved
    by document so no document is on both sides."""
    from megamoe.finetune.data import load_tasks

    tmp, spm, _ = setup
    runs = [load_tasks(tmp / "tasks", ["order", "count"], spm, 12, 1000, 1000, seed, max_valid=40) for seed in (0, 1)]
    (_, tr0, va0, te0), (_, tr1, va1, te1) = runs
    assert torch_equal(va0.ids, va1.ids) and torch_equal(te0.ids, te1.ids)
    assert len(va0.labels) == 80 and len(te0.labels) == 200 and len(tr0.labels) == 2 * (300 - 40)
    from megamoe.finetune.data import _carve

    rows = [{"id": f"t/{i}"} for i in range(300)]
    valid, rest = _carve(rows, "t", 40)
    assert len(valid) == 40 and not {r["id"] for r in valid} & {r["id"] for r in rest} and len(rest) == 260
    assert _carve(rows, "t", 40)[0] == valid  # fixed
    small = [load_tasks(tmp / "tasks", ["order"], spm, 12, 50, 10, seed, max_valid=40)[1] for seed in (0, 1)]
    assert not torch_equal(small[0].ids, small[1].ids)  # the training draw follows the seed
    d = tmp_path / "brown"
    d.mkdir()
    rows = [{"text": f"doc {doc} passage {i}", "label": doc % 2, "split": "train", "id": f"brown/d{doc}/{i}"}
            for doc in range(20) for i in range(5)]
    (d / "brown_genre.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "SOURCES.json").write_text(json.dumps({"brown_genre": {"labels": ["a", "b"]}}))
    rows[0]["split"] = "test"
    (d / "brown_genre.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, tr, va, _ = load_tasks(d, ["brown_genre"], spm, 12, 1000, 10, 0, max_valid=10)
    import sentencepiece as sp_

    dec = sp_.SentencePieceProcessor(model_file=str(spm))
    docs = lambda s: {dec.decode([i for i in r.tolist() if i]).split()[1] for r in s.ids}  # noqa: E731
    assert len(va.labels) == 10 and not docs(va) & docs(tr)


def torch_equal(a, b):
    import torch

    return a.shape == b.shape and torch.equal(a, b)


def test_transfer_suite_defaults_to_the_transfer_arms(setup):
    """Without --arms, --transfer runs the skills arms and their baselines (TRANSFER_ARMS), not the
    same-task suite: a suite without ``+skills`` arms has no transfer claim to judge."""
    tmp, spm, ckpt = setup
    with pytest.raises(SystemExit) as e:
        tool.main(["--base", str(ckpt), "--transfer", "count", "--tasks", "order,count", "--task-dir",
                   str(tmp / "tasks"), "--tokenizer", str(spm), "--seq-len", "12", "--cache", str(tmp / "cache_r"),
                   "--report", "--out", str(tmp / "res" / "defaults")])
    assert e.value.code == 0
    res = json.loads((tmp / "res" / "defaults.json").read_text())
    assert res["arms"] == tool.TRANSFER_ARMS.split(",") and not res["complete"]
