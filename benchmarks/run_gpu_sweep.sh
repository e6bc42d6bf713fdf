#!/usr/bin/env bash
# The GPU proof in one device call of at most 8 minutes, headline figures first. From the repository root:
#
#   BYOL_FAST_GIT_SHA=<commit> BYOL_FAST_GIT_DIRTY=<0|1> bash benchmarks/run_gpu_sweep.sh
#   (device tool: run(command=<that line>, carry=[".whl"], timeout_s=540); make .whl/ here first with
#   `bash benchmarks/fetch_peer_wheels.sh`)
#
# Plan, run by benchmarks/sweep.py; each section is stopped at its budget (or at what is left of the
# 480 s deadline), and its JSON, Markdown and PNG are written and packed into $OUT before the next starts:
#
#   section        budget s  what
#   setup                20  peer wheels from .whl/, synthetic JPEGs (8192, made once per machine)
#   cuda-tests           90  pytest -m cuda, 60 s per test: correctness before speed
#   e2e                  60  ResNet-50 at 224, batch 256, torch backend from JPEGs: images/s, data wait, MFU
#   peers                60  byol-pytorch (fp32 as shipped, bf16) and lightly beside byol_fast, batch 256
#   step                 60  the step variants at batch 256 in one process (cuDNN tunes once), LARS alone, profile
#   step-vit             30  ViT-S/16 (timm) with AdamW at 224, batch 256, eager and captured (timm on the image)
#   decode-crop          20  the torch backend's decode and crop stages alone (host- vs GPU-time)
#   pipeline             45  the data pipelines alone (DALI and FFCV rows only when installed)
#   step-compile         85  torch.compile with and without the CUDA graph (never run before: last)
#   total               470  = 7 min 50 s, under the 8-minute call; the tool allows 10
#
# A section that finishes early leaves its time unused (the call ends sooner: device time is the scarce
# thing). Out ($OUT, default /tmp/byol-sweep-out): results.tar.gz (benchmarks/results/*.json|md|png;
# `tar -xzf results.tar.gz -C .` at the repository root, then `python -m benchmarks.report`), summary.md
# (the target table and every page) and sweep.log, all rewritten after every section, so a call stopped
# early still brings back what was measured. The device copy has no .git: pass the commit in
# BYOL_FAST_GIT_SHA (and 1 in BYOL_FAST_GIT_DIRTY if the tree had uncommitted changes).
# Arguments go to benchmarks.sweep: `--device cpu` is the dry run CI does (tests/test_benchmarks.py).
set -o pipefail
export PYTHONUNBUFFERED=1
export OUT=${OUT:-/tmp/byol-sweep-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/sweep.log") 2>&1
export BYOL_FAST_GIT_SHA=${BYOL_FAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

WHEELS=.whl
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  SITE=/tmp/byol-bench-site  # its own folder: a DALI installed by benchmarks/dali_wheel_parts.sh stays apart
  if python3 -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" byol-pytorch lightly beartype; then
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    echo "peers: installed byol-pytorch, lightly and beartype from $WHEELS/"
  else
    echo "peers: installing from $WHEELS/ failed (above): their rows will say skipped"
  fi
else
  echo "peers: no wheels in $WHEELS/, so the byol-pytorch and lightly rows will say skipped" \
    "(make them with 'bash benchmarks/fetch_peer_wheels.sh' and carry $WHEELS)"
fi
nvidia-smi -L || echo "no nvidia-smi"
python3 - <<'EOF'
import importlib, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("nvidia.dali", "ffcv", "byol_pytorch", "lightly", "matplotlib", "psutil", "pytest_timeout"):
    try:
        importlib.import_module(name)
        print(f"  {name}: importable")
    except Exception as err:
        print(f"  {name}: NOT importable ({type(err).__name__}: {err})")
EOF
python3 -m benchmarks.sweep --out "$OUT" "$@"
