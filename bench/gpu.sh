#!/usr/bin/env bash
# The whole GPU run as one command that ends by itself inside one device call, fails soft, and
# returns figures whatever happens inside it. On the device machine (H100/H200, the GPU image's own
# python3; the wheelhouse of bench/wheels.sh carried as .whl/):
#
#   device run:  OUT="$OUT" bash bench/gpu.sh          carry [".whl"], timeout_s 570
#   then, only if that call left more than 6 minutes:   OUT="$OUT" STAGES=extra bash bench/gpu.sh
#   back here:   copy the files into bench/data/, then  make gpu-report
#
# STAGES=priority (the default) runs, in this order, each step under its own `timeout -k 15`
# with its own limit (seconds, times LIMIT_SCALE), and never past BUDGET seconds from the start:
#   setup    20  the wheelhouse into /tmp/site (when .whl/ holds wheels), env.json (device, versions, date)
#   verify   95  python -m fusedloss verify --device cuda on the kernel families
#   sp       75  bench sp, bf16, A = 18, 32768, 131072: fused, eager, Liger
#   sp_linear 70 bench sp_linear and sp_topk: fused-linear, materialised eager, Liger
#   dqn      90  bench dqn bf16 (one-step, multi-step, CUDA graph) and vec_dqn (fp32), no compile
#   lm_head  50  bench lm_head at V = 128256: fused, Liger, Cut Cross-Entropy, eager
#   compile  80  the compile provider for one sp shape and one dqn shape
#   cuda     50  pytest -m cuda (full sizes, launch counts, graph capture)
# The limits sum to 530 s with set-up; each step's limit is cut to what the budget has left, after
# timeout's 15 s grace, so the script ends by BUDGET.
# STAGES=extra: sinkhorn, the other sp/dqn/lm_head rows (fp32, secondary shapes, compile), the
# kernel tests on CUDA and the long fuzz run.
#
# Fail soft: every step runs even when an earlier one failed; a bench step writes its JSON after
# every benchmark (conftest.py's FailSoftBenchmarks), turns SIGTERM into a normal end of the session,
# and stops itself at FUSEDLOSS_BENCH_DEADLINE, a little before its timeout. The exit status is
# non-zero if any step failed or was cut. Files under $OUT (at most 8, none in a folder): env.json,
# gpu.log (all output, with each step's start, limit, exit status and time), results-<step>.json.
# Triton's and Inductor's caches live in .cache/ in the working tree, so a second command on a warm
# machine skips recompilation.
#
# Knobs (environment): OUT (default bench/gpu-out), STAGES, BUDGET (default 540: a device call may
# run 570 s; the transfers come on top), LIMIT_SCALE (default 1), BENCH_MAX_TIME (pytest-benchmark's --benchmark-max-time,
# default 0.1 s), PYTHON (default python3). GPU_DRY_RUN=1 fakes the CUDA check and runs the same
# steps on the CPU (the kernels under the Triton interpreter, tiny shapes, DRY_K as every bench
# step's -k filter): tests/test_gpu_script.py runs it with short limits, so the order, the
# deadlines, the partial JSON and the report are checked in CI. Without CUDA and without
# GPU_DRY_RUN the script prints one line and exits 2: it never makes figures from the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DRY_RUN=${GPU_DRY_RUN:-0}

if [ "$DRY_RUN" != 1 ] && ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "make gpu: no CUDA device here (torch.cuda.is_available() is False under $PY); nothing was run, no figures were made." >&2
    exit 2
fi
unset FUSEDLOSS_BACKEND
if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    export TRITON_INTERPRET=1
else
    DEVICE=cuda
    unset TRITON_INTERPRET
fi

