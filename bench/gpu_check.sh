#!/usr/bin/env bash
# The GPU check: every GPU slot ends in a committed, complete results folder, from one command.
#
#   bench/gpu_check.sh [OUTDIR]                          on the GPU machine, from the repo root
#   bench/gpu_check.sh --stages bench --suites depthwise_conv2d OUTDIR    re-run part of it after a fix
#   bench/gpu_check.sh --dry-run OUTDIR                  the same stages on a CPU machine (tiny shapes, Triton
#                                                        interpreter, CUDA emulation, no sanitizer): CI runs it
#
# Stages, in order of value, each with its own time budget inside a whole-run budget (--budget SECONDS, default
# 420 on a GPU, 1800 for --dry-run):
#   build      build _C against the torch that is there (sm_90 unless TORCH_CUDA_ARCH_LIST says otherwise, all
#              cores, offline, no dependency resolution) into a private folder put first on PYTHONPATH; record
#              `python -m repkernels info`, nvidia-smi and versions in env.txt
#   canary     every C++ and Triton op called with bad arguments must raise (child processes: a crash is
#              reported with its signal and faulthandler trace, and the run goes on)  -> canary.json
#   tests      the GPU tests (pytest -m gpu), per-test timeout                         -> pytest.xml
#   sanitizer  compute-sanitizer memcheck and racecheck over bench/sanitize_ops.py     -> sanitizer.txt
#   bench      every bench suite, --quick, fp32 and bf16                               -> bench_<suite>.{txt,json,png}
# After every stage summary.md is rewritten (goals table, failures) and, with --archive FILE, the folder is
# packed into FILE, so a run cut short keeps what it finished. Exit status: 0 when every stage ran to the end
# (failures found by a stage are in summary.md, not in the exit status), 1 when a stage failed or timed out,
# 2 on a usage error.
set -uo pipefail

ALL_STAGES="build canary tests sanitizer bench"
ALL_SUITES="depthwise_conv2d kernelwarehouse parcnetv2 multibranch_conv_bn kernel_transform"
DRY_RUN=0
STAGES=$ALL_STAGES
SUITES=$ALL_SUITES
BUDGET=""
ARCHIVE=""
OUTDIR=""

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --stages) STAGES=${2//,/ }; shift ;;
        --suites) SUITES=${2//,/ }; shift ;;
        --budget) BUDGET=$2; shift ;;
        --archive) ARCHIVE=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
        *) [ -z "$OUTDIR" ] || { echo "gpu_check: one OUTDIR only" >&2; exit 2; }; OUTDIR=$1 ;;
    esac
    shift
done
for s in $STAGES; do
    case " $ALL_STAGES " in *" $s "*) ;; *) echo "gpu_check: unknown stage '$s' (stages: $ALL_STAGES)" >&2; exit 2 ;; esac
done
for s in $SUITES; do
    case " $ALL_SUITES " in *" $s "*) ;; *) echo "gpu_check: unknown suite '$s' (suites: $ALL_SUITES)" >&2; exit 2 ;; esac
