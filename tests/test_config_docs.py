"""docs/configuration.md's field table is generated from the config dataclasses' field
docstrings (megamoe/config_docs.py); these tests keep the two from drifting apart."""

import dataclasses
import subprocess
import sys
from pathlib import Path

from megamoe import config_docs

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_docstring():
    missing = config_docs.undocumented()
    assert not missing, ("config fields without a docstring: put a string literal on the line after "
                         "each field, then run " + config_docs.REGENERATE + "\n  " + "\n  ".join(missing))


def test_configuration_page_is_up_to_date():
    text = config_docs.DOC.read_text(encoding="utf-8")
    assert config_docs.updated_document(text) == text, (
        f"docs/configuration.md is out of date with the config dataclasses: run {config_docs.REGENERATE}")


def test_reference_lists_every_field_with_its_default():
    sections = config_docs.reference_sections()
    paths = {r.path for _, _, _, rows in sections for r in rows}
    assert {"model.hidden_size", "moe.router.top_k", "moe.hash.variant", "moe.mpo.grad_mask",
            "parallel.expert_parallel", "data.split", "train.zero_stage", "rank"} <= paths
    row = next(r for _, _, _, rows in sections for r in rows if r.path == "moe.router.drop_policy")
    assert (row.type, row.default, row.allowed) == ("str", "probability", "position, probability")


@dataclasses.dataclass
class _Planted:
    documented: int = 1
    """Has its docstring."""
    bare: int = 2  # a comment is not a docstring


def test_a_field_without_a_docstring_is_found():
    assert config_docs.attribute_docstrings(_Planted) == {"documented": "Has its docstring."}


def test_help_config_prints_the_reference_and_exits_0():
    out = subprocess.run([sys.executable, "pretrain/pretrain_moe.py", "--help-config"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "moe.router.top_k (int, default 1)" in out.stdout
    assert "train.zero_stage" in out.stdout and "data.seq_length" in out.stdout
