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
    assert res["complete"] and res["done"] == len(tool.QUICK_ARMS.split(",")) * 2
    rows = res["summary"]["rows"]
    assert {r["arm"] for r in rows} == set(tool.QUICK_ARMS.split(","))
    for r in rows:
        lo, hi = r["avg_ci"]
        assert r["seeds"] == 2 and lo <= r["avg"] + 1e-9 and r["avg"] <= hi + 1e-9
        assert (r["routing_learned"] is not None) == (r["arm"] in ("poly", "cpoly", "tensorpoly1", "mta", "mta_one"))
    claims = {c["claim"].split(" (")[0] for c in res["summary"]["claims"]}
    assert claims == {c[0].split(" (")[0] for c in tool.CLAIMS}
    md = (tmp / "res" / "ft.md").read_text()
    assert "## 100 training examples per task" in md and "[bootstrap 95% interval" in md
    assert (tmp / "res" / "ft.png").stat().st_size > 1000
    t0 = time.time()  # resume: everything is cached
    with pytest.raises(SystemExit):
        tool.main(argv)
    assert time.time() - t0 < first / 2
    assert json.loads((tmp / "res" / "ft.json").read_text())["summary"]["rows"] == rows


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
                                       (["--steps", "0"], "--steps 0: must be >= 1")])
def test_bad_numbers_stop_with_one_line_before_loading_anything(argv, msg, capsys):
    """--sizes 0 was a ValueError traceback from deep inside the run."""
    with pytest.raises(SystemExit) as e:
        tool.main(["--base", "does-not-matter", "--arms", "lora", *argv])
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {msg}\n"
