"""Hostile model files: what a file claims is checked against what it holds before anything is allocated or run.

Each hostile file is a tiny model's file, copied and then corrupted one way; the error names the file and what
was expected, and the good model beside it still lists, loads and gives the same result.
"""

import ast
import builtins
import json
import os
import re
import resource
import shutil
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from thinkdiff_core import CheckpointError, Reasoner, VisionEncoder, extract_vision, load_aligner
from thinkdiff_core.files import check_safetensors_file, read_json
from thinkdiff_core.reason import check_vlm_folder
from thinkdiff_core.render import check_flux_folder

ASSETS = REPO / "thinkdiff_core" / "assets"
REMOTE_CODE = {"AutoConfig": "configuration_evil.EvilConfig"}


@contextmanager
def address_space_headroom(nbytes):
    """Any allocation of more than `nbytes` in the block fails (Linux): proof that nothing is materialised."""
    statm = Path("/proc/self/statm")
    if not statm.exists():
        yield
        return
    used = int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = used + nbytes if hard == resource.RLIM_INFINITY else min(hard, used + nbytes)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def aligner_of(*shapes, element=None):
    """The official layout's five tensors of the given shapes; with `element`, each a stride-0 view of it."""
    names = ("0.weight", "0.bias", "2.weight", "2.bias", "3.weight")
    if element is None:
        return {f"mm_projector.{n}": torch.ones(s) for n, s in zip(names, shapes)}
    return {f"mm_projector.{n}": torch.as_strided(element, s, (0,) * len(s)) for n, s in zip(names, shapes)}


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.fixture
def vlm_copy(tmp_path, tiny_models):
    folder = tmp_path / "Qwen2-VL"
    shutil.copytree(tiny_models["vlm"], folder)
    return folder


# ------------------------------------------------------------------ aligners


def test_a_2_kb_pth_claiming_160_gb_is_refused_at_once_without_allocating(tmp_path):
    path = tmp_path / "claims_160_gb.pth"
    torch.save({"model": aligner_of((4096, 10_000_000), (4096,), (4096, 4096), (4096,), (4096,),
                                    element=torch.zeros(1))}, path)
    assert path.stat().st_size < 4096
    started = time.perf_counter()
    with address_space_headroom(1 << 30), pytest.raises(CheckpointError) as error:
        load_aligner(path)
    assert time.perf_counter() - started < 1
    assert str(error.value) == (
        f"{path}: mm_projector.0.weight claims shape (4096, 10000000) (163,840,000,000 bytes of torch.float32) but "
        f"the file holds 4 bytes for it; expected weights stored whole, as torch.save and safetensors write them")


def test_a_pth_whose_records_inflate_or_that_uses_the_unsized_legacy_format_is_refused(tmp_path, tiny_models):
    # torch.save never compresses: a deflated record is a few KB that inflate to whatever torch would allocate.
    deflated = tmp_path / "deflated.pth"
    with zipfile.ZipFile(tiny_models["aligner"]) as source, \
            zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as target:
        for record in source.infolist():
            target.writestr(record.filename, source.read(record.filename))
    with pytest.raises(CheckpointError, match=re.escape(f"{deflated}: ") + r"\S+ is compressed \([\d,]+ bytes for "
                       r"[\d,]+\); torch\.save writes no compressed records, so this is not a checkpoint it wrote"):
        load_aligner(deflated)
    legacy = tmp_path / "legacy.pth"
    torch.save(aligner_of((16, 12), (16,), (16, 16), (16,), (16,)), legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=re.escape(
            f"{legacy}: saved in the format of PyTorch before 1.6, whose sizes cannot be checked before loading; "
            f"load it and save it again with a current PyTorch (torch.save)")):
        load_aligner(legacy)


@pytest.mark.parametrize("content, message", [
    (b"", "{path}: empty (0 bytes) (expected the official .pth or a .safetensors aligner)"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 134217728\n",
     "{path} is a Git LFS pointer, not the weights: download the file itself (e.g. `git lfs pull` in that clone)"),
])
def test_an_empty_pth_or_a_git_lfs_pointer_is_named(tmp_path, content, message):
    path = tmp_path / "thinkdiff_lvlm.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_aligner(path)
    assert str(error.value) == message.format(path=path)


