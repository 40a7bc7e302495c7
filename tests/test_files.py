"""Downloaded weights are checked before loading: a cut-off or missing file is named, with what to do."""

import json
import re
import shutil

import pytest
import torch

from thinkdiff_core import Reasoner, VisionEncoder
from thinkdiff_core.files import check_safetensors_file, check_safetensors_folder, save_safetensors


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_safetensors({"a": torch.ones(3, 4), "b": torch.zeros(5)}, path)
    return path


def test_a_whole_file_passes_and_its_header_describes_it_to_the_byte(weights):
    check_safetensors_file(weights)
    length = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + length])
    assert 8 + length + max(entry["data_offsets"][1] for name, entry in header.items()
                            if name != "__metadata__") == weights.stat().st_size


def test_a_cut_off_download_is_named_with_both_sizes(weights):
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match=re.escape(f"{weights} is an incomplete download: {size - 10:,} bytes where "
                                                   f"its header describes {size:,}; download it again")):
        check_safetensors_file(weights)


def test_extra_bytes_and_broken_headers_are_refused(weights):
    data = weights.read_bytes()
    weights.write_bytes(data + b"\0")
    with pytest.raises(ValueError, match=re.escape(f"{weights} is longer than its header says: {len(data) + 1:,} "
                                                   f"bytes where its header describes {len(data):,}")):
        check_safetensors_file(weights)
    weights.write_bytes(data[:5])
    with pytest.raises(ValueError, match=re.escape(f"{weights} is not a .safetensors file, or an incomplete download "
                                                   f"(5 bytes); download it again")):
        check_safetensors_file(weights)
    weights.write_bytes((8).to_bytes(8, "little") + b"{broken}")
    with pytest.raises(ValueError, match=re.escape(f"{weights} has an unreadable .safetensors header")):
        check_safetensors_file(weights)
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}'
    weights.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(ValueError, match=re.escape(f"{weights} has an unreadable .safetensors header (data_offsets "
                                                   f"are not integers)")):
        check_safetensors_file(weights)


def test_files_without_tensors_and_empty_tensors_pass(tmp_path):
    for name, tensors in (("none", {}), ("empty", {"a": torch.zeros(0), "b": torch.ones(2), "c": torch.zeros(3, 0)})):
        save_safetensors(tensors, tmp_path / f"{name}.safetensors", metadata={"format": "pt"})
        check_safetensors_file(tmp_path / f"{name}.safetensors")


def test_a_git_lfs_pointer_is_told_apart(weights):
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4400000000\n")
    with pytest.raises(ValueError, match=re.escape(f"{weights} is a Git LFS pointer, not the weights: download the "
                                                   f"file itself")):
        check_safetensors_file(weights)


def test_a_sharded_folder_needs_every_shard_its_index_lists(tmp_path, weights):
    shutil.move(weights, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{tmp_path} lacks model-00002-of-00002.safetensors of the weight files its "
            f"model.safetensors.index.json lists; download the missing ones")):
        check_safetensors_folder(tmp_path)
    save_safetensors({"b": torch.zeros(5)}, tmp_path / "model-00002-of-00002.safetensors")
    check_safetensors_folder(tmp_path)


@pytest.fixture
def vlm_copy(tmp_path, tiny_models):
    folder = tmp_path / "Qwen2-VL"
    shutil.copytree(tiny_models["vlm"], folder)
    return folder


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_the_vlm_loader_names_a_cut_off_weight_file(vlm_copy):
    shard = sorted(vlm_copy.glob("*.safetensors"))[-1]  # the tiny VLM is sharded as the real one
    cut(shard)
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        Reasoner.from_pretrained(vlm_copy, device="cpu")


def test_the_vlm_loader_names_missing_tokenizer_files(vlm_copy):
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (vlm_copy / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"{vlm_copy} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); the Qwen2-VL "
            f"processor needs them")):
        Reasoner.from_pretrained(vlm_copy, device="cpu")


def test_a_blip2_folder_needs_only_the_shards_of_its_vision_tower(tmp_path, tiny_models):
    from thinkdiff_core.vision import extract_vision

    folder = tmp_path / "blip2"
    shutil.copytree(tiny_models["blip2"], folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    t5_only = {shard for shard in weight_map.values()} - {shard for key, shard in weight_map.items()
                                                         if key.startswith("vision_model.")}
    assert t5_only  # the tiny BLIP-2 is sharded so that some shards hold no vision tensors
    for shard in t5_only:
        (folder / shard).unlink()
    report = extract_vision(folder, tmp_path / "vision.safetensors")
    assert report["tensors"] == sum(key.startswith("vision_model.") for key in weight_map)


def test_a_cut_off_flux_part_is_named_before_anything_loads(tmp_path, tiny_models):
    from thinkdiff_core.render import check_flux_folder

    flux = tmp_path / "FLUX.1-dev"
    shutil.copytree(tiny_models["flux"], flux)
    check_flux_folder(flux)
    shard = sorted((flux / "transformer").glob("*.safetensors"))[-1]
    cut(shard)
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        check_flux_folder(flux)


def test_the_vision_loader_names_a_cut_off_file_or_shard(tmp_path, tiny_models):
    from thinkdiff_core.vision import extract_vision

    vision_file = tmp_path / "blip2_vision.safetensors"
    extract_vision(tiny_models["blip2"], vision_file)
    cut(vision_file)
    with pytest.raises(ValueError, match=re.escape(f"{vision_file} is an incomplete download: ")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")

    folder = tmp_path / "blip2"
    shutil.copytree(tiny_models["blip2"], folder)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = folder / weight_map["vision_model.embeddings.patch_embedding.weight"]
    cut(shard, keep=0.9)
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        VisionEncoder.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        extract_vision(folder, tmp_path / "again.safetensors")
