"""The configuration reference, generated from the typed config dataclasses.

Every field of :class:`megamoe.run_config.RunConfig` (and of the fine-tuning
:class:`megamoe.finetune.config.AdapterConfig`) carries an *attribute docstring*: a string
literal on the line after the field. This module reads those with ``ast`` (Python keeps no
attribute docstrings at run time), and renders one table per section: field path, type,
default, allowed values and the docstring's first line. Allowed values come from the type
(``Literal`` options, ``bool``) and from the ``check(...)`` calls of the section's
``__post_init__`` that name the field, so the reference says what validation enforces.

    python -m megamoe.config_docs            # rewrite the table in docs/configuration.md
    python -m megamoe.config_docs --check    # exit 1 when docs/configuration.md is out of date
    python pretrain/pretrain_moe.py --help-config   # the same reference as text

Trap: a field without a docstring is an error (``tests/test_config_docs.py``), not a blank cell.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED: python -m megamoe.config_docs -->"
END = "<!-- END GENERATED -->"
REGENERATE = ".venv/bin/python -m megamoe.config_docs"


@dataclasses.dataclass
class FieldDoc:
    path: str  # dotted path from the root, e.g. "moe.router.top_k"
    type: str
    default: str
    allowed: str
    doc: str  # the whole docstring ("" when missing)

    @property
    def summary(self) -> str:
        """The docstring's first paragraph on one line."""
        return " ".join(self.doc.strip().split("\n\n")[0].split())


def _class_ast(cls: type) -> ast.ClassDef:
    src = textwrap.dedent(inspect.getsource(cls))
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.ClassDef), cls
    return node


