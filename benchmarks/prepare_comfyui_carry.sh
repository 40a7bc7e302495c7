#!/usr/bin/env bash
# Prepares .device/comfyui for benchmarks/gpu.sh (the GPU machine has no ComfyUI and no package index):
# for each ComfyUI checkout given, newest first, the Python source that its model management imports
# (comfy/, folder_paths.py, node_helpers.py, comfyui_version.py) as <n>-comfyui-<version>.tar.xz, and
# wheels of the native packages those import that the device lacks (comfy-aimdo and comfy-kitchen at the
# versions the checkout's requirements.txt pins), built for the device's Python 3.12 on x86-64. With
# --bitsandbytes also .device/wheels: bitsandbytes for the device (its 8-bit and 4-bit stages).
#   bash benchmarks/prepare_comfyui_carry.sh [--bitsandbytes] /path/to/ComfyUI [/path/to/an/older/ComfyUI]
# The older checkout is the fallback gpu.sh runs if the newer one fails. A bare git repository of ComfyUI
# (e.g. a mirror) also serves: its HEAD's files are read out, any blob it lacks left out. One device call
# carries 64 MiB with the working tree: bitsandbytes (41 MiB) and ComfyUI 0.3.64 fit, 0.33's wheels do not.
set -euo pipefail
bitsandbytes=false
[ "${1:-}" = --bitsandbytes ] && { bitsandbytes=true; shift; }
[ $# -ge 1 ] || { echo "usage: $0 [--bitsandbytes] COMFYUI_CHECKOUT [OLDER_CHECKOUT ...]" >&2; exit 2; }
cd "$(dirname "$0")/.."
dest=.device/comfyui
rm -rf "$dest"
mkdir -p "$dest/wheels"
device_wheel() {  # REQUIREMENT FOLDER: a wheel of it for the device's Python 3.12 on x86-64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$2" "$1"
}
if $bitsandbytes; then
  rm -rf .device/wheels
  device_wheel bitsandbytes .device/wheels
fi
files=(comfy folder_paths.py node_helpers.py comfyui_version.py)
export_head() {  # bare repository $1 -> a new folder holding its HEAD's files (and requirements.txt)
  local folder path
  folder=$(mktemp -d)
  git --git-dir="$1" ls-tree -r HEAD --name-only -- "${files[@]}" requirements.txt | while read -r path; do
    mkdir -p "$folder/$(dirname "$path")"
    git --git-dir="$1" cat-file blob "HEAD:$path" > "$folder/$path" 2>/dev/null || rm -f "$folder/$path"
  done
  echo "$folder"
}
n=0
for checkout in "$@"; do
  exported=
  if [ ! -e "$checkout/comfy" ] && git --git-dir="$checkout" rev-parse -q --verify HEAD >/dev/null 2>&1; then
    checkout=$(export_head "$checkout")
    exported=$checkout
  fi
  [ -f "$checkout/comfy/model_management.py" ] || { echo "$checkout is not a ComfyUI checkout" >&2; exit 2; }
  version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$checkout/comfyui_version.py")
  tar -cJf "$dest/$n-comfyui-$version.tar.xz" -C "$checkout" --exclude=__pycache__ --exclude='*.pyc' \
    "${files[@]}"
  for package in comfy-aimdo comfy-kitchen; do
    pin=$(grep -i "^$package[=<>~]" "$checkout/requirements.txt" || true)
    [ -z "$pin" ] || device_wheel "$pin" "$dest/wheels"
  done
  [ -z "$exported" ] || rm -rf "$exported"
  n=$((n + 1))
done
carry=("$dest")
[ ! -d .device/wheels ] || carry+=(.device/wheels)
du -sh "${carry[@]}"
carried=$(du -sbc "${carry[@]}" | tail -n 1 | cut -f 1)
[ "$carried" -le $((60 * 2 ** 20)) ] || echo "warning: $((carried / 2 ** 20)) MiB to carry; one device call" \
  "takes 64 MiB with the working tree: leave out an older checkout or --bitsandbytes" >&2
