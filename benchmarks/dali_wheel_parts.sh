#!/usr/bin/env bash
# DALI, the default GPU backend, onto the lent GPU machine, which has no network: its wheel (424 MB) and the
# wheels it needs that the machine lacks cannot travel in one call (64 MiB each), so they travel as parts,
# one per call, while the machine stays warm (it goes back after 30 s idle), and are joined there.
#
#   here:   bash benchmarks/dali_wheel_parts.sh download   # PyPI -> .dali/wheels -> .dali/parts/part-NN + SHA256SUMS
#   there, once per part, calls back to back (device tool; N = 00, 01, ...):
#           run(command="bash benchmarks/dali_wheel_parts.sh stash",
#               carry=[".dali/SHA256SUMS", ".dali/parts/part-N"], timeout_s=60)
#   there, with the last part:
#           run(command="bash benchmarks/dali_wheel_parts.sh stash && bash benchmarks/dali_wheel_parts.sh rows",
#               carry=[".dali/SHA256SUMS", ".dali/parts/part-<last>"], timeout_s=300)
#
# stash checks each arrived part against SHA256SUMS and moves it out of the tree to $PARTS_DIR (machine-local,
# kept while the machine is warm), then lists the parts still missing; join checks that all are there,
# concatenates them and checks the whole archive; install joins and installs the wheels into $SITE
# (--no-index --no-deps: the archive holds exactly what is missing); rows installs, then measures DALI's
# end-to-end and pipeline rows (result names e2e-dali, pipeline-dali) and packs them into
# $OUT/dali-results.tar.gz (unpack at the repository root, then `python -m benchmarks.report`).
#
# Cost plan against a session's 15 minutes of device time. The archive is nvidia-dali-cuda120 2.4.0
# (424.5 MB) plus nvidia-libnvcomp-cu12 (43.5 MB), nvidia-nvimgcodec-cu12 (32.1 MB), nvtx, libcst, optree,
# astunparse, gast, makefun (6 MB): 506 MB = 482.5 MiB = 9 parts of 60 MiB, the last about 3 MiB; 60 MiB
# leaves 4 MiB of each call's 64 MiB for the working tree (~1 MiB). The speed of a transfer into the machine
# has not been measured yet: the per-call figures are estimates (replace them with the first session's).
#   machine start, when not warm                                        1-2 min
#   8 stash calls of ~60 MiB each, ~15-30 s apiece, back to back          2-4 min
#   the last part + install (unpacks ~1 GB, ~30-60 s) + the DALI rows    ~3 min (rows capped at 150 s)
#   total                                                                6-9 min
# So DALI fits a session of its own, or one whose sweep (run_gpu_sweep.sh: 8 min + start) came back from its
# first call with that much left; never before the sweep: the headline figures come first.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=${DALI_CARRY_DIR:-.dali}            # here: parts and their checksums (git-ignored)
PARTS_DIR=${DALI_PARTS_DIR:-/tmp/byol-dali-parts}  # there: the parts that have arrived, then the joined wheels
SITE=${DALI_SITE:-/tmp/byol-dali-site}    # there: where the wheels are installed (on PYTHONPATH for the rows)
PART_SIZE=${DALI_PART_SIZE:-60m}
ARCHIVE=dali-wheels.tar
WHEELS=(nvidia-dali-cuda120==2.4.0 nvidia-libnvcomp-cu12==6.0.0.12 nvidia-nvimgcodec-cu12==0.9.0.20
        nvtx==0.2.17 libcst==1.9.0 optree==0.20.0 astunparse==1.6.3 gast==0.7.0 makefun==1.16.0)

# pack DIR: DIR's wheels as one archive split into $CARRY/parts/part-NN, with SHA256SUMS of the archive and parts.
pack() {
  local from=$1
  rm -rf "$CARRY/parts" && mkdir -p "$CARRY/parts"
  tar -cf "$CARRY/$ARCHIVE" -C "$from" .
  split -b "$PART_SIZE" -d -a 2 "$CARRY/$ARCHIVE" "$CARRY/parts/part-"
  (cd "$CARRY" && sha256sum "$ARCHIVE" && cd parts && sha256sum part-*) >"$CARRY/SHA256SUMS"
  rm "$CARRY/$ARCHIVE"
  ls -l "$CARRY/parts"
  echo "$(ls "$CARRY/parts" | wc -l) parts; carry each with $CARRY/SHA256SUMS (see this script's header)"
}

