"""Every Python block of README.md and docs/ runs as written: the blocks of a page run in order, in
one namespace, in a fresh directory, as a reader would paste them. A ```yaml block whose first line
is ``# <name>.yaml`` is written to that file first, so a later block can open it. A block preceded by
the line ``<!-- not run -->`` is an illustration and is skipped (the docs say why beside it)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"(?P<skip><!-- not run -->\n)?```(?P<lang>\w+)\n(?P<body>.*?)```", re.S)


def _blocks(page: Path):
    return [(m.group("lang"), m.group("body"), bool(m.group("skip")))
            for m in BLOCK.finditer(page.read_text(encoding="utf-8"))]


def test_pages_have_blocks():
    """The extraction finds the blocks it should (a change of fence style would skip them silently)."""
    assert sum(lang == "python" for page in PAGES for lang, _, _ in _blocks(page)) >= 10


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang == "python" for lang, _, _ in _blocks(p))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_page_blocks_run(page, tmp_path, monkeypatch):
    pytest.importorskip("yaml")
    monkeypatch.chdir(tmp_path)
    import fusedloss as fl

    # Each page registers its own examples ("my_loss") into a registry of its own.
    monkeypatch.setattr(fl.LOSS_BUILDER_REGISTRY, "_entries", dict(fl.LOSS_BUILDER_REGISTRY._entries))
    namespace = {"__name__": "__doc_snippet__"}
    for i, (lang, body, skip) in enumerate(_blocks(page)):
        if skip:
            continue
        if lang == "yaml":
            first = body.splitlines()[0] if body.strip() else ""
            m = re.fullmatch(r"#\s*([\w.-]+\.ya?ml)\s*", first)
            if m:
                (tmp_path / m.group(1)).write_text(body, encoding="utf-8")
        elif lang == "python":
            try:
                exec(compile(body, f"{page.name} block {i}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page.relative_to(ROOT)}, python block {i} fails: {type(exc).__name__}: "
                                     f"{exc}\n{body}") from exc


def test_nothing_points_outside_the_repository():
    """What a user or contributor needs lives in the repository: no path above its root."""
    files = [*PAGES, ROOT / "Makefile", *sorted((ROOT / "bench").glob("*.sh")), *sorted((ROOT / "bench").glob("*.py"))]
    bad = [str(f.relative_to(ROOT)) for f in files if re.search(r"\.\./shared|\.\./\.library", f.read_text())]
    assert not bad, bad
