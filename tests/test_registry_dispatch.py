import subprocess
import sys
import types

import pytest
import torch
import yaml
from torch import nn

import fusedloss as fl
from fusedloss import _dispatch
from fusedloss.registry import _registry

SEED_YAML_SINKHORN = """
train:
  loss:
    type: "sinkhorn_knopp"
    params:
      p: 1
      lam_state: 0.2       # weight for state distance relative to action distance
      blur: 0.004           # Sinkhorn entropic regularization
      debias: true
      backend: "tensorized" # or "online" for KeOps
      scaling: 0.95
"""
SEED_YAML_L2 = """
train:
  loss:
    type: "l2_loss"
    params:
      reduction: "mean"
"""

KEYS = ["dqn", "l2_loss", "linear_cross_entropy", "policy", "router_z", "sinkhorn_knopp", "sp", "sp_linear", "sp_topk", "sv", "switch_load_balancing",
        "vec_dqn"]


def test_registered_keys():
    assert sorted(fl.LOSS_BUILDER_REGISTRY) == KEYS
    assert all(k in fl.LOSS_BUILDER_REGISTRY for k in KEYS)
    assert "nope" not in fl.LOSS_BUILDER_REGISTRY


@pytest.mark.parametrize("text", [SEED_YAML_SINKHORN, SEED_YAML_L2], ids=["sinkhorn", "l2"])
def test_seed_yaml_examples_build(text):
    spec = yaml.safe_load(text)["train"]["loss"]
    module = fl.build_loss(spec)
    assert isinstance(module, nn.Module)
    attr_spec = types.SimpleNamespace(type=spec["type"], params=spec["params"])
    assert type(fl.build_loss(attr_spec)) is type(module)


def test_sinkhorn_yaml_module_runs():
    module = fl.build_loss(yaml.safe_load(SEED_YAML_SINKHORN)["train"]["loss"])
    pa, ta, ps, ts = torch.randn(8, 2), torch.randn(9, 2), torch.randn(8, 3), torch.randn(9, 3)
    assert torch.isfinite(module(pa, ta, ps, ts))


def test_modules_forward_like_functions():
    from fusedloss.testing import make_dqn_inputs, make_sp_inputs

    step, out = make_dqn_inputs(2, 4, 3, seed=0)
    loss, metrics = fl.build_loss({"type": "dqn", "params": {"gamma": 0.5, "backend": "torch"}})(step, out)
    want, _ = fl.dqn_loss(step, out, fl.DqnLossConfig(gamma=0.5, backend="torch"))
    assert torch.equal(loss, want)
    q, z = make_sp_inputs(3, 4, seed=0)
    loss, _ = fl.build_loss({"type": "sp", "params": {"loss_type": "js"}})({"q_star": q}, z)
    assert torch.equal(loss, fl.sp_loss({"q_star": q}, z, fl.SpLossConfig(loss_type="js"))[0])
    r = torch.randn(5, 3)
    assert torch.equal(fl.build_loss({"type": "router_z"})(r), fl.router_z_loss(r))
    assert torch.equal(fl.build_loss({"type": "switch_load_balancing", "params": {"top_k": 2}})(r),
                       fl.switch_load_balancing_loss(r, 2))
    assert isinstance(fl.build_loss({"type": "l2_loss", "params": {"reduction": "sum"}}), nn.MSELoss)


def test_registry_errors():
    with pytest.raises(KeyError, match="known types: .*'dqn'"):
        fl.build_loss({"type": "dqm"})
    with pytest.raises(TypeError, match="unknown params \\['gama'\\]"):
        fl.build_loss({"type": "dqn", "params": {"gama": 0.9}})
    with pytest.raises(KeyError, match="'type'"):
        fl.build_loss({"params": {}})
    with pytest.raises(ValueError, match="p must be 1 or 2"):
        fl.build_loss({"type": "sinkhorn_knopp", "params": {"p": 3}})


def test_register_round_trip_and_missing_params():
    reg = _registry.Registry("test")

    @reg.register("scaled_mse")
    class Factory:
        def __init__(self, scale: float):
            self.scale = scale

        def build(self):
            return nn.MSELoss()

    assert reg.get("scaled_mse") is Factory and list(reg) == ["scaled_mse"]
    with pytest.raises(ValueError, match="already taken"):
        reg.register("scaled_mse")(type("Other", (), {"build": lambda self: nn.L1Loss()}))
    fl.LOSS_BUILDER_REGISTRY.register("test_scaled_mse")(Factory)
    try:
        assert isinstance(fl.build_loss({"type": "test_scaled_mse", "params": {"scale": 2.0}}), nn.MSELoss)
        with pytest.raises(TypeError, match="missing required params \\['scale'\\]"):
            fl.build_loss({"type": "test_scaled_mse"})
    finally:
        fl.LOSS_BUILDER_REGISTRY._entries.pop("test_scaled_mse")