done

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1   # no progress bars in the result files
START=$(date +%s)
# REPKERNELS_COMMIT names the commit where the checkout has no .git (e.g. a copied working tree)
SHA=${REPKERNELS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ -z "${REPKERNELS_COMMIT:-}" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    SHA="$SHA-dirty"
fi
export REPKERNELS_COMMIT=$SHA

if [ -z "$BUDGET" ]; then
    if [ "$DRY_RUN" = 1 ]; then BUDGET=1800; else BUDGET=420; fi   # 7 minutes on a GPU; CPUs are slower
fi
if [ "$DRY_RUN" = 1 ]; then
    export CUDA_VISIBLE_DEVICES=""          # CPU even on a GPU machine
    export TRITON_INTERPRET=1
    DEVICE="dryrun-cpu"
else
    DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' \
             | sed 's/-\{2,\}/-/g; s/-$//')
    [ -n "$DEVICE" ] || { echo "gpu_check: no GPU visible (nvidia-smi failed); use --dry-run on a CPU machine" >&2; exit 2; }
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc > /dev/null; then
    # the toolkit root as nvcc itself reports it (the nvcc on PATH may be a wrapper script elsewhere)
    echo 'int main() { return 0; }' > "${TMPDIR:-/tmp}/gpu_check_probe.cu"
    top=$(cd "${TMPDIR:-/tmp}" && nvcc -v --dryrun gpu_check_probe.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
    [ -z "$top" ] || export CUDA_HOME=$(cd "$top" && pwd)
fi
OUTDIR=${OUTDIR:-bench/results/$DEVICE-$SHA}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SITE=${REPKERNELS_CHECK_SITE:-${TMPDIR:-/tmp}/repkernels-gpu-check-site}
touch "$OUTDIR/stages.tsv"
FAILED=0

say() { printf '[gpu_check %4ds] %s\n' "$(( $(date +%s) - START ))" "$*"; }

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# record NAME RC SECONDS BUDGET: one line per stage in stages.tsv (a re-run replaces the earlier line)
record() {
    grep -v "^$1	" "$OUTDIR/stages.tsv" > "$OUTDIR/stages.tsv.new" || true
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$OUTDIR/stages.tsv.new"
    mv "$OUTDIR/stages.tsv.new" "$OUTDIR/stages.tsv"
}

finish_stage() {
    "$PY" "$ROOT/bench/summary.py" "$OUTDIR" > /dev/null 2> "$OUTDIR/summary.err" \
        || say "summary failed: $(tail -1 "$OUTDIR/summary.err")"
    [ -s "$OUTDIR/summary.err" ] || rm -f "$OUTDIR/summary.err"
    if [ -n "$ARCHIVE" ]; then
        tar czf "$ARCHIVE.tmp" -C "$(dirname "$OUTDIR")" "$(basename "$OUTDIR")" && mv "$ARCHIVE.tmp" "$ARCHIVE"
    fi
}

# run_stage NAME BUDGET_S COMMAND...: run under `timeout`, output to the terminal and OUTDIR/NAME.log
run_stage() {
    local name=$1 budget=$2 left; shift 2
    left=$(remaining)
    if [ "$left" -lt 10 ]; then
        say "$name: skipped, the whole-run budget (${BUDGET} s) is spent"
        record "$name" skip 0 "$budget"; FAILED=1; finish_stage; return 1
    fi
    [ "$budget" -le "$left" ] || budget=$left
    say "$name: start (budget ${budget} s)"
    local t0=$(date +%s) rc log="$OUTDIR/$name.log"
    case $name in bench_*) log="$OUTDIR/$name.txt" ;; esac   # the bench table is a result, not a log
    # bash -c runs the stage functions too (exported below); timeout kills the whole stage at its budget
    # STAGE_BUDGET: the stage's own budget after the whole-run cap, for stages that split or pace themselves
    STAGE_BUDGET=$budget timeout -k 10 "$budget" bash -c '"$@"' _ "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    record "$name" "$rc" "$(( $(date +%s) - t0 ))" "$budget"
    if [ "$rc" = 124 ]; then say "$name: TIMED OUT after ${budget} s"; else say "$name: done, exit $rc"; fi
    [ "$rc" = 0 ] || FAILED=1
    finish_stage
    return "$rc"
}

budget_of() {  # stage budgets in seconds (GPU; the dry run on 2 CPU cores gets more)
    local gpu cpu
    case "$1" in
        build) gpu=120 cpu=400 ;; canary) gpu=40 cpu=120 ;; tests) gpu=75 cpu=300 ;;
        sanitizer) gpu=70 cpu=120 ;; depthwise_conv2d) gpu=75 cpu=200 ;; kernelwarehouse) gpu=60 cpu=300 ;;
        parcnetv2) gpu=35 cpu=200 ;; multibranch_conv_bn) gpu=25 cpu=200 ;; kernel_transform) gpu=15 cpu=100 ;;
    esac
    if [ "$DRY_RUN" = 1 ]; then echo "$cpu"; else echo "$gpu"; fi
}

