"""The pack inside a real ComfyUI, opt-in (CI cannot install ComfyUI):

    THINKDIFF_COMFYUI=/path/to/ComfyUI python -m pytest tests/test_real_comfyui.py

This Python must have ComfyUI's requirements, this pack's and pytest. The test starts that ComfyUI on
the CPU with this pack in custom_nodes and model files under the shipped workflows' exact names: the tiny
ThinkDiff models (aligners widened to T5's 4096), a tiny FLUX.1-dev in diffusers keys (ComfyUI converts
them), random full-size CLIP-L, CLIP-G, T5-XXL (fp8) and FLUX VAE, which ComfyUI builds from fixed configs, an
SD3.5 checkpoint (a depth-2 MMDiT with those encoders and a random SD3 VAE) and an LTX-Video checkpoint (a 2-layer
transformer and a tiny VAE given in its metadata). A probe compares the pack's conditioning layout for each T5-XXL
family (FLUX, SD3 with and without T5, Chroma, LTX-Video, Mochi, CogVideoX where ComfyUI has it) with ComfyUI's
own encoders and CLIPTextEncode, and checks that HiDream's and SD1's CLIPs are refused.
The example images are not copied into ComfyUI's input folder: the pack puts them there itself. The test checks
that ComfyUI lists the UI workflows (only those) as Templates with their thumbnails, queues each shipped API
workflow unchanged over HTTP, and the reasoning one with 2 variations (two pictures), and, where playwright and
Chromium are installed, loads the UI workflows into ComfyUI's own frontend and runs the reasoning one opened from
the Templates menu. About 25 minutes on 2 cores and 13 GB of disk; the time goes mostly to T5-XXL passes (~30 s
each, whatever the text's length: the probe makes 7) and to writing the random encoders (~3 min).
THINKDIFF_SCREENSHOTS=DIR saves the Templates dialog (templates_extensions.png) and the page after each run from
it, to look at the Reason node's answer, and the frontend console's warnings (console_warnings.txt).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PACK_FILES, REPO

COMFYUI = os.environ.get("THINKDIFF_COMFYUI")
SCREENSHOTS = os.environ.get("THINKDIFF_SCREENSHOTS")  # a folder: the page after each run from it is saved there
pytestmark = pytest.mark.skipif(not COMFYUI, reason="set THINKDIFF_COMFYUI to a ComfyUI checkout to run")

WORKFLOWS = REPO / "workflows"
API_FOLDER = REPO / "api_workflows"
REASONING = "ThinkDiff-LVLM reasoning"
SD35, LTXV = "ThinkDiff-LVLM reasoning SD3.5", "ThinkDiff-LVLM reasoning LTX-Video"
SIDE_BY_SIDE = "ThinkDiff-LVLM aligned tokens vs answer text"
FLUX_API_WORKFLOWS = [REASONING, "ThinkDiff-CLIP two images", "ThinkDiff-CLIP image and text"]  # one FLUX image each
API_WORKFLOWS = [*FLUX_API_WORKFLOWS, SD35, LTXV, SIDE_BY_SIDE]  # every UI workflow, each with its API twin
SD35_CHECKPOINT, LTXV_CHECKPOINT = "sd3.5_large_fp8_scaled.safetensors", "ltx-video-2b-v0.9.safetensors"
ASSETS = REPO / "thinkdiff_core" / "assets"
T5_WIDTH = 4096
FLUX_WIDTH = 128
# Reasoning runs that must execute need seeds new to the server (a repeat is served from its cache); the
# shipped workflows use 0. Variations use their seed and the next.
PREVIEW_ONLY_SEED, FRONTEND_SEED, VARIATIONS_SEED = 2, 1, 3

# Code run in a new process in the ComfyUI checkout, on the CPU, importing its `comfy` package.
PROBE_PREAMBLE = """
import sys
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management looks for a GPU
"""
# The width of the FLUX that ComfyUI's own detection would build from these weights.
FLUX_WIDTH_PROBE = PROBE_PREAMBLE + """
from safetensors.torch import load_file
import comfy.model_detection as detection
print(detection.detect_unet_config(detection.convert_diffusers_mmdit(load_file(sys.argv[1]), ""), "")["hidden_size"])
"""
# What ComfyUI's LoadedModel asks to free before loading a quantised VLM's patcher: fresh, and after an unload.
PINNED_PATCHER_PROBE = PROBE_PREAMBLE + """
import importlib, torch
import comfy.model_management as mm
sys.path.insert(0, sys.argv[1])
managed = importlib.import_module("ComfyUI-ThinkDiff.nodes.managed")
patcher = managed.manage(torch.nn.Linear(256, 256), movable=False)
needed = [mm.LoadedModel(patcher).model_memory_required(patcher.load_device)]
mm.load_models_gpu([patcher], force_full_load=True)
mm.unload_all_models()
needed.append(mm.LoadedModel(patcher).model_memory_required(patcher.load_device))
print(patcher.model_size(), *needed)
"""
# The model class and parameter counts of the diffusion model and the VAE that ComfyUI builds from a checkpoint
# (its diffusion model on the meta device; the VAE for real, from the checkpoint's metadata as the loader does).
CHECKPOINT_SIZE_PROBE = PROBE_PREAMBLE + """
import torch
from safetensors import safe_open
import comfy.model_detection as detection, comfy.sd
prefix = "model.diffusion_model."
with safe_open(sys.argv[1], "pt") as checkpoint:
    metadata, keys = checkpoint.metadata(), list(checkpoint.keys())
    unet = {key: checkpoint.get_tensor(key) for key in keys if key.startswith(prefix)}
    config = detection.model_config_from_unet(unet, prefix, metadata=metadata)
    vae_prefix = config.vae_key_prefix[0]
    vae = {key[len(vae_prefix):]: checkpoint.get_tensor(key) for key in keys if key.startswith(vae_prefix)}
model = config.get_model(unet, prefix, device=torch.device("meta"))
print(type(config).__name__, sum(p.numel() for p in model.diffusion_model.parameters()),
      sum(p.numel() for p in comfy.sd.VAE(sd=vae, metadata=metadata).first_stage_model.parameters()))