def test_entry_point_plugins(monkeypatch):
    class PluginFactory:
        def build(self):
            return nn.L1Loss()

    ep = types.SimpleNamespace(name="plugin_l1", load=lambda: PluginFactory)
    monkeypatch.setattr(_registry, "entry_points", lambda group: [ep] if group == "fusedloss.losses" else [])
    reg = _registry.Registry("loss", "fusedloss.losses")
    assert "plugin_l1" in reg and reg.get("plugin_l1") is PluginFactory


def test_dispatch_rule(monkeypatch):
    x = torch.randn(3, 4)
    assert _dispatch.resolve_backend("torch", "sp", x) is fl.Backend.TORCH
    assert _dispatch.resolve_backend("auto", "sp", x) is fl.Backend.TORCH  # CPU tensors: reference
    with pytest.raises(NotImplementedError, match="no fused kernel"):
        _dispatch.resolve_backend("triton", "sv", x)
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve_backend("cuda", "sp", x)
    monkeypatch.setattr(_dispatch, "_KERNEL_FAMILIES", _dispatch.kernel_families() | {"fake"})
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.resolve_backend("triton", "fake", x)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if _dispatch.triton_available():
        assert _dispatch.resolve_backend("triton", "fake", x) is fl.Backend.TRITON
        with pytest.raises(RuntimeError, match="float32, bfloat16 and float16"):
            _dispatch.resolve_backend("triton", "fake", x.double())
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "triton")
    with pytest.raises(NotImplementedError):
        _dispatch.resolve_backend("auto", "sv", x)  # the override applies to "auto" ...
    assert _dispatch.resolve_backend("torch", "sv", x) is fl.Backend.TORCH  # ... not to explicit choices
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="FUSEDLOSS_BACKEND"):
        _dispatch.resolve_backend("auto", "sv", x)