stage_build() {
    {
        echo "# gpu_check $(date -Is) commit $SHA dry_run=$DRY_RUN"
        uname -a
        "$PY" --version
        "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
        "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 || true
        nvcc --version 2>&1 | tail -2 || true
        gcc --version 2>&1 | head -1 || true
        nvidia-smi 2>&1 || echo "nvidia-smi: not available"
        (command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer) 2>&1 | head -1
    } > "$OUTDIR/env.txt" 2>&1
    rm -rf "$SITE"
    local jobs
    jobs=$(nproc)
    say "building _C: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} MAX_JOBS=$jobs -> $SITE"
    REPKERNELS_BUILD_EXT=${REPKERNELS_BUILD_EXT:-1} MAX_JOBS=$jobs "$PY" -m pip install --no-build-isolation \
        --no-deps --no-index --no-cache-dir --disable-pip-version-check --upgrade --target "$SITE" -v . \
        || return 1
    (cd /tmp && PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" REPKERNELS_REQUIRE_C=1 "$PY" -m repkernels info) \
        | tee -a "$OUTDIR/env.txt"
    return "${PIPESTATUS[0]}"
}

stage_tests() {
    local timeout_flag=()
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then timeout_flag=(--timeout=60); fi
    # The tests that need a GPU (marked `gpu` by tests/conftest.py); on a CPU machine they are collected and skipped.
    # Tests not started 15 s before the stage's budget ends are skipped, so pytest still writes its report.
    REPKERNELS_TEST_DEADLINE=$(( $(date +%s) + STAGE_BUDGET - 15 )) \
    "$PY" -m pytest tests -m gpu "${timeout_flag[@]}" -q -rfE -p no:cacheprovider \
        --junitxml="$OUTDIR/pytest.xml" -o junit_family=xunit2
    local rc=$?
    [ "$rc" != 5 ] || rc=0   # no test selected is not a failure of the stage
    return $rc
}

stage_sanitizer() {
    local out="$OUTDIR/sanitizer.txt"
    if [ "$DRY_RUN" = 1 ]; then
        echo "sanitizer: dry run, no compute-sanitizer; the kernel paths run without it (CPU)" > "$out"
        "$PY" -m repkernels.bench.sanitize_ops 2>&1 | tee -a "$out"
        return "${PIPESTATUS[0]}"
    fi
    local sanitizer
    sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
                /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
    if [ -z "$sanitizer" ]; then
        echo "sanitizer: compute-sanitizer is neither on PATH nor in the CUDA toolkit on this machine" | tee "$out"
        return 1
    fi
    local half=$(( STAGE_BUDGET / 2 )) rc=0
    : > "$out"
    for tool in memcheck racecheck; do
        echo "sanitizer: === $tool ===" | tee -a "$out"
        timeout -k 5 "$half" "$sanitizer" --tool "$tool" --error-exitcode 9 --print-limit 20 \
            "$PY" -m repkernels.bench.sanitize_ops 2>&1 | tee -a "$out"
        local trc=${PIPESTATUS[0]}
        echo "sanitizer: $tool exit $trc$([ "$trc" = 124 ] && echo ' (timed out)')" | tee -a "$out"
        [ "$trc" = 0 ] || rc=1
    done
    return $rc
}

stage_bench_suite() {
    local suite=$1
    "$PY" -m repkernels.bench --ops "$suite" --quick --dtype fp32,bf16 --out "$OUTDIR" --name "bench_$suite" \
        --compile-budget "${REPKERNELS_BENCH_COMPILE_BUDGET_S:-30}" 2>&1 | grep -v '^USDT:'
    return "${PIPESTATUS[0]}"
}

export PY ROOT OUTDIR SITE DRY_RUN SHA START
export -f say budget_of stage_build stage_tests stage_sanitizer stage_bench_suite
say "results -> $OUTDIR (device $DEVICE, commit $SHA, stages: $STAGES)"
cd "$ROOT"
for stage in $STAGES; do
    case $stage in
        build)
            run_stage build "$(budget_of build)" stage_build || { say "build failed: the later stages need _C"; break; } ;;
        *)
            if [ -d "$SITE/repkernels" ]; then
                export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
            elif [ "$DRY_RUN" = 0 ]; then
                say "no build in $SITE: run the build stage first"; FAILED=1; break
            fi
            case $stage in
                canary) run_stage canary "$(budget_of canary)" "$PY" -m repkernels.bench.canary --json "$OUTDIR/canary.json" ;;
                tests) run_stage tests "$(budget_of tests)" stage_tests ;;
                sanitizer) run_stage sanitizer "$(budget_of sanitizer)" stage_sanitizer ;;
                bench) for suite in $SUITES; do
                           run_stage "bench_$suite" "$(budget_of "$suite")" stage_bench_suite "$suite"
                       done ;;
            esac ;;
    esac
done
say "finished in $(( $(date +%s) - START )) s: $OUTDIR/summary.md"
exit $FAILED
