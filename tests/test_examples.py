"""Smoke tests of examples/ with tiny settings: each asserts that the example learns something.
The full runs (and their measured results) are in the examples' docstrings and docs/examples.md."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_dqn_cartpole_beats_a_random_policy(tmp_path):
    pytest.importorskip("gymnasium")
    pytest.importorskip("yaml")
    ex = load("dqn_cartpole")
    r = ex.train(seed=0, steps=4000, warmup=500, eps_decay=2000, progress=False, plot=str(tmp_path / "curve.png"))
    greedy = ex.evaluate(r["q"], episodes=5, seed=123)
    random_policy = ex.evaluate(None, episodes=20, seed=123)
    assert greedy > 2 * random_policy, (greedy, random_policy)
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_distill_lm_loss_falls(tmp_path):
    ex = load("distill_lm")
    r = ex.run(vocab=128, steps=40, batch=128, teacher_steps=80, quiet=True, plot=str(tmp_path / "distill.png"))
    for name, curve in r["curves"].items():
        assert sum(curve[-5:]) < sum(curve[:5]), (name, curve[:5], curve[-5:])
    assert r["memory"]["fused_linear"] < r["memory"]["materialised"]
    assert (tmp_path / "distill.png").stat().st_size > 0


def test_sinkhorn_clouds_cost_drops(tmp_path):
    ex = load("sinkhorn_clouds")
    r = ex.flow(points=120, steps=6, quiet=True, plot=str(tmp_path / "clouds.png"))
    assert r["costs"][-1] < 0.5 * r["costs"][0], r["costs"]
    assert (tmp_path / "clouds.png").stat().st_size > 0


def test_grpo_digits_reward_rises(tmp_path):
    pytest.importorskip("tqdm")
    ex = load("grpo_digits")
    r = ex.train(steps=120, length=3, progress=False, plot=str(tmp_path / "grpo.png"))
    first, last = sum(r["curve"][:10]) / 10, sum(r["curve"][-20:]) / 20
    assert last > first + 0.1, (first, last)
    assert (tmp_path / "grpo.png").stat().st_size > 0


def test_tp_distill_under_torchrun_prints_the_one_process_losses():
    """The vocabulary-parallel example under torchrun (two gloo ranks, and three with uneven
    shards) prints the losses of one process holding the whole head, and they fall."""
    import subprocess

    if not pytest.importorskip("torch.distributed").is_available():
        pytest.skip("torch.distributed is not available in this build")
    script, args = str(EXAMPLES / "tp_distill.py"), ["--steps", "21", "--vocab", "301"]

    def losses(*launcher):
        res = subprocess.run([sys.executable, *launcher, script, *args], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
        return [line.split()[-1] for line in res.stdout.splitlines() if line.startswith("step")]

    one = losses()
    assert len(one) == 3 and float(one[-1]) < 0.8 * float(one[0]), one  # steps 0, 10 and 20
    for n in (2, 3):
        assert losses("-m", "torch.distributed.run", "--nproc-per-node", str(n)) == one


@pytest.mark.parametrize("name", ["dqn_cartpole", "distill_lm", "sinkhorn_clouds", "grpo_digits", "tp_distill"])
def test_example_help_shows_every_option_with_its_default(name):
    import subprocess

    res = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--help"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    options = [line for line in res.stdout.splitlines() if line.strip().startswith("--")]
    assert options and "--threads" in res.stdout
    assert res.stdout.count("(default:") == len(options), res.stdout
