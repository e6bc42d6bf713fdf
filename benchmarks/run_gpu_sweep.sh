#!/usr/bin/env bash
# The whole GPU benchmark sweep in one device call (< 10 minutes), run from the repository root:
#
#   BYOL_FAST_GIT_SHA=<commit> BYOL_FAST_GIT_DIRTY=<0|1> bash benchmarks/run_gpu_sweep.sh
#
# Installs the peer wheels carried in .whl/ (byol-pytorch, lightly, beartype), makes the
# synthetic JPEGs, then runs, each under its own time cap inside one overall budget
# (SWEEP_BUDGET_S, default 540 s), most important first: the step sweep, end to end,
# peers, pipelines, and last the torch.compile variants. Every benchmark writes its JSON
# after each row, so a section stopped by its cap keeps what it measured.
#
# Out ($OUT, at most 8 files come back): results.tar.gz (benchmarks/results/*.json|md|png;
# unpack at the repository root, then `python -m benchmarks.report`), summary.md (the
# target table and every result page), sweep.log (everything printed).
# DALI and FFCV are used when importable (install them before, in the same command);
# otherwise their rows say "skipped". The device copy has no .git: pass the commit in
# BYOL_FAST_GIT_SHA (and 1 in BYOL_FAST_GIT_DIRTY if the tree had uncommitted changes) so the
# results name it. results.tar.gz is rewritten after every section, so a command stopped early
# still brings back what was measured. SWEEP_DEVICE=cpu runs the same plumbing with the
# benchmarks' --small sizes (a dry run of this script on a machine without a GPU).
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/byol-sweep-out}
BUDGET=${SWEEP_BUDGET_S:-540}
STAGE=$(mktemp -d /tmp/byol-sweep.XXXXXX)
RESULTS=$STAGE/benchmarks/results
mkdir -p "$OUT" "$RESULTS"
exec > >(tee -a "$OUT/sweep.log") 2>&1
export BYOL_BENCH_PEAK_CACHE=$STAGE/peak.json
export BYOL_FAST_GIT_SHA=${BYOL_FAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
CORES=$(nproc)
DEVICE=${SWEEP_DEVICE:-cuda}
if [[ $DEVICE == cpu ]]; then
  DATA_IMAGES=64
  COMMON=(--device cpu --small)
  STEP_SIZES=(--archs resnet18 --batches 8)
  COMPILE_SIZES=(--archs resnet18 --batches 8)
else
  DATA_IMAGES=8192
  COMMON=(--device cuda)
  STEP_SIZES=(--archs resnet50,resnet18 --batches 256,128,64 --seconds 1.0)
  COMPILE_SIZES=(--archs resnet50 --batches 256 --seconds 1.0)
fi
COMMON+=(--out-dir "$RESULTS")
DATA=data/synthetic-bench-$DATA_IMAGES/train
START=$SECONDS
RESERVE=25  # seconds kept for the report and the tarball

# run NAME CAP_S PREFIX CMD...: CMD under `timeout`, capped by what is left of the budget.
run() {
  local name=$1 cap=$2 prefix=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  if ((left < 20)); then
    echo "=== $name: SKIPPED, only ${left}s of the budget left"
    return
  fi
  ((cap > left)) && cap=$left
  echo "=== $name (cap ${cap}s, $((SECONDS - START))s elapsed): $*"
  timeout -k 10 "$cap" "$@"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - START))s"
  if ((rc == 124 || rc == 137)) && [[ -n $prefix ]]; then
    python3 -m benchmarks.report --results "$RESULTS" --mark-cut "$prefix:$cap" --no-readme --no-pages
  fi
  pack
}

# pack: what is measured so far into $OUT (cheap; done after every section).
pack() {
  tar -czf "$OUT/results.tar.gz.partial" -C "$STAGE" benchmarks/results && mv "$OUT/results.tar.gz.partial" "$OUT/results.tar.gz"
}

if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=${SWEEP_SITE:-/tmp/byol-bench-site}  # not /tmp/site: leave a DALI installed there alone
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} || echo "wheel install failed: peers will be skipped"
fi
nvidia-smi -L || echo "no nvidia-smi"
df -h /dev/shm  # the torchvision backend's DataLoader workers hand batches over through it
python3 - <<'EOF'
import importlib, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("nvidia.dali", "ffcv", "byol_pytorch", "lightly", "matplotlib", "psutil"):
    try:
        importlib.import_module(name)
        print(f"  {name}: importable")
    except Exception as err:
        print(f"  {name}: NOT importable ({type(err).__name__}: {err})")
EOF

run data 60 "" python3 -c "from benchmarks.common import synthetic_train_dir as s; print(s(None, $DATA_IMAGES, $CORES))"
SECS() { [[ $DEVICE == cpu ]] || echo "--seconds $1"; }
run step 200 step python3 -m benchmarks.step_bench "${COMMON[@]}" "${STEP_SIZES[@]}" \
  --variants fp32-eager,channels_last,bf16,bf16+fused-lars,bf16+graph --profile
run e2e 100 e2e python3 -m benchmarks.e2e_bench "${COMMON[@]}" --data "$DATA" --backends dali,torch,torchvision,ffcv \
  $(SECS 6)
run peers 80 peers python3 -m benchmarks.peers_bench "${COMMON[@]}" $(SECS 1.5)
run pipeline 70 pipeline python3 -m benchmarks.pipeline_bench "${COMMON[@]}" --data "$DATA" $(SECS 4)
run step-compile 200 step-compile python3 -m benchmarks.step_bench "${COMMON[@]}" "${COMPILE_SIZES[@]}" \
  --name step-compile --variants bf16+compile+graph,bf16+compile --lars-arch none

echo "=== report ($((SECONDS - START))s elapsed)"
timeout 20 python3 -m benchmarks.report --results "$RESULTS" --no-readme --print >"$STAGE/table.md"
{
  echo "# GPU sweep summary (git $BYOL_FAST_GIT_SHA)"
  echo
  cat "$STAGE/table.md"
  for page in "$RESULTS"/*.md; do
    [[ $(basename "$page") == index.md ]] && continue
    echo
    cat "$page"
  done
} >"$OUT/summary.md"
pack
echo "=== done in $((SECONDS - START))s; results.tar.gz holds:"
tar -tzf "$OUT/results.tar.gz"
echo
grep -v '^wrote ' "$STAGE/table.md"
