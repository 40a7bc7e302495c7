"""Tiny random models in exactly the on-disk formats users download, for tests and the demo.

- `vlm/`: a Qwen2-VL folder laid out like Qwen/Qwen2-VL-7B-Instruct on the Hub (legacy flat
  config.json, sharded safetensors with the Hub's key names and an index, byte-level BPE
  tokenizer with Qwen2-VL's special tokens, the official chat template, preprocessor config
  and the released generation_config.json sampling defaults).
- `aligner_lvlm.pth`: the official training checkpoint layout ({"model", "optimizer", "config",
  "scaler", "epoch"}) with d_in = the tiny VLM's hidden size and d_out = the tiny T5 width.
- `blip2/`: a BLIP-2 folder laid out like Salesforce/blip2-flan-t5-xxl (config.json with vision,
  Q-Former and T5 configs, sharded safetensors with vision_model.*, qformer.*, language_model.* ...,
  preprocessor_config.json), and `aligner_clip.pth`: the CLIP-variant aligner (d_in = its vision width).
- `flan-t5/`: a T5 encoder-decoder folder (the frozen Flan-T5 of aligner training), sharing the
  tiny FLUX T5's tokenizer and width.
- `flux/`: a diffusers FLUX pipeline folder (transformer, VAE, CLIP-L text encoder + tokenizer,
  T5 encoder + tokenizer, scheduler) with FLUX.1-dev's scheduler and VAE constants.

Everything is deterministic for a seed and takes seconds on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import ASSETS

QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Qwen2's pre-tokenizer pattern (from its tokenizer.json).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CORPUS = [
    "You are a helpful assistant.",
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a "
    "detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt and "
    "start the answer with 'Create an image'.",
    "Word 1: white, Word 2: blue, Word 3: red, Picture 1: Picture 2: Picture 3:",
    "Create an image of a red car parked on a street, a blue car, a white car, photorealistic, detailed.",
    "yellow white red purple pink orange green brown blue black leaf hat cup chair car box book ball bag apple "
    "zebra tiger sheep pig monkey lion dog cow cat bird watercolor sketch pixel origami lego icon graffiti "
    "futuristic wireframe old swim sleep sing run read fly eat drink cry angry beach desert glacier volcano "
    "amusement park gym waterfall space cave seafloor wood wicker sequined plastic paper metal leather lace "
    "denim ceramic 0 1 2 3 4 5 6 7 8 9 , . : ; ! ? ' \" ( ) - \n\n",
]

VLM_HIDDEN = 64
VISION_HIDDEN = 48  # differs from VLM_HIDDEN so that swapped aligners are caught
T5_WIDTH = 32
CLIP_WIDTH = 32


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _qwen2_tokenizer(folder: Path) -> dict[str, int]:
    """Byte-level BPE with Qwen2's pre-tokenizer, trained on a small fixed corpus; returns the special ids."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    tokenizer.add_special_tokens(QWEN2_VL_SPECIAL_TOKENS)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as the Hub folder has them
    ids = {token: tokenizer.token_to_id(token) for token in QWEN2_VL_SPECIAL_TOKENS}
    template = (ASSETS / "qwen2vl_chat_template.jinja").read_text()
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for t, i in ids.items()
        },
        "additional_special_tokens": [t for t in QWEN2_VL_SPECIAL_TOKENS if t not in ("<|endoftext|>",)],
        "bos_token": None,
        "chat_template": template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    })
    _write_json(folder / "chat_template.json", {"chat_template": template})
    return ids