def attribute_docstrings(cls: type) -> dict[str, str]:
    """{field name: docstring} for the string literals that directly follow an annotated field."""
    body = _class_ast(cls).body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _message(node: ast.AST) -> str | None:
    """A ``check`` message as text: constants as is, f-string parts ``{self.x}`` as ``x``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant):
                parts.append(str(v.value))
            else:  # FormattedValue
                expr = ast.unparse(v.value).replace("self.", "")
                parts.append(expr)
        text = "".join(parts)
        return re.sub(r"\b(\w+)=\1\b", r"\1", text)  # "hidden_size=hidden_size" -> "hidden_size"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _message(node.left), _message(node.right)
        return left + right if left is not None and right is not None else None
    return None


def check_messages(cls: type) -> dict[str, list[str]]:
    """{field name: messages of the ``check(cond, "field", value, message)`` calls naming it}
    in ``cls.__post_init__`` (loops over field-name tuples included)."""
    out: dict[str, list[str]] = {}
    post = next((n for n in _class_ast(cls).body
                 if isinstance(n, ast.FunctionDef) and n.name == "__post_init__"), None)
    if post is None:
        return out
    loop_names: dict[str, list[str]] = {}
    for node in ast.walk(post):
        if (isinstance(node, ast.For) and isinstance(node.target, ast.Name)
                and isinstance(node.iter, (ast.Tuple, ast.List))):
            loop_names[node.target.id] = [e.value for e in node.iter.elts
                                          if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    for node in ast.walk(post):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "check"
                and len(node.args) >= 4):
            continue
        target, msg = node.args[1], _message(node.args[3])
        if msg is None:
            continue
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            names = [target.value]
        elif isinstance(target, ast.Name):
            names = loop_names.get(target.id, [])
        else:
            names = []
        for name in names:
            if msg not in out.setdefault(name, []):
                out[name].append(msg)
    return out


def _type_text(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        kinds = {type(a).__name__ for a in get_args(tp)}
        return kinds.pop() if len(kinds) == 1 else "literal"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in get_args(tp))
    if origin in (list, tuple):
        (item, *_) = get_args(tp) or (Any,)
        return f"list of {_type_text(item)}"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _value_text(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value_text(x) for x in v) + "]"
    return str(v)


def _allowed(tp: Any, messages: list[str]) -> str:
    parts = []
    literals = [a for a in _flatten(tp) if a is not None]
    if get_origin(tp) is Literal or any(get_origin(a) is Literal for a in get_args(tp)):
        parts.append(", ".join(_value_text(a) for a in literals))
    # a check that restates the Literal ("must be 'a' or 'b'") adds nothing
    parts += [m for m in messages if not (literals and all(repr(a) in m for a in literals))]
    return "; ".join(parts)


def _flatten(tp: Any) -> list:
    if get_origin(tp) is Literal:
        return list(get_args(tp))
    return [a for arg in get_args(tp) if get_origin(arg) is Literal for a in get_args(arg)]


def section_fields(cls: type, prefix: str = "") -> list[tuple[str, type, list[FieldDoc]]]:
    """[(section path, class, its fields)] for ``cls`` and every nested section, depth first."""
    hints = typing.get_type_hints(cls)
    docs = attribute_docstrings(cls)
    msgs = check_messages(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}.{f.name}" if prefix else f.name
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            rows.append(FieldDoc(path, "section", "", "", docs.get(f.name, "")))
            nested += section_fields(tp, path)
        else:
            rows.append(FieldDoc(path, _type_text(tp), "required" if default is dataclasses.MISSING
                                 else _value_text(default), _allowed(tp, msgs.get(f.name, [])),
                                 docs.get(f.name, "")))
    return [(prefix, cls, rows)] + nested


def reference_sections() -> list[tuple[str, str, type, list[FieldDoc]]]:
    """[(title, section path, class, fields)]: the run config's sections, then the adapters'."""
    from megamoe.finetune.config import AdapterConfig
    from megamoe.run_config import RunConfig

    out = [(path or "run", path, cls, rows) for path, cls, rows in section_fields(RunConfig)]
    out += [("fine-tuning adapters (tools/finetune.py --arms METHOD:FIELD=VALUE)", "", AdapterConfig,
             section_fields(AdapterConfig)[0][2])]
    return out


def undocumented() -> list[str]:
    """Fields without an attribute docstring, as ``Class.field`` (the test wants none)."""
    missing = []
    for _, _, cls, rows in reference_sections():
        for r in rows:
            if not r.doc.strip():
                src = Path(inspect.getsourcefile(cls)).resolve()
                where = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
                missing.append(f"{cls.__qualname__}.{r.path.rsplit('.', 1)[-1]} ({where})")
    return missing


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def render_markdown() -> str:
    lines = []
    for title, path, cls, rows in reference_sections():
        lines += [f"### `{title}`" if path or title == "run" else f"### {title}", ""]
        intro = " ".join((inspect.getdoc(cls) or "").split("\n\n")[0].split())
        if intro and not intro.startswith(cls.__name__ + "("):
            lines += [f"{intro} (`{cls.__module__}.{cls.__qualname__}`)", ""]
        else:
            lines += [f"`{cls.__module__}.{cls.__qualname__}`", ""]
        lines += ["| field | type | default | allowed | meaning |", "|---|---|---|---|---|"]
        for r in rows:
            name = r.path if path else r.path
            if r.type == "section":
                lines.append(f"| `{name}` | section | | | {_cell(r.summary)} ([its fields](#{_anchor(r.path)})) |")
            else:
                lines.append(f"| `{name}` | {r.type} | `{_cell(r.default)}` | {_cell(r.allowed)} | {_cell(r.summary)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def render_text() -> str:
    """The reference for a terminal (``pretrain_moe.py --help-config``)."""
    out = ["megamoe run configuration: YAML sections, overridable as section.field=value", ""]
    for title, path, cls, rows in reference_sections():
        out.append(f"[{title}]")
        for r in rows:
            if r.type == "section":
                continue
            head = f"  {r.path} ({r.type}, default {r.default})"
            out.append(head)
            out.append(textwrap.fill(r.summary, width=100, initial_indent="      ", subsequent_indent="      "))
            if r.allowed:
                out.append(textwrap.fill("allowed: " + r.allowed, width=100, initial_indent="      ",
                                         subsequent_indent="        "))
        out.append("")
    return "\n".join(out)


def updated_document(text: str) -> str:
    """``text`` with the part between the markers replaced by the generated reference."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOC}: markers {BEGIN!r} / {END!r} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{render_markdown()}\n{END}{tail}"


class HelpConfigAction(argparse.Action):
    """``add_argument("--help-config", action=HelpConfigAction)``: print the reference, exit 0."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(render_text())
        parser.exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 if the document is out of date; write nothing")
    p.add_argument("--doc", default=str(DOC), help="the document holding the markers (default docs/configuration.md)")
    p.add_argument("--text", action="store_true", help="print the reference as text and exit")
    args = p.parse_args(argv)
    if args.text:
        print(render_text())
        return 0
    missing = undocumented()
    if missing:
        print("error: config fields without a docstring (add a string literal on the line after each):\n  "
              + "\n  ".join(missing), file=sys.stderr)
        return 2
    doc = Path(args.doc)
    text = doc.read_text(encoding="utf-8")
    new = updated_document(text)
    if args.check:
        if new != text:
            print(f"{doc} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if new != text:
        doc.write_text(new, encoding="utf-8")
        print(f"wrote {doc}")
    else:
        print(f"{doc} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
