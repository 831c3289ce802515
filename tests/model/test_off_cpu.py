"""The canonical state-dict paths work when the model's tensors are not on the CPU.

On a GPU the trainer's checkpoint set-up (``local_layout``) and every save call each MoE
layer's ``gather_full`` on the live CUDA model, and index ops (index_select / index_copy_) reject an
index tensor on another device. No CUDA here: the ``meta`` device enforces the same
same-device rule (it raised "index_copy_(): self, index and source expected to be in the same
device" for the FFN experts' CPU row index before the fix), so each model kind is moved there.
"""

from __future__ import annotations

import pytest
import torch

from megamoe.model.config import HashConfig, MoEConfig, MPOConfig
from megamoe.model.state_dict import gather_full_state_dict
from megamoe.moe.layer import MoELayer
from tests.model.common import build, tiny_model

KINDS = {
    "ffn_experts": MoEConfig(num_experts=4, every=1),
    "gelu_experts": MoEConfig(num_experts=4, every=1),
    "multihash": MoEConfig(num_experts=4, hash_layers=[0, 1], hash=HashConfig(variant="random", num_hashes=2)),
    "mpo_experts": MoEConfig(num_experts=4, every=1, expert_type="mpo", mpo=MPOConfig(max_bond_dim=4)),
    "shared_experts": MoEConfig(num_experts=4, every=1, shared_experts=1, shared_expert_gate=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_moe_full_state_dict_off_cpu(kind):
    """Router and experts (which gather and scatter with index tensors) are moved off the CPU.
    Dense parts, shared experts included, stay: ``gather_full_state_dict`` copies them to the
    host, which a meta tensor cannot do (a CUDA one can), and the trainer's ``local_layout``
    swaps parameter ``.data`` for CPU stand-ins, which PyTorch allows from CUDA but not from meta."""
    model = build(tiny_model(activation="gelu" if kind == "gelu_experts" else "swiglu"), KINDS[kind])
    ref = gather_full_state_dict(model)
    moe = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    assert moe
    for name, m in moe.items():
        m.router.to("meta")
        m.experts.to("meta")
        prefix = name + "."
        full = m.gather_full(prefix)  # what every save and the checkpoint set-up call on the live model
        assert {k: tuple(v.shape) for k, v in full.items()} == {k: tuple(ref[k].shape) for k in full}
        m.load_full(ref, prefix)  # a CPU checkpoint into the off-CPU layer
        m.load_full(full, prefix)  # and its own off-CPU full dict back