@pytest.mark.parametrize("weights, message", [
    (aligner_of((1, 70_000), (1,), (1, 1), (1,), (1,)),
     "mm_projector.0.weight has shape (1, 70000); the mlp2x_gelu_t5_norm aligner needs mm_projector.0.weight "
     "[d_out, d_in], 0.bias [d_out], 2.weight [d_out, d_out], 2.bias [d_out], 3.weight [d_out] with d_in and "
     "d_out from 1 to 65,536"),
    ({**aligner_of((16, 12), (16,), (16, 16), (16,), (16,)), "mm_projector.2.bias": torch.arange(16)},
     "mm_projector.2.bias holds torch.int64 values; expected floating-point weights"),
    ({**aligner_of((16, 12), (16,), (16, 16), (16,), (16,)), "mm_projector.3.weight": [1.0] * 16},
     "mm_projector.3.weight is list; expected a dense tensor of weights"),
])
def test_weights_that_do_not_fit_the_aligner_layout_are_refused(tmp_path, weights, message):
    path = tmp_path / "odd.pth"
    torch.save({"model": weights}, path)
    with pytest.raises(CheckpointError) as error:
        load_aligner(path)
    assert str(error.value) == f"{path}: {message}"


def safetensors_with(path, header, data):
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)


def test_a_safetensors_header_claiming_more_than_its_data_is_refused_by_name(tmp_path):
    claims = tmp_path / "claims.safetensors"
    safetensors_with(claims, {"mm_projector.0.weight": {"dtype": "F32", "shape": [400_000, 100_000],
                                                        "data_offsets": [0, 4]}}, b"\0" * 4)
    started = time.perf_counter()
    with pytest.raises(ValueError) as error:
        load_aligner(claims)
    assert time.perf_counter() - started < 1
    assert str(error.value) == (
        f"{claims} has an unreadable .safetensors header ('mm_projector.0.weight' claims shape [400000, 100000] of "
        f"F32 (160,000,000,000 bytes) but its data_offsets hold 4 bytes); download it again")
    overlapping = tmp_path / "overlapping.safetensors"
    safetensors_with(overlapping, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                   "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ValueError, match=re.escape(f"{overlapping} has an unreadable .safetensors header (the data "
                                                   f"of 'b' (0 to 4) does not follow the tensor before it (which "
                                                   f"ends at 4)); download it again")):
        check_safetensors_file(overlapping)
    nested = tmp_path / "nested.safetensors"
    encoded = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    nested.write_bytes(len(encoded).to_bytes(8, "little") + encoded)
    with pytest.raises(ValueError, match=re.escape(f"{nested} has an unreadable .safetensors header (the header is "
                                                   f"not a JSON object: it nests deeper than 64 levels)")):
        check_safetensors_file(nested)


# ------------------------------------------------------------------ JSON


def deep(levels):
    return '{"a":' * levels + "1" + "}" * levels


@pytest.mark.parametrize("content, problem", [
    (deep(100_000), "it nests deeper than 64 levels"),  # past the recursion limit
    (deep(65), "it nests deeper than 64 levels"),  # parsed, but too deep for whatever recurses over it next
    ('{"hidden_size": 1e999}', "it is not readable JSON (the number 1e999 is too large)"),
    ('{"hidden_size": NaN}', "it is not readable JSON (NaN is not a JSON number)"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "it is not readable JSON (Exceeds the limit (4300 digits)"),
    ("[1, 2]", "it holds an array where a JSON object is expected"),
    ('"qwen2_vl"', "it holds a string where a JSON object is expected"),
    (b'{"model_type": "qwen2_vl\xff"}', "it is not UTF-8 text ('utf-8' codec can't decode byte 0xff"),
    ('{"model_type": "qwen2', "it is not readable JSON (Unterminated string starting at: line 1 column 16"),
])
def test_hostile_json_is_a_value_error_naming_the_file_and_the_expectation(tmp_path, content, problem):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as error:
        read_json(path, "a model config (a JSON object)")
    assert str(error.value).startswith(f"{path} is not a model config (a JSON object): {problem}")


