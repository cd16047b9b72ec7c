"""The project's documentation links only to files inside the repository: a user who clones it has nothing
else (a link to a sibling checkout such as `../shared/` resolves nowhere for them)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# [text](target) in Markdown; external URLs (scheme:) and in-page anchors are not files.
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _markdown_files() -> list[Path]:
    skip = {".venv", ".git", ".state", "node_modules"}
    return [p for p in REPO.rglob("*.md") if not skip.intersection(p.relative_to(REPO).parts)]


def test_every_relative_markdown_link_resolves_inside_the_repository() -> None:
    files = _markdown_files()
    assert REPO / "README.md" in files and REPO / "docs" / "architecture.md" in files
    broken = []
    for md in files:
        for target in _LINK.findall(md.read_text()):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue
            resolved = (md.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO) or not resolved.exists():
                broken.append(f"{md.relative_to(REPO)} -> {target}")
    assert not broken, f"links that leave the repository or point nowhere: {broken}"


def test_readme_links_the_architecture_page() -> None:
    assert "](docs/architecture.md)" in (REPO / "README.md").read_text()
