#!/usr/bin/env bash
# Prepares .device/comfyui for benchmarks/gpu_comfyui.sh (the GPU machine has no ComfyUI and no package
# index): for each ComfyUI checkout given, newest first, the Python source that its model management
# imports (comfy/, folder_paths.py, node_helpers.py, comfyui_version.py) as <n>-comfyui-<version>.tar.xz,
# and wheels of the native packages those import that the device lacks (comfy-aimdo and comfy-kitchen at
# the versions the checkout's requirements.txt pins), built for the device's Python 3.12 on x86-64.
#   bash benchmarks/prepare_comfyui_carry.sh /path/to/ComfyUI [/path/to/an/older/ComfyUI]
# The older checkout is the fallback gpu_comfyui.sh runs if the newer one fails.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 COMFYUI_CHECKOUT [OLDER_CHECKOUT ...]" >&2; exit 2; }
cd "$(dirname "$0")/.."
dest=.device/comfyui
rm -rf "$dest"
mkdir -p "$dest/wheels"
n=0
for checkout in "$@"; do
  [ -f "$checkout/comfy/model_management.py" ] || { echo "$checkout is not a ComfyUI checkout" >&2; exit 2; }
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$checkout/comfyui_version.py")
  tar -cJf "$dest/$n-comfyui-$version.tar.xz" -C "$checkout" --exclude=__pycache__ --exclude='*.pyc' \
    comfy folder_paths.py node_helpers.py comfyui_version.py
  for package in comfy-aimdo comfy-kitchen; do
    pin=$(grep -i "^$package[=<>~]" "$checkout/requirements.txt" || true)
    [ -z "$pin" ] || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dest/wheels" "$pin"
  done
  n=$((n + 1))
done
du -ach "$dest"/*.tar.xz "$dest"/wheels/* | tail -n 1
