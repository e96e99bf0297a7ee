"""MkDocs hooks: the strict build fails when the public API is not fully documented.

- every name in ``fusedloss.__all__`` has a docstring of its own and appears in ``api.md``;
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


def problems(docs_dir: Path) -> list[str]:
    import fusedloss

    api = (docs_dir / "api.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^::: fusedloss\.(\w+)", api, flags=re.M))
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
    import fusedloss

    public = set(fusedloss.__all__)
    up = "../" * page.url.count("/")

    def link(m):
        name = m.group(1).split(".")[-1]
        code = f"<code>{m.group(1).removeprefix('fusedloss.')}</code>"
        return f'<a href="{up}api/#fusedloss.{name}">{code}</a>' if name in public else code

    return _ROLE.sub(link, html)
