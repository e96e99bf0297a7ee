#!/usr/bin/env bash
# The whole GPU run in one command (`make gpu`): correctness on CUDA, then the benchmark suite,
# everything written under $OUT. Meant for one `device` call of at most 10 minutes on an H100/H200
# with the GPU image (Python 3.12, torch, triton, pytest, pytest-benchmark, hypothesis); the other
# packages come from the wheelhouse that bench/wheels.sh builds in .whl/ (carry it).
#
#   make gpu                      # check, then bench (STAGES="check bench")
#   make gpu-check                # verify --device cuda, pytest -m cuda, reliability + fuzz on CUDA
#   make gpu-bench                # the bench suite, one JSON per family
#   make gpu-report               # back on any machine: BENCHMARKS.md and bench/plots from the JSON
#
# Knobs (environment): OUT (default bench/gpu-out), STAGES, FAMILIES (bench order, default
# "dqn sp sp_linear vec_dqn sinkhorn"), BENCH_K (a pytest -k filter for the bench files), BENCH_MAX_TIME
# (pytest-benchmark's --benchmark-max-time, default 0.1 s), CHECK_TIMEOUT and BENCH_TIMEOUT
# (seconds per stage and per family, so one slow part cannot eat the call), BUDGET (seconds for
# the whole script, default 570: no stage starts or runs past it). Every stage runs even
# when an earlier one fails; the exit status is non-zero if any failed. Files under $OUT: env.json,
# gpu.log (all output), results-<family>.json: at most 8 files, as the device tool brings back.
#
# On a machine without CUDA this prints one line and exits 2: it never makes figures from the
# Triton interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "make gpu: no CUDA device here (torch.cuda.is_available() is False under $PY); nothing was run, no figures were made." >&2
    exit 2
fi
unset TRITON_INTERPRET FUSEDLOSS_BACKEND

OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu.log"
STAGES=${STAGES:-check bench}
FAMILIES=${FAMILIES:-dqn sp sp_linear vec_dqn sinkhorn}
BENCH_MAX_TIME=${BENCH_MAX_TIME:-0.1}
CHECK_TIMEOUT=${CHECK_TIMEOUT:-240}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-150}
BUDGET=${BUDGET:-570}  # the whole script: a device call may run 600 s
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$LOG" 2>&1 || echo "make gpu: installing .whl/ failed (see $LOG); going on with what is installed" | tee -a "$LOG"
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

"$PY" - "$OUT/env.json" <<'EOF' 2>&1 | tee -a "$LOG"
import datetime, json, platform, subprocess, sys

import torch

def version(name):
    try:
        return getattr(__import__(name), "__version__", "?")
    except Exception:
        return None

def smi(query):
    try:
        return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20).stdout.strip() or None
    except Exception:
        return None

env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
       "driver": smi("driver_version"), "memory": smi("memory.total"), "clocks_max": smi("clocks.max.sm"),
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       **{name: version(name) for name in ("triton", "numpy", "geomloss", "pykeops", "liger_kernel", "ot",
                                           "tensordict", "pytest_benchmark", "hypothesis")}}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print("environment:", json.dumps(env))
EOF

status=0
run_stage() {  # name, timeout, command...; never past BUDGET seconds from the start
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS - 15))
    if [ "$left" -lt 20 ]; then
        echo "=== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

for stage in $STAGES; do
    case $stage in
    check)
        run_stage "verify --device cuda" "$CHECK_TIMEOUT" "$PY" -m fusedloss verify --device cuda
        run_stage "pytest -m cuda" "$CHECK_TIMEOUT" "$PY" -m pytest -m cuda tests -q -rs -p no:cacheprovider
        run_stage "kernel tests on CUDA" "$CHECK_TIMEOUT" "$PY" -m pytest tests/test_kernels_dqn.py \
            tests/test_multistep.py tests/test_kernels_sp.py tests/test_distill.py tests/test_kernels_vec_dqn.py \
            tests/test_compile_paths.py -q --maxfail=25 -p no:cacheprovider
        run_stage "reliability and fuzz on CUDA" "$CHECK_TIMEOUT" "$PY" -m pytest tests/test_reliability.py \
            tests/test_fuzz.py -q --maxfail=25 -p no:cacheprovider
        ;;
    bench)
        for fam in $FAMILIES; do
            args=(bench/bench_"$fam".py --benchmark-only --benchmark-json="$OUT/results-$fam.json"
                  --benchmark-max-time="$BENCH_MAX_TIME" --benchmark-min-rounds=5 -q -p no:cacheprovider)
            [ -n "${BENCH_K:-}" ] && args+=(-k "$BENCH_K")
            run_stage "bench $fam" "$BENCH_TIMEOUT" "$PY" -m pytest "${args[@]}"
        done
        ;;
    *)
        echo "make gpu: unknown stage '$stage' (stages: check, bench)" | tee -a "$LOG"
        status=1
        ;;
    esac
done
echo "make gpu: done, exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit $status