def _hub_key(key: str) -> str:
    """Map a state-dict key of the installed transformers to the Hub checkpoint's key."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def make_tiny_vlm(folder: Path, seed: int = 0) -> dict:
    """A tiny random Qwen2-VL folder; returns its config dict."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    ids = _qwen2_tokenizer(folder)
    vocab_size = -(-(max(ids.values()) + 1) // 64) * 64  # padded like the real 152064
    config = {  # the released config.json, with tiny sizes
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "hidden_act": "silu",
        "hidden_size": VLM_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "max_window_layers": 2,
        "model_type": "qwen2_vl",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": 2, "embed_dim": 32, "mlp_ratio": 4, "num_heads": 2, "in_chans": 3,
            "hidden_size": VLM_HIDDEN, "patch_size": 14, "spatial_merge_size": 2,
            "spatial_patch_size": 14, "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
        "vocab_size": vocab_size,
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "generation_config.json", {  # the released sampling defaults
        "bos_token_id": ids["<|endoftext|>"], "pad_token_id": ids["<|endoftext|>"], "do_sample": True,
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "repetition_penalty": 1.05,
        "temperature": 0.01, "top_k": 1, "top_p": 0.001, "transformers_version": "4.41.2",
    })
    _write_json(folder / "preprocessor_config.json", {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
    })

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**{k: v for k, v in config.items()
                                                             if k not in ("architectures", "transformers_version")}))
    state = {_hub_key(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": [k for k in names if not k.startswith("visual.")],
              "model-00002-of-00002.safetensors": [k for k in names if k.startswith("visual.")]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return config


def make_tiny_aligner(path: Path, d_in: int, d_out: int, norm_weight: torch.Tensor, seed: int = 0) -> None:
    """An aligner saved the way the authors' runner saves a training checkpoint."""
    from ..aligner import PREFIX, Aligner

    torch.manual_seed(seed)
    aligner = Aligner(d_in, d_out)
    with torch.no_grad():  # training starts the norm from the T5 encoder's final_layer_norm
        aligner[3].weight.copy_(norm_weight)
    model_state = {PREFIX + k: v.clone() for k, v in aligner.state_dict().items()}
    optimizer_state = {
        "state": {i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v)}
                  for i, v in enumerate(model_state.values())},
        "param_groups": [{"lr": 8e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False,
                          "params": list(range(len(model_state)))}],
    }
    torch.save({
        "model": model_state,
        "optimizer": optimizer_state,
        "config": {"model": {"arch": "mllama-vllm-t5-embed-decoder-5", "mm_projector_type": "mlp2x_gelu_t5_norm"},
                   "run": {"init_lr": 1e-4, "min_lr": 8e-5, "warmup_lr": 1e-6, "weight_decay": 0.05}},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 0},
        "epoch": 39,
    }, str(path))


def _clip_tokenizer(folder: Path) -> int:
    """A character-level CLIP BPE vocabulary in the openai/clip-vit-large-patch14 file layout."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols CLIP's BPE starts from
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)})
    (folder / "merges.txt").write_text("#version: 0.2\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {**special, "add_prefix_space": False, "do_lower_case": True,
                                                   "errors": "replace", "model_max_length": 77,
                                                   "tokenizer_class": "CLIPTokenizer"})
    return len(vocab)


def _t5_tokenizer(folder: Path) -> int:
    """A small Unigram tokenizer.json in T5's layout (<pad>=0, </s>=1, <unk>=2, '▁' word marks)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    letters = sorted({c for text in CORPUS for c in text if not c.isspace()})
    pieces += [(c, -5.0) for c in letters] + [("▁" + c, -4.0) for c in letters]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(folder / "tokenizer_config.json", {**special, "extra_ids": 0, "model_max_length": 512,
                                                   "tokenizer_class": "T5Tokenizer"})
    return len(pieces)


