"""Docs and code cite only files inside the repository, and every such citation resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("dpzo_engine", "bench", "tests", "kernels", "csrc", "examples", "docs")
SUFFIXES = {".py", ".cpp", ".h", ".md", ".cu"}
MARKDOWN = ["README.md", "bench/README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]


def source_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "setup.py", ROOT / "Makefile"]
    for d in SOURCE_DIRS:
        files += [p for p in (ROOT / d).rglob("*") if p.suffix in SUFFIXES and p.is_file()]
    return [p for p in files if p.exists() and p != Path(__file__).resolve()]


def test_nothing_cites_documents_outside_the_repository():
    outside = re.compile(
        r"\.\./shared|shared/DESIGN|DESIGN section|/work/|\b(assets|algorithms|engineering|anchors)\.md"
    )  # the shared notes are not in the repository: docs/ holds what the code cites
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in source_files()
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert not hits, hits


def test_design_section_citations_exist():
    design = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    sections = {int(n) for n in re.findall(r"^## (\d+)\.", design, flags=re.M)}
    cited = re.compile(r"docs/design\.md,? sections? (\d+)(?:(?:–| and |/|, )(\d+))?")
    missing = []
    for p in source_files():
        for m in cited.finditer(p.read_text(encoding="utf-8")):
            missing += [f"{p.relative_to(ROOT)}: section {n}" for n in m.groups() if n and int(n) not in sections]
    assert not missing, missing


@pytest.mark.parametrize("doc", [d for d in MARKDOWN if (ROOT / d).exists()])
def test_relative_links_resolve(doc):
    path = ROOT / doc
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    broken = [
        link
        for link in links
        if not re.match(r"[a-z]+://|#|mailto:", link) and not (path.parent / link.split("#")[0]).exists()
    ]
    assert not broken, broken


@pytest.mark.parametrize("doc", [d for d in MARKDOWN if (ROOT / d).exists()])
def test_repository_paths_named_in_docs_exist(doc):
    text = (ROOT / doc).read_text(encoding="utf-8")
    named = re.findall(r"`((?:dpzo_engine|bench|tests|kernels|csrc|examples|docs)/[^`<>*{}\s]*)`", text)
    missing = [p for p in named if not (ROOT / p.split("::")[0]).exists()]
    assert not missing, missing
