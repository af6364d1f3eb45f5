"""The docs cannot drift: docs/cli.md is what `docs/make_cli_reference.py` renders from `AugmentConfig` and the
CLI, it names exactly the flags the CLI's help prints, the README stays a five-minute read (at most 12,000
characters), and every relative link in README.md and docs/*.md points to a file of the repository."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from urllib.parse import unquote

import pytest
import typer
from typer.testing import CliRunner

from flows.cli import app

REPO = Path(__file__).resolve().parent.parent
CLI_MD = REPO / "docs" / "cli.md"
GENERATOR = REPO / "docs" / "make_cli_reference.py"
REGENERATE = "regenerate it with `python docs/make_cli_reference.py` (and commit docs/cli.md)"
README_LIMIT = 12_000

#: A long option as the help prints it (`--reach-refuse-share`, `--no-force`), not a bare `--`.
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
#: Inline Markdown links and images `[text](target)`, and reference definitions `[label]: target`.
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\S.*)?$", re.M)
HTML_LINK = re.compile(r"<(?:a|img)\s[^>]*?(?:href|src)=\"([^\"]+)\"", re.I)


def load_generator():
    spec = importlib.util.spec_from_file_location("make_cli_reference", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def help_texts() -> dict[str, str]:
    """`augment --help` and every sub-command's `--help`, unwrapped (one line per option)."""
    commands = [[], *([name] for name in typer.main.get_command(app).commands)]
    texts = {}
    for command in commands:
        result = CliRunner().invoke(app, [*command, "--help"], terminal_width=10_000, max_content_width=10_000)
        assert result.exit_code == 0, (command, result.output)
        texts[" ".join(["augment", *command])] = result.output
    return texts


def test_cli_reference_is_generated_from_the_config():
    text = load_generator().render()
    assert CLI_MD.read_text(encoding="utf-8") == text, f"docs/cli.md is stale: {REGENERATE}"


def test_cli_reference_has_every_flag_the_help_prints_and_no_other():
    documented = set(FLAG.findall(CLI_MD.read_text(encoding="utf-8")))
    printed: set[str] = set()
    for command, text in help_texts().items():
        flags = set(FLAG.findall(text))
        assert flags - documented == set(), f"`{command} --help` prints flags docs/cli.md lacks: {REGENERATE}"
        printed |= flags
    assert documented - printed == set(), "docs/cli.md names flags no `--help` of augment prints"
    assert {"--ref", "--n", "--out", "--strength", "--no-reach-check", "--shards-per-task"} <= documented


def test_readme_is_a_five_minute_read():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme) <= README_LIMIT, f"README.md has {len(readme):,} characters (at most {README_LIMIT:,})"
    assert "<!-- defaults:start -->" in readme and "<!-- defaults:end -->" in readme
    assert "make test" in readme  # the CI command (.ci/run runs `make test`)


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip().lower())
    text = "".join(c for c in text if c.isalnum() or c in " -")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)  # code blocks hold no links
    text = re.sub(r"`[^`\n]*`", "", text)  # nor do code spans
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text) + HTML_LINK.findall(text)


DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = unquote(target).partition("#")
        resolved = (doc.parent / file_part).resolve() if file_part else doc
        if not resolved.is_relative_to(REPO) or not resolved.exists():
            broken.append(f"{target}: no such file in the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert broken == [], f"{doc.relative_to(REPO)}: {broken}"