def make_tiny_flux(folder: Path, seed: int = 0) -> dict:
    """A tiny FLUX.1 diffusers folder; returns the widths a ThinkDiff aligner must match."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    clip_vocab = _clip_tokenizer(folder / "tokenizer")
    t5_vocab = _t5_tokenizer(folder / "tokenizer_2")
    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=CLIP_WIDTH,
        bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
        hidden_act="quick_gelu",
    )).save_pretrained(folder / "text_encoder")
    T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )).save_pretrained(folder / "text_encoder_2")
    FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6),
    ).save_pretrained(folder / "transformer")
    AutoencoderKL(  # 8x downsampling and 16 latent channels, like FLUX's ae
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[8, 8, 8, 8], layers_per_block=1,
        latent_channels=16, norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.1159, scaling_factor=0.3611,
    ).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(folder / "scheduler")
    _write_json(folder / "model_index.json", {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.30.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
    })
    return {"t5_width": T5_WIDTH, "clip_width": CLIP_WIDTH}


def make_tiny_blip2(folder: Path, seed: int = 0) -> dict:
    """A tiny random BLIP-2 folder (224 px, patch 14: the real 16x16 patch grid); returns its config."""
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from ..vision import BLIP2_IMAGE_PROCESSOR

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 4,
        "initializer_factor": 1.0, "initializer_range": 0.02, "transformers_version": "4.27.0.dev0",
        "vision_config": {"hidden_size": VISION_HIDDEN, "intermediate_size": 96, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-6,
                          "qkv_bias": True, "model_type": "blip_2_vision_model"},
        "qformer_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                           "intermediate_size": 64, "encoder_hidden_size": VISION_HIDDEN,
                           "model_type": "blip_2_qformer"},
        "text_config": {"model_type": "t5", "d_model": T5_WIDTH, "d_ff": 64, "d_kv": 8, "num_layers": 1,
                        "num_decoder_layers": 1, "num_heads": 4, "vocab_size": 128,
                        "feed_forward_proj": "gated-gelu", "architectures": ["T5ForConditionalGeneration"]},
    }
    _write_json(folder / "config.json", config)
    _write_json(folder / "preprocessor_config.json", {**BLIP2_IMAGE_PROCESSOR, "processor_class": "Blip2Processor"})
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(Blip2Config(**{k: v for k, v in config.items()
                                                         if k not in ("architectures", "transformers_version")}))
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}  # untie T5's shared embeddings
    # As released: the vision tower first, the (here tiny, there 11B) T5 in its own shards.
    groups = [lambda k: k.startswith("vision_model."), lambda k: not k.startswith(("vision_model.", "language_model.")),
              lambda k: k.startswith("language_model.")]
    weight_map = {}
    for number, belongs in enumerate(groups, start=1):
        shard = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        keys = sorted(k for k in state if belongs(k))
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    total = sum(v.numel() * v.element_size() for v in state.values())
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return config


def make_tiny_flan_t5(folder: Path, tokenizer_dir: Path, seed: int = 0) -> None:
    """A tiny T5 encoder-decoder (gated-GELU, dropout 0.1, like Flan-T5) with the given T5 tokenizer files."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=vocab, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", dropout_rate=0.1, tie_word_embeddings=False, decoder_start_token_id=0,
        pad_token_id=0, eos_token_id=1,
    ))
    with torch.no_grad():  # T5's random untied head gives logits of std ~sqrt(d_model); a trained one is calmer
        model.lm_head.weight.mul_(T5_WIDTH ** -0.5)
    model.save_pretrained(folder)


def make_tiny_models(folder: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write vlm/, blip2/, flux/, flan-t5/, aligner_lvlm.pth and aligner_clip.pth under `folder`; returns their paths."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder; give a folder to write the tiny models into")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"vlm": folder / "vlm", "blip2": folder / "blip2", "flux": folder / "flux", "flan_t5": folder / "flan-t5",
             "aligner": folder / "aligner_lvlm.pth", "aligner_clip": folder / "aligner_clip.pth"}
    for name in ("vlm", "blip2", "flux", "flan_t5"):
        if paths[name].exists():
            shutil.rmtree(paths[name])
    vlm = make_tiny_vlm(paths["vlm"], seed)
    blip2 = make_tiny_blip2(paths["blip2"], seed)
    widths = make_tiny_flux(paths["flux"], seed)
    make_tiny_flan_t5(paths["flan_t5"], paths["flux"] / "tokenizer_2", seed)
    t5 = load_file(str(paths["flux"] / "text_encoder_2" / "model.safetensors"))
    generator = torch.Generator().manual_seed(seed)
    for name, d_in in (("aligner", vlm["hidden_size"]), ("aligner_clip", blip2["vision_config"]["hidden_size"])):
        norm = t5["encoder.final_layer_norm.weight"] + 0.1 * torch.randn(widths["t5_width"], generator=generator)
        make_tiny_aligner(paths[name], d_in, widths["t5_width"], norm, seed)
    return paths
