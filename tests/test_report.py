import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
report = pytest.importorskip("report")
pytest.importorskip("matplotlib")


def _bench(group, provider, median, **info):
    return {"group": group, "name": f"bench[{provider}]", "stats": {"median": median},
            "extra_info": {"family": info.pop("family", "dqn"), "provider": provider, "device": "test-gpu",
                           "torch": "9.9", **info}}


def test_report_tables_targets_and_plots(tmp_path):
    data = {"datetime": "2026-11-22T00:00:00", "benchmarks": [
        _bench("dqn B=256 S=64 A=18", "eager", 100e-6, launches_per_call=40),
        _bench("dqn B=256 S=64 A=18", "compile", 30e-6),
        _bench("dqn B=256 S=64 A=18", "fused", 25e-6, launches_per_call=5, peak_extra_memory_bytes=2**20),
        _bench("dqn B=256 S=64 A=18", "fused-cudagraph", 9e-6),
        _bench("dqn B=256 S=64 A=18", "fused-compile", 21e-6),
        _bench("sp kl-fwd bfloat16 N=8192 A=32768", "fused", 1e-3, family="sp", pct_of_copy=85.0, gbs=2800.0,
               byte_model="5*N*A*b"),
    ]}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "BENCHMARKS.md"
    report.main([str(path), "--out", str(out), "--plots", str(tmp_path / "plots")])
    text = out.read_text()
    assert "fused is 4.00× eager (target ≥ 5.0×): **misses by 1.25×**" in text
    assert "fused is 1.20× compile (target ≥ 2.0×): **misses by 1.67×**" in text
    assert "5 launches per forward+backward (target ≤ 4): **misses: 5 launches**" in text
    assert "## RL shapes: the captured and the compiled step" in text
    assert "| dqn B=256 S=64 A=18 | 9.0 µs | 21.0 µs | 25.0 µs | 30.0 µs | 100.0 µs |" in text
    assert "| sp kl-fwd bfloat16 N=8192 A=32768 | –" not in text  # not an RL shape: no headline row
    assert "at 85.0% of copy bandwidth (target ≥ 80.0%): meets" in text
    assert "| dqn B=256 S=64 A=18 | fused | 25.0 µs |" in text and "device test-gpu" in text
    assert (tmp_path / "plots" / "dqn.png").stat().st_size > 1000
    assert "![dqn](plots/dqn.png)" in text


def test_report_relative_plot_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.json").write_text(json.dumps({"benchmarks": [_bench("dqn B=1 S=2 A=3", "eager", 1e-5)]}))
    report.main(["r.json", "--out", "BENCHMARKS.md", "--plots", "bench/plots"])
    assert "![dqn](bench/plots/dqn.png)" in Path("BENCHMARKS.md").read_text()


def test_report_refuses_cpu_and_interpreter_timings(tmp_path, monkeypatch):
    """A CPU run never overwrites BENCHMARKS.md silently: CPU rows need --allow-cpu and are
    labelled; kernels timed under the interpreter never go into the repository's BENCHMARKS.md."""
    monkeypatch.chdir(tmp_path)
    rows = [_bench("dqn B=1 S=2 A=3", "eager", 1e-3, device="cpu (x86_64)"),
            _bench("dqn B=1 S=2 A=3", "fused", 9e-2, device="cpu (x86_64)")]
    Path("r.json").write_text(json.dumps({"benchmarks": rows}))
    with pytest.raises(SystemExit, match="ran on the CPU, 1 of them kernels under the Triton interpreter"):
        report.main(["r.json", "--out", "cpu.md", "--plots", "plots"])
    assert not Path("cpu.md").exists()
    with pytest.raises(SystemExit, match="never go into BENCHMARKS.md"):
        report.main(["r.json", "--allow-cpu", "--out", str(report.REPO_BENCHMARKS), "--plots", "plots"])
    report.main(["r.json", "--allow-cpu", "--out", "cpu.md", "--plots", "plots"])
    assert Path("cpu.md").read_text().splitlines()[2].startswith("**CPU run.**")


def test_report_renders_the_model_as_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("r.json").write_text(json.dumps({"benchmarks": [_bench("dqn B=1 S=2 A=3", "eager", 1e-5)]}))
    model = {"torch": "9.9", "python": "3.x", "rows": [
        {"case": "dqn B=1 S=2 A=3", "fwd launches": 1, "fwd+bwd launches": 3, "fwd+bwd bytes": 2e9,
         "bytes / model": 1.5, "fwd+bwd aten launches": {"ones_like": 1}, "host us fwd+bwd": 512.3},
        {"case": "sp N=2 V=3", "fwd launches": 1, "fwd+bwd launches": 2, "fwd+bwd bytes": 1e9, "bytes / model": 1.0,
         "all bytes / model": 1.25, "fwd+bwd aten launches": {}, "H100 predicted us": 400.04,
         "H200 predicted us": 300.0, "H200 % of copy": 77.4, "H200 bound": ["instructions"],
         "sass": [{"kernel": "_sp_fwd_kernel", "num_warps": 16, "regs": 64, "spill_stores": 0, "spill_loads": 0,
                   "shared": 64, "occupancy": 0.5, "programs": 2, "loops": 2, "instr_per_element": 66.25}]}],
        "gpus": {"H200": {"copy_bw": 4.3e12, "sms": 132, "clock": 1.755e9}}}
    Path("m.json").write_text(json.dumps(model))
    report.main(["r.json", "--model", "m.json", "--out", "B.md", "--plots", "plots"])
    text = Path("B.md").read_text()
    assert report.MODEL_HEADING in text and "not a measurement" in text
    assert "| dqn B=1 S=2 A=3 | 1 | 3 | ones_like×1 | 2.000 | 1.50 | – | 512 | – | – | – |" in text
    assert "| sp N=2 V=3 | 1 | 2 |  | 1.000 | 1.00 | 1.25 | – | 400.0 | 300.0 | 77 |" in text
    assert "| sp N=2 V=3 | `_sp_fwd_kernel` | 16 | 64 | 0 | 64 | 0.50 | 2 | 2 | 66.2 | instructions |" in text
    assert "H200 4.3 TB/s, 132 SMs at 1.755 GHz" in text
