"""The wheel set for the network-less GPU machine (tools/gpu_wheels.py) cannot rot: every
third-party import of megamoe, its tests and tools, and every requirement of every carried
wheel, is either in the GPU image or carried. The checks are shown to catch a gap. No download
here (tools/gpu_wheels.py itself needs PyPI); tools/gpu_device.sh's error path is checked too.
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gpu_wheels  # noqa: E402

from megamoe.errors import UserError  # noqa: E402


def test_the_carried_set_is_complete():
    assert gpu_wheels.unmet_on_gpu() == []


def test_a_dropped_dependency_is_caught(monkeypatch):
    carry = {k: v for k, v in gpu_wheels.CARRY.items() if k != "hjson"}
    monkeypatch.setattr(gpu_wheels, "CARRY", carry)
    assert gpu_wheels.unmet_on_gpu() == ["deepspeed requires hjson"]


def test_a_new_import_missing_from_the_image_is_caught(tmp_path, monkeypatch):
    have = set(gpu_wheels.CARRY) | gpu_wheels.GPU_IMAGE
    dists = md.packages_distributions()
    # an installed module whose distribution the GPU image lacks and nobody carries
    mod = next(m for m, ds in sorted(dists.items()) if m.isidentifier() and "megamoe" not in ds
               and not {gpu_wheels.canonical(d) for d in ds} & have)
    (tmp_path / "new_feature.py").write_text(f"import os\nimport {mod}\n")
    found = gpu_wheels.third_party_imports(paths=(str(tmp_path),))
    assert mod in found and "os" not in found
    monkeypatch.setattr(gpu_wheels, "third_party_imports", lambda: found)
    assert any(line.startswith(f"import {mod} ") for line in gpu_wheels.unmet_on_gpu())


def test_versions_come_from_the_verified_environment():
    assert gpu_wheels.verified_versions(["deepspeed", "transformers"]) == {
        "deepspeed": md.version("deepspeed"), "transformers": md.version("transformers")}
    with pytest.raises(UserError, match="no-such-dist-xyz: not installed"):
        gpu_wheels.verified_versions(["no-such-dist-xyz"])


def test_requirements_pins_are_what_travels():
    """requirements.txt's exact pins of carried packages equal the installed (verified) versions."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep and gpu_wheels.canonical(name) in gpu_wheels.CARRY:
            assert md.version(name) == version.strip(), name


def test_device_script_without_wheels_says_what_to_do(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "tools" / "gpu_device.sh"), "--wheels", str(tmp_path / "none")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 3
    assert p.stderr.strip().splitlines() == [f"error: {tmp_path / 'none'}: no wheels; run 'python "
                                             "tools/gpu_wheels.py' here first and carry .whl"]