"""
# A tiny LTX-Video checkpoint built from this ComfyUI's own classes, configured (partly) by the checkpoint's
# metadata, which CheckpointLoaderSimple passes on: a 2-layer transformer 128 wide (ComfyUI reads the layers
# and widths from its keys) in one head (from the metadata; from the keys alone it would be 32 heads of 4,
# whose attention over the 4992 tokens of 97 frames of 768x512 takes 20 s a step on 2 cores), and a VAE of 3
# compress_all blocks after a 4x4 patch (32x spatial, 8x temporal, as the real one). 0.33 takes the VAE's
# base channels (16) from the metadata too; 0.3.64 builds it at 128.
LTXV_CHECKPOINT_WRITER = PROBE_PREAMBLE + """
import json, torch
from safetensors.torch import save_file
import comfy.ops
from comfy.ldm.lightricks.model import LTXVModel
from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
torch.manual_seed(0)
vae_config = {"dims": 3, "in_channels": 3, "out_channels": 3, "latent_channels": 128, "patch_size": 4,
              "blocks": [["compress_all", 1], ["compress_all", 1], ["compress_all", 1], ["res_x", 1]],
              "norm_layer": "pixel_norm", "latent_log_var": "uniform", "causal_decoder": False,
              "encoder_base_channels": 16, "decoder_base_channels": 16}
heads = {"num_attention_heads": 1, "attention_head_dim": 128}
transformer = LTXVModel(in_channels=128, cross_attention_dim=128, caption_channels=4096, num_layers=2, **heads,
                        dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
vae = VideoVAE(config=vae_config)
with torch.no_grad():
    for module in (transformer, vae):
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.ones_like(parameter) if "norm" in name else torch.randn_like(parameter) * 0.02)
    # Otherwise torch.empty: the latent's per-channel mean and std.
    for name, buffer in vae.per_channel_statistics.named_buffers():
        buffer.fill_(1.0 if "std" in name else 0.0)
state = {"model.diffusion_model." + k: v.contiguous() for k, v in transformer.state_dict().items()}
state.update({"vae." + k: v.contiguous() for k, v in vae.state_dict().items()})
save_file(state, sys.argv[1], metadata={"config": json.dumps({"vae": vae_config, "transformer": heads})})
"""
# The pack's family layouts (nodes/families.py) against ComfyUI's own encoders and CLIPTextEncode, for the CLIPs
# each family loads, from the random encoder files; prints one JSON object.
FAMILIES_PROBE = PROBE_PREAMBLE + """
import gc, importlib, json, os, time, torch
import comfy.model_management as mm
import comfy.sd
import nodes
sys.path.insert(0, sys.argv[1])
families = importlib.import_module("ComfyUI-ThinkDiff.nodes.families")
encoders, text = sys.argv[2], sys.argv[3]

def load(names, kind):
    clip = comfy.sd.load_clip([os.path.join(encoders, name) for name in names],
                              clip_type=getattr(comfy.sd.CLIPType, kind))
    # A T5-XXL pass costs ~30 s on a CPU: the same tokens are encoded once (CLIPTextEncode and ours ask alike).
    encode, memo = clip.encode_from_tokens, {}
    def memoized(tokens, **options):
        key = repr((tokens, sorted(options.items())))
        if key not in memo:
            memo[key] = encode(tokens, **options)
        return dict(memo[key]) if isinstance(memo[key], dict) else memo[key]  # the caller may pop from it
    clip.encode_from_tokens = memoized
    return clip

def free():
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()

def same(a, b):
    return a is None and b is None or a is not None and b is not None and a.shape == b.shape and torch.equal(a, b)

def compare(clip):
    ((reference, reference_extras),) = nodes.CLIPTextEncode().encode(clip, text)[0]
    ours = families.encode(clip, clip.tokenize(text))
    ((cond, extras),) = ours.conditioning(ours.t5, ours.t5_mask)
    before = ours.before_t5.shape[1]
    slot = torch.randn((2, 8, reference.shape[-1]), generator=torch.Generator().manual_seed(0)).to(reference.dtype)
    ((slot_cond, slot_extras),) = ours.conditioning(slot)
    pooled, mask = reference_extras.get("pooled_output"), reference_extras.get("attention_mask")
    slot_pooled, slot_mask = slot_extras.get("pooled_output"), slot_extras.get("attention_mask")
    return ours, {
        "family": ours.family.name, "before_t5": before, "t5": ours.t5.shape[1],
        "reference_extras": sorted(reference_extras), "extras": sorted(extras),
        "rebuilt": torch.equal(cond, reference) and same(extras.get("pooled_output"), pooled)
                   and same(extras.get("attention_mask"), mask),
        "pooled": None if pooled is None else list(pooled.shape),
        "mask": None if mask is None else list(mask.shape),
        "slot_shape": list(slot_cond.shape), "slot_extras": sorted(slot_extras),
        "slot_kept": torch.equal(slot_cond[:, before:], slot)
                     and torch.equal(slot_cond[:, :before], reference[:, :before].expand(2, -1, -1)),
        "slot_pooled": None if slot_pooled is None else bool(slot_pooled.shape == (2, pooled.shape[-1])
                                                              and torch.equal(slot_pooled, pooled.expand(2, -1))),
        "slot_mask": None if slot_mask is None else bool(slot_mask.dtype == mask.dtype
                                                          and torch.equal(slot_mask, torch.ones((2, 8), dtype=mask.dtype))),
    }

CLIP_L, CLIP_G, T5 = "clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"
cases = [("SD3 CLIP-L/G", [CLIP_L, CLIP_G], "SD3"), ("SD3 T5", [T5], "SD3"), ("SD3", [CLIP_L, CLIP_G, T5], "SD3"),
         ("FLUX", [CLIP_L, T5], "FLUX"), ("Chroma", [T5], "CHROMA"), ("LTXV", [T5], "LTXV"), ("Mochi", [T5], "MOCHI")]
