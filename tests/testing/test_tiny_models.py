import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO
from thinkdiff_core.testing.tiny_models import QWEN2_VL_SPECIAL_TOKENS


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_cli_output_is_deterministic_for_a_seed(tmp_path, tiny_models):
    out = tmp_path / "again"
    result = subprocess.run([sys.executable, "-m", "thinkdiff_core", "make-tiny-models", str(out)],
                            cwd=REPO, capture_output=True, text=True, check=True)
    assert f"vlm: {out / 'vlm'}" in result.stdout
    fresh, first = digest(out), digest(tiny_models["vlm"].parent)
    safetensors = [name for name in first if name.endswith(".safetensors")]
    assert len(safetensors) == 10  # 2 VLM shards, 3 BLIP-2 shards, Flan-T5, CLIP, T5, transformer, VAE
    for name in safetensors + ["vlm/tokenizer.json", "vlm/vocab.json", "vlm/merges.txt"]:
        assert fresh[name] == first[name], name
    other = tmp_path / "other-seed"
    subprocess.run([sys.executable, "-m", "thinkdiff_core", "make-tiny-models", str(other), "--seed", "1"],
                   cwd=REPO, capture_output=True, check=True)
    assert digest(other)["vlm/model-00001-of-00002.safetensors"] != first["vlm/model-00001-of-00002.safetensors"]


def test_vlm_folder_is_in_the_hub_layout_and_loads_with_plain_transformers(tiny_models):
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLForConditionalGeneration

    folder = tiny_models["vlm"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2_vl" and "text_config" not in config  # the released flat layout
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" in keys
    assert any(k.startswith("visual.blocks.") for k in keys) and not any(k.startswith("model.visual") for k in keys)

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True,
                                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    on_disk = load_file(str(folder / "model-00001-of-00002.safetensors"))
    torch.testing.assert_close(model.get_input_embeddings().weight.float(), on_disk["model.embed_tokens.weight"].float())

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for token in QWEN2_VL_SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) is not None
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == config["image_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|vision_start|>") == config["vision_start_token_id"]
    assert tokenizer.eos_token == "<|im_end|>"
    text = "Create an image of a red car."
    assert tokenizer.decode(tokenizer(text).input_ids) == text

    official = (REPO.parent / "shared" / "docs" / "qwen2vl_chat_template.jinja")
    shipped = (REPO / "thinkdiff_core" / "assets" / "qwen2vl_chat_template.jinja").read_text()
    if official.is_file():  # the project's research copy, beside the checkout
        assert shipped == official.read_text()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    assert processor.chat_template == shipped


def test_aligner_checkpoint_is_the_official_layout_matching_the_tiny_models(tiny_models):
    from thinkdiff_core import load_aligner

    checkpoint = torch.load(tiny_models["aligner"], weights_only=True)
    assert set(checkpoint) == {"model", "optimizer", "config", "scaler", "epoch"}
    assert all(k.startswith("mm_projector.") for k in checkpoint["model"])
    aligner = load_aligner(tiny_models["aligner"])
    vlm = json.loads((tiny_models["vlm"] / "config.json").read_text())
    t5 = json.loads((tiny_models["flux"] / "text_encoder_2" / "config.json").read_text())
    flux = json.loads((tiny_models["flux"] / "transformer" / "config.json").read_text())
    assert aligner.in_features == vlm["hidden_size"]
    assert aligner.out_features == t5["d_model"] == flux["joint_attention_dim"]
    clip_aligner = load_aligner(tiny_models["aligner_clip"])
    blip2 = json.loads((tiny_models["blip2"] / "config.json").read_text())
    assert clip_aligner.in_features == blip2["vision_config"]["hidden_size"] != aligner.in_features
    assert clip_aligner.out_features == aligner.out_features


def test_blip2_folder_is_in_the_hub_layout_and_loads_with_plain_transformers(tiny_models):
    from transformers import Blip2ForConditionalGeneration, BlipImageProcessor

    folder = tiny_models["blip2"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "blip-2" and config["vision_config"]["image_size"] == 224
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = {index["weight_map"][k] for k in index["weight_map"] if k.startswith("language_model.")}
    assert shards == {"model-00003-of-00003.safetensors"}  # the T5 lives apart from the vision tower
    model, info = Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    processor = BlipImageProcessor.from_pretrained(folder, local_files_only=True)
    assert processor.size == {"height": 224, "width": 224} and processor.image_mean[0] == 0.48145466


def test_flux_folder_loads_with_plain_diffusers(tiny_models):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_models["flux"], local_files_only=True)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 64
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.max_shift == 1.15
    prompt_embeds, pooled, _ = pipe.encode_prompt(prompt="a red car", prompt_2=None, max_sequence_length=16)
    assert prompt_embeds.shape == (1, 16, pipe.transformer.config.joint_attention_dim)
    assert pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    assert pipe.tokenizer_2("a red car").input_ids[-1] == 1  # T5's </s>


def test_cli_refuses_a_file_as_the_folder_and_documents_the_layout(tmp_path, tiny_models, capsys):
    from thinkdiff_core.__main__ import main

    target = tmp_path / "README.md"
    target.write_text("# notes\n")
    assert main(["make-tiny-models", str(target)]) == 2
    assert capsys.readouterr().err == f"error: {target} exists and is not a folder; give a folder to write the " \
                                      f"tiny models into\n"
    assert target.read_text() == "# notes\n"
    with pytest.raises(SystemExit):
        main(["make-tiny-models", "--help"])
    shown = capsys.readouterr().out
    assert "DIR          folder to write into (created if missing)" in shown
    for path in tiny_models.values():  # every entry it writes, each on its own line
        assert f"\n  {path.name}{'/' if path.is_dir() else ''} " in shown
