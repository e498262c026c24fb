"""The README is a front door that stays true: its Python snippet runs, its links and the docs pages' resolve.

The snippet under "The API in ten lines" is executed as it is written, from the repository root, with the model
name ``efficientnet_lite0`` resolved under ``$SCORECAM_MODELS`` (the session's exported bundle), so a renamed
argument, a changed default or a removed attribute breaks this test instead of a newcomer's first try.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAX_README_LINES = 250


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def _local_links(path: Path) -> list[str]:
    links = LINK.findall(path.read_text(encoding="utf-8"))
    return [u for u in links if not re.match(r"^[a-z][a-z0-9+.-]*:", u) and not u.startswith("#")]


def test_readme_is_a_front_door():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; the deep material belongs in docs/"
    for command in ("make demo", "make test"):
        assert command in "\n".join(lines[:30]), f"{command!r} must be on the README's first screen"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_every_local_link_resolves(page: Path):
    missing = []
    for url in _local_links(page):
        target = (page.parent / url.split("#", 1)[0]).resolve()
        if not target.exists():
            missing.append(url)
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_readme_links_every_docs_page():
    linked = {(README.parent / u.split("#", 1)[0]).resolve() for u in _local_links(README)}
    orphans = [p.name for p in DOCS.glob("*.md") if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link to: {orphans}"


def test_readme_api_snippet_runs(lite0_bundle, monkeypatch):
    blocks = _python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no Python snippet"
    snippet = blocks[0]
    assert "Explainer(" in snippet
    monkeypatch.setenv("SCORECAM_MODELS", str(lite0_bundle.parent))
    monkeypatch.chdir(ROOT)
    assert lite0_bundle.name == "efficientnet_lite0"
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(snippet, str(README) + ":snippet", "exec"), namespace)  # noqa: S102 - the README's own code
    assert os.environ["SCORECAM_MODELS"] == str(lite0_bundle.parent)
