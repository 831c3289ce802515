"""Training data: megatron-core GPT datasets over blends and splits, batches, and the sampler's
exact resume (also across a data-parallel size change)."""

import numpy as np
import pytest
import torch

from megamoe.config import ConfigError
from megamoe.data import DataConfig, build_datasets, build_loader
from megamoe.data.sampler import ResumableBatchSampler
from megamoe.errors import UserError


def _cfg(prefixes, tmp_path, **kw):
    kw.setdefault("seq_length", 64)
    return DataConfig(data_path=list(prefixes), cache_dir=str(tmp_path / "cache"), **kw)


def test_batches_shapes_and_shift(token_prefixes, tmp_path):
    train, valid, test = build_datasets(_cfg(token_prefixes[:1], tmp_path, split="90,8,2"), 200, 16, 0)
    assert test is None and len(train) >= 200 and len(valid) >= 16
    batch = next(iter(build_loader(train, 4, 8, 0, 2, 0)))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["loss_mask"].shape == (4, 64)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
    # labels are the next tokens: the sample is one window of seq_length + 1 tokens
    np.testing.assert_array_equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["input_ids"].min()) >= 10 and int(batch["input_ids"].max()) < 100


def test_blend_weights(token_prefixes, tmp_path):
    """A 1:3 blend of two datasets with disjoint token ranges draws samples 1:3."""
    a, b = token_prefixes
    train, _, _ = build_datasets(_cfg(["1", a, "3", b], tmp_path, split="100,0,0"), 800)
    from_a = sum(int(train[i]["tokens"].max()) < 100 for i in range(800))
    assert abs(from_a / 800 - 0.25) < 0.01  # megatron-core's blending is error-feedback, not random


def _stream(ds, mbs, gbs, dp, consumed, steps):
    """The global batches (DP shards re-assembled in rank order) of `steps` optimizer steps."""
    loaders = [iter(build_loader(ds, mbs, gbs, r, dp, consumed)) for r in range(dp)]
    out = []
    for _ in range(steps):
        micro = []
        for _ in range(gbs // (mbs * dp)):
            micro += [next(it)["input_ids"] for it in loaders]
        out.append(torch.cat(micro))
    return out


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 2), (1, 2), (2, 4)])
def test_resume_exact_across_dp_sizes(token_prefixes, tmp_path, dp_before, dp_after):
    """Resuming at N consumed samples gives the batches an uninterrupted run gives from N on,
    also with a different data-parallel size."""
    train, _, _ = build_datasets(_cfg(token_prefixes, tmp_path, split="100,0,0"), 256)
    mbs, gbs = 2, 8
    full = _stream(train, mbs, gbs, dp_before, 0, 6)
    resumed = _stream(train, mbs, gbs, dp_after, 3 * gbs, 3)
    for a, b in zip(full[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(full[0], full[1])


def test_sampler_partition_and_errors():
    shards = [list(ResumableBatchSampler(40, 8, 2, 8, r, 2)) for r in range(2)]
    flat = sorted(i for s in shards for b in s for i in b)
    assert flat == list(range(8, 40))  # every sample after the resume point once, no overlap
    with pytest.raises(UserError, match="global_batch_size=6 must be a multiple"):
        ResumableBatchSampler(40, 0, 2, 6, 0, 2)
    with pytest.raises(UserError, match="consumed_samples=3"):
        ResumableBatchSampler(40, 3, 2, 8, 0, 2)


def test_config_validation():
    with pytest.raises(ConfigError, match="split"):
        DataConfig(split="a,b")
    with pytest.raises(ConfigError, match="data_path"):
        DataConfig(data_path=["0.5", "x", "w", "y"])
    with pytest.raises(ConfigError, match="data_path"):
        DataConfig(data_path=[])
    assert DataConfig(data_path=["3", "a", "1", "b"]).blend() == (["a", "b"], [3.0, 1.0])
