#!/usr/bin/env bash
# Downloads the peer libraries' wheels into .whl/ (git-ignored), here, where PyPI is reachable; the GPU
# machine has no network, so run_gpu_sweep.sh installs them from that folder when the device call carries it:
#
#   bash benchmarks/fetch_peer_wheels.sh          # then run(..., carry=[".whl"])
#
# All three are pure Python (py3-none-any): one download serves the GPU machine's Python 3.12. byol-pytorch
# 0.9.1 also needs einops (and its trainer accelerate), and the lightly modules the peers benchmark uses import
# only torch, torchvision and numpy: all already on the GPU machine (see its package list in the device tool's
# KINDS.md). The folder travels in every call's 64 MiB, so this refuses to leave more than MAX_KB in it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
PEERS=(byol-pytorch==0.9.1 beartype==0.23.1 lightly==1.6.0)
MAX_KB=4096
mkdir -p "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  -d "$DEST" "${PEERS[@]}"
ls -l "$DEST"
total_kb=$(du -sk "$DEST" | cut -f1)
if ((total_kb > MAX_KB)); then
  echo "$DEST holds ${total_kb} KB, over ${MAX_KB} KB: remove what run_gpu_sweep.sh does not install" >&2
  exit 1
fi
echo "$DEST: ${total_kb} KB; carry it: run(..., carry=[\"$DEST\"])"