if hasattr(comfy.sd.CLIPType, "COGVIDEOX"):  # ComfyUI from May 2026
    cases.append(("CogVideoX", [T5], "COGVIDEOX"))
results, parts = {}, {}
for label, names, kind in cases:
    start = time.time()
    clip = load(names, kind)
    ours, results[label] = compare(clip)
    results[label]["seconds"] = round(time.time() - start, 1)
    parts[label] = ours
    del clip, ours
    free()
# SD3's split: CLIP-L/G's part (as SD3's CLIP without T5 encodes the text), then T5's (as with T5 alone).
results["SD3"]["before_t5_is_clip_lg"] = torch.equal(parts["SD3"].before_t5, parts["SD3 CLIP-L/G"].before_t5)
results["SD3"]["t5_is_t5_alone"] = torch.equal(parts["SD3"].t5, parts["SD3 T5"].t5)
# CLIPs the pack must refuse: HiDream's (T5-XXL beside other encoders, its own layout) and SD1's (no T5).
for label, names, kind in [("HiDream", [T5], "HIDREAM"), ("SD1", [CLIP_L], "STABLE_DIFFUSION")]:
    try:
        clip = load(names, kind)
    except FileNotFoundError as error:  # a checkout without its tokenizer files (HiDream's Llama 3 tokenizer.json)
        results[label] = {"missing": str(error)}
        continue
    try:
        families.detect(clip)
        results[label] = {"refusal": None}
    except ValueError as error:
        results[label] = {"refusal": str(error)}
    del clip
    free()
