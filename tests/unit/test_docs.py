"""The documentation cannot drift: the configuration reference against ``config.py`` and
``config.example.toml``, every relative link and anchor in README.md and docs/, the README's
length, and the architecture page against ``ls pgguard/``.

``config.py``'s frozen dataclasses are the source of truth: each section of ``Config`` (a
dataclass, an optional one such as ``[cluster]``, or a table of named ones such as
``[roles.NAME]``) must have a ``## `[section]` `` heading in docs/configuration.md with a
``| key | default | meaning |`` table holding one row per field; the default cell starts with
the field's default as a TOML value in backticks (a field whose default is None, i.e. unset,
says in words what applies instead). config.example.toml must mention every key, set or
commented out, with the same default.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from pgguard import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "configuration.md"
EXAMPLE = ROOT / "config.example.toml"
ARCHITECTURE = DOCS / "architecture.md"
README_MAX_LINES = 400


# ------------------------------------------------------------------ the schema


def _sections() -> dict[str, type]:
    """Every section of ``Config`` by its name in the file (``roles.NAME`` for named tables)."""
    out: dict[str, type] = {}
    hints = typing.get_type_hints(config_mod.Config)
    for f in dataclasses.fields(config_mod.Config):
        hint = hints[f.name]
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            out[f.name] = typing.cast(type, hint)
        elif typing.get_origin(hint) in (Mapping, dict):
            out[f"{f.name}.NAME"] = typing.get_args(hint)[1]
    return out


def _defaults(cls: type, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Field -> default, as a fresh object has it with no PGGUARD_* variable set."""
    import os

    for var in [v for v in os.environ if v.startswith("PGGUARD_")]:
        monkeypatch.delenv(var)
    obj = cls()
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)}


def _toml_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _same(written: Any, default: Any) -> bool:
    """A written TOML value equals a default (a list key also takes one string, as config.py does)."""
    if isinstance(default, tuple) and isinstance(written, str):
        written = [written]
    return type(written) is not bool and written == _toml_value(default) or written is default

def _toml_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_text(v) for v in value) + "]"
    return repr(value)


# ------------------------------------------------------- docs/configuration.md


