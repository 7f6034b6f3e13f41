"""The README is the front door: every CLI command is in its command table, every relative link
in it, the docs pages and the changelog leads somewhere, and it stays short."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from sae_transfer.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED_FILES = [README, ROOT / "CHANGELOG.md", *DOCS]
MAX_README_LINES = 260

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+\1")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)


def _prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line outside fenced and indented code blocks."""
    lines, in_fence = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence and not line.startswith("    "):
            lines.append((number, line))
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text kept, lower case, punctuation dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    """Every heading anchor of a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    repeats: dict[str, int] = {}
    anchors = set()
    for _, line in _prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            count = repeats.get(slug, 0)
            anchors.add(f"{slug}-{count}" if count else slug)
            repeats[slug] = count + 1
    return anchors


def _relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every relative link of a Markdown file (not in code)."""
    links = []
    for number, line in _prose_lines(path):
        for match in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = match.group(1)
            if not _EXTERNAL.match(target):
                links.append((number, target))
    return links


def _registered_commands() -> set[tuple[str, ...]]:
    """Every command path the typer app serves (groups walked recursively), e.g. ("diff",)."""
    found: set[tuple[str, ...]] = set()

    def walk(command, prefix: tuple[str, ...]) -> None:
        subcommands = getattr(command, "commands", None)  # a group (typer may vendor its own click)
        if subcommands is not None:
            for name, sub in subcommands.items():
                if not getattr(sub, "hidden", False):
                    walk(sub, prefix + (name,))
        elif prefix:
            found.add(prefix)

    walk(typer.main.get_command(app), ())
    return found


def _section(path: Path, title: str) -> list[str]:
    """The lines of the `## title` section of a Markdown file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip() == f"## {title}"]
    assert starts, f"{path.name} has no '## {title}' section"
    body = []
    for line in lines[starts[0] + 1:]:
        if line.startswith("## "):
            break
        body.append(line)
    return body


def _command_table_rows() -> list[tuple[str, ...]]:
    """The command words of each row of the README's command table: `sae-transfer diff --sae S`
    gives ("diff",); words end at the first option, placeholder or argument."""
    rows = []
    for line in _section(README, "Command line"):
        if not line.startswith("|"):
            continue
        first_cell = re.split(r"(?<!\\)\|", line.strip().strip("|"))[0]
        match = re.search(r"`sae-transfer ([^`]*)`", first_cell)
        if not match:
            continue
        words = []
        for word in match.group(1).split():
            if not re.fullmatch(r"[a-z][a-z0-9-]*", word):
                break
            words.append(word)
        rows.append(tuple(words))
    return rows


def test_the_cli_has_commands_to_check():
    commands = _registered_commands()
    assert {("demo",), ("run",), ("sql",), ("diff",)} <= commands, f"unexpected command walk: {sorted(commands)}"


def test_every_cli_command_is_in_the_readme_command_table():
    rows = _command_table_rows()
    missing = sorted(
        " ".join(command)
        for command in _registered_commands()
        if not any(row[: len(command)] == command for row in rows)
    )
    assert not missing, (
        f"commands registered on the sae-transfer CLI but missing from README.md's "
        f"'## Command line' table: {', '.join(missing)} (add a row `sae-transfer <command> ...` | what it does)"
    )


def test_every_row_of_the_command_table_is_a_real_command():
    commands = _registered_commands()
    stale = sorted(
        " ".join(row) or "(no command name)"
        for row in _command_table_rows()
        if not any(row[: len(command)] == command for command in commands)
    )
    assert not stale, f"README.md's command table lists commands the CLI does not have: {', '.join(stale)}"


@pytest.mark.parametrize("path", LINKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(path):
    assert path.exists(), f"{path.relative_to(ROOT)} does not exist"
    broken = []
    for number, target in _relative_links(path):
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT)}:{number}: ({target})"
        if not resolved.exists():
            broken.append(f"{where} -> no file {file_part}")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{where} -> {resolved.relative_to(ROOT)} has no heading with anchor #{anchor}")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_readme_links_every_docs_page():
    targets = {(README.parent / t.partition("#")[0]).resolve() for _, t in _relative_links(README)}
    unlinked = [str(page.relative_to(ROOT)) for page in DOCS if page.resolve() not in targets]
    assert not unlinked, f"docs pages the README does not link: {', '.join(unlinked)}"


def test_the_readme_is_short():
    n_lines = len(README.read_text(encoding="utf-8").splitlines())
    assert n_lines <= MAX_README_LINES, (
        f"README.md has {n_lines} lines, more than {MAX_README_LINES}: move detail into a docs/ page and link it"
    )
