#!/usr/bin/env bash
# ComfyUI's memory manager with this pack on the GPU machine, as one command (a few minutes on an H100):
# benchmarks/comfyui_memory.py against a real ComfyUI's model management: a Qwen2-VL-7B-sized model with
# random weights through the loader nodes, then 10 queued Reason runs, each followed by loading a
# FLUX-sized model (FLUX.1-dev fp8), with ComfyUI budgeting as on a 24 GB card so that they evict each
# other; then the same with the VLM in 4-bit where bitsandbytes is installed (gpu_run.sh installs it: run
# this right after it, on the same warm machine).
# Prepare .device/comfyui here first (bash benchmarks/prepare_comfyui_carry.sh /path/to/ComfyUI) and
# carry it: run(command="bash benchmarks/gpu_comfyui.sh", carry=[".device/comfyui"], timeout_s=600).
# Each ComfyUI source there is tried newest first until one run completes a pass.
# Results go to $OUT (or benchmarks/out): <n>-comfyui-<version>.json per ComfyUI tried, comfyui_memory.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
carry=.device/comfyui
log="$out/comfyui_memory.log"
: > "$log"
if ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/comfyui-site "$carry"/wheels/*.whl >> "$log" 2>&1
  export PYTHONPATH=/tmp/comfyui-site${PYTHONPATH:+:$PYTHONPATH}
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /tmp; free -g; } >> "$log" 2>&1
export TORCH_LOGS=recompiles  # a recompile after the VLM came back would show in the log
status=1
for source in $(ls "$carry"/*-comfyui-*.tar.xz 2>/dev/null | sort); do
  checkout=/tmp/$(basename "$source" .tar.xz)
  mkdir -p "$checkout" && tar -xJf "$source" -C "$checkout"
  echo "== $(basename "$source")" >> "$log"
  left=$((570 - SECONDS))  # the call's 600 s, less the unpacking and the summary
  [ "$left" -gt 60 ] || break
  TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) timeout "$left" python3 benchmarks/comfyui_memory.py --comfyui "$checkout" \
    --out "$out/$(basename "$source" .tar.xz).json" "$@" >> "$log" 2>&1
  status=$?
  echo "exit $status" >> "$log"
  [ "$status" -eq 0 ] && break
done
[ -n "$(ls "$carry"/*-comfyui-*.tar.xz 2>/dev/null)" ] || echo "no ComfyUI source in $carry: run benchmarks/prepare_comfyui_carry.sh" >> "$log"
tail -n 30 "$log"
exit "$status"
