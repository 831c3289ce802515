"""README.md's and docs/*.md's commands must work verbatim after ``make demo`` (the brief's first
rule). What drifts silently is what they name: files that moved, links and anchors, checkpoint
tags the demo no longer keeps (``--tag global_step200`` failed once ``train.keep_last: 2`` left only
steps 400 and 500), flags a tool no longer has, config fields that were renamed. These checks
cover every command shown, GPU-only ones included; ``tests/test_docs_commands.py`` runs the ones
a CPU checkout can run."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from megamoe import config_docs
from megamoe.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TEXT = {p: p.read_text(encoding="utf-8") for p in PAGES}
ALL = "\n".join(TEXT.values())
# the topics docs/ must cover (issue 28), one page each
TOPICS = ["configuration", "parallelism-and-launching", "checkpoints", "moe", "data", "hf", "finetuning",
          "planning", "benchmarks", "studies", "gpu-check", "troubleshooting"]


def commands(text: str) -> list[str]:
    """Shell commands shown: lines of ```bash blocks (continuations joined, comments dropped) and
    inline code spans that start like a command."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\s*\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            if line:
                out.append(line)
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        if re.match(r"(\(?cd \S+ && )?(python|bash|deepspeed|sbatch|DS_ACCELERATOR=|NGPUS=|HOSTFILE=)", span):
            out.append(span)
    return out


def tool_calls(cmd: str) -> list[tuple[str, list[str]]]:
    """(script path, its arguments) for each repository script a command runs."""
    calls = []
    for part in re.split(r"&&|;|\|", cmd):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i, w in enumerate(words):
            if re.fullmatch(r"(tools|pretrain|launch)/[\w/.-]+\.(py|sh|sbatch)|zero_to_fp32\.py", w):
                calls.append((w, words[i + 1:]))
                break
    return calls


@lru_cache(maxsize=None)
def known_flags(script: str) -> frozenset[str]:
    """Every --flag a script accepts: its --help for Python tools, its source for shell scripts."""
    path = ROOT / ("tools/zero_to_fp32.py" if script == "zero_to_fp32.py" else script)
    if path.suffix == ".py":
        out = subprocess.run([sys.executable, str(path), "--help"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
        text = out.stdout
    else:
        text = path.read_text()
    return frozenset(re.findall(r"--[a-z][\w-]*", text))


def test_docs_has_one_page_per_topic():
    assert [t for t in TOPICS if not (ROOT / "docs" / f"{t}.md").is_file()] == []


def test_readme_is_short():
    assert len(TEXT[ROOT / "README.md"].splitlines()) <= 250


def test_every_repo_path_the_pages_name_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:tools|configs|launch|pretrain|megamoe|tests|docs|results)/[\w./-]+"
                           r"\.(?:py|yaml|sh|json|sbatch|example|md|png))", ALL))
    assert len(paths) > 40  # the pattern still finds them
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", TEXT.get(page) or page.read_text(), flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page, text in TEXT.items():
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []


def test_demo_checkpoint_tags_in_the_pages_are_kept_by_make_demo():
    train = load_run_config(ROOT / "configs" / "demo.yaml").train
    saved = sorted({*range(train.save_interval, train.train_steps + 1, train.save_interval), train.train_steps})
    kept = {f"global_step{s}" for s in saved[-train.keep_last:]}
    named = re.findall(rf"{re.escape(train.save_dir)}\S*[^\n]*?(?:--tag )?(global_step\d+)", ALL)
    assert named and set(named) <= kept, (named, kept)


def test_every_flag_shown_exists_in_its_tool():
    unknown, checked = [], 0
    for page, text in TEXT.items():
        for cmd in commands(text):
            for script, args in tool_calls(cmd):
                flags = {a.split("=", 1)[0] for a in args if a.startswith("--")}
                checked += len(flags)
                unknown += [f"{page.name}: {script} {f}" for f in sorted(flags - known_flags(script))]
    assert checked > 40  # the extraction still finds them
    assert unknown == []


def test_every_config_override_shown_names_a_field():
    fields = {r.path for _, path, _, rows in config_docs.reference_sections() if path or rows
              for r in rows}
    bad, checked = [], 0
    for page, text in TEXT.items():
        for cmd in commands(text):
            for script, args in tool_calls(cmd):
                if script not in ("pretrain/pretrain_moe.py", "launch/cpu_demo.sh", "launch/single_node_gpus.sh",
                                  "launch/multi_node_hostfile.sh"):
                    continue
                for a in args:
                    m = re.fullmatch(r"([a-z_]+(?:\.[a-z_]+)+)=.*", a)
                    if m:
                        checked += 1
                        if m.group(1) not in fields:
                            bad.append(f"{page.name}: {a}")
    assert checked > 10
    assert bad == []
