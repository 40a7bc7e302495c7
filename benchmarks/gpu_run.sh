#!/usr/bin/env bash
# The whole GPU benchmark as one command, sized for a short lease of one H100/H200 (~6 minutes):
#   1. generate vs the fast path (eager graph, compiled graph) on Qwen2-VL-7B with random weights,
#      2-shot 612-token prompt, 128 tokens; leak check; the random model saved, loaded back from disk
#      (page cache dropped) and, when bitsandbytes is there, loaded 8-bit and 4-bit (drift measured);
#      a float32 4-layer copy checks that both paths draw the same tokens for a seed;
#   2. a second process as ComfyUI runs it (its default allocator, cudaMallocAsync) with its own empty
#      compile cache: the first call of the path the nodes use (fast_compiled) as a new user sees it,
#      nothing warmed by generate, compiling in the background.
# Results go to $OUT (or benchmarks/out): bench.json, bench_new_process.json, bench.log, gpu.txt.
# Extra arguments go to both bench runs (a CPU dry run of this script: --config <tiny>/vlm/config.json
# --device cpu --image-size 56 --prompt-tokens 40 --tokens 8).
# Machines without a package index: put a bitsandbytes wheel in .device/wheels first
# (pip download --no-deps bitsandbytes -d .device/wheels) and carry .device/wheels.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out}
mkdir -p "$out"
if ! python3 -c "import bitsandbytes" 2>/dev/null && ls .device/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .device/wheels/*.whl
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "no nvidia-smi"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} > "$out/gpu.txt" 2>&1
quantize=()
python3 -c "import bitsandbytes" 2>/dev/null && quantize=(--quantize 8bit 4bit)
# Compile from a cold cache: the first call a new user sees.
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR
export TORCH_LOGS=recompiles  # a recompile (per layer, per prompt length) would show in bench.log
timeout 400 python3 -m thinkdiff_core bench --out "$out/bench.json" --save-random /tmp/qwen2-vl-7b-random \
  --drop-page-cache "${quantize[@]}" "$@" > /dev/null 2> "$out/bench.log"
echo "bench exit $?" >> "$out/bench.log"
rm -rf /tmp/qwen2-vl-7b-random
TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)
PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync timeout 150 python3 -m thinkdiff_core bench --paths fast_compiled fast --repeats 1 --leak-runs 0 \
  --out "$out/bench_new_process.json" "$@" > /dev/null 2>> "$out/bench.log"
echo "new-process bench exit $?" >> "$out/bench.log"
tail -n 20 "$out/bench.log"
python3 -m thinkdiff_core.commands.bench "$out/bench.json" "$out/bench_new_process.json"
