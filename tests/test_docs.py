"""The documentation's completeness rule, checked without building the site (``make docs`` builds
it strictly and applies the same rule): every public name has a docstring and an API entry, and
every config field an attribute docstring."""

import importlib.util
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_public_api_is_documented():
    assert _hooks().problems(DOCS) == []


def test_field_docstrings_are_found():
    import dataclasses

    @dataclasses.dataclass
    class Config:
        """A config with one documented field and one without."""

        documented: int = 1
        """It has a docstring."""
        bare: int = 2

    assert _hooks()._field_docs(Config) == {"documented"}


def test_every_nav_page_exists():
    import re

    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (DOCS.parent / "mkdocs.yml").read_text(), flags=re.M)
    generated = {"benchmarks.md"}
    missing = [p for p in nav if p not in generated and not (DOCS / p).exists()]
    assert nav and not missing, missing
