"""Wheels that megamoe needs on a GPU machine with no network, and the one command to run there.

    python tools/gpu_wheels.py                  # -> .whl/ (git-ignored), then prints the run call
    python tools/gpu_wheels.py --python-version 3.11 --dest /tmp/whl311   # a rehearsal here

The lent GPU machine (an H200 with this workplace's CUDA image: Python 3.12, torch 2.11+cu130,
transformers 5.17, ...) reaches no package registry. Whatever megamoe imports that the image
lacks must travel with the working tree as wheels, and pip installs them there with
``--no-index --target`` (tools/gpu_device.sh). This tool downloads exactly that set, at the
versions verified here: the pins of requirements.txt, and for their dependencies the versions
installed in this machine's .venv (``importlib.metadata``), so the GPU run uses the library
versions the CPU test suite passed with (torch itself excepted: the image's CUDA build is used).

Why each package is carried (:data:`CARRY`); everything else megamoe, its tests and its tools
import is in the image (:data:`GPU_IMAGE`, the package list read from the machine on
2026-11-17). tests/tools/test_gpu_wheels.py fails when a new third-party import appears that
is neither in the image nor carried, so the set cannot silently rot.

DeepSpeed publishes only a source archive on PyPI. It is built here into a pure-Python wheel
(``pip wheel --no-build-isolation`` with ``DS_BUILD_OPS=0``): no prebuilt CUDA op; its ops
JIT-compile on first use, and megamoe uses none (torch's fused AdamW, torch attention).

The output directory appears whole or not at all (temporary name, then rename). The total that
would travel (tracked files + the wheels + the carried data) is checked against the device
tool's 64 MiB limit before anything is sent.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megamoe.errors import UserError, cli_main  # noqa: E402
from megamoe.utils import atomic_path  # noqa: E402

# distribution -> why it travels (the image lacks it, or has a version megamoe is not verified on)
CARRY = {
    "deepspeed": "the training engine; not in the image (built here from PyPI's sdist, see the docstring)",
    "hjson": "deepspeed's config parser; not in the image",
    "pydantic": "deepspeed's config models; not in the image",
    "pydantic-core": "pydantic's compiled core (cp312 wheel)",
    "annotated-types": "pydantic's dependency; not in the image",
    "typing-inspection": "pydantic's dependency; not in the image",
    "typing-extensions": "pydantic needs >= 4.16; the image's version is not recorded",
    "megatron-core": "process groups, TP layers, indexed datasets; not in the image (cp312 wheel)",
    "datasets": "the indexed-dataset wrapper (megamoe/data); not in the image",
    "dill": "datasets' dependency (pinned below 0.4.2 by datasets); not in the image",
    "multiprocess": "datasets' dependency; not in the image",
    "fsspec": "datasets pins fsspec <= 2026.9.0; the image's version is not recorded",
    "transformers": "the image has 5.17; the HF export/import mappings are verified on requirements.txt's pin",
    "peft": "must match the carried transformers (tests import it at collection)",
    "regex": "transformers needs regex >= 2025.10.22; the image's version is not recorded",
}

# Packages in the GPU image (device tool's KINDS.md, read from the machine on 2026-11-17).
GPU_IMAGE = set("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())

# What travels besides the wheels: the corpus gpu_check trains on (make data), not the raw text.
DATA = ["data/corpus_text_document.bin", "data/corpus_text_document.idx", "data/corpus_text_document.json",
        "data/tokenizer"]
DEVICE_LIMIT_MIB = 64  # the device tool's limit on the working tree that travels
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def verified_versions(names) -> dict[str, str]:
    """The version of each distribution in the running interpreter's environment (the .venv the
    test suite ran in): what was verified, so what travels."""
    out, missing = {}, []
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            missing.append(name)
    if missing:
        raise UserError(f"{', '.join(missing)}: not installed in {sys.prefix}; run this tool with the project's "
                        f".venv/bin/python after `make test` (it copies the versions verified there)")
    return out


def third_party_imports(paths=("megamoe", "tests", "tools", "pretrain")) -> dict[str, set[str]]:
    """Top-level imported module -> the distributions that provide it, for every import under
    ``paths`` that resolves to an installed distribution (stdlib and the project's own modules do not)."""
    dists = md.packages_distributions()
    mods = set()
    for base in paths:
        for f in (ROOT / base).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", f.read_text(errors="replace"), re.M):
                mods.add(m.group(1))
    return {m: {canonical(d) for d in dists[m]} for m in sorted(mods) if m in dists and "megamoe" not in dists[m]}


def unmet_on_gpu() -> list[str]:
    """What megamoe would lack on the GPU machine: third-party imports of the project, and the
    requirements (extras aside) of every carried distribution, that neither the image nor the
    carried wheels provide. Empty when the set is complete."""
    have = set(CARRY) | GPU_IMAGE
    out = [f"import {m} ({', '.join(sorted(ds))})" for m, ds in third_party_imports().items() if not ds & have]
    for dist in sorted(CARRY):
        for req in md.requires(dist) or []:
            name, _, marker = req.partition(";")
            if "extra ==" in marker:
                continue
            dep = canonical(re.match(r"\s*([A-Za-z0-9_.-]+)", name).group(1))
            if dep not in have:
                out.append(f"{dist} requires {dep}")
    return out


def tree_bytes() -> int:
    """Bytes of what the device tool sends by default: tracked files and untracked, not ignored ones."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / f.decode()).stat().st_size for f in files if f and (ROOT / f.decode()).is_file())


def path_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


def download(dest: Path, versions: dict[str, str], python_version: str) -> None:
    pip = [sys.executable, "-m", "pip"]
    binary = [d for d in versions if d != "deepspeed"]
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = pip + ["download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                 "--implementation", "cp", *plat, "-d", str(dest)] + [f"{d}=={versions[d]}" for d in binary]
    _run(cmd, "pip download")
    if "deepspeed" in versions:
        env = dict(os.environ, DS_BUILD_OPS="0")
        _run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
                    f"deepspeed=={versions['deepspeed']}"], "building the deepspeed wheel", env)


def _run(cmd, what, env=None) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        err = [line for line in p.stderr.splitlines() if line.startswith("ERROR")] or p.stderr.splitlines()[-1:]
        raise UserError(f"{what} failed: {' '.join(err)[:400]} (is PyPI reachable? the command: {' '.join(cmd)})")


@cli_main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", default=str(ROOT / ".whl"), help="output folder (replaced whole; default .whl/)")
    ap.add_argument("--python-version", default="3.12", help="the GPU image's Python (default 3.12)")
    args = ap.parse_args(argv)
    versions = verified_versions(sorted(CARRY))
    dest = Path(args.dest)
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        download(tmp, versions, args.python_version)
    wheels = sorted(dest.glob("*.whl"))
    got = {canonical(w.name.split("-")[0]) for w in wheels}
    lacking = sorted(set(versions) - got)
    if lacking:
        raise UserError(f"{dest}: no wheel for {', '.join(lacking)} after the download; rerun, or check pip's output")
    data = [p for p in DATA if (ROOT / p).exists()]
    sizes = {"working tree": tree_bytes(), "wheels": sum(w.stat().st_size for w in wheels),
             "data": sum(path_bytes(ROOT / p) for p in data)}
    mib = {k: v / 2**20 for k, v in sizes.items()}
    print(f"{len(wheels)} wheels in {dest}: " + ", ".join(w.name for w in wheels))
    print("travels: " + ", ".join(f"{k} {v:.1f} MiB" for k, v in mib.items())
          + f" = {sum(mib.values()):.1f} of {DEVICE_LIMIT_MIB} MiB")
    if sum(mib.values()) > DEVICE_LIMIT_MIB:
        raise UserError(f"{sum(mib.values()):.1f} MiB would travel, over the device tool's {DEVICE_LIMIT_MIB} MiB")
    if len(data) < len(DATA):
        print("no data/ (run `make data` first): gpu_check will train on its synthetic corpus instead")
    if not dest.resolve().is_relative_to(ROOT):
        print(f"{dest} is outside the repository, and the device tool carries only paths inside it: "
              f"a rehearsal here is `bash tools/gpu_device.sh --cpu-smoke --wheels {dest}`")
        return 0
    carry = [str(dest.resolve().relative_to(ROOT))] + data
    print("on the GPU machine (device tool's run):\n"
          f"  command: bash tools/gpu_device.sh\n  carry:   {carry}\n  timeout_s: 600")
    return 0


if __name__ == "__main__":
    main()
