"""MkDocs hooks: the strict build fails when the public API is not fully documented.

- every name in ``fusedloss.__all__`` has a docstring of its own and appears in ``api.md``: the
  families' names in the sections generated from the family table (at the ``<!-- families -->``
  line), the rest written there by hand;
- every field of a public config dataclass has an attribute docstring (the string right after
  the field, which mkdocstrings renders).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
from pathlib import Path


def _field_docs(cls) -> set[str]:
    """Names of the dataclass fields of ``cls`` (and its bases) followed by a string literal."""
    names = set()
    for klass in cls.__mro__:
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                names.add(node.target.id)
    return names


FAMILIES_MARKER = "<!-- families -->"


def family_sections() -> str:
    """The API page's family sections, from the family table: one ``##`` section per run of
    families with one ``section`` title, each export under its defining module's path (which
    mkdocstrings resolves statically)."""
    from fusedloss.losses import FAMILIES

    out, title = [], None
    for family in FAMILIES:
        if family.section != title:
            title = family.section
            out.append(f"\n## {title}\n")
        for name in family.exports:
            out.append(f"::: fusedloss.losses.{family.name}.{name}")
    return "\n".join(out) + "\n"


def anchors() -> dict[str, str]:
    """``{public name: its anchor on the API page}``."""
    from fusedloss.losses import FAMILIES

    out = {name: f"fusedloss.losses.{f.name}.{name}" for f in FAMILIES for name in f.exports}
    api = (Path(__file__).parent / "api.md").read_text(encoding="utf-8")
    out.update({name: f"fusedloss.{name}" for name in re.findall(r"^::: fusedloss\.(\w+)$", api, flags=re.M)})
    return out


def problems(docs_dir: Path) -> list[str]:
    import fusedloss

    api = (docs_dir / "api.md").read_text(encoding="utf-8")
    if FAMILIES_MARKER not in api:
        return [f"docs/api.md has no {FAMILIES_MARKER} line, where the family sections go"]
    api = api.replace(FAMILIES_MARKER, family_sections())
    listed = set(re.findall(r"^::: fusedloss\.(?:losses\.\w+\.)?(\w+)$", api, flags=re.M))
    out = []
    for name in fusedloss.__all__:
        obj = getattr(fusedloss, name)
        own = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
        if not (own or "").strip():
            out.append(f"fusedloss.{name} has no docstring")
        if name not in listed:
            out.append(f"fusedloss.{name} is missing from docs/api.md")
        if isinstance(obj, type) and dataclasses.is_dataclass(obj):
            documented = _field_docs(obj)
            for f in dataclasses.fields(obj):
                if f.name not in documented:
                    out.append(f"fusedloss.{name}.{f.name} (a config field) has no docstring")
    for name in sorted(listed - set(fusedloss.__all__)):
        out.append(f"docs/api.md documents fusedloss.{name}, which is not in fusedloss.__all__")
    return out


def on_pre_build(config, **kwargs):
    from mkdocs.exceptions import PluginError

    found = problems(Path(config["docs_dir"]))
    if found:
        raise PluginError("the public API is not fully documented:\n  " + "\n  ".join(found))


def on_page_markdown(markdown, page, config, files, **kwargs):
    """The API page's family sections come from the family table."""
    if page.file.src_uri == "api.md":
        return markdown.replace(FAMILIES_MARKER, family_sections())
    return markdown


def on_files(files, config, **kwargs):
    """Publish BENCHMARKS.md (the repository's figures) as the Benchmarks page, with its plots."""
    from mkdocs.structure.files import File

    root = Path(config["docs_dir"]).resolve().parent
    text = (root / "BENCHMARKS.md").read_text(encoding="utf-8")
    text = re.sub(r"\]\(bench/plots/([\w.-]+\.png)\)", r"](plots/\1)", text)
    intro = ("This page is the repository's `BENCHMARKS.md`, written by `bench/report.py` from the "
             "pytest-benchmark JSON of a run (`make gpu-report`).\n\n")
    title, _, rest = text.partition("\n")
    files.append(File.generated(config, "benchmarks.md", content=f"{title}\n\n{intro}{rest}"))
    for png in sorted((root / "bench" / "plots").glob("*.png")):
        files.append(File.generated(config, f"plots/{png.name}", abs_src_path=str(png)))
    return files


_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr):<code>~?([\w.]+)</code>")


def on_page_content(html, page, config, files, **kwargs):
    """The docstrings' Sphinx roles (``:func:`dqn_loss```) as links into the API reference."""
    where = anchors()
    up = "../" * page.url.count("/")

    def link(m):
        name = m.group(1).split(".")[-1]
        code = f"<code>{m.group(1).removeprefix('fusedloss.')}</code>"
        return f'<a href="{up}api/#{where[name]}">{code}</a>' if name in where else code

    return _ROLE.sub(link, html)