def test_json_files_that_are_not_json_text_are_refused_before_reading(tmp_path):
    empty, big, fifo = tmp_path / "tokenizer.json", tmp_path / "config.json", tmp_path / "preprocessor_config.json"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{empty} is empty (0 bytes) where a tokenizer (a JSON object) "
                                                   f"is expected; download it again")):
        read_json(empty, "a tokenizer (a JSON object)")
    empty.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 7031645\n")
    with pytest.raises(ValueError, match=re.escape(f"{empty} is a Git LFS pointer, not a tokenizer (a JSON object): "
                                                   f"download the file itself (e.g. `git lfs pull` in that clone)")):
        read_json(empty, "a tokenizer (a JSON object)")
    with open(big, "wb") as f:  # sparse: 200 MB claimed, nothing written
        f.truncate(200_000_000)
    with pytest.raises(ValueError, match=re.escape(f"{big} is 200,000,000 bytes, more than a JSON object can be "
                                                   f"(100,000,000)")):
        read_json(big)
    if hasattr(os, "mkfifo"):  # reading a FIFO would block forever
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match=re.escape(f"{fifo} is not a regular file (a JSON object expected)")):
            read_json(fifo)


# ------------------------------------------------------------------ the VLM folder


@pytest.mark.parametrize("change, message", [
    (lambda c: c.update(num_hidden_layers=10**9),
     "{config}: num_hidden_layers is 1000000000; expected a whole number from 0 to 1,024 (far more than any "
     "released model uses)"),
    (lambda c: c["vision_config"].update(embed_dim=10**12),
     "{config}: embed_dim is 1000000000000; expected a whole number from 1 to 262,144 (far more than any released "
     "model uses)"),
    (lambda c: c.update(hidden_size="64"),
     "{config}: hidden_size is '64'; expected a whole number from 1 to 262,144 (far more than any released model "
     "uses)"),
    (lambda c: c.update(num_hidden_layers=200),
     "{config} does not fit the weights beside it: num_hidden_layers is 200 but the weights hold 2 such layers; "
     "the config and the weights must come from the same model: download the folder again"),
    (lambda c: c.update(intermediate_size=100_000),
     "{config} does not fit the weights beside it: it makes model.layers.0.mlp.gate_proj.weight [100000, 64] but "
     "the weights hold [128, 64]; the config and the weights must come from the same model: download the folder "
     "again"),
    (lambda c: [c.pop(key) for key in list(c) if key != "model_type"],  # transformers' defaults: Qwen2-VL-72B
     "{config} does not fit the weights beside it: num_hidden_layers is 80 but the weights hold 2 such layers; "
     "the config and the weights must come from the same model: download the folder again"),
])
def test_config_sizes_are_checked_against_bounds_and_the_weights_before_loading(vlm_copy, change, message):
    config = vlm_copy / "config.json"
    edit_json(config, change)
    started = time.perf_counter()
    with pytest.raises(ValueError) as error:
        check_vlm_folder(vlm_copy)
    assert time.perf_counter() - started < 1
    assert str(error.value) == message.format(config=config)


@pytest.mark.parametrize("change, message", [
    (lambda p: p.update(min_pixels=10**15),
     "min_pixels is 1000000000000000; expected a whole number from 1 to 12,845,056"),
    (lambda p: p.update(max_pixels=10**15), "max_pixels is 1000000000000000; expected a whole number from 1 to "
                                            "67,108,864"),
    (lambda p: p.update(min_pixels=1_000_000, max_pixels=1000), "min_pixels 1,000,000 is more than max_pixels 1,000"),
    (lambda p: p.update(patch_size=16), "patch_size is 16 but the vision tower in config.json takes 14; the "
                                        "processor config belongs to another model"),
])
def test_preprocessor_sizes_are_checked(vlm_copy, change, message):
    processor = vlm_copy / "preprocessor_config.json"
    edit_json(processor, change)
    with pytest.raises(ValueError, match=re.escape(f"{processor}: {message}")):
        check_vlm_folder(vlm_copy)


