"""Turn pytest-benchmark JSON files into BENCHMARKS.md and one PNG plot per family.

    pytest bench --benchmark-only --benchmark-json=bench/results.json
    python bench/report.py bench/results.json [more.json ...] --out BENCHMARKS.md --plots bench/plots

Each family gets a table (case × provider: median time, GB/s under the family's byte model, % of
the copy bandwidth measured in the same run, speed-up over eager and over torch.compile, peak extra
memory, launches per call), and the targets the kernel issues set are checked above the figures,
saying where a kernel misses and by how much.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

# (family, provider, baseline provider, required speed-up, case filter or None)
SPEEDUP_TARGETS = [
    ("sp", "fused", "compile", 2.0, lambda c: "A=18" not in c and "A=256" not in c),
    ("sp", "fused", "eager", 3.0, lambda c: "A=18" in c or "A=256" in c),
    ("sp", "fused", "liger", 1.3, None),
    ("dqn", "fused", "eager", 5.0, lambda c: "A=32768" not in c),
    ("dqn", "fused", "compile", 2.0, lambda c: "A=32768" not in c),
    ("vec_dqn", "fused", "eager", 5.0, None),
    ("vec_dqn", "fused", "compile", 2.0, None),
    ("sinkhorn", "online", "tensorized", 1.0, lambda c: int(c.split("N=M=")[1].split()[0]) >= 5000),
]
# The provider speed-ups and plots are relative to; "eager" unless named here.
BASELINE = {"sinkhorn": "tensorized"}
# (family, provider, minimum % of copy bandwidth, case filter)
BANDWIDTH_TARGETS = [
    ("sp", "fused", 80.0, lambda c: "A=18" not in c and "A=256" not in c),
    ("dqn", "fused", 70.0, lambda c: "A=32768" in c),
]
# launches per training step: the walk and the fold, autograd's seed of the loss, the backward
MAX_LAUNCHES = {("dqn", "fused"): 4}
# Providers that run a Triton kernel: on a CPU they ran under the interpreter.
INTERPRETED_PROVIDERS = {"fused", "fused-cudagraph", "fused-compile", "fused-linear", "liger", "cce"}
# The RL-shape headline: the fused step captured in a CUDA graph and compiled, then the rest.
HEADLINE = ["fused-cudagraph", "fused-compile", "fused", "compile", "eager"]
REPO_BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def load(paths):
    rows, meta = [], {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if "benchmarks" not in data:  # env.json of a GPU run, or another record: no figures in it
            continue
        meta.setdefault("datetime", data.get("datetime"))
        meta.setdefault("machine", data.get("machine_info", {}))
        for b in data["benchmarks"]:
            info = b.get("extra_info", {})
            if "family" not in info:
                continue
            case = b.get("group") or info.get("shape", "")
            rows.append({"family": info["family"], "case": case, "provider": info.get("provider", b["name"]),
                         "median_s": b["stats"]["median"], "info": info})
    return rows, meta


def _fmt_time(s):
    return f"{s * 1e6:,.1f} µs" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _fmt(v, spec, none="–"):
    return none if v is None else format(v, spec)


def tables(rows):
    by_family = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        by_family[r["family"]][r["case"]][r["provider"]] = r
    return by_family


def check_targets(by_family):
    lines = []
    for fam, prov, base, need, keep in SPEEDUP_TARGETS:
        for case, provs in sorted(by_family.get(fam, {}).items()):
            if (keep and not keep(case)) or prov not in provs or base not in provs:
                continue
            got = provs[base]["median_s"] / provs[prov]["median_s"]
            verdict = "meets" if got >= need else f"**misses by {need / got:.2f}×**"
            lines.append(f"- {fam} `{case}`: {prov} is {got:.2f}× {base} (target ≥ {need}×): {verdict}")
    for fam, prov, need, keep in BANDWIDTH_TARGETS:
        for case, provs in sorted(by_family.get(fam, {}).items()):
            r = provs.get(prov)
            if r is None or (keep and not keep(case)) or r["info"].get("pct_of_copy") is None:
                continue
            got = r["info"]["pct_of_copy"]
            verdict = "meets" if got >= need else f"**misses by {need - got:.1f} points**"
            lines.append(f"- {fam} `{case}`: {prov} at {got:.1f}% of copy bandwidth (target ≥ {need}%): {verdict}")
    for (fam, prov), most in MAX_LAUNCHES.items():
        for case, provs in sorted(by_family.get(fam, {}).items()):
            r = provs.get(prov)
            n = None if r is None else r["info"].get("launches_per_call")
            if n is not None:
                verdict = "meets" if n <= most else f"**misses: {n} launches**"
                lines.append(f"- {fam} `{case}`: {n} launches per forward+backward (target ≤ {most}): {verdict}")
    return lines


def headline(by_family):
    """The RL shapes' table: every case where a headline provider ran, with the median step time
    of each of ``HEADLINE`` (a trainer at these shapes is host-bound, so it captures or compiles
    its step)."""
    rows = [(fam, case, provs) for fam, cases in sorted(by_family.items()) for case, provs in sorted(cases.items())
            if any(p in provs for p in HEADLINE[:2])]
    if not rows:
        return []
    out = ["## RL shapes: the captured and the compiled step", "",
           "Median time of one training step (forward and gradient), device synchronized.", "",
           "| case | " + " | ".join(HEADLINE) + " |", "|---|" + "---:|" * len(HEADLINE)]
    for fam, case, provs in rows:
        cells = [_fmt_time(provs[p]["median_s"]) if p in provs else "–" for p in HEADLINE]
        out.append(f"| {case} | " + " | ".join(cells) + " |")
    return out + [""]


def family_table(fam, cases):
    base = BASELINE.get(fam, "eager")
    out = [f"### {fam}", "", f"| case | provider | median | GB/s | % copy | × {base} | × compile | peak extra MiB | launches |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, provs in sorted(cases.items()):
        eager = provs.get(base, {}).get("median_s")
        comp = provs.get("compile", {}).get("median_s")
        for prov, r in sorted(provs.items()):
            i, t = r["info"], r["median_s"]
            mem = i.get("peak_extra_memory_bytes")
            out.append(
                f"| {case} | {prov} | {_fmt_time(t)} | {_fmt(i.get('gbs'), '.1f')} | {_fmt(i.get('pct_of_copy'), '.1f')} | "
                f"{_fmt(eager / t if eager else None, '.2f')} | {_fmt(comp / t if comp else None, '.2f')} | "
                f"{_fmt(None if mem is None else mem / 2**20, '.1f')} | {_fmt(i.get('launches_per_call'), 'd')} |")
    byte_models = sorted({r["info"]["byte_model"] for p in cases.values() for r in p.values() if "byte_model" in r["info"]})
    if byte_models:
        out += ["", "Byte model: " + "; ".join(f"`{b}`" for b in byte_models)]
    return out


def plot(fam, cases, plots_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(cases)
    provs = sorted({p for c in cases.values() for p in c})
    base = BASELINE.get(fam, "eager")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(names)), 4.5))
    width = 0.8 / max(1, len(provs))
    for k, prov in enumerate(provs):
        xs = [i + k * width for i in range(len(names))]
        speed = [cases[c][base]["median_s"] / cases[c][prov]["median_s"] if prov in cases[c] and base in cases[c]
                 else 0.0 for c in names]
        mem = [(cases[c][prov]["info"].get("peak_extra_memory_bytes") or 0) / 2**20 if prov in cases[c] else 0.0
               for c in names]
        ax1.bar(xs, speed, width, label=prov)
        ax2.bar(xs, mem, width, label=prov)
    for ax, title in ((ax1, f"speed-up over {base} (×)"), (ax2, "peak extra memory (MiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{fam}: {title}")
    ax1.axhline(1.0, color="grey", lw=0.8)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    plots_dir.mkdir(parents=True, exist_ok=True)
    path = plots_dir / f"{fam}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(rows, meta, plots_dir: Path, root: Path, title: str, preface: str = "") -> str:
    by_family = tables(rows)
    versions = {}
    for r in rows:
        for k in ("device", "torch", "cuda", "driver", "triton", "geomloss", "pykeops", "liger_kernel", "ot", "python"):
            if r["info"].get(k) is not None:
                versions.setdefault(k, r["info"][k])
    out = [f"# {title}", ""]
    if preface:
        out += [preface, ""]
    out += [f"Run: {meta.get('datetime', '?')}. " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    targets = check_targets(by_family)
    if targets:
        out += ["## Targets", ""] + targets + [""]
    out += headline(by_family)
    out += ["## Figures", "", "Median of the pytest-benchmark rounds, forward + backward, device synchronized "
            "inside the timed function; compile time excluded.", ""]
    for fam, cases in sorted(by_family.items()):
        out += family_table(fam, cases)
        png = plot(fam, cases, plots_dir)
        out += ["", f"![{fam}]({Path(os.path.relpath(png.resolve(), root.resolve())).as_posix()})", ""]
    return "\n".join(out) + "\n"


MODEL_HEADING = "## Model (counted without a GPU; not a measurement)"


def render_model(model: dict) -> str:
    """The section for ``bench/model.py --json``: launches, bytes against the byte model, host µs
    with the launches stubbed and, where the rows carry them, the sm_90 SASS counts and the
    predicted H100/H200 times, under a heading that says it is a model."""
    out = [MODEL_HEADING, "",
           f"From `bench/model.py` (torch {model.get('torch', '?')}, Python {model.get('python', '?')}): the public "
           "loss on the kernel path with every Triton launch stubbed, on the CPU. Launches are Triton launches plus "
           "aten ops that would launch a device kernel; bytes are the sum of each Triton launch's tensor "
           "arguments, against the family's minimal byte model (`+aten` adds the aten ops' inputs and outputs); "
           "host µs is the median of eager fwd+bwd calls on one CPU thread (RL shapes only), noisy by ±30% "
           "between runs on a shared machine. The predicted time is the model's: per launch the largest of its "
           "bytes ÷ copy bandwidth, its SASS warp instructions ÷ the issue rate (4 per SM per clock) and 3 µs "
           "of launch, for " + "; ".join(f"{name} {g['copy_bw'] / 1e12:.1f} TB/s, {g['sms']} SMs at "
                                         f"{g['clock'] / 1e9:.3f} GHz" for name, g in model.get("gpus", {}).items())
           + " (assumed, to be calibrated by the first GPU run). % of copy is the byte model's bytes ÷ copy "
           "bandwidth ÷ the predicted time.", "",
           "| case | launches fwd | launches fwd+bwd | aten ops besides the kernels | GB fwd+bwd | × byte model | "
           "+aten | host µs | H100 µs (model) | H200 µs (model) | H200 % of copy (model) |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    kernels = []
    for r in model["rows"]:
        aten = ", ".join(f"{k}×{v}" for k, v in sorted(r["fwd+bwd aten launches"].items()))
        host = f"{r['host us fwd+bwd']:.0f}" if "host us fwd+bwd" in r else "–"
        pred = " | ".join(f"{r[k]:.1f}" if k in r else "–" for k in ("H100 predicted us", "H200 predicted us"))
        copy = f"{r['H200 % of copy']:.0f}" if "H200 % of copy" in r else "–"
        all_bytes = f"{r['all bytes / model']:.2f}" if "all bytes / model" in r else "–"
        out.append(f"| {r['case']} | {r['fwd launches']} | {r['fwd+bwd launches']} | {aten} | "
                   f"{r['fwd+bwd bytes'] / 1e9:.3f} | {r['bytes / model']:.2f} | {all_bytes} | {host} | {pred} | "
                   f"{copy} |")
        for k, bound in zip(r.get("sass", []), r.get("H200 bound", [])):
            ipe = f"{k['instr_per_element']:.1f}" if "instr_per_element" in k else "–"
            kernels.append(f"| {r['case']} | `{k['kernel']}` | {k['num_warps']} | {k['regs']} | "
                           f"{k['spill_stores'] + k['spill_loads']} | {k['shared']} | {k['occupancy']:.2f} | "
                           f"{k['programs']} | {k.get('loops', '–')} | {ipe} | {bound} |")
    if kernels:
        out += ["", "Each launch's sm_90 compile (ahead of time, with the runtime's divisibility specialisation; "
                "loops are the top-level SASS loops, each loop over a row's tiles one pass over it; instructions per element "
                "are static counts of those loops' bodies, or of the whole kernel when a row fits one tile):",
                "", "| case | kernel | warps | registers | spilled B | shared B | occupancy | programs | loops | "
                "SASS instr / element | H200 bound |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                *kernels]
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--plots", default="bench/plots")
    ap.add_argument("--title", default="fusedloss benchmarks")
    ap.add_argument("--preface", default="", help="text placed above the figures")
    ap.add_argument("--model", help="the JSON of bench/model.py, rendered as a section of its own")
    ap.add_argument("--allow-cpu", action="store_true",
                    help="accept CPU rows (labelled as such); interpreter timings of the kernels never go into "
                         "the repository's BENCHMARKS.md")
    args = ap.parse_args(argv)
    rows, meta = load(args.json)
    out = Path(args.out)
    cpu = [r for r in rows if str(r["info"].get("device", "")).startswith("cpu")]
    interpreted = [r for r in cpu if r["provider"] in INTERPRETED_PROVIDERS]
    if cpu and not args.allow_cpu:
        raise SystemExit(f"report.py: {len(cpu)} of the {len(rows)} benchmarks ran on the CPU"
                         + (f", {len(interpreted)} of them kernels under the Triton interpreter, whose timings mean "
                            "nothing" if interpreted else "")
                         + f"; refusing to write {out}. Use the JSON of a GPU run (make gpu), or pass --allow-cpu "
                           "and an --out of its own for a labelled CPU report.")
    if interpreted and out.resolve() == REPO_BENCHMARKS.resolve():
        raise SystemExit(f"report.py: {len(interpreted)} benchmarks are kernels timed under the Triton interpreter; "
                         f"they never go into {REPO_BENCHMARKS.name}. Pass another --out for a labelled CPU report.")
    preface = args.preface
    if cpu:
        label = ("**CPU run.** These figures come from the CPU"
                 + (" (the kernels under the Triton interpreter: their times say nothing about GPU speed)"
                    if interpreted else "") + ", not from a GPU.")
        preface = f"{label}\n\n{preface}" if preface else label
    text = render(rows, meta, Path(args.plots), out.resolve().parent, args.title, preface)
    if args.model:
        text += "\n" + render_model(json.loads(Path(args.model).read_text()))
    out.write_text(text)
    print(f"wrote {out} ({len(rows)} benchmarks)")


if __name__ == "__main__":
    main()