OUT=${OUT:-bench/gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu.log"
STAGES=${STAGES:-priority}
BUDGET=${BUDGET:-540}
LIMIT_SCALE=${LIMIT_SCALE:-1}
BENCH_MAX_TIME=${BENCH_MAX_TIME:-0.1}
DRY_K=${DRY_K:-fused or eager}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.cache/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

status=0
scaled() { awk -v s="$1" -v k="$LIMIT_SCALE" 'BEGIN { v = int(s * k + 0.5); print (v < 1 ? 1 : v) }'; }

step() {  # name, limit (seconds, before LIMIT_SCALE), command...: never past BUDGET seconds from the start
    local name=$1 limit
    limit=$(scaled "$2")
    shift 2
    local left=$((BUDGET - SECONDS - 15))  # timeout's grace after its SIGTERM comes on top of the limit
    if [ "$left" -lt 5 ]; then
        echo "=== $name: skipped, the ${BUDGET}s budget is spent" | tee -a "$LOG"
        status=1
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    # a bench step stops itself before its timeout: a quarter of the limit, at most 20 s, is left for the end
    local margin=$((limit / 4))
    [ "$margin" -le 20 ] || margin=20
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    FUSEDLOSS_BENCH_DEADLINE=$(($(date +%s) + limit - margin)) timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

bench() {  # step name, limit, -k filter (empty: all), bench files...: one JSON, results-<name>.json
    local name=$1 limit=$2 filter=$3
    shift 3
    [ "$DRY_RUN" = 1 ] && filter=$DRY_K
    local args=("$@" --benchmark-only --benchmark-json="$OUT/results-$name.json" --benchmark-max-time="$BENCH_MAX_TIME"
                --benchmark-min-rounds=5 -q -p no:cacheprovider)
    [ -n "$filter" ] && args+=(-k "$filter")
    step "bench $name" "$limit" "$PY" -m pytest "${args[@]}"
}

WHEELS=0
if compgen -G ".whl/*.whl" >/dev/null; then
    WHEELS=1
    export PYTHONPATH=/tmp/site:$PYTHONPATH
fi

setup() {
    if [ "$WHEELS" = 1 ]; then
        timeout -k 5 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || echo "make gpu: installing .whl/ failed; going on with what is installed"
    fi
    timeout -k 5 20 "$PY" - "$OUT/env.json" <<'EOF'
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
                              text=True, timeout=10).stdout.strip() or None
    except Exception:
        return None

cuda = torch.cuda.is_available()
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "gpu": torch.cuda.get_device_name() if cuda else None,
       "capability": list(torch.cuda.get_device_capability()) if cuda else None,
       "driver": smi("driver_version"), "memory": smi("memory.total"), "clocks_max": smi("clocks.max.sm"),
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       **{name: version(name) for name in ("triton", "numpy", "geomloss", "pykeops", "liger_kernel",
                                           "cut_cross_entropy", "ot", "tensordict", "pytest_benchmark",
                                           "hypothesis")}}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print("environment:", json.dumps(env))
EOF
}

echo "=== setup (the wheelhouse, env.json)" | tee -a "$LOG"
setup 2>&1 | tee -a "$LOG"
echo "=== setup: done after ${SECONDS}s" | tee -a "$LOG"

KERNEL_FAMILIES=(--family dqn --family vec_dqn --family rope --family sp --family sp_topk --family sp_linear
                 --family lm_head)
SP_PRIORITY="bfloat16 and (A18 or A32768 or A131072) and not compile"
COMPILE_PRIORITY="compile and bfloat16 and (N8192-A32768 and kl-fwd or B256-S64-A18)"
DQN_PRIORITY="not compile and not float32"
LM_PRIORITY="V128256 and not compile"

for stage in $STAGES; do
    case $stage in
    priority)
        step "verify --device $DEVICE" 95 "$PY" -m fusedloss verify --device "$DEVICE" "${KERNEL_FAMILIES[@]}"
        bench sp 75 "$SP_PRIORITY" bench/bench_sp.py
        bench sp_linear 70 "" bench/bench_sp_linear.py
        bench dqn 90 "$DQN_PRIORITY" bench/bench_dqn.py bench/bench_vec_dqn.py
        bench lm_head 50 "$LM_PRIORITY" bench/bench_lm_head.py
        bench compile 80 "$COMPILE_PRIORITY" bench/bench_sp.py bench/bench_dqn.py
        step "pytest -m cuda" 50 "$PY" -m pytest -m cuda tests -q -rs -p no:cacheprovider
        ;;
    extra)
        bench sinkhorn 120 "" bench/bench_sinkhorn.py
        bench extra-sp 100 "not ($SP_PRIORITY) and not ($COMPILE_PRIORITY)" bench/bench_sp.py
        bench extra-dqn 100 "not ($DQN_PRIORITY) and not ($COMPILE_PRIORITY)" bench/bench_dqn.py bench/bench_vec_dqn.py
        bench extra-lm_head 100 "not ($LM_PRIORITY)" bench/bench_lm_head.py
        step "kernel tests on CUDA" 120 "$PY" -m pytest tests/test_kernels_dqn.py tests/test_multistep.py \
            tests/test_kernels_sp.py tests/test_distill.py tests/test_kernels_vec_dqn.py tests/test_lm_head.py \
            tests/test_compile_paths.py tests/test_autotune.py -q --maxfail=25 -p no:cacheprovider
        step "reliability and long fuzz on CUDA" 120 "$PY" -m pytest tests/test_reliability.py \
            tests/test_reliability_round2.py tests/test_fuzz.py --fuzz-long -q --maxfail=25 -p no:cacheprovider
        ;;
    *)
        echo "make gpu: unknown stage '$stage' (stages: priority, extra)" | tee -a "$LOG"
        status=1
        ;;
    esac
done
echo "make gpu: done after ${SECONDS}s, exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit $status
