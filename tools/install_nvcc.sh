#!/usr/bin/env bash
# Install nvcc 13.0.x from PyPI into a local cache (no system CUDA needed) and print
# the path of the nvcc binary on the last line.
#
# Pinned to 13.0.x: the lent GPUs run a CUDA 13.0 driver, which rejects PTX written by
# a newer compiler.  Usage:
#   export NVCC="$(bash tools/install_nvcc.sh | tail -n1)"
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
dest="${POPEN_CUDA_CACHE:-$here/.cache/cuda-pypi}"
ver="${POPEN_CUDA_VERSION:-13.0}"
pkgs=(nvidia-cuda-nvcc nvidia-nvvm nvidia-cuda-crt nvidia-cuda-runtime nvidia-cuda-cccl)

find_nvcc() { find "$dest" -type f -name nvcc -perm -u+x 2>/dev/null | head -n1; }

if [ -z "$(find_nvcc)" ]; then
  specs=()
  for p in "${pkgs[@]}"; do specs+=("$p==$ver.*"); done
  echo "installing ${specs[*]} into $dest" >&2
  python3 -m pip install --quiet --disable-pip-version-check --no-deps --target "$dest" "${specs[@]}" >&2
fi
nvcc="$(find_nvcc)"
if [ -z "$nvcc" ]; then
  echo "error: nvcc not found under $dest after install" >&2
  exit 1
fi
root="$(dirname "$(dirname "$nvcc")")"
# The wheels split one CUDA tree over several packages; nvcc looks for cicc under
# ../nvvm/bin and for headers under ../include, so link the pieces into one tree.
for sub in nvvm include lib; do
  if [ ! -e "$root/$sub" ]; then
    src="$(find "$dest" -maxdepth 4 -type d -name "$sub" -not -path "$root/*" | head -n1)"
    [ -n "$src" ] && ln -s "$src" "$root/$sub"
  fi
done
"$nvcc" --version >&2
echo "$nvcc"
