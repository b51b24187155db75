"""Where every value of a recipe comes from: the source comments of a YAML config, as rows and Markdown tables.

A recipe states each value on its own line with its source in the line's comment::

    # source CFG: bytedance/ibot@da316d8 evaluation/semantic_segmentation/configs/upernet/vit_base_512_ade20k_160k.py
    optim:
      lr: 8.0e-5      # README:112 optimizer.lr=8e-5 (CFG:54's 7e-4 is overridden)

A comment-only line indented below a keyed line continues that line's source. ``# source NAME: TEXT`` lines
(anywhere at column 0) name the files the sources cite as ``NAME:line``. :func:`recipe_rows` reads a recipe into
``(key, value, source)`` rows (the values parsed by YAML, so they are the loaded values); :func:`markdown_table`
renders them, whole or as the differences from another recipe. ``finegrain config --config NAME --sources``
prints the table; docs/finetune.md and docs/ovd.md hold generated tables between ``<!-- recipe-table NAME
[--base BASE] [--values-only] -->`` and ``<!-- end recipe-table -->`` markers that :func:`update_doc` rewrites
and the tests compare (``python -m finegrain.recipe_sources FILE.md ...`` rewrites them in place).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from .config import resolve_config_path

LEGEND = re.compile(r"^# source (?P<name>[\w.+-]+): (?P<text>.+)$")
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[\w.-]+):(?P<rest>.*)$")
COMMENT_LINE = re.compile(r"^(?P<indent> *)#(?P<text>.*)$")
BLOCK = re.compile(r"<!-- recipe-table (?P<args>[^>]*?) -->\n.*?<!-- end recipe-table -->", re.DOTALL)


@dataclass
class Row:
    """One recipe value: dotted ``key``, its ``value`` as YAML writes it, and its ``source`` comment."""

    key: str
    value: str
    source: str


def _split_comment(text: str) -> tuple[str, str]:
    """``"value  # comment"`` -> ``("value", "comment")``; a ``#`` inside quotes is not a comment."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _show(value) -> str:
    """A loaded YAML value as one line of flow YAML (``[3, 5, 7, 11]``, ``0.0001``, ``null``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def legend(path: Path) -> dict[str, str]:
    """The ``# source NAME: TEXT`` lines of a recipe file: ``{NAME: TEXT}``."""
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = LEGEND.match(line)
        if match:
            found[match["name"]] = match["text"].strip()
    return found


def recipe_rows(name_or_path: str) -> list[Row]:
    """Every leaf value of a recipe file (a built-in name or a path) with its source comment, in file order.

    Flow values (``[..]``, ``{..}``) are one row; a mapping written in block style is a path to its keys."""
    text = resolve_config_path(name_or_path).read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    rows: list[Row] = []
    parents: list[tuple[int, str]] = []  # (indent, key) of the open block mappings
    last_indent = None
    for line in text.splitlines():
        keyed = KEY_LINE.match(line)
        if keyed is None:
            comment = COMMENT_LINE.match(line)
            if comment and rows and last_indent is not None and len(comment["indent"]) >= max(last_indent, 1):
                rows[-1].source = f"{rows[-1].source} {comment['text'].strip()}".strip()
            continue
        indent = len(keyed["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        value_text, source = _split_comment(keyed["rest"])
        dotted = ".".join([*(key for _, key in parents), keyed["key"]])
        if not value_text:  # a block mapping: its keys follow
            parents.append((indent, keyed["key"]))
            last_indent = None
            continue
        value = data
        for part in dotted.split("."):
            value = value[part]
        rows.append(Row(dotted, _show(value), source))
        last_indent = indent
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(name: str, base: str | None = None, values_only: bool = False) -> str:
    """The Markdown table of recipe ``name``: ``| key | value | source |``, then its legend. With ``base``,
    only the rows whose value, source (unless ``values_only``) or presence differs from recipe ``base`` (a key
    ``base`` has and ``name`` has not shows as ``(not set)``)."""
    rows = recipe_rows(name)
    names = legend(resolve_config_path(name))
    if base is not None:
        base_rows = {row.key: row for row in recipe_rows(base)}
        keys = {row.key for row in rows}
        same = (lambda row, other: other is not None and other.value == row.value) if values_only else (
            lambda row, other: other == row)
        rows = [row for row in rows if not same(row, base_rows.get(row.key))]
        rows += [Row(key, "(not set)", "") for key in base_rows if key not in keys]
    lines = ["| key | value | source |", "|---|---|---|"]
    lines += [f"| `{row.key}` | `{_cell(row.value)}` | {_cell(row.source)} |" for row in rows]
    if names:
        lines.append("")
        lines += [f"- {key}: {text}" for key, text in names.items()]
    return "\n".join(lines)


def _render_block(args: str) -> str:
    """A marker's arguments ``NAME [--base BASE] [--values-only]`` -> the block with its table."""
    parts = args.split()
    name, base = parts[0], (parts[parts.index("--base") + 1] if "--base" in parts else None)
    table = markdown_table(name, base, "--values-only" in parts)
    return f"<!-- recipe-table {args} -->\n{table}\n<!-- end recipe-table -->"


def rendered_doc(text: str) -> str:
    """``text`` with every recipe-table block regenerated from its recipe."""
    return BLOCK.sub(lambda match: _render_block(match["args"]), text)


def update_doc(path: Path) -> bool:
    """Rewrite the recipe-table blocks of a Markdown file; True when something changed."""
    text = path.read_text(encoding="utf-8")
    new = rendered_doc(text)
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    for doc in sys.argv[1:]:
        print(f"{doc}: {'updated' if update_doc(Path(doc)) else 'up to date'}")