print(json.dumps(results))
"""


def comfy_probe(code: str, *args: str) -> list[str]:
    """The words the probe printed."""
    return comfy_probe_output(code, *args).split()


def comfy_probe_output(code: str, *args: str) -> str:
    probe = subprocess.run([sys.executable, "-c", code, *args], cwd=COMFYUI, capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"probe in {COMFYUI} failed:\n{probe.stderr[-3000:]}")
    return probe.stdout


def write_models(models: Path, tiny_models: dict) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from thinkdiff_core import extract_vision
    from thinkdiff_core.testing.tiny_models import make_tiny_aligner

    torch.manual_seed(0)
    shutil.copytree(tiny_models["vlm"], models / "LLM" / "Qwen2-VL-7B-Instruct")
    thinkdiff = models / "thinkdiff"
    thinkdiff.mkdir(parents=True)
    extract_vision(tiny_models["blip2"], thinkdiff / "blip2_vision.safetensors")
    with safe_open(str(thinkdiff / "blip2_vision.safetensors"), "pt") as vision:
        vision_width = vision.get_slice("vision_model.post_layernorm.weight").get_shape()[0]
    vlm_width = json.loads((tiny_models["vlm"] / "config.json").read_text())["hidden_size"]
    make_tiny_aligner(thinkdiff / "thinkdiff_lvlm.pth", vlm_width, T5_WIDTH, torch.ones(T5_WIDTH))
    make_tiny_aligner(thinkdiff / "thinkdiff_clip.pth", vision_width, T5_WIDTH, torch.ones(T5_WIDTH))

    # ComfyUI reads FLUX's widths from its keys; heads = hidden size / sum(axes_dim) = 128 / 128.
    flux = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=FLUX_WIDTH, num_attention_heads=1, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    (models / "diffusion_models").mkdir()
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in flux.state_dict().items()},
              str(models / "diffusion_models" / "flux1-dev.safetensors"))
    vae = AutoencoderKL(latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, use_quant_conv=False, use_post_quant_conv=False)
    vae = {k: v.contiguous() for k, v in vae.state_dict().items()}
    (models / "vae").mkdir()
    save_file(vae, str(models / "vae" / "ae.safetensors"))

    encoders = models / "text_encoders"
    encoders.mkdir()
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                        projection_dim=768, hidden_act="quick_gelu"))
    clip_l = {k: v.to(torch.float16).contiguous() for k, v in clip_l.state_dict().items()}
    save_file(clip_l, str(encoders / "clip_l.safetensors"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                        num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"))
    clip_g = {k: v.to(torch.float16).contiguous() for k, v in clip_g.state_dict().items()}
    save_file(clip_g, str(encoders / "clip_g.safetensors"))
    t5 = t5_xxl_encoder()
    save_file(t5, str(encoders / "t5xxl_fp16.safetensors"))

    # SD3.5 as its checkpoint holds it, under the prefixes ComfyUI's SD3 support reads (supported_models.SD3:
    # text_encoders.{clip_l,clip_g,t5xxl}.transformer., the VAE under first_stage_model.): a tiny MMDiT and the
    # same random encoders and 16-channel VAE (ComfyUI converts its diffusers keys) as the files above.
    checkpoints = models / "checkpoints"
    checkpoints.mkdir()
    sd35 = {"model.diffusion_model." + k: v for k, v in tiny_sd3_mmdit().items()}
    sd35.update({"first_stage_model." + k: v for k, v in vae.items()})
    for name, encoder in (("clip_l", clip_l), ("clip_g", clip_g), ("t5xxl", t5)):
        sd35.update({f"text_encoders.{name}.transformer.{k}": v for k, v in encoder.items()})
    save_file(sd35, str(checkpoints / SD35_CHECKPOINT))
    del sd35, t5, clip_g
    comfy_probe(LTXV_CHECKPOINT_WRITER, str(checkpoints / LTXV_CHECKPOINT))


def tiny_sd3_mmdit() -> dict[str, torch.Tensor]:
    """ComfyUI's SD3 MMDiT at depth 2 (model_detection reads the depth, channels and widths from these shapes;
    hidden = 64 x depth = 128, 2 heads of 64; the last block's context part is pre_only). pos_embed holds
    64x64 patches, the real one's 192x192 cut to what a 1024x1024 image (128x128 latent) needs: ComfyUI crops
    it around the centre to the latent's size."""
    generator = torch.Generator().manual_seed(0)
    hidden, depth, patch, channels = 128, 2, 2, 16

    def weight(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    state = {"pos_embed": weight(1, 64 * 64, hidden), "x_embedder.proj.weight": weight(hidden, channels, patch, patch),
             "x_embedder.proj.bias": weight(hidden)}

    def linear(name, out_features, in_features):
        state[name + ".weight"], state[name + ".bias"] = weight(out_features, in_features), weight(out_features)

    linear("t_embedder.mlp.0", hidden, 256)
    linear("t_embedder.mlp.2", hidden, hidden)
    linear("y_embedder.mlp.0", hidden, 2048)  # the pooled CLIP-L + CLIP-G vector
    linear("y_embedder.mlp.2", hidden, hidden)
    linear("context_embedder", hidden, T5_WIDTH)
    linear("final_layer.linear", patch * patch * channels, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    for block in range(depth):
        for part in ("x_block", "context_block"):
            prefix = f"joint_blocks.{block}.{part}."
            pre_only = part == "context_block" and block == depth - 1
            linear(prefix + "attn.qkv", 3 * hidden, hidden)
            state[prefix + "attn.ln_q.weight"], state[prefix + "attn.ln_k.weight"] = torch.ones(64), torch.ones(64)
            linear(prefix + "adaLN_modulation.1", (2 if pre_only else 6) * hidden, hidden)
            if not pre_only:
                linear(prefix + "attn.proj", hidden, hidden)
                linear(prefix + "mlp.fc1", 4 * hidden, hidden)
                linear(prefix + "mlp.fc2", hidden, 4 * hidden)
    return state


def t5_xxl_encoder() -> dict[str, torch.Tensor]:
    """A random T5-XXL encoder in fp8 (4.8 GB instead of 9.5), a storage ComfyUI loads as is."""
    generator = torch.Generator().manual_seed(0)

    def weight(*shape, std=0.02):
        return (torch.randn(*shape, generator=generator) * std).to(torch.float8_e4m3fn)

    def ones():
        return torch.ones(T5_WIDTH).to(torch.float8_e4m3fn)

    state = {"shared.weight": weight(32128, T5_WIDTH, std=1.0), "encoder.final_layer_norm.weight": ones(),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": weight(32, 64)}
    for block in range(24):
        prefix = f"encoder.block.{block}.layer."
        state.update({prefix + f"0.SelfAttention.{name}.weight": weight(T5_WIDTH, T5_WIDTH) for name in "qkvo"})
        state[prefix + "1.DenseReluDense.wi_0.weight"] = weight(10240, T5_WIDTH)
        state[prefix + "1.DenseReluDense.wi_1.weight"] = weight(10240, T5_WIDTH)
        state[prefix + "1.DenseReluDense.wo.weight"] = weight(T5_WIDTH, 10240)
        state[prefix + "0.layer_norm.weight"], state[prefix + "1.layer_norm.weight"] = ones(), ones()
    return state


class Server:
    def __init__(self, url: str, base: Path, log: Path, builds_tiny_flux: bool, pack: Path, too_big: dict):
        self.url, self.base, self.log, self.builds_tiny_flux, self.pack = url, base, log, builds_tiny_flux, pack
        self.too_big = too_big  # checkpoint name: why this ComfyUI builds its models too big for a CPU, or None

    def skip_without_tiny_flux(self):
        if not self.builds_tiny_flux:  # e.g. 0.3.64 (October 2025); 0.3.75 reads the widths
            pytest.skip("this ComfyUI builds FLUX.1 at fixed widths (hidden 3072), too slow to sample on a CPU")

    def skip_unless_tiny(self, checkpoint: str):
        if self.too_big[checkpoint]:
            pytest.skip(self.too_big[checkpoint])

    def get(self, path: str):
        return json.load(urllib.request.urlopen(self.url + path))

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue an API-format prompt and wait for its history entry; a failed run fails the test."""
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
        request = urllib.request.Request(self.url + "/prompt", body, {"Content-Type": "application/json"})
        try:
            prompt_id = json.load(urllib.request.urlopen(request))["prompt_id"]
        except urllib.error.HTTPError as error:
            pytest.fail(f"ComfyUI refused the prompt: {error.read().decode()}")
        deadline = time.time() + timeout
        while time.time() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("status_str") in ("success", "error"):
                errors = [message for kind, message in entry["status"]["messages"] if kind == "execution_error"]
                assert entry["status"]["status_str"] == "success", errors
                return entry
            time.sleep(1)
        pytest.fail(f"the prompt did not finish in {timeout} s; log: {self.log}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def checkpoint_too_big(path: Path) -> str | None:
    """Why the models this ComfyUI builds from a tiny checkpoint are too slow for a CPU, or None."""
    kind, model, vae = comfy_probe(CHECKPOINT_SIZE_PROBE, str(path))[-3:]
    if int(model) > 10_000_000:  # both have 1.3-1.9 M (SD3 reads its depth from the keys, LTXV its widths)
        return f"this ComfyUI builds {kind} from {path.name} with {int(model):,} parameters, too slow on a CPU"
    if kind == "LTXV" and int(vae) > 1_000_000:  # 0.33: 0.37 M; 0.3.64 fixes the base channels at 128 (15 M)
        return (f"this ComfyUI builds LTX-Video's VAE at {int(vae):,} parameters (its base channels fixed at 128), "
                "too slow to decode 97 frames of 768x512 on a CPU")
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models):
    base = tmp_path_factory.mktemp("comfyui-base")
    write_models(base / "models", tiny_models)
    pack = base / "custom_nodes" / "ComfyUI-ThinkDiff"
    pack.mkdir(parents=True)
    for name in (*PACK_FILES, "workflows"):  # workflows/: what ComfyUI lists as the pack's templates
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, pack / name)

    flux_file = base / "models" / "diffusion_models" / "flux1-dev.safetensors"
    builds_tiny_flux = int(comfy_probe(FLUX_WIDTH_PROBE, str(flux_file))[-1]) == FLUX_WIDTH
    too_big = {name: checkpoint_too_big(base / "models" / "checkpoints" / name)
               for name in (SD35_CHECKPOINT, LTXV_CHECKPOINT)}

    port, log = free_port(), base / "comfyui.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--listen",
                                    "127.0.0.1", "--port", str(port)], cwd=COMFYUI, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", base, log, builds_tiny_flux, pack, too_big)
    try:
        deadline = time.time() + 300
        while True:
            try:
                server.get("/object_info/ThinkDiffReason")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail(f"ComfyUI did not start:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def test_comfyui_lists_the_nodes_and_the_workflows_models(server):
    info = server.get("/object_info")
    assert "IMPORT FAILED" not in server.log.read_text()
    assert {"ThinkDiffLoadVLM", "ThinkDiffLoadVisionEncoder", "ThinkDiffLoadAligner", "ThinkDiffReason",
            "ThinkDiffCompose"} <= set(info)
    # The answer shown on the Reason node is resent from ComfyUI's cache where ComfyUI has that (0.33 does,
    # 0.3.64 does not); the node is no output node.
    assert info["ThinkDiffReason"].get("has_intermediate_output", True) is True
    assert info["ThinkDiffReason"]["output_node"] is False
    assert info["ThinkDiffLoadVLM"]["input"]["required"]["model"][0] == ["Qwen2-VL-7B-Instruct"]
    assert info["ThinkDiffLoadAligner"]["input"]["required"]["aligner_name"][0] == ["thinkdiff_clip.pth",
                                                                                  "thinkdiff_lvlm.pth"]
    assert info["ThinkDiffLoadVisionEncoder"]["input"]["required"]["vision_name"][0] == ["blip2_vision.safetensors"]


def fetch(server, path: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(server.url + urllib.parse.quote(path, safe="/?&=")) as response:
        return response.headers.get_content_type(), response.read()


def test_comfyui_lists_the_ui_workflows_as_templates_with_their_thumbnails(server):
    # The pack's folder name is its Templates category; the API twins are not listed.
    listed = server.get("/workflow_templates")
    assert {pack: sorted(names) for pack, names in listed.items()} == {server.pack.name: sorted(API_WORKFLOWS)}
    for name in API_WORKFLOWS:
        # What the frontend fetches when the template opens, and the picture it shows on its card.
        assert fetch(server, f"/api/workflow_templates/{server.pack.name}/{name}.json") == (
            "application/json", (WORKFLOWS / f"{name}.json").read_bytes())
        assert fetch(server, f"/api/workflow_templates/{server.pack.name}/{name}.jpg") == (
            "image/jpeg", (WORKFLOWS / f"{name}.jpg").read_bytes())
    # The example images are in ComfyUI's input folder, put there by the pack as it loaded, and LoadImage lists them.
    examples = ["thinkdiff_blue_car.png", "thinkdiff_cat.png", "thinkdiff_pink_sunglasses.png",
                "thinkdiff_white_car.png"]
    assert sorted(p.name for p in (server.base / "input").glob("*.png")) == examples
    for name in examples:
        asset = ASSETS / name.removeprefix("thinkdiff_")
        assert fetch(server, f"/view?filename={name}&type=input")[1] == asset.read_bytes()
    assert set(examples) <= set(server.get("/object_info/LoadImage")["LoadImage"]["input"]["required"]["image"][0])


def test_family_layouts_match_comfyuis_own_encoders(server):
    """The pack splits ComfyUI's encoding of a text where T5's tokens begin and rebuilds it with other tokens in
    T5's place (nodes/families.py): checked against ComfyUI's own encoders and CLIPTextEncode for each family's
    CLIP, from the random encoder files (one after another; each T5-XXL pass takes ~30 s on a CPU)."""
    output = comfy_probe_output(FAMILIES_PROBE, str(server.pack.parent), str(server.base / "models" / "text_encoders"),
                                "a white car painted blue, on a beach")
    results = json.loads(output.strip().splitlines()[-1])
    names = {"SD3 CLIP-L/G": "SD3 / SD3.5", "SD3 T5": "SD3 / SD3.5", "SD3": "SD3 / SD3.5", "FLUX": "FLUX.1",
             "Chroma": "Chroma / PixArt", "LTXV": "LTX-Video", "Mochi": "Mochi"}
    for label, family in names.items():
        result = results[label]
        assert result["family"] == family, label
        # ComfyUI's conditioning, rebuilt from the split with T5's own tokens (and T5's mask) in T5's place.
        assert result["rebuilt"] and result["extras"] == result["reference_extras"], (label, result)
        # Other tokens in T5's place: 2 rows of 8, the part before T5 and the pooled vector repeated per row,
        # and a T5 mask of ones for them exactly where ComfyUI's encoder gives one.
        assert result["slot_shape"] == [2, result["before_t5"] + 8, T5_WIDTH] and result["slot_kept"], (label, result)
        assert result["slot_extras"] == result["reference_extras"], (label, result)
        assert (result["slot_pooled"] is None) == (result["pooled"] is None) and result["slot_pooled"] in (None, True)
        assert (result["slot_mask"] is None) == (result["mask"] is None) and result["slot_mask"] in (None, True)
    # SD3: CLIP-L/G's 77 tokens before T5's, exactly as its CLIP without T5 and T5 alone encode the text.
    assert (results["SD3"]["before_t5"], results["SD3 CLIP-L/G"]["before_t5"], results["SD3 CLIP-L/G"]["t5"]) == (
        77, 77, 0)
    assert results["SD3"]["before_t5_is_clip_lg"] and results["SD3"]["t5_is_t5_alone"]
    assert results["SD3"]["t5"] == results["SD3 T5"]["t5"] == 77  # SD3's T5 tokenizer pads to 77
    assert results["SD3"]["pooled"] == results["SD3 T5"]["pooled"] == [1, 2048]  # L + G (zeros without them)
    for label in ("SD3 T5", "FLUX", "Chroma", "LTXV", "Mochi"):
        assert results[label]["before_t5"] == 0, label
    assert results["FLUX"]["pooled"] == [1, 768] and results["Chroma"]["pooled"] is None
    assert results["FLUX"]["t5"] == 256 and results["LTXV"]["t5"] == 128 and results["Mochi"]["t5"] == 256
    assert results["LTXV"]["mask"] == [1, 128] and results["Mochi"]["mask"] == [1, 256]
    assert results["FLUX"]["mask"] is None and results["Chroma"]["mask"] is None and results["SD3"]["mask"] is None
    if "CogVideoX" in results:
        assert results["CogVideoX"]["before_t5"] == 0 and results["CogVideoX"]["t5"] == 226
        assert results["CogVideoX"]["pooled"] is None and results["CogVideoX"]["mask"] is None
    # A CLIP of a layout the pack does not know is refused, naming the ones it supports: HiDream's, whose T5-XXL
    # sits beside other encoders, and SD1's, without T5.
    for label, tokenizer in (("HiDream", "HiDreamTokenizer"), ("SD1", "SD1Tokenizer")):
        if "missing" in results[label]:
            warnings.warn(f"{COMFYUI} cannot build {label}'s CLIP, refusal unchecked: {results[label]['missing']}")
            continue
        refusal = results[label]["refusal"]
        assert refusal and f"({tokenizer})" in refusal, (label, refusal)
        assert all(family in refusal for family in ("FLUX.1", "SD3 / SD3.5", "Chroma / PixArt", "LTX-Video", "Mochi"))


@pytest.mark.parametrize("name", FLUX_API_WORKFLOWS)
def test_shipped_api_workflow_runs_unchanged(server, name):
    from PIL import Image

    server.skip_without_tiny_flux()
    prompt = json.loads((API_FOLDER / f"{name} (API).json").read_text())
    entry = server.run(prompt)

    latent = next(node["inputs"] for node in prompt.values() if node["class_type"] == "EmptySD3LatentImage")
    (saved,) = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    pixels = np.asarray(Image.open(server.base / "output" / saved["subfolder"] / saved["filename"]))
    assert pixels.shape == (latent["height"], latent["width"], 3)
    assert pixels.std() > 0  # SaveImage writes NaN as 0: a uniform image means NaNs reached it
    if name == REASONING:
        reason_id = next(i for i, node in prompt.items() if node["class_type"] == "ThinkDiffReason")
        preview_id = next(i for i, node in prompt.items() if node["class_type"] == "PreviewAny")
        answer = entry["outputs"][reason_id]["text"]
        assert len(answer) == 1 and answer[0] and entry["outputs"][preview_id]["text"] == answer


def test_reasoning_variations_draw_a_picture_each(server):
    from PIL import Image

    server.skip_without_tiny_flux()
    prompt = json.loads((API_FOLDER / f"{REASONING} (API).json").read_text())
    reason_id = next(i for i, node in prompt.items() if node["class_type"] == "ThinkDiffReason")
    prompt[reason_id]["inputs"].update(seed=VARIATIONS_SEED, variations=2)
    latent = next(node["inputs"] for node in prompt.values() if node["class_type"] == "EmptySD3LatentImage")
    latent["batch_size"] = 2  # latent i is drawn from the conditioning's row i
    entry = server.run(prompt)

    saved = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    pictures = [np.asarray(Image.open(server.base / "output" / image["subfolder"] / image["filename"]))
                for image in saved]
    assert [p.shape for p in pictures] == [(latent["height"], latent["width"], 3)] * 2
    assert all(p.std() > 0 for p in pictures)  # SaveImage writes NaN as 0
    assert not np.array_equal(*pictures)  # also from each latent's own noise: the answers below show the rows differ
    (answer,) = entry["outputs"][reason_id]["text"]
    parts = re.fullmatch(rf"variation 1 \(seed {VARIATIONS_SEED}\):\n(.+)\n\nvariation 2 \(seed "
                         rf"{VARIATIONS_SEED + 1}\):\n(.+)", answer, re.DOTALL)
    assert parts, answer
    # Different seeds sample different tokens, whose states are the two rows of conditioning.
    assert parts[1] != parts[2]


def saved_files(server, entry: dict, node_id: str) -> list[Path]:
    return [server.base / "output" / image["subfolder"] / image["filename"]
            for image in entry["outputs"].get(node_id, {}).get("images", [])]


def node_ids(prompt: dict, class_type: str) -> list[str]:
    return [i for i, node in prompt.items() if node["class_type"] == class_type]


def test_sd35_workflow_runs_unchanged(server):
    """SD3.5's checkpoint (tiny MMDiT; random CLIP-L, CLIP-G, T5-XXL and VAE at full size) at 1024x1024."""
    from PIL import Image

    server.skip_unless_tiny(SD35_CHECKPOINT)
    prompt = json.loads((API_FOLDER / f"{SD35} (API).json").read_text())
    entry = server.run(prompt, timeout=900)
    latent = next(prompt[i]["inputs"] for i in node_ids(prompt, "EmptySD3LatentImage"))
    (saved,) = [path for i in node_ids(prompt, "SaveImage") for path in saved_files(server, entry, i)]
    pixels = np.asarray(Image.open(saved))
    assert pixels.shape == (latent["height"], latent["width"], 3) == (1024, 1024, 3)
    assert pixels.std() > 0  # SaveImage writes NaN as 0
    (reason_id,), (preview_id,) = node_ids(prompt, "ThinkDiffReason"), node_ids(prompt, "PreviewAny")
    answer = entry["outputs"][reason_id]["text"]
    assert len(answer) == 1 and answer[0] and entry["outputs"][preview_id]["text"] == answer


def test_ltxv_workflow_runs_unchanged(server):
    """LTX-Video's checkpoint (tiny transformer and VAE) with T5-XXL from CLIPLoader: 97 frames of 768x512."""
    from PIL import Image

    server.skip_unless_tiny(LTXV_CHECKPOINT)
    prompt = json.loads((API_FOLDER / f"{LTXV} (API).json").read_text())
    entry = server.run(prompt, timeout=900)
    latent = next(prompt[i]["inputs"] for i in node_ids(prompt, "EmptyLTXVLatentVideo"))
    assert (latent["width"], latent["height"], latent["length"]) == (768, 512, 97)
    (saved,) = [path for i in node_ids(prompt, "SaveAnimatedWEBP") for path in saved_files(server, entry, i)]
    with Image.open(saved) as video:
        assert (video.format, video.n_frames, video.size) == ("WEBP", latent["length"], (latent["width"],
                                                                                          latent["height"]))
    (reason_id,), (preview_id,) = node_ids(prompt, "ThinkDiffReason"), node_ids(prompt, "PreviewAny")
    answer = entry["outputs"][reason_id]["text"]
    assert len(answer) == 1 and answer[0] and entry["outputs"][preview_id]["text"] == answer


def test_aligned_tokens_vs_answer_text_workflow_runs_unchanged(server):
    """FLUX drawn from the aligned tokens and from the Reason node's answer encoded as a prompt, side by side."""
    from PIL import Image

    server.skip_without_tiny_flux()
    prompt = json.loads((API_FOLDER / f"{SIDE_BY_SIDE} (API).json").read_text())
    entry = server.run(prompt)
    saves = {prompt[i]["inputs"]["filename_prefix"]: saved_files(server, entry, i)
             for i in node_ids(prompt, "SaveImage")}
    assert sorted(saves) == ["ThinkDiff aligned tokens", "ThinkDiff answer text"] and all(
        len(paths) == 1 for paths in saves.values()), saves
    aligned, answer = (np.asarray(Image.open(saves[prefix][0]))
                       for prefix in ("ThinkDiff aligned tokens", "ThinkDiff answer text"))
    assert aligned.shape == answer.shape == (512, 512, 3)
    assert aligned.std() > 0 and answer.std() > 0  # SaveImage writes NaN as 0
    assert not np.array_equal(aligned, answer)


def test_comfyui_counts_a_quantised_vlm_as_loaded(server):
    # Its weights never leave the GPU, so ComfyUI must not free their size again before each run (that
    # evicted FLUX), neither on the first load nor after an unload, which cannot move them.
    size, first_load, after_unload = map(int, comfy_probe(PINNED_PATCHER_PROBE, str(server.pack.parent)))
    assert size > 0 and first_load == after_unload == 0


@pytest.mark.parametrize("precision", ["bf16", "4-bit (bitsandbytes)"])
def test_reasoning_runs_up_to_the_answer_preview(server, precision):
    """The reasoning workflow's part before FLUX (loaders, Reason, Preview Any), on any ComfyUI."""
    if "bitsandbytes" in precision:
        pytest.importorskip("bitsandbytes")
    prompt = json.loads((API_FOLDER / f"{REASONING} (API).json").read_text())
    preview_id = next(i for i, node in prompt.items() if node["class_type"] == "PreviewAny")
    needed, pending = set(), [preview_id]
    while pending:
        node_id = pending.pop()
        needed.add(node_id)
        pending += [value[0] for value in prompt[node_id]["inputs"].values() if isinstance(value, list)]
    prompt = {i: prompt[i] for i in needed}
    reason_id = next(i for i in needed if prompt[i]["class_type"] == "ThinkDiffReason")
    prompt[reason_id]["inputs"]["seed"] = PREVIEW_ONLY_SEED
    loader_id = next(i for i in needed if prompt[i]["class_type"] == "ThinkDiffLoadVLM")
    prompt[loader_id]["inputs"]["precision"] = precision
    entry = server.run(prompt)
    (answer,) = entry["outputs"][preview_id]["text"]
    assert answer


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def test_frontend_loads_the_ui_workflows_and_shows_the_answer(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    info = server.get("/object_info")

    def declared(prompt):
        """class and inputs of each node, less widgets only the frontend has (Preview Any's on 0.3.64)."""
        return {i: (node["class_type"], {k: v for k, v in node["inputs"].items()
                                         if any(k in group for group in info[node["class_type"]]["input"].values())})
                for i, node in prompt.items()}

    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        except sync_api.Error as error:
            pytest.skip(f"no Chromium for playwright: {error}")
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # Errors from this pack's extension, and any once the app is open (frontend 1.27.10 raises one of its
        # own while opening, also without custom nodes).
        page_errors, app_open = [], [False]
        page.on("pageerror", lambda error: page_errors.append(str(error))
                if app_open[0] or "ThinkDiff" in (error.stack or "") else None)
        # The frontend's console warnings; ours: any naming the pack, one that an extension imports a frontend
        # module that is not public, one on a deprecated widget property (the frontend warns of its own too).
        warnings = []
        page.on("console", lambda message: warnings.append(message.text) if message.type == "warning" else None)

        def open_app():
            app_open[0] = False
            page.goto(server.url)
            # Registered only after the extensions' beforeRegisterNodeDef (web/thinkdiff.js) ran for it.
            page.wait_for_function("!!(window.app?.graph && window.LiteGraph?.registered_node_types?.ThinkDiffReason)",
                                   timeout=120_000)
            app_open[0] = True

        def load(workflow):
            page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
            return page.evaluate("""() => (window.app.graph.nodes || window.app.graph._nodes)
                .filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)""")

        def open_template(name):
            """Open a template as a person does: Templates, the pack under Extensions, the template's card. Returns
            each card's title and its thumbnail's width once loaded (0: a placeholder)."""
            page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.get_by_text(server.pack.name, exact=True).click()
            page.wait_for_function("""(count) => {
                const images = [...document.querySelectorAll("[data-testid^='template-workflow-'] img")];
                return images.length === count && images.every((image) => image.complete); }""",
                arg=len(API_WORKFLOWS), timeout=30_000)
            cards = page.evaluate("""() => [...document.querySelectorAll("[data-testid^='template-workflow-']")]
                .map((card) => [card.querySelector('h3').textContent, card.querySelector('img').naturalWidth])""")
            if SCREENSHOTS:
                page.screenshot(path=str(Path(SCREENSHOTS) / "templates_extensions.png"))
            page.locator(f"[data-testid='template-workflow-{name}']").click()
            nodes = len(json.loads((WORKFLOWS / f"{name}.json").read_text())["nodes"])
            page.wait_for_function("""(count) => !document.querySelector("[data-testid^='template-workflow-']")
                && (window.app.graph.nodes || window.app.graph._nodes).length === count""", arg=nodes, timeout=30_000)
            return sorted(cards)

        open_app()
        for name in API_WORKFLOWS:
            assert load(json.loads((WORKFLOWS / f"{name}.json").read_text())) == [], name
            # The frontend's own minimum width for each of our nodes (its title, sockets and widgets) fits.
            too_narrow = page.evaluate("""() => (window.app.graph.nodes || window.app.graph._nodes)
                .filter(n => n.type.startsWith('ThinkDiff') && n.computeSize()[0] > n.size[0])
                .map(n => [n.type, n.size[0], n.computeSize()[0]])""")
            assert too_narrow == [], name
            frontend_prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            api_prompt = declared(json.loads((API_FOLDER / f"{name} (API).json").read_text()))
            assert declared(frontend_prompt) == api_prompt, name
        assert page_errors == []
        server.skip_without_tiny_flux()

        # Run the reasoning workflow from the page, then reload the page and run it again: served whole from
        # ComfyUI's cache, the node still shows the answer where ComfyUI resends it.
        workflow = json.loads((WORKFLOWS / f"{REASONING}.json").read_text())
        reason = next(node for node in workflow["nodes"] if node["type"] == "ThinkDiffReason")
        reason["widgets_values"][2] = FRONTEND_SEED
        reason_widget = """(name) => (window.app.graph.nodes || window.app.graph._nodes)
            .find(n => n.type === 'ThinkDiffReason').widgets.find(w => w.name === name)"""
        # Once the box is laid out (computedHeight): its text, whether it is read-only, its own height
        # (offsetHeight, before the canvas zoom's transform), and the instruction box's height then.
        read_answer = f"""() => {{
            const widget = ({reason_widget})('vlm_answer');
            return widget?.value && widget.computedHeight ? [widget.value, widget.element.readOnly,
                widget.element.offsetHeight, ({reason_widget})('instruction').computedHeight] : null; }}"""
        runs = 2 if info["ThinkDiffReason"].get("has_intermediate_output") else 1
        answers, cached, instruction_heights = [], [], []
        for run in range(runs):
            if run == 0:  # from the Templates menu, as it opens: its images are where its LoadImage nodes look
                assert open_template(REASONING) == sorted([name, 512] for name in API_WORKFLOWS)
                assert page.evaluate("""() => (window.app.graph.nodes || window.app.graph._nodes)
                    .filter(n => !window.LiteGraph.registered_node_types[n.type]).map(n => n.type)""") == []
                page.evaluate(f"() => {{ ({reason_widget})('seed').value = {FRONTEND_SEED}; }}")
                # The menu fits the graph into view (50 %), where the frontend hides text boxes; zoom in to the
                # view the file was saved with, as a person would to read the node.
                page.evaluate("""(saved) => { const view = window.app.canvas.ds; view.scale = saved.scale;
                    view.offset[0] = saved.offset[0]; view.offset[1] = saved.offset[1];
                    window.app.canvas.setDirty(true, true); }""", workflow["extra"]["ds"])
            else:
                assert load(workflow) == []
            instruction_heights.append(page.wait_for_function(
                f"() => ({reason_widget})('instruction').computedHeight", timeout=15_000).json_value())
            before = set(server.get("/history"))
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            deadline = time.time() + 300
            while not (new := set(server.get("/history")) - before):
                if time.time() > deadline:
                    pytest.fail(f"the run queued from the page did not finish in 300 s; log: {server.log}")
                time.sleep(1)
            (entry,) = (server.get("/history")[prompt_id] for prompt_id in new)
            assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
            cached.append(next(message["nodes"] for kind, message in entry["status"]["messages"]
                               if kind == "execution_cached"))
            try:
                page.wait_for_function(read_answer, timeout=15_000)
            except sync_api.TimeoutError:
                pass
            answers.append(page.evaluate(read_answer))
            if SCREENSHOTS:  # for a person to look at the nodes after a run (Escape: the templates dialog)
                page.keyboard.press("Escape")
                page.screenshot(path=str(Path(SCREENSHOTS) / f"reasoning_run_{len(answers)}.png"))
            open_app()
        browser.close()
    if SCREENSHOTS:
        (Path(SCREENSHOTS) / "console_warnings.txt").write_text("\n".join(warnings))
    ours = [text for text in warnings if any(mark in text for mark in ("ThinkDiff", "internal module", "widget."))]
    assert ours == [], ours
    assert answers[0] and answers[0][1] is True, f"no read-only answer on the node: {answers[0]}"
    assert answers[0][2] >= 120, f"the answer box is {answers[0][2]} px high; web/thinkdiff.js asks for 140"
    # The node grew by the answer box: the instruction box kept its height.
    assert answers[0][3] == instruction_heights[0], f"instruction: {instruction_heights[0]} px, then {answers[0][3]}"
    if runs == 2:
        assert str(reason["id"]) not in cached[0] and str(reason["id"]) in cached[1]
        assert answers[1] == answers[0], "the answer of a run served from the cache is not shown"
    assert page_errors == []


def test_memory_check_runs_on_this_comfyuis_model_management(tmp_path):
    """benchmarks/comfyui_memory.py (stage comfyui_memory of benchmarks/gpu.sh on a GPU) imports this checkout's
    memory manager and the pack as ComfyUI does; on the CPU it evicts nothing, but every step runs."""
    out = tmp_path / "memory.json"
    completed = subprocess.run([sys.executable, str(REPO / "benchmarks" / "comfyui_memory.py"), "--comfyui", COMFYUI,
                                "--cpu", "--runs", "2", "--tokens", "4", "--flux-gib", "0.001", "--out", str(out)],
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(out.read_text())
    version = (Path(COMFYUI) / "comfyui_version.py").read_text().split("=")[-1].strip().strip('"')
    assert results["comfyui"] == version and results["comfyui_args"] == ["--cpu"]
    assert len(results["passes"]["fp32"]["runs"]) == 3 and results["passes"]["fp32"]["same_conditioning_after_reload"]