# stash: verify the parts carried into this tree and move them to $PARTS_DIR; list those still missing.
stash() {
  mkdir -p "$PARTS_DIR"
  cp "$CARRY/SHA256SUMS" "$PARTS_DIR/SHA256SUMS"
  local part
  for part in "$CARRY"/parts/part-*; do
    [[ -e $part ]] || continue
    if ! (cd "$CARRY/parts" && grep " $(basename "$part")\$" ../SHA256SUMS | sha256sum -c --quiet -); then
      echo "$part does not match SHA256SUMS: carry it again" >&2
      exit 1
    fi
    mv "$part" "$PARTS_DIR/"
    echo "stashed $(basename "$part")"
  done
  local missing
  missing=$(missing_parts)
  echo "missing: ${missing:-none}"
}

missing_parts() {
  grep -o 'part-[0-9]*$' "$PARTS_DIR/SHA256SUMS" | while read -r part; do
    [[ -e $PARTS_DIR/$part ]] || echo -n "$part "
  done
}

# join: all parts -> the archive (checked) -> $PARTS_DIR/wheels.
join_parts() {
  local missing
  missing=$(missing_parts)
  if [[ -n $missing ]]; then
    echo "cannot join: $missing still to carry (stash them first)" >&2
    exit 1
  fi
  cat "$PARTS_DIR"/part-* >"$PARTS_DIR/$ARCHIVE"
  (cd "$PARTS_DIR" && grep " $ARCHIVE\$" SHA256SUMS | sha256sum -c --quiet -) || {
    echo "the joined $ARCHIVE does not match SHA256SUMS" >&2
    exit 1
  }
  rm -rf "$PARTS_DIR/wheels" && mkdir -p "$PARTS_DIR/wheels"
  tar -xf "$PARTS_DIR/$ARCHIVE" -C "$PARTS_DIR/wheels"
  rm "$PARTS_DIR/$ARCHIVE"
  echo "joined: $(ls "$PARTS_DIR/wheels" | wc -l) wheels in $PARTS_DIR/wheels"
}

install() {
  join_parts
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$PARTS_DIR"/wheels/*.whl
  PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} python3 -c "import nvidia.dali as d; print('DALI', d.__version__)"
}

rows() {
  [[ -d $SITE/nvidia/dali ]] || install
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  export BYOL_FAST_GIT_SHA=${BYOL_FAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
  local out=${OUT:-/tmp/byol-sweep-out} stage
  stage=$(mktemp -d /tmp/byol-dali.XXXXXX)
  mkdir -p "$out" "$stage/benchmarks/results"
  local common=(--device cuda --out-dir "$stage/benchmarks/results")
  timeout -k 5 90 python3 -m benchmarks.e2e_bench "${common[@]}" --backends dali --name e2e-dali --seconds 6 || true
  timeout -k 5 60 python3 -m benchmarks.pipeline_bench "${common[@]}" --backends dali --name pipeline-dali \
    --seconds 4 || true
  python3 -m benchmarks.report --results "$stage/benchmarks/results" --no-readme --print
  tar -czf "$out/dali-results.tar.gz" -C "$stage" benchmarks/results
}

case ${1:-} in
  download)
    rm -rf "$CARRY/wheels" && mkdir -p "$CARRY/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}"
    pack "$CARRY/wheels"
    rm -rf "$CARRY/wheels"
    ;;
  pack) pack "$2" ;;
  stash) stash ;;
  join) join_parts ;;
  install) install ;;
  rows) rows ;;
  *)
    echo "usage: $0 download|pack DIR (here); stash|join|install|rows (on the GPU machine): see the header" >&2
    exit 2
    ;;
esac
