"""The family table is the one place a family is registered: everything that names the families
(exports, registry, dispatch, verify, compile check, API page) agrees with it, and the worked
example of docs/kernels.md, a new family added as written there, works end to end."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fusedloss as fl
from fusedloss import _dispatch
from fusedloss.losses import FAMILIES, FAMILY_MODULES

ROOT = Path(__file__).resolve().parents[1]


def test_everything_comes_from_the_table():
    exports = [name for f in FAMILIES for name in f.exports]
    assert len(exports) == len(set(exports))
    assert set(exports) <= set(fl.__all__)
    assert set(fl.__all__) - set(exports) == {"Backend", "explain_backend", "LazyMetrics", "LOSS_BUILDER_REGISTRY", "LossFactory",
                                               "build_loss"}
    assert [f.name for f in FAMILIES] == list(FAMILY_MODULES)
    keys = {k: v for f in FAMILIES for k, v in f.factories.items()}
    assert {k: fl.LOSS_BUILDER_REGISTRY.get(k) for k in keys} == keys
    assert _dispatch.kernel_families() == {f.kernel for f in FAMILIES if f.kernel}
    for f in FAMILIES:
        for key, factory in f.factories.items():
            assert isinstance(fl.build_loss({"type": key}), __import__("torch").nn.Module), key


def test_compile_check_reads_the_table():
    pytest.importorskip("triton")
    code = ("import sys; sys.path.insert(0, 'tests'); import compile_check as c; "
            "print(sorted(m.__name__.rsplit('.', 1)[1] for m in c.KERNEL_MODULES))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(sorted({f.kernel for f in FAMILIES if f.kernel}))


def _worked_example():
    text = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    section = text[text.index("### A worked example"):text.index("### Adding the fused kernel")]
    module = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    diff = re.search(r"```diff\n-(.*?)\n\+(.*?)\n```", section, flags=re.S)
    return module, diff.group(1), diff.group(2)


def test_worked_example_adds_a_family(tmp_path):
    """docs/kernels.md's new family, written as a copy of the package with that module and that one
    line: its loss, registry entry, verify cases and API section all appear, and nothing else changes."""
    module, old_line, new_line = _worked_example()
    pkg = tmp_path / "fusedloss"
    shutil.copytree(ROOT / "fusedloss", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "losses" / "bc_mse.py").write_text(module, encoding="utf-8")
    init = (pkg / "losses" / "__init__.py").read_text(encoding="utf-8")
    assert old_line in init, "the diff in docs/kernels.md no longer matches fusedloss/losses/__init__.py"
    (pkg / "losses" / "__init__.py").write_text(init.replace(old_line, new_line), encoding="utf-8")
    code = f"""
import importlib.util, sys, torch
import fusedloss as fl
assert fl.__file__.startswith({str(tmp_path)!r}), fl.__file__
pred, target = torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4)
mask = torch.tensor([[True, True, False], [True, False, False]])
loss = fl.bc_mse_loss(pred, target, mask)
want = ((pred - target).square() * mask[..., None]).sum() / (3 * 4)
assert torch.allclose(loss, want), (loss, want)
assert isinstance(fl.build_loss({{"type": "bc_mse"}}), fl.BcMseLoss)
try:
    fl.bc_mse_loss(pred, target, mask, fl.BcMseLossConfig(backend="triton"))
except NotImplementedError:
    pass
else:
    raise AssertionError("backend='triton' must raise for a family without a kernel")
spec = importlib.util.spec_from_file_location("hooks", {str(ROOT / "docs" / "hooks.py")!r})
hooks = importlib.util.module_from_spec(spec); spec.loader.exec_module(hooks)
assert "## Behaviour cloning" in hooks.family_sections()
assert "::: fusedloss.losses.bc_mse.bc_mse_loss" in hooks.family_sections()
problems = hooks.problems(__import__("pathlib").Path({str(ROOT / "docs")!r}))
assert problems == [], problems
from fusedloss.cli import verify
sys.exit(verify(["--device", "cpu", "--family", "bc_mse"]))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 2 checks passed" in res.stdout
