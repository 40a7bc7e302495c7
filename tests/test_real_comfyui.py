"""The pack inside a real ComfyUI, opt-in (CI cannot install ComfyUI):

    THINKDIFF_COMFYUI=/path/to/ComfyUI python -m pytest tests/test_real_comfyui.py

This Python must have ComfyUI's requirements, this pack's and pytest. The test starts that ComfyUI on
the CPU with this pack in custom_nodes and model files under the shipped workflows' exact names: the tiny
ThinkDiff models (aligners widened to T5's 4096), a tiny FLUX.1-dev in diffusers keys (ComfyUI converts
them) and random full-size CLIP-L, T5-XXL (fp8) and FLUX VAE, which ComfyUI builds from fixed configs.
The example images are not copied into ComfyUI's input folder: the pack puts them there itself. The test checks
that ComfyUI lists the UI workflows (only those) as Templates with their thumbnails, queues each shipped API
workflow unchanged over HTTP, and the reasoning one with 2 variations (two pictures), and, where playwright and
Chromium are installed, loads the UI workflows into ComfyUI's own frontend and runs the reasoning one opened from
the Templates menu. About 6-10 minutes (2 cores) and 6 GB of disk.
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
API_WORKFLOWS = ["ThinkDiff-LVLM reasoning", "ThinkDiff-CLIP two images", "ThinkDiff-CLIP image and text"]
REASONING = "ThinkDiff-LVLM reasoning"
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


def comfy_probe(code: str, *args: str) -> list[str]:
    probe = subprocess.run([sys.executable, "-c", code, *args], cwd=COMFYUI, capture_output=True, text=True)
    if probe.returncode:
        pytest.fail(f"probe in {COMFYUI} failed:\n{probe.stderr[-3000:]}")
    return probe.stdout.split()


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
    (models / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(models / "vae" / "ae.safetensors"))

    encoders = models / "text_encoders"
    encoders.mkdir()
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                        projection_dim=768, hidden_act="quick_gelu"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in clip_l.state_dict().items()},
              str(encoders / "clip_l.safetensors"))
    save_file(t5_xxl_encoder(), str(encoders / "t5xxl_fp16.safetensors"))


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
    def __init__(self, url: str, base: Path, log: Path, builds_tiny_flux: bool, pack: Path):
        self.url, self.base, self.log, self.builds_tiny_flux, self.pack = url, base, log, builds_tiny_flux, pack

    def skip_without_tiny_flux(self):
        if not self.builds_tiny_flux:  # e.g. 0.3.64 (October 2025); 0.3.75 reads the widths
            pytest.skip("this ComfyUI builds FLUX.1 at fixed widths (hidden 3072), too slow to sample on a CPU")

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

    port, log = free_port(), base / "comfyui.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "main.py", "--cpu", "--base-directory", str(base), "--listen",
                                    "127.0.0.1", "--port", str(port)], cwd=COMFYUI, stdout=log_file,
                                   stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", base, log, builds_tiny_flux, pack)
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


@pytest.mark.parametrize("name", API_WORKFLOWS)
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
