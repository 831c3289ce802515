"""convert_to_hf end to end: stock exports load in a fresh interpreter WITHOUT megamoe and
without remote code; megamoe exports load there with trust_remote_code; user mistakes give one
clear error line (exit 2) and leave no output behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.hf.common import PARAGRAPH, build_native, isolated_python, moe_cases, tiny_model, train_spm, write_counts

LOAD_CODE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
ids = torch.tensor(json.loads(sys.argv[2]))
for name in sys.argv[3:]:
    remote = name == "megamoe"
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "/" + name, trust_remote_code=remote).eval()
    tok = AutoTokenizer.from_pretrained(sys.argv[1] + "/" + name)
    with torch.no_grad():
        logits = model(ids).logits
    gen = model.generate(ids[:, :4], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    out[name] = {"arch": type(model).__name__, "logits": logits.tolist(), "gen": gen.tolist(),
                 "tok": tok.encode(PARAGRAPH), "bos": tok.bos_token_id, "eos": tok.eos_token_id}
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    return train_spm(tmp_path_factory.mktemp("tok") / "spm.model")


def to_hf(argv):
    from tools import convert_to_hf

    with pytest.raises(SystemExit) as e:
        convert_to_hf.main(argv)
    return e.value.code


def canonical_checkpoint(tmp_path, name, model_cfg, moe_cfg, tokenizer=None):
    """A native model saved as a canonical megamoe checkpoint directory (+ its native model)."""
    from megamoe.hf.import_ import write_checkpoint
    from megamoe.model.state_dict import gather_full_state_dict

    native = build_native(model_cfg, moe_cfg)
    write_checkpoint(tmp_path / name, model_cfg, moe_cfg, gather_full_state_dict(native), source=name,
                     tokenizer=tokenizer)
    return tmp_path / name, native


def test_exports_load_without_megamoe(tmp_path, spm_model):
    import sentencepiece as spm

    cases = moe_cases(write_counts(tmp_path / "counts.npy"))
    big_vocab = dict(vocab_size=400)
    from megamoe.model.config import MoEConfig, RouterConfig

    qwen = MoEConfig(num_experts=4, every=1, shared_experts=1, shared_expert_gate=True,
                     router=RouterConfig(top_k=2, eval_capacity_factor=2.0))
    picks = {"llama": cases["dense"], "mixtral": cases["top2"], "qwen2_moe": (tiny_model(), qwen),
             "megamoe": cases["hash_balanced"]}
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(0))
    natives = {}
    for name, (m, moe) in picks.items():
        m = type(m)(**{**vars(m), **big_vocab})
        ck, natives[name] = canonical_checkpoint(tmp_path, "ck_" + name, m, moe, spm_model)
        assert to_hf(["--checkpoint", str(ck), "--output", str(tmp_path / "hf" / name)]) == 0
    r = isolated_python(LOAD_CODE.replace("PARAGRAPH", repr(PARAGRAPH)), tmp_path, str(tmp_path / "hf"),
                        json.dumps(ids.tolist()), *picks)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.split("RESULT", 1)[1])
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    want_arch = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "megamoe": "MegamoeForCausalLM"}
    for name, native in natives.items():
        assert res[name]["arch"] == want_arch[name]
        with torch.no_grad():
            ref = native(ids).logits
        assert (torch.tensor(res[name]["logits"]) - ref).abs().max() <= 1e-4, name
        assert res[name]["tok"] == sp.encode(PARAGRAPH)
        assert (res[name]["bos"], res[name]["eos"]) == (sp.bos_id(), sp.eos_id())
    files = {p.name for p in (tmp_path / "hf" / "megamoe").iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md",
            "configuration_megamoe.py", "modeling_megamoe.py"} <= files
    card = (tmp_path / "hf" / "megamoe" / "README.md").read_text()
    assert "hash routing (balanced" in card and "total:" in card


def test_sharded_export_and_bf16(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    import megamoe.hf  # noqa: F401

    m, moe = moe_cases("unused")["mpo"]
    ck, native = canonical_checkpoint(tmp_path, "ck", m, moe)
    assert to_hf(["--checkpoint", str(ck), "--output", str(tmp_path / "out"), "--no-tokenizer",
                  "--max-shard-size", "20KB", "--dtype", "bf16"]) == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((tmp_path / "out" / s).is_file() for s in shards)
    with safe_open(str(tmp_path / "out" / sorted(shards)[0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = native(ids).logits, hf(ids).logits.float()
    assert got.dtype == torch.float32 and (got - ref).abs().max() < 0.1  # bf16 rounding only
    assert hf.generate(ids[:, :4], max_new_tokens=5, do_sample=False).shape == (2, 9)


def error(capsys, argv):
    assert to_hf(argv) == 2
    return capsys.readouterr().err


def test_errors(tmp_path, capsys):
    cases = moe_cases(write_counts(tmp_path / "counts.npy"))
    out = tmp_path / "out"
    # missing checkpoint
    assert "does not exist" in error(capsys, ["--checkpoint", str(tmp_path / "nope"), "--output", str(out)])
    # unknown tag in a training save_dir
    ck, _ = canonical_checkpoint(tmp_path, "hash", *cases["hash_random"])
    save_dir = tmp_path / "save"
    shutil.copytree(ck, save_dir / "global_step5")
    (save_dir / "global_step5" / "COMPLETE").write_text("global_step5\n")
    (save_dir / "latest").write_text("global_step5")
    msg = error(capsys, ["--checkpoint", str(save_dir), "--tag", "global_step9", "--output", str(out),
                         "--no-tokenizer"])
    assert "global_step9" in msg and "global_step5" in msg
    # incomplete save (DeepSpeed files but no COMPLETE marker)
    (save_dir / "global_step5" / "COMPLETE").unlink()
    (save_dir / "global_step5" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert "incomplete" in error(capsys, ["--checkpoint", str(save_dir), "--output", str(out), "--no-tokenizer"])
    # target that cannot express the model
    msg = error(capsys, ["--checkpoint", str(ck), "--output", str(out), "--target", "mixtral", "--no-tokenizer"])
    assert "cannot express" in msg and "hash routing" in msg
    msg = error(capsys, ["--checkpoint", str(ck), "--output", str(out), "--target", "llama", "--no-tokenizer"])
    assert "MoE blocks" in msg
    # no tokenizer known
    assert "--tokenizer" in error(capsys, ["--checkpoint", str(ck), "--output", str(out)])
    assert not out.exists()
    # output holding a different model: refused, then replaced with --overwrite; same model: no-op
    ck2, _ = canonical_checkpoint(tmp_path, "dense", *cases["dense"])
    assert to_hf(["--checkpoint", str(ck), "--output", str(out), "--no-tokenizer"]) == 0
    assert "already holds a different megamoe export" in error(
        capsys, ["--checkpoint", str(ck2), "--output", str(out), "--no-tokenizer"])
    assert json.loads((out / "config.json").read_text())["model_type"] == "megamoe"
    assert to_hf(["--checkpoint", str(ck), "--output", str(out), "--no-tokenizer"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert to_hf(["--checkpoint", str(ck2), "--output", str(out), "--no-tokenizer", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    # weights and config from different models (e.g. a config edited after training)
    cfg_file = ck2 / "megamoe_config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("ffn_hidden_size: 64", "ffn_hidden_size: 32"))
    msg = error(capsys, ["--checkpoint", str(ck2), "--output", str(tmp_path / "o2"), "--no-tokenizer"])
    assert "do not match its config" in msg and "wrong shapes" in msg and not (tmp_path / "o2").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "not this export" in error(capsys, ["--checkpoint", str(ck), "--output", str(other), "--no-tokenizer"])
    # a damaged weights file
    (ck / "model.safetensors").write_bytes((ck / "model.safetensors").read_bytes()[:100])
    assert "damaged" in error(capsys, ["--checkpoint", str(ck), "--output", str(tmp_path / "o3"), "--no-tokenizer"])


def test_failure_leaves_no_partial_export(tmp_path, monkeypatch):
    from megamoe.hf import export

    m, moe = moe_cases("unused")["dense"]
    ck, _ = canonical_checkpoint(tmp_path, "ck", m, moe)

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(export, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        to_hf(["--checkpoint", str(ck), "--output", str(tmp_path / "out"), "--no-tokenizer"])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_oracle_variant_is_refused():
    from megamoe.errors import UserError
    from megamoe.hf.configs import choose_target
    from megamoe.model.config import HashConfig, MoEConfig

    moe = MoEConfig(num_experts=4, hash_layers=[0], hash=HashConfig(variant="oracle_future", allow_oracle=True))
    with pytest.raises(UserError, match="oracle_future"):
        choose_target("auto", tiny_model(), moe)


def test_export_checksums_catch_a_missing_or_altered_expert(tmp_path, capsys):
    """megamoe_export.json holds a sha256 per tensor; reading the export back through megamoe
    (convert_from_hf) checks them: an edited or deleted expert tensor is one clear error."""
    from safetensors.torch import load_file, save_file

    from tools import convert_from_hf

    m, moe = moe_cases("unused")["top2"]
    ck, _ = canonical_checkpoint(tmp_path, "ck", m, moe)
    assert to_hf(["--checkpoint", str(ck), "--output", str(tmp_path / "hf"), "--no-tokenizer"]) == 0
    sums = json.loads((tmp_path / "hf" / "megamoe_export.json").read_text())["tensors"]
    experts = [k for k in sums if ".experts." in k]
    assert experts and len(sums) == len(load_file(str(tmp_path / "hf" / "model.safetensors")))

    def from_hf(tag):
        with pytest.raises(SystemExit) as e:
            convert_from_hf.main(["--hf-dir", str(tmp_path / tag), "--output", str(tmp_path / f"mm_{tag}")])
        return e.value.code, capsys.readouterr().err

    assert from_hf("hf")[0] == 0
    for tag, edit in (("altered", "alter"), ("missing", "drop")):
        shutil.copytree(tmp_path / "hf", tmp_path / tag)
        sd = load_file(str(tmp_path / tag / "model.safetensors"))
        if edit == "alter":
            sd[experts[1]] = sd[experts[1]].clone()
            sd[experts[1]].view(-1)[0] += 1e-3
        else:
            del sd[experts[1]]
        save_file(sd, str(tmp_path / tag / "model.safetensors"))
        code, err = from_hf(tag)
        assert code == 2 and experts[1] in err and ("checksum" in err or "missing" in err), err