def _reference() -> dict[str, dict[str, tuple[str, str]]]:
    """Section -> key -> (default cell, meaning cell), from the tables under ## `[section]`."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    section: str | None = None
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^##\s+`\[([\w.]+)\]`\s*$", line)
        if heading:
            section = heading[1]
            out.setdefault(section, {})
            continue
        if line.startswith("## "):
            section = None
            continue
        row = re.match(r"^\|\s*`(\w+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if section is not None and row:
            out[section][row[1]] = (row[2].strip(), row[3].strip())
    return out


def _cell_default(cell: str) -> tuple[bool, Any]:
    """(True, value) when the cell starts with a backticked TOML value, else (False, None)."""
    m = re.match(r"^`([^`]+)`", cell)
    if not m:
        return False, None
    try:
        return True, tomllib.loads(f"v = {m[1]}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


def test_configuration_reference_has_every_key_default_and_meaning(monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _reference()
    problems: list[str] = []
    for section, cls in _sections().items():
        where = f"docs/configuration.md, ## `[{section}]`"
        rows = reference.get(section)
        if rows is None:
            problems.append(f"{where}: section missing (add the heading and a | key | default | meaning | table)")
            continue
        defaults = _defaults(cls, monkeypatch)
        for key, default in defaults.items():
            name = f"[{section}] {key}"
            if key not in rows:
                shown = "unset: ..." if default is None else f"`{_toml_text(default)}`"
                problems.append(f"{where}: no row for {name} (add | `{key}` | {shown} | what it does |)")
                continue
            cell, meaning = rows[key]
            parsed, value = _cell_default(cell)
            if default is None:
                if not cell or parsed:
                    problems.append(f"{where}: {name} defaults to unset; say what applies instead (got {cell!r})")
            elif not parsed:
                problems.append(f"{where}: {name} default cell must start with `{_toml_text(default)}` (got {cell!r})")
            elif not _same(value, default):
                problems.append(f"{where}: {name} default is {_toml_text(default)} in config.py, {cell!r} here")
            if len(meaning) < 5:
                problems.append(f"{where}: {name} has no meaning (got {meaning!r})")
        for key in sorted(set(rows) - set(defaults)):
            problems.append(f"{where}: [{section}] {key} is documented but not in config.py")
    for section in sorted(set(reference) - set(_sections())):
        problems.append(f"docs/configuration.md: section [{section}] is not in config.py")
    assert not problems, "the configuration reference drifted:\n" + "\n".join(problems)


# ---------------------------------------------------------- config.example.toml


def _example() -> dict[str, dict[str, tuple[Any, bool]]]:
    """Section -> key -> (value, set): every assignment, set or commented out (``# key = v``).

    Named tables (``[roles.app]``, commented or not) count as ``roles.NAME``."""
    out: dict[str, dict[str, tuple[Any, bool]]] = {}
    section = ""
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        # A named table's name may be quoted: [addresses."10.1.2.0/24"].
        header = re.match(r'^(#\s?)?\[(\w+)(\.(?:[\w-]+|"[^"]*"))?\]\s*(#.*)?$', line)
        if header:
            section = f"{header[2]}.NAME" if header[3] else header[2]
            out.setdefault(section, {})
            continue
        assignment = re.match(r"^(#\s?)?([a-z_]+)\s*=\s*(.+)$", line)
        if assignment and section:
            try:
                value = tomllib.loads(f"v = {assignment[3]}")["v"]
            except tomllib.TOMLDecodeError:
                continue  # prose that happens to contain " = "
            out[section][assignment[2]] = (value, assignment[1] is None)
    return out


def test_config_example_mentions_every_key_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    example = _example()
    problems: list[str] = []
    for section, cls in _sections().items():
        keys = example.get(section)
        if keys is None:
            problems.append(f"config.example.toml: no [{section}] section (commented out is fine)")
            continue
        defaults = _defaults(cls, monkeypatch)
        for key, default in defaults.items():
            if key not in keys:
                problems.append(f"config.example.toml: [{section}] {key} missing (add it with its default, or as `# {key} = ...`)")
                continue
            value, is_set = keys[key]
            if section.endswith(".NAME") or (default is None and not is_set):
                continue  # an example value for a key that is unset by default
            if not _same(value, default):
                problems.append(
                    f"config.example.toml: [{section}] {key} = {_toml_text(value) if not isinstance(value, list) else value}"
                    f" but config.py's default is {_toml_text(default)}"
                )
        for key in sorted(set(keys) - set(defaults)):
            problems.append(f"config.example.toml: [{section}] {key} is not a key in config.py")
    assert not problems, "config.example.toml and config.py disagree:\n" + "\n".join(problems)


def test_config_example_is_valid_as_it_stands() -> None:
    config_mod.load(EXAMPLE, env={})


# ------------------------------------------------------------- links, anchors


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        if not fence:
            yield line


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
    text = text.lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _prose(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m[1])
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors


def _links(path: Path) -> Iterator[str]:
    for line in _prose(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is not a link
        for m in re.finditer(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line):
            yield m[1]


def test_anchor_rules_match_github() -> None:
    assert github_anchor("Reload, drain, signals") == "reload-drain-signals"
    assert github_anchor("`[roles.NAME]`") == "rolesname"
    assert github_anchor("One `/metrics`") == "one-metrics"
    assert github_anchor("Leak diagnostics: idle sessions") == "leak-diagnostics-idle-sessions"


def test_every_relative_link_and_anchor_resolves() -> None:
    broken = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            dest = (page.parent / path_part).resolve() if path_part else page
            name = page.relative_to(ROOT)
            if ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{name}: {target} points outside the repository")
            elif not dest.exists():
                broken.append(f"{name}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{name}: {target}: no heading with anchor #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the reference belongs in docs/"
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for page in sorted(DOCS.glob("*.md")):  # the map names every page
        assert f"(docs/{page.name})" in text, f"README.md's map of docs/ does not link docs/{page.name}"


# ---------------------------------------------------------------- architecture


def _modules() -> list[str]:
    """Every module as the architecture page names it: ``x.py``, ``testing/x.py``, ``_relay.c``."""
    package = ROOT / "pgguard"
    names = [p.name for p in sorted(package.glob("*.py"))] + [p.name for p in sorted(package.glob("*.c"))]
    names += [f"testing/{p.name}" for p in sorted((package / "testing").glob("*.py"))]
    return names


def _layer_sections() -> dict[int, str]:
    """Layer number -> the text of docs/architecture.md under its ``## ... (layer N)`` heading."""
    out: dict[int, str] = {}
    current: int | None = None
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"^## .*\(layer (\d)\)", line)
        if heading:
            current = int(heading[1])
            out[current] = ""
        elif line.startswith("## "):
            current = None
        elif current is not None:
            out[current] += line + "\n"
    return out


def test_architecture_names_every_module_in_its_layer() -> None:
    from test_architecture import LAYERS

    sections = _layer_sections()
    problems = []
    for name in _modules():
        module = name.removesuffix(".py").replace("/", ".")
        if name.endswith(".c"):
            layer = LAYERS["relay"]
        elif module.endswith("__init__"):
            layer = LAYERS["testing" if "/" in name else "__init__"]
        else:
            layer = LAYERS[module]
        if f"`{name}`" not in sections.get(layer, ""):
            problems.append(f"docs/architecture.md: `{name}` is not named under the heading of layer {layer}")
    assert not problems, "\n".join(problems)


def test_architecture_speaks_only_of_this_repository() -> None:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    for outside in ("../", "shared/", "steering"):
        assert outside not in text, f"docs/architecture.md refers to {outside!r}, outside this repository"
