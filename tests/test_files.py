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
            f"{tmp_path} lacks model-00002-of-00002.safetensors of the 2 weight files its "
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


def test_the_vision_loader_names_a_cut_off_file_or_shard(tmp_path, tiny_models):
    from thinkdiff_core.vision import extract_vision

    vision_file = tmp_path / "blip2_vision.safetensors"
    extract_vision(tiny_models["blip2"], vision_file)
    cut(vision_file)
    with pytest.raises(ValueError, match=re.escape(f"{vision_file} is an incomplete download: ")):
        VisionEncoder.from_pretrained(vision_file, device="cpu")

    folder = tmp_path / "blip2"
    shutil.copytree(tiny_models["blip2"], folder)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    cut(shard, keep=0.9)
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        VisionEncoder.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=re.escape(f"{shard} is an incomplete download: ")):
        extract_vision(folder, tmp_path / "again.safetensors")
