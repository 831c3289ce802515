"""The README's commands must work verbatim after ``make demo`` (the brief's first rule). The
commands themselves are exercised by each tool's tests; what drifts silently is what they name:
files that moved, and checkpoint tags the demo no longer keeps (``--tag global_step200`` failed
once ``train.keep_last: 2`` left only steps 400 and 500)."""

import re
from pathlib import Path

from megamoe.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_every_repo_path_the_readme_names_exists():
    paths = set(re.findall(r"(?<![\w/.-])((?:tools|configs|launch|pretrain|megamoe|tests)/[\w./-]+"
                           r"\.(?:py|yaml|sh|json|sbatch|example))", README))
    assert len(paths) > 40  # the pattern still finds them
    assert [p for p in sorted(paths) if not (ROOT / p).exists()] == []


def test_demo_checkpoint_tags_in_the_readme_are_kept_by_make_demo():
    train = load_run_config(ROOT / "configs" / "demo.yaml").train
    saved = sorted({*range(train.save_interval, train.train_steps + 1, train.save_interval), train.train_steps})
    kept = {f"global_step{s}" for s in saved[-train.keep_last:]}
    named = re.findall(rf"{re.escape(train.save_dir)}\S*[^\n]*?--tag (global_step\d+)", README)
    assert named and set(named) <= kept, (named, kept)