@pytest.mark.parametrize("name, change, message", [
    ("config.json", lambda c: c.update(auto_map=REMOTE_CODE),
     "{path} asks to run the model's own Python code (auto_map {{'AutoConfig': 'configuration_evil.EvilConfig'}}); "
     "ThinkDiff never runs code from a model folder: use a model that transformers supports itself"),
    ("tokenizer_config.json", lambda c: c.update(tokenizer_class="EvilTokenizer"),
     "{path}: tokenizer_class 'EvilTokenizer' is not a class of transformers"),
    ("preprocessor_config.json", lambda c: c.update(processor_class="EvilProcessor"),
     "{path}: processor_class 'EvilProcessor' is not a class of transformers"),
])
def test_a_folder_asking_for_remote_code_is_refused_and_runs_nothing(vlm_copy, monkeypatch, name, change, message):
    edit_json(vlm_copy / name, change)
    marker = vlm_copy / "ran"
    (vlm_copy / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.setattr(builtins, "input", lambda *_: pytest.fail("transformers asked to run remote code"))
    with pytest.raises(ValueError) as error:
        Reasoner.from_pretrained(vlm_copy, device="cpu")
    assert str(error.value).startswith(message.format(path=vlm_copy / name))
    assert not marker.exists()


def test_the_cli_refuses_a_remote_code_folder_with_one_error_line(vlm_copy, tmp_path, tiny_models, capsys):
    from thinkdiff_core.__main__ import main

    edit_json(vlm_copy / "config.json", lambda c: c.update(auto_map=REMOTE_CODE))
    code = main(["generate", "--vlm", str(vlm_copy), "--aligner", str(tiny_models["aligner"]), "--flux",
                 str(tiny_models["flux"]), "--items", "white", str(ASSETS / "white_car.png"), "blue",
                 str(ASSETS / "blue_car.png"), "red", "--out", str(tmp_path / "out")])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: {vlm_copy / 'config.json'} asks to run the model's own Python code (auto_map {{'AutoConfig': "
        f"'configuration_evil.EvilConfig'}}); ThinkDiff never runs code from a model folder: use a model that "
        f"transformers supports itself\n")
    assert not (tmp_path / "out").exists()


def test_broken_tokenizer_files_and_escaping_indexes_are_named(vlm_copy):
    tokenizer = vlm_copy / "tokenizer.json"
    tokenizer.write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"{tokenizer} is empty (0 bytes) where a tokenizer (a JSON "
                                                   f"object) is expected; download it again")):
        Reasoner.from_pretrained(vlm_copy, device="cpu")
    tokenizer.unlink()
    (vlm_copy / "merges.txt").write_text("version https://git-lfs.github.com/spec/v1\nsize 1671839\n")
    with pytest.raises(ValueError, match=re.escape(f"{vlm_copy / 'merges.txt'} is a Git LFS pointer, not its content")):
        check_vlm_folder(vlm_copy)
    shutil.copy(REPO / "README.md", vlm_copy / "merges.txt")  # any text: the check is for what a pointer looks like
    index = vlm_copy / "model.safetensors.index.json"
    edit_json(index, lambda i: i["weight_map"].update({"lm_head.weight": "../../outside.safetensors"}))
    with pytest.raises(ValueError, match=re.escape(f"{index} is not a readable safetensors index (expected a "
                                                   f"weight_map of tensor names to shard file names beside it)")):
        check_vlm_folder(vlm_copy)


def test_bin_weights_are_checked_as_torch_load_would_read_them(vlm_copy, tiny_models):
    for path in [*vlm_copy.glob("*.safetensors"), vlm_copy / "model.safetensors.index.json"]:
        path.unlink()
    weights = vlm_copy / "pytorch_model.bin"
    with zipfile.ZipFile(tiny_models["aligner"]) as source, zipfile.ZipFile(weights, "w", zipfile.ZIP_DEFLATED) as bomb:
        for record in source.infolist():
            bomb.writestr(record.filename, source.read(record.filename))
    with pytest.raises(ValueError, match=re.escape(f"{weights}: ") + r"\S+ is compressed"):
        check_vlm_folder(vlm_copy)


def test_after_a_refused_folder_the_good_model_loads_and_reasons_alike(vlm_copy, reasoner):
    good = (vlm_copy / "config.json").read_text()
    edit_json(vlm_copy / "config.json", lambda c: c.update(auto_map=REMOTE_CODE))
    with pytest.raises(ValueError, match="asks to run the model's own Python code"):
        Reasoner.from_pretrained(vlm_copy, device="cpu")
    (vlm_copy / "config.json").write_text(good)
    again = Reasoner.from_pretrained(vlm_copy, device="cpu")
    first, second = (r.reason(["white", "blue", "red"], seed=3, max_new_tokens=4) for r in (reasoner, again))
    assert torch.equal(first.token_ids, second.token_ids)
    assert torch.equal(first.hidden_states, second.hidden_states)


