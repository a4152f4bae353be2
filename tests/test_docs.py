"""The docs stay current: the generated reference matches the code, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

from optimizer_cli.report.reference import recipe_reference

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_reference_page_is_current() -> None:
    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == recipe_reference(), (
        "docs/reference.md is out of date: python -m optimizer_cli.report.reference > docs/reference.md"
    )


def test_reference_names_every_pass_option() -> None:
    from optimizer_cli.passes import PASS_REGISTRY
    from optimizer_cli.recipe import pass_options

    page = recipe_reference()
    for name in PASS_REGISTRY:
        section = page.split(f"### `{name}` (", 1)[1].split("\n### ", 1)[0]
        for option in pass_options(name):
            assert f"| `{option}` |" in section, (name, option)


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
    return [t for t in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in t]


def test_relative_links_resolve() -> None:
    broken = [
        f"{page.relative_to(ROOT)} -> {target}"
        for page in PAGES
        for target in _links(page)
        if not (page.parent / target).exists()
    ]
    assert not broken, broken


def test_link_check_catches_a_missing_page(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("see [x](missing.md) and [y](https://example.org/a.md)\n```\n[z](in-code.md)\n```\n")
    assert _links(page) == ["missing.md"]


def test_readme_is_short_and_links_the_docs() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    linked = {Path(t).name for t in _links(ROOT / "README.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages the README does not link: {sorted(pages - linked)}"