def test_import_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import fusedloss, torch; "
            "print(fusedloss.sp_js_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0).item())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_cli_verify_runs_and_passes():
    res = subprocess.run([sys.executable, "-m", "fusedloss", "verify", "--family", "router_z", "--family", "sv"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 6 checks passed" in res.stdout and "router_z" in res.stdout and "not checked" not in res.stdout
    assert subprocess.run([sys.executable, "-m", "fusedloss"], capture_output=True).returncode == 2
    assert subprocess.run([sys.executable, "-m", "fusedloss", "--help"], capture_output=True).returncode == 0


def test_cli_verify_names_an_unknown_family():
    res = subprocess.run([sys.executable, "-m", "fusedloss", "verify", "--family", "nosuch"],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "unknown family 'nosuch'" in res.stderr and "dqn" in res.stderr


def test_cli_verify_says_which_paths_it_did_not_check():
    """A kernel family whose kernel cannot run here (CPU tensors, interpreter off) is not reported as
    checked: the summary names the path and the reason."""
    env = {**__import__("os").environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "fusedloss", "verify", "--device", "cpu", "--family", "rope"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all 2 checks passed" in res.stdout
    assert "not checked: the triton path of rope" in res.stdout and "TRITON_INTERPRET=1" in res.stdout


def test_import_leaves_triton_language_unloaded():
    """TRITON_INTERPRET must be settable after `import fusedloss`, before the first kernel runs."""
    code = "import sys, fusedloss; assert 'triton.language' not in sys.modules, 'triton.language imported'"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_interpreter_switched_on_too_late_is_named():
    pytest.importorskip("triton")
    code = ("import os, torch, triton.language, fusedloss as fl\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n    fl.sp_js_loss(torch.randn(2, 3), torch.randn(2, 3), 1.0, backend='triton')\n"
            "except RuntimeError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"})
    assert "set after triton.language had been imported" in res.stdout, res.stdout + res.stderr


def test_explain_backend_says_what_auto_chose(monkeypatch, caplog):
    import logging

    x = torch.randn(3, 4)
    assert fl.explain_backend(fl.dqn_loss, x).startswith("torch: backend='auto': the PyTorch reference (the tensors "
                                                         "are on cpu")
    assert "has no fused kernel" in fl.explain_backend(fl.SvLoss, x)
    assert fl.explain_backend("sp", x, backend="torch") == "torch: backend='torch': the PyTorch reference"
    with pytest.raises(NotImplementedError, match="no fused kernel"):
        fl.explain_backend(fl.sv_loss, x, backend="triton")
    with pytest.raises(ValueError, match="family name"):
        fl.explain_backend(len, x)
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    assert fl.explain_backend(fl.sp_linear_loss, x).startswith("torch: FUSEDLOSS_BACKEND='torch'")
    monkeypatch.delenv("FUSEDLOSS_BACKEND")
    with caplog.at_level(logging.DEBUG, logger="fusedloss"):
        fl.sp_kl_loss(x, torch.randn(3, 4), 1.0)
    assert any(r.name == "fusedloss" and r.getMessage().startswith("sp: backend='auto': the PyTorch reference")
               for r in caplog.records)


def test_configs_are_checked_where_a_value_changes():
    import dataclasses
    from typing import Literal, Optional

    from fusedloss.losses._common import LossConfig

    cfg = fl.DqnLossConfig()
    with pytest.raises(TypeError, match=r"DqnLossConfig.double_dqn must be a bool"):
        cfg.double_dqn = "false"
    with pytest.raises(TypeError, match="YAML reads a number"):
        cfg.gamma = "1e-3"
    with pytest.raises(ValueError, match="td_loss"):
        cfg.td_loss = "l3"
    assert cfg == fl.DqnLossConfig()  # every failed assignment left the config as it was
    cfg.mask_key = "mask"
    cfg.mask_key = None  # Optional[str]
    assert dataclasses.replace(cfg, gamma=0.5).gamma == 0.5
    with pytest.raises(TypeError, match="n_step must be an integer"):
        dataclasses.replace(cfg, n_step=2.0)

    @dataclasses.dataclass
    class Toy(LossConfig):
        """Every kind of annotation the checks read."""

        mode: Literal["a", "b"] = "a"
        limit: Optional[float] = None
        count: "int | None" = 3

        def check_values(self):
            if self.count is not None and self.count < 0:
                raise ValueError("count must be >= 0")

    t = Toy(mode="b", limit=2, count=None)
    with pytest.raises(TypeError, match=r"Toy.mode must be one of 'a', 'b'"):
        t.mode = "c"
    with pytest.raises(TypeError, match="Toy.limit must be a number or None"):
        Toy(limit="x")
    with pytest.raises(ValueError, match="count must be >= 0"):
        t.count = -1
    assert (t.mode, t.limit, t.count) == ("b", 2, None)


def test_cli_verify_without_triton_says_so():
    code = ("import sys; sys.modules['triton'] = None\n"
            "from fusedloss.cli import main\n"
            "sys.exit(main(['verify', '--device', 'cpu', '--family', 'rope']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "interpreter" not in res.stdout.splitlines()[0]
    assert "not checked: the triton path of rope (Triton is not installed" in res.stdout


def test_config_checks_edge_cases():
    import dataclasses
    import typing

    from fusedloss.losses._common import LossConfig

    @dataclasses.dataclass(slots=True)
    class Slotted(LossConfig):
        """Fields in slots: assignments are still checked."""

        a: float = 0.0

        def check_values(self):
            if self.a < 0:
                raise ValueError("a must be >= 0")

    s = Slotted()
    with pytest.raises(ValueError, match="a must be >= 0"):
        s.a = -1.0
    assert s.a == 0.0
    cfg = fl.DqnLossConfig(n_step=3)
    del cfg.td_lambda
    with pytest.raises(ValueError, match="two kinds of multi-step target"):
        cfg.td_lambda = 0.5  # a field set again after del is checked too

    if typing.TYPE_CHECKING:  # a name the annotations use but Python never imports
        from collections import OrderedDict  # noqa: F401

    @dataclasses.dataclass
    class Hinted(LossConfig):
        """An unresolvable annotation and a container: neither blocks construction."""

        mapping: "OrderedDict | None" = None
        sizes: list[int] = dataclasses.field(default_factory=list)
        rate: float = 1.0

    h = Hinted(mapping={"a": 1}, sizes=[1, 2])
    with pytest.raises(TypeError, match="Hinted.rate must be a number"):
        h.rate = "fast"

    @dataclasses.dataclass
    class FreshCfg(LossConfig):
        """A config class first built inside a compiled function."""

        scale: float = 2.0

    torch._dynamo.reset()
    f = torch.compile(lambda x: x * FreshCfg(scale=3.0).scale, fullgraph=True)
    assert float(f(torch.ones(()))) == 3.0