def test_every_from_pretrained_in_the_pack_passes_trust_remote_code_false():
    own = {"Reasoner", "VisionEncoder", "VLMJudge", "cls"}  # the pack's own loaders, which check first
    calls = []
    for path in sorted((REPO / "thinkdiff_core").rglob("*.py")) + sorted((REPO / "nodes").rglob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                    and call.func.attr == "from_pretrained" \
                    and not (isinstance(call.func.value, ast.Name) and call.func.value.id in own):
                given = {k.arg: k.value for k in call.keywords}
                calls.append((path.name, call.lineno, isinstance(given.get("trust_remote_code"), ast.Constant)
                              and given["trust_remote_code"].value is False))
    assert len(calls) >= 9  # reason (3), render, cobsat_judge (2), generate, train (3)
    assert [call for call in calls if not call[2]] == []


# ------------------------------------------------------------------ BLIP-2, FLUX


def test_hostile_vision_files_are_named(tmp_path, tiny_models):
    vision_file = tmp_path / "blip2_vision.safetensors"
    extract_vision(tiny_models["blip2"], vision_file)
    tensors = load_file(str(vision_file))
    metadata = json.loads(json.dumps(read_metadata(vision_file)))

    def with_metadata(**changes):
        save_file(tensors, str(vision_file), metadata={**metadata, **changes})

    with_metadata(vision_config=deep(100))
    with pytest.raises(ValueError, match=re.escape(f"{vision_file} (its vision_config metadata) is not a vision "
                                                   f"config: it nests deeper than 64 levels")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")
    with_metadata(vision_config=json.dumps({**json.loads(metadata["vision_config"]), "num_hidden_layers": 10**6}))
    with pytest.raises(ValueError, match=re.escape(f"{vision_file} (its vision_config metadata): num_hidden_layers "
                                                   f"is 1000000; expected a whole number from 0 to 1,024")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")
    with_metadata(vision_config=json.dumps({**json.loads(metadata["vision_config"]), "hidden_size": 96}))
    with pytest.raises(ValueError, match=re.escape(f"{vision_file}: the vision tensors do not match the vision config "
                                                   f"(vision_model.embeddings.class_embedding is [1, 1, 48] where the "
                                                   f"config makes [1, 1, 96]")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")
    processor = {**json.loads(metadata["image_processor"]), "size": {"height": 10**6, "width": 10**6}}
    with_metadata(image_processor=json.dumps(processor))
    with pytest.raises(ValueError, match=re.escape(f"{vision_file}: its image processor resizes to {{'height': "
                                                   f"1000000, 'width': 1000000}}, but the vision tower takes 224x224 "
                                                   f"images")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")


def read_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_hostile_flux_folders_are_named_before_anything_loads(tmp_path, tiny_models):
    flux = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_models["flux"], flux)
    index, transformer = flux / "model_index.json", flux / "transformer" / "config.json"
    good_index, good_transformer = index.read_text(), transformer.read_text()
    edit_json(index, lambda i: i.update(transformer=["evil_transformer", "EvilTransformer"]))
    with pytest.raises(ValueError, match=re.escape(f"{index}: transformer is ['evil_transformer', 'EvilTransformer']; "
                                                   f"expected [library, class] naming a class of diffusers or "
                                                   f"transformers (ThinkDiff never runs code from a model folder)")):
        check_flux_folder(flux)
    index.write_text(good_index)
    edit_json(transformer, lambda c: c.update(num_layers=500))
    with pytest.raises(ValueError, match=re.escape(f"{transformer}: num_layers is 500, but its weights hold at most 1 "
                                                   f"numbered layer (in ")):
        check_flux_folder(flux)
    edit_json(transformer, lambda c: c.update(num_layers=1, attention_head_dim=[10**9]))
    with pytest.raises(ValueError, match=re.escape(f"{transformer}: attention_head_dim is [1000000000]; expected a "
                                                   f"whole number from 1 to 262,144")):
        check_flux_folder(flux)
    transformer.write_text(good_transformer)
    scheduler = flux / "scheduler" / "scheduler_config.json"
    edit_json(scheduler, lambda c: c.update(num_train_timesteps=10**12))
    with pytest.raises(ValueError, match=re.escape(f"{scheduler}: num_train_timesteps is 1000000000000")):
        check_flux_folder(flux)


# ------------------------------------------------------------------ ComfyUI: listing and loading


def node(host, node_id):
    return host.runtime.get_node_class(node_id)()


def test_hostile_files_beside_the_good_models_never_break_listing_or_loading(host, tiny_models):
    llm, clip_vision, thinkdiff = host.models / "LLM", host.models / "clip_vision", host.models / "thinkdiff"
    hostile = {"deep": deep(100_000).encode(), "latin-1": b'{"model_type": "qwen2_vl\xe9"}', "list": b"[]",
               "huge-number": b'{"model_type": 1e999}'}
    made = []
    try:
        for name, content in hostile.items():
            (llm / f"hostile-{name}").mkdir()
            (llm / f"hostile-{name}" / "config.json").write_bytes(content)
            made.append(llm / f"hostile-{name}")
        if hasattr(os, "mkfifo"):
            (llm / "hostile-fifo").mkdir()
            os.mkfifo(llm / "hostile-fifo" / "config.json")
            made.append(llm / "hostile-fifo")
        header = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
        (clip_vision / "hostile.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
        made.append(clip_vision / "hostile.safetensors")
        torch.save({"model": aligner_of((4096, 10_000_000), (4096,), (4096, 4096), (4096,), (4096,),
                                        element=torch.zeros(1))}, thinkdiff / "hostile.pth")
        made.append(thinkdiff / "hostile.pth")

        vlm_loader, aligner_loader = node(host, "ThinkDiffLoadVLM"), node(host, "ThinkDiffLoadAligner")
        vlm_names = type(vlm_loader).INPUT_TYPES()["required"]["model"][0]
        assert "Qwen-VL/Qwen2-VL-tiny" in vlm_names
        # Unreadable configs are listed, so that choosing one says what is wrong with it.
        assert {f"hostile-{name}" for name in hostile} <= set(vlm_names)
        vision_names = type(node(host, "ThinkDiffLoadVisionEncoder")).INPUT_TYPES()["required"]["vision_name"][0]
        assert {"blip2-tiny", "blip2_vision.safetensors"} <= set(vision_names)
        assert "hostile.safetensors" not in vision_names
        with pytest.raises(ValueError, match=re.escape(f"{llm / 'hostile-deep' / 'config.json'} is not a model config "
                                                       f"(a JSON object): it nests deeper than 64 levels")):
            vlm_loader.load("hostile-deep", "fp32")
        with pytest.raises(ValueError, match=re.escape(f"{llm / 'hostile-list' / 'config.json'} is not a model config "
                                                       f"(a JSON object): it holds an array")):
            vlm_loader.load("hostile-list", "fp32")
        (good,) = aligner_loader.load("thinkdiff_lvlm.pth")
        # ValueError: the pack's copy in custom_nodes has its own CheckpointError class.
        with pytest.raises(ValueError, match=re.escape(f"{thinkdiff / 'hostile.pth'}: mm_projector.0.weight claims "
                                                       f"shape (4096, 10000000)")):
            aligner_loader.load("hostile.pth")
        (again,) = aligner_loader.load("thinkdiff_lvlm.pth")
        states = torch.randn(3, good.in_features, generator=torch.Generator().manual_seed(0))
        assert torch.equal(good.module(states), again.module(states))
        assert torch.equal(again.module(states), load_aligner(tiny_models["aligner"])(states))
    finally:
        for path in made:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def test_the_vlm_loader_node_refuses_a_remote_code_folder(host, monkeypatch):
    folder = host.models / "LLM" / "Qwen2-VL-remote-code"
    shutil.copytree(host.models / "LLM" / "Qwen-VL" / "Qwen2-VL-tiny", folder)
    try:
        edit_json(folder / "config.json", lambda c: c.update(auto_map=REMOTE_CODE))
        monkeypatch.setattr(builtins, "input", lambda *_: pytest.fail("transformers asked to run remote code"))
        with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'} asks to run the model's own Python "
                                                       f"code (auto_map")):
            node(host, "ThinkDiffLoadVLM").load("Qwen2-VL-remote-code", "fp32")
    finally:
        shutil.rmtree(folder)
