"""Every shipped config under configs/ loads and validates (a broken example is a bug)."""

from pathlib import Path

import pytest

from megamoe.config import ConfigError
from megamoe.model.accounting import account
from megamoe.run_config import load_run_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path):
    cfg = load_run_config(path)
    counts = account(cfg.model, cfg.moe)
    assert counts.total >= counts.active > 0


def test_override_is_checked_against_other_sections():
    with pytest.raises(ConfigError, match="moe.num_experts"):
        load_run_config(CONFIGS[0].parent / "switch_top2.yaml", ["parallel.expert_parallel=3"])
