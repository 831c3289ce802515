"""Single-process decoder sanity: causality, learning, tied head, learned positions, activation
checkpointing, canonical state dict round trip, and parity with transformers' Llama."""

import pytest
import torch

from megamoe.errors import UserError
from megamoe.model.config import MoEConfig, RouterConfig
from megamoe.model.generate import greedy_generate
from megamoe.model.state_dict import gather_full_grads, gather_full_state_dict, load_full_state_dict
from tests.model.common import V, batch, build, tiny_model


@pytest.mark.parametrize("kw", [{}, dict(position_embedding="learned", norm="layernorm", activation="gelu",
                                         bias=True, num_kv_heads=2)])
def test_causal(kw):
    model = build(tiny_model(**kw)).eval()
    ids, _ = batch()
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % V
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-4


def test_loss_decreases():
    model = build(tiny_model())
    ids, labels = batch()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        out = model(ids, labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(V))).item(), abs=0.3)
    assert losses[-1] < losses[0] - 0.5, losses


def test_loss_mask_and_ignore_index():
    model = build(tiny_model())
    ids, labels = batch()
    mask = torch.zeros_like(ids)
    mask[:, :5] = 1
    masked = model(ids, labels, mask).lm_loss
    ignored = labels.clone()
    ignored[:, 5:] = -100
    torch.testing.assert_close(model(ids, ignored).lm_loss, masked)
    logp = torch.log_softmax(model(ids).logits[:, :5].double(), -1)
    ref = -logp.gather(-1, labels[:, :5, None]).mean()
    torch.testing.assert_close(masked.double(), ref, rtol=1e-5, atol=1e-6)


def test_tied_head_gets_both_gradients():
    """Tied: no lm_head.weight; embed.grad(tied) == embed.grad + lm_head.grad of an untied model
    whose head starts equal to the embedding."""
    tied, untied = build(tiny_model(tie_embeddings=True)), build(tiny_model())
    sd = gather_full_state_dict(tied)
    assert "lm_head.weight" not in sd and "lm_head.weight" in gather_full_state_dict(untied)
    load_full_state_dict(untied, {**sd, "lm_head.weight": sd["embed.weight"]})
    ids, labels = batch()
    lt, lu = tied(ids, labels).loss, untied(ids, labels).loss
    torch.testing.assert_close(lt, lu)
    lt.backward()
    lu.backward()
    gt, gu = gather_full_grads(tied), gather_full_grads(untied)
    torch.testing.assert_close(gt["embed.weight"], gu["embed.weight"] + gu["lm_head.weight"], rtol=1e-5, atol=1e-7)


def test_learned_positions():
    model = build(tiny_model(position_embedding="learned"))
    ids, labels = batch(s=10)
    model(ids, labels).loss.backward()
    g = model.pos_embed.weight.grad
    assert g[:10].abs().sum(-1).min() > 0 and g[10:].abs().sum() == 0
    assert model.rope is None
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(num_experts=4, layers=[0], hash_layers=[1], router=RouterConfig(
    top_k=2, capacity_factor=0.6, jitter_eps=0.1))], ids=["dense", "top2_jitter+hash"])
def test_activation_checkpointing_same_grads(moe):
    """Recomputation replays the same routing (RNG state restored, so jitter noise matches)."""
    ref, ckpt = build(tiny_model(), moe), build(tiny_model(activation_checkpointing=True), moe, seed=1)
    load_full_state_dict(ckpt, gather_full_state_dict(ref))
    ids, labels = batch()
    for m in (ref, ckpt):
        torch.manual_seed(0)
        m(ids, labels).loss.backward()
    gr, gc = gather_full_grads(ref), gather_full_grads(ckpt)
    assert gr.keys() == gc.keys()
    for k in gr:
        torch.testing.assert_close(gc[k], gr[k], rtol=0, atol=0, msg=k)


def test_state_dict_strict():
    model = build(tiny_model())
    sd = gather_full_state_dict(model)
    assert sd["layers.0.attn.q_proj.weight"].shape == (32, 32)
    assert sd["layers.1.mlp.down_proj.weight"].shape == (32, 64)
    other = build(tiny_model(), seed=5)
    load_full_state_dict(other, sd)
    ids, _ = batch()
    torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(UserError, match="missing keys.*final_norm.weight"):
        load_full_state_dict(other, {k: v for k, v in sd.items() if k != "final_norm.weight"})
    with pytest.raises(UserError, match="unexpected keys.*bogus"):
        load_full_state_dict(other, {**sd, "bogus": torch.zeros(1)})
    with pytest.raises(UserError, match="embed.weight"):
        load_full_state_dict(other, {**sd, "embed.weight": torch.zeros(V + 1, 32)})


def test_matches_transformers_llama():
    """Same weights in transformers' LlamaForCausalLM give the same logits: RoPE convention,
    RMSNorm, GQA, SwiGLU and the canonical [out, in] names are HF's."""
    transformers = pytest.importorskip("transformers")
    cfg = tiny_model(num_kv_heads=2)
    model = build(cfg).eval()
    hf_cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=cfg.norm_eps,
                                      max_position_embeddings=32, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                                      attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    sd = gather_full_state_dict(model)
    rename = {"embed.": "model.embed_tokens.", "final_norm.": "model.norm.", "lm_head.": "lm_head.",
              ".attn_norm.": ".input_layernorm.", ".mlp_norm.": ".post_attention_layernorm.", ".attn.": ".self_attn."}
    hf_sd = {}
    for k, v in sd.items():
        for a, b in rename.items():
            k = k.replace(a, b)
        hf_sd[k if k.startswith(("model.", "lm_head")) else "model." + k] = v
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids, _ = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-5)
    out = greedy_generate(model, ids[:1, :5], max_new_tokens=6)
    ref = hf.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert torch.equal(out, ref)
