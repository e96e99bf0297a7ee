"""A fresh tree builds an sdist and a wheel (PEP 517, the pyproject's setuptools backend, no network),
the wheel holds the package and its license, and the sdist's test tree collects and runs."""

import email
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILT = (".git", ".venv", "site", "build", "dist", "*.egg-info", "__pycache__", ".whl", ".hypothesis",
         ".pytest_cache", ".benchmarks", "gpu-out")


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    pytest.importorskip("build")
    src = tmp_path_factory.mktemp("src") / "fusedloss"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*BUILT))
    out = src.parent / "dist"
    res = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (sdist,), (wheel,) = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    return sdist, wheel


def test_wheel_holds_the_package_and_its_metadata(dists):
    _, wheel = dists
    names = zipfile.ZipFile(wheel).namelist()
    assert "fusedloss/_families.py" in names and "fusedloss/kernels/dqn.py" in names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    info = next(n for n in names if n.endswith(".dist-info/METADATA"))
    meta = email.message_from_bytes(zipfile.ZipFile(wheel).read(info))
    assert meta["License-Expression"] == "MIT" or meta["License"] == "MIT"
    assert meta["Author"] and any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)
    requires = meta.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].strip() for r in core) == ["numpy", "torch"]
    assert any("geomloss" in r and 'extra == "sinkhorn"' in r for r in requires)


def test_sdist_test_tree_runs(dists, tmp_path):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    for needed in ("conftest.py", "pyproject.toml", "LICENSE", "tests/compile_check.py", "bench/_common.py",
                   "docs/hooks.py"):
        assert (tree / needed).exists(), needed
    env = {**__import__("os").environ, "PYTHONPATH": str(tree)}
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests", "bench"],
                             cwd=tree, capture_output=True, text=True, env=env)
    assert collect.returncode == 0, collect.stdout[-3000:] + collect.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_docs.py",
                          "tests/test_family_table.py::test_everything_comes_from_the_table"],
                         cwd=tree, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
