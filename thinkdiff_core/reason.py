"""ThinkDiff-LVLM reasoning with Qwen2-VL: the paper's generation and the states it keeps.

For each generated token the kept vector is the final-norm hidden state at the position that
produced it: vector 0 is the state at the last prompt position, vector t >= 1 the state computed
when token t-1 was fed in; the last token is never fed back. A forward hook on the language
model's final norm that keeps the last position of every forward call gives exactly this, since
generation makes one forward call per new token.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import numbers
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .decode import SAMPLING_LOCK, FastDecoder, cache_length, cuda_indices
from .files import (
    check_config_sizes,
    check_model_folder,
    check_safetensors_file,
    check_safetensors_folder,
    check_torch_file,
    json_kind,
    read_json,
)
from .prompt import Item, build_messages, check_plain_text, check_structure, placeholder
from .versions import release

logger = logging.getLogger(__name__)

# bitsandbytes (>= 0.48) warns as it is imported, on CPUs with AVX-512 BF16, that an optional faster 4-bit CPU
# kernel (the `kernels` package) is missing. It is imported whenever diffusers or transformers load a model
# (their quantizers import it where installed), so the line would open nearly every run, quantised or not.
# Only that message of that logger is dropped; its other warnings, and every other logger's, pass.
BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BITSANDBYTES_CPU_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_the_cpu_kernel_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BITSANDBYTES_CPU_KERNEL_WARNING)


def quiet_bitsandbytes_cpu_kernel_warning() -> None:
    """Drop bitsandbytes' missing-CPU-kernel warning (a filter on its logger, which exists before bitsandbytes
    is imported: logging hands out one logger per name). Idempotent, also across copies of this module (ComfyUI
    imports the pack's thinkdiff_core under the pack's name, a script under its own): filters are told by name."""
    cpu_logger = logging.getLogger(BITSANDBYTES_CPU_LOGGER)
    name = _not_the_cpu_kernel_warning.__qualname__
    if not any(getattr(existing, "__qualname__", None) == name for existing in cpu_logger.filters):
        cpu_logger.addFilter(_not_the_cpu_kernel_warning)


quiet_bitsandbytes_cpu_kernel_warning()  # before anything of the pack can import bitsandbytes

QWEN2_VL_MODEL_TYPE = "qwen2_vl"
FP16_REFUSAL = (
    "float16 is refused for Qwen2-VL: it overflows to NaN/inf in Qwen2-VL's activations "
    "(transformers#33294), and ThinkDiff's aligner was trained on bfloat16 states. Use bfloat16 "
    "(default on GPU) or float32."
)


@dataclass
class Reasoning:
    """What one reasoning call produced (one variation)."""

    hidden_states: torch.Tensor  # [max_new_tokens, hidden] float32 on CPU
    token_ids: torch.Tensor  # [max_new_tokens] int64 on CPU
    text: str  # the decoded answer
    prompt: str  # the exact chat text given to the processor
    seed: int = 0  # the seed it was sampled with


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                 "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
        if dtype.lower() not in names:
            raise ValueError(f"unknown dtype {dtype!r}; expected bfloat16 or float32")
        dtype = names[dtype.lower()]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise ValueError(FP16_REFUSAL)
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"unsupported dtype {dtype} for Qwen2-VL; expected bfloat16 or float32")
    return dtype


def check_vlm_folder(folder: Path) -> None:
    """Raise a clear error unless `folder` looks like a local Qwen2-VL Hugging Face folder whose files hold what
    they claim: readable JSON files asking for no code of their own, a config that fits its weights, and
    plausible image sizes. Nothing is loaded (safetensors headers and JSON files only)."""
    if not folder.exists():
        raise FileNotFoundError(f"VLM folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"VLM path is not a folder: {folder} (expected a Qwen2-VL model folder)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder: config.json is missing. Expected a local copy "
            f"of Qwen/Qwen2-VL-7B-Instruct (config.json, *.safetensors, tokenizer and preprocessor files)"
        )
    model_type = read_json(config_path, json_kind(config_path.name)).get("model_type")
    if model_type != QWEN2_VL_MODEL_TYPE:
        raise ValueError(
            f"{folder} holds a {model_type!r} model; ThinkDiff-LVLM needs Qwen2-VL "
            f"(model_type 'qwen2_vl', e.g. Qwen/Qwen2-VL-7B-Instruct)"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise FileNotFoundError(f"{folder} has config.json but no weight files (*.safetensors)")
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is missing {name}; the Qwen2-VL processor needs it")
    if not (folder / "tokenizer.json").is_file() and not all((folder / name).is_file()
                                                             for name in ("vocab.json", "merges.txt")):
        raise FileNotFoundError(f"{folder} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
                                f"the Qwen2-VL processor needs them")
    configs = check_model_folder(folder)
    if not any(folder.glob("*.safetensors")):  # then transformers torch.loads the .bin files
        for path in sorted(folder.glob("*.bin")):
            check_torch_file(path, "a PyTorch weight file")
    config = qwen2_vl_config(config_path, configs["config.json"])
    check_qwen2_vl_weights(config_path, config, check_safetensors_folder(folder),
                           quantized="quantization_config" in configs["config.json"])
    check_qwen2_vl_processor(folder / "preprocessor_config.json", configs["preprocessor_config.json"], config)


# Qwen2-VL's image sizing enlarges every image to min_pixels and shrinks it to max_pixels (Qwen2-VL-7B: 3,136
# and 12,845,056, as `size` shortest_edge / longest_edge in newer files). No image needs enlarging beyond the
# largest the model was released to see; beyond these the vision tower only runs for minutes.
QWEN2_VL_PROCESSOR_BOUNDS = {"min_pixels": (1, 12_845_056), "shortest_edge": (1, 12_845_056),
                             "max_pixels": (1, 1 << 26), "longest_edge": (1, 1 << 26), "patch_size": (1, 1024),
                             "temporal_patch_size": (1, 64), "merge_size": (1, 64)}


def qwen2_vl_config(path: Path, config: dict):
    """transformers' Qwen2VLConfig of a config.json (its defaults filled in, as from_pretrained will), built
    without loading anything."""
    from transformers import Qwen2VLConfig

    try:
        return Qwen2VLConfig(**config)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise ValueError(f"{path} is not a usable Qwen2-VL config ({type(e).__name__}: {e})") from e


def check_qwen2_vl_weights(path: Path, config, shapes: dict[str, list[int]], quantized: bool = False) -> None:
    """The sizes in config.json (`path`) against the tensors its folder's shards hold (their headers only).
    from_pretrained builds the model from the config and initialises at random, at the config's size, whatever
    the shards lack: a config that claims more layers or wider ones would allocate for minutes before failing,
    or load a model that is not the one in the files. (Quantised checkpoints pack their weights: only their
    layer counts are compared.)"""
    text, vision = config.get_text_config(), config.vision_config
    problem = "does not fit the weights beside it"
    advice = "the config and the weights must come from the same model: download the folder again"
    for prefix, count, key in ((r"(?:model\.language_model|model)\.layers", text.num_hidden_layers,
                                "num_hidden_layers"),
                               (r"(?:model\.)?visual\.blocks", vision.depth, "vision_config.depth")):
        held = {int(m.group(1)) for name in shapes if (m := re.match(prefix + r"\.(\d+)\.", name))}
        if shapes and held != set(range(count)):
            raise ValueError(f"{path} {problem}: {key} is {count} but the weights hold {len(held)} such layers; "
                             f"{advice}")
    if quantized or not shapes:
        return
    head = text.hidden_size // text.num_attention_heads
    if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.num_key_value_heads \
            or vision.embed_dim % vision.num_heads:
        raise ValueError(f"{path} {problem}: its widths do not divide into its attention heads (hidden_size "
                         f"{text.hidden_size}, num_attention_heads {text.num_attention_heads}, num_key_value_heads "
                         f"{text.num_key_value_heads}; vision embed_dim {vision.embed_dim}, num_heads "
                         f"{vision.num_heads})")
    rope = getattr(text, "rope_scaling", None) or getattr(text, "rope_parameters", None) or {}
    section = rope.get("mrope_section") if isinstance(rope, dict) else None
    if section is not None and (not isinstance(section, list) or not all(type(n) is int for n in section)
                                or 2 * sum(section) != head):
        raise ValueError(f"{path} {problem}: rope_scaling's mrope_section {section} must add up to half the "
                         f"attention head width ({head // 2})")
    merged = vision.embed_dim * vision.spatial_merge_size ** 2
    expected = {
        "embed_tokens.weight": [text.vocab_size, text.hidden_size],
        "layers.0.mlp.gate_proj.weight": [text.intermediate_size, text.hidden_size],
        "layers.0.self_attn.k_proj.weight": [text.num_key_value_heads * head, text.hidden_size],
        "lm_head.weight": [text.vocab_size, text.hidden_size],
        "visual.patch_embed.proj.weight": [vision.embed_dim, None, vision.temporal_patch_size, vision.patch_size,
                                           vision.patch_size],
        "visual.blocks.0.mlp.fc1.weight": [int(vision.embed_dim * vision.mlp_ratio), vision.embed_dim],
        "visual.merger.mlp.2.weight": [vision.hidden_size, merged],
    }
    for name, shape in shapes.items():
        for suffix, want in expected.items():
            if (name == suffix or name.endswith("." + suffix)) and (len(shape) != len(want) or any(
                    w is not None and w != s for w, s in zip(want, shape))):
                raise ValueError(f"{path} {problem}: it makes {name} {[w if w is not None else '*' for w in want]} "
                                 f"but the weights hold {shape}; {advice}")


def check_qwen2_vl_processor(path: Path, processor: dict, config) -> None:
    """preprocessor_config.json's sizes: plausible (QWEN2_VL_PROCESSOR_BOUNDS), and the patches it cuts the
    vision tower's own (another patch size makes tensors the tower cannot multiply)."""
    check_config_sizes(processor, path, QWEN2_VL_PROCESSOR_BOUNDS)
    for low, high in (("min_pixels", "max_pixels"), ("shortest_edge", "longest_edge")):
        sizes = processor.get("size") if low == "shortest_edge" else processor
        if isinstance(sizes, dict) and sizes.get(low) is not None and sizes.get(high) is not None \
                and sizes[low] > sizes[high]:
            raise ValueError(f"{path}: {low} {sizes[low]:,} is more than {high} {sizes[high]:,}")
    vision = config.vision_config
    for key, own in (("patch_size", vision.patch_size), ("temporal_patch_size", vision.temporal_patch_size),
                     ("merge_size", vision.spatial_merge_size)):
        if processor.get(key, own) != own:
            raise ValueError(f"{path}: {key} is {processor[key]} but the vision tower in config.json takes {own}; "
                             f"the processor config belongs to another model")


QUANTIZATIONS = ("8bit", "4bit")
QUANTIZATION_DRIFT = (
    "the VLM is quantised to {0}: its states drift from the bfloat16 states ThinkDiff's aligner was trained "
    "on, so pictures can differ from the paper's; `python -m thinkdiff_core bench --quantize {0}` measures "
    "the drift"
)


def load_qwen2_vl(folder: str | os.PathLike, device: torch.device, dtype: torch.dtype | str | None = None,
                  quantization: str | None = None):
    """Qwen2VLForConditionalGeneration from a local folder, each tensor read straight onto `device`.

    The vision tower and the output head stay unquantised: only the language model's layers are
    bitsandbytes-quantised when `quantization` is given.
    """
    import transformers
    from transformers import Qwen2VLForConditionalGeneration

    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    dtype_option = "dtype" if release(transformers) >= (4, 56) else "torch_dtype"
    options = {dtype_option: dtype}
    if quantization is not None:
        options["quantization_config"] = quantization_config(quantization, dtype)
        logger.warning("ThinkDiff: %s", QUANTIZATION_DRIFT.format(quantization))
    # device_map places each tensor on the device as it is read (no full CPU copy first).
    return Qwen2VLForConditionalGeneration.from_pretrained(
        folder, local_files_only=True, trust_remote_code=False, attn_implementation="sdpa", device_map={"": device},
        **options
    )


def quantization_config(quantization: str, dtype: torch.dtype):
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"{quantization} loading needs bitsandbytes, an optional dependency: "
                          f"pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    # The vision tower and the output head stay unquantised (transformers 5 matches names from the start).
    keep = ["visual", "model.visual", "lm_head"]
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=keep)


# Bytes per weight of a quantised language-model layer: int8 (8-bit; one float32 scale per row is
# negligible) or two nf4 values per byte plus a float32 scale per block of 64 (4-bit).
QUANTIZED_BYTES_PER_WEIGHT = {"8bit": 1.0, "4bit": 0.5 + 4 / 64}


def quantized_size(folder: str | os.PathLike, quantization: str, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of weights a Qwen2-VL folder takes once loaded with `quantization`, read from its
    safetensors headers: the language model's linear weights quantised, everything else in `dtype`."""
    from safetensors import safe_open

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    element = torch.tensor([], dtype=dtype).element_size()
    total = 0.0
    for file in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors_file(file)  # names a broken shard before safe_open fails on it
        with safe_open(file, framework="pt") as tensors:
            for name in tensors.keys():
                shape = tensors.get_slice(name).get_shape()
                weights = math.prod(shape)
                quantized = len(shape) == 2 and ".layers." in name and "visual" not in name
                total += weights * (QUANTIZED_BYTES_PER_WEIGHT[quantization] if quantized else element)
    return int(total)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's final RMSNorm (its module path moved across transformers versions)."""
    return model.get_decoder().norm


@contextmanager
def capture_last_positions(module: torch.nn.Module, on_state: Callable[[int], None] | None = None):
    """Collect the output at the last position of every forward call of `module`."""
    states: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        states.append(output[:, -1].detach())
        if on_state is not None:
            on_state(len(states))

    handle = module.register_forward_hook(hook)
    try:
        yield states
    finally:
        handle.remove()


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def variation_seeds(seed: int, variations: int) -> list[int]:
    """The seeds of `variations` samplings from `seed`: variation i samples with seed + i, so that each can be
    drawn again alone with its own seed."""
    if not (_integer(variations) and variations >= 1):
        raise ValueError(f"variations must be an integer >= 1 (1 = a single sampling), got {variations!r}")
    if not (_integer(seed) and 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    if seed + variations - 1 >= 2**64:
        raise ValueError(f"variation i samples with seed + i, so seed + variations - 1 must be at most 2**64 - 1; "
                         f"got seed {seed!r} and {variations} variations")
    return [seed + i for i in range(variations)]


def check_sampling(seed, temperature, top_p, max_new_tokens: int, min_new_tokens: int = 1) -> None:
    """Refuse settings that would fail deep inside sampling or draw from a broken distribution (NaN passes
    no comparison and inf passes `> 0`, so each value is checked for what it must be)."""
    integer = _integer

    def finite(value):
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

    if not (integer(seed) and 0 <= seed < 2**64):  # torch.manual_seed's range, as ComfyUI's seed widget
        raise ValueError(f"seed must be an integer from 0 to 2**64 - 1, got {seed!r}")
    if not (finite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be > 0 and finite (the paper samples at 0.6), got {temperature!r}")
    if not (finite(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] (the paper uses 0.9), got {top_p!r}")
    if not (integer(min_new_tokens) and integer(max_new_tokens) and 1 <= min_new_tokens <= max_new_tokens):
        raise ValueError(f"need integers 1 <= min_new_tokens <= max_new_tokens (the paper generates 128), got "
                         f"{min_new_tokens!r} and {max_new_tokens!r}")


class Reasoner:
    """A Qwen2-VL model with its processor, producing ThinkDiff's reasoning states."""

    def __init__(self, model, processor=None, fast: bool = True, compile: bool | None = None):
        """`fast`: sample with the static-cache path (`decode.FastDecoder`) whenever the token count is
        fixed, as in the paper; `compile`: compile its decoder layer, in the background while the first
        run decodes uncompiled (default: on CUDA when Triton is installed). `processor` may be None for
        callers that pass prepared inputs to `sample`."""
        from transformers import GenerationConfig

        self.model = model.eval()
        self.processor = processor
        self.fast = fast
        self._decoder: FastDecoder | None = None
        self.compile = compile
        # The released generation_config.json asks for top_k=1, top_p=0.001 and a repetition
        # penalty; transformers fills unset sampling options from it. The paper's sampler (vLLM)
        # never read it, so only the special token ids are kept.
        source = model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=source.bos_token_id, eos_token_id=source.eos_token_id, pad_token_id=source.pad_token_id
        )
        tokenizer_eos = processor.tokenizer.eos_token_id if processor is not None else None
        configured = source.eos_token_id if isinstance(source.eos_token_id, list) else [source.eos_token_id]
        self.eos_token_ids = sorted({i for i in [*configured, tokenizer_eos] if i is not None})

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        quantization: str | None = None,
        **options,
    ) -> "Reasoner":
        """Load Qwen2-VL from a local folder, never the network; bf16 on GPU, float32 on CPU, sdpa.

        `quantization` "8bit" or "4bit" (bitsandbytes) shrinks the language model for GPUs of 24 GB or
        less, at the cost of states that drift from those the aligner was trained on.
        """
        folder = Path(folder)
        check_vlm_folder(folder)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        import transformers
        from transformers import AutoImageProcessor, AutoProcessor

        # The PIL image processor is the one the authors' pipeline ran (the torchvision one
        # resamples slightly differently); transformers 5 selects it by backend name.
        pil_option = {"backend": "pil"} if release(transformers) >= (5, 0) else {"use_fast": False}
        # trust_remote_code=False: no code from the folder runs, and transformers never asks (check_vlm_folder
        # has already refused a folder that wants its own code, naming the file).
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                             **pil_option)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                                  image_processor=image_processor)
        return cls(load_qwen2_vl(folder, device, dtype, quantization), processor, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return final_norm(self.model).weight.shape[0]

    def render_prompt(self, items: Sequence[Item], instruction: str | None = None):
        """The exact chat text and the images, in order, for `items`. Words and an instruction that would give
        the chat special tokens of their own (a turn, an image slot) are refused."""
        messages, images = build_messages(items, instruction)
        tokenizer = self.processor.tokenizer
        check_plain_text(tokenizer, items, instruction)
        prompt = self._chat(messages)
        # What the per-input check cannot see: text forming a special token only within the whole chat.
        check_structure(tokenizer, prompt, self._chat(build_messages(*placeholder(items, instruction))[0]))
        return prompt, images

    def _chat(self, messages: list[dict]) -> str:
        # The tokenizer's renderer passes add_vision_id ("Picture i:") to the template in every
        # transformers version; some processors' apply_chat_template drop it.
        return self.processor.tokenizer.apply_chat_template(
            messages, chat_template=getattr(self.processor, "chat_template", None), tokenize=False,
            add_generation_prompt=True, add_vision_id=True,
        )

    def prepare_inputs(self, prompt: str, images: list) -> dict:
        # PIL images are height x width x channels; left to guess, transformers 4.x reads an image 1 or 3 pixels
        # tall as channels first (transposed, or an error about the mean).
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt",
                                input_data_format="channels_last")
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def reason(
        self,
        items: Sequence[Item],
        instruction: str | None = None,
        seed: int = 0,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        on_token: Callable[[int, int], None] | None = None,
    ) -> Reasoning:
        """The paper's reasoning: exactly `max_new_tokens` tokens (EOS masked) and their producing states.

        `on_token(done, total)` is called as each token's state is computed; an exception it
        raises (e.g. a user's cancel) stops generation and propagates.
        """
        return self.reason_variations(items, instruction, [seed], temperature, top_p, max_new_tokens, on_token)[0]

    def reason_variations(
        self,
        items: Sequence[Item],
        instruction: str | None = None,
        seeds: Sequence[int] = (0,),
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Reasoning]:
        """reason() for each seed (e.g. variation_seeds(seed, n)): on the fast path decoded together in one pass
        (see FastDecoder.run_variations: each is reason() with its seed up to the rounding of batched products),
        on the plain path one after another (exactly reason() with each seed). `on_token(done, total)` counts
        decode steps: one per token on the fast path, per token of each seed on the plain path."""
        seeds = list(seeds)
        for seed in seeds:  # before any image is processed
            check_sampling(seed, temperature, top_p, max_new_tokens)
        prompt, images = self.render_prompt(items, instruction)
        # The paper's min_tokens = max_tokens with ignore_eos: EOS can never be sampled.
        return self.decode_variations(prompt, self.prepare_inputs(prompt, images), seeds, temperature, top_p,
                                      max_new_tokens, max_new_tokens, on_token)

    def generate(
        self,
        prompt: str,
        images: list,
        seed: int = 0,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        min_new_tokens: int = 1,
        on_token: Callable[[int, int], None] | None = None,
    ) -> Reasoning:
        """Sample from a rendered chat and keep the final-norm state that produced each generated token."""
        return self.decode_variations(prompt, self.prepare_inputs(prompt, images), [seed], temperature, top_p,
                                      max_new_tokens, min_new_tokens, on_token)[0]

    def decode_variations(
        self,
        prompt: str,
        inputs: dict,
        seeds: Sequence[int] = (0,),
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        min_new_tokens: int = 1,
        on_token: Callable[[int, int], None] | None = None,
    ) -> list[Reasoning]:
        """generate() for each seed, from the processor's `inputs` of `prompt` (prepare_inputs; made before the
        model moved to its device, e.g. to size the memory it needs first with decode_memory, they follow it)."""
        seeds = list(seeds)
        samples = self.sample_variations(inputs, seeds, temperature, top_p, max_new_tokens, min_new_tokens, on_token)
        return [Reasoning(hidden_states=states, token_ids=tokens, prompt=prompt, seed=seed,
                          text=self.processor.tokenizer.decode(tokens, skip_special_tokens=True))
                for seed, (tokens, states) in zip(seeds, samples)]

    def sample(
        self,
        inputs: dict,
        seed: int = 0,
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        min_new_tokens: int = 1,
        on_token: Callable[[int, int], None] | None = None,
        fast: bool | None = None,
        forced_tokens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids [n] and their producing final-norm states [n, hidden] (float32, CPU) for processor inputs.

        A fixed token count (min = max, the paper's setting) takes the fast path unless `fast` is False;
        otherwise transformers' generate runs, which can stop at EOS. `forced_tokens` (fast path only)
        feeds given tokens instead of sampled ones, to compare states on the same tokens.
        """
        return self.sample_variations(inputs, [seed], temperature, top_p, max_new_tokens, min_new_tokens, on_token,
                                      fast, None if forced_tokens is None else forced_tokens.view(1, -1))[0]

    def sample_variations(
        self,
        inputs: dict,
        seeds: Sequence[int],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_new_tokens: int = 128,
        min_new_tokens: int = 1,
        on_token: Callable[[int, int], None] | None = None,
        fast: bool | None = None,
        forced_tokens: torch.Tensor | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """sample() per seed: (token ids [n], states [n, hidden]) each. The fast path decodes them together
        (FastDecoder.run_variations; `forced_tokens` [seeds, n]), transformers' generate one after another."""
        seeds = list(seeds)
        if not seeds:
            raise ValueError("sample_variations needs at least one seed")
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        for seed in seeds:
            check_sampling(seed, temperature, top_p, max_new_tokens, min_new_tokens)
        fast = self.fast if fast is None else fast
        if forced_tokens is not None and not (fast and min_new_tokens == max_new_tokens == forced_tokens.shape[-1]):
            raise ValueError("forced_tokens needs the fast path and exactly max_new_tokens = min_new_tokens tokens")
        with SAMPLING_LOCK:  # one run at a time in the process (see decode.SAMPLING_LOCK)
            if fast and min_new_tokens == max_new_tokens:
                tokens, states = self.decoder.run_variations(inputs, max_new_tokens, seeds, temperature, top_p,
                                                             self.eos_token_ids, forced_tokens, on_token)
                return list(zip(tokens, states))
            samples = []
            for i, seed in enumerate(seeds):
                # Progress over all variations: steps of the earlier ones done.
                counted = None if on_token is None else \
                    (lambda done, _total, before=i * max_new_tokens: on_token(before + done,
                                                                              len(seeds) * max_new_tokens))
                samples.append(self._generate_plain(inputs, seed, temperature, top_p, max_new_tokens, min_new_tokens,
                                                    counted))
            return samples

    def decode_memory(self, prompt_tokens: int, max_new_tokens: int, variations: int = 1) -> int:
        """Bytes a fast-path run needs beyond the weights: the static cache and state rows of every variation,
        the sampler's per-row float32 temporaries over the vocabulary, and the prompt's activations in the
        prefill (one layer's at a time: hidden states, q/k/v and the MLP's intermediate)."""
        config = getattr(self.model.config, "text_config", self.model.config)
        element = torch.finfo(self.model.dtype).bits // 8 if self.model.dtype.is_floating_point else 2
        head_dim = config.hidden_size // config.num_attention_heads
        length = cache_length(prompt_tokens, max_new_tokens)
        cache = 2 * config.num_hidden_layers * variations * config.num_key_value_heads * length * head_dim * element
        states = max(max_new_tokens, 128) * variations * config.hidden_size * element
        sampler = 8 * variations * config.vocab_size * 4  # logits, sort, cumsum, masks, draws
        prefill = prompt_tokens * (4 * config.hidden_size + 3 * config.intermediate_size) * element
        return cache + states + sampler + prefill

    @property
    def compile(self) -> bool | None:
        return self._compile

    @compile.setter
    def compile(self, value: bool | None) -> None:
        """May change between runs: the decoder switches without losing what it compiled."""
        self._compile = value
        if self._decoder is not None:
            self._decoder.compile = self._compiles()

    def _compiles(self) -> bool:
        # Compiled layers only serve the CUDA graph (the decoder uses none elsewhere) and need Triton.
        return importlib.util.find_spec("triton") is not None if self._compile is None else self._compile

    @property
    def decoder(self) -> FastDecoder:
        if self._decoder is None:
            self._decoder = FastDecoder(self.model, compile=self._compiles())
        return self._decoder

    def release(self) -> None:
        """Free the fast path's device memory (its cache and captured graph); call when the model moves."""
        if self._decoder is not None:
            self._decoder.release()

    def _generate_plain(self, inputs, seed, temperature, top_p, max_new_tokens, min_new_tokens, on_token):
        """transformers' generate, with a hook keeping the last position of each final-norm call."""
        from transformers import GenerationConfig

        generation = GenerationConfig(
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,  # EOS is masked until then
            eos_token_id=self.eos_token_ids,
            bos_token_id=self.model.generation_config.bos_token_id,
            pad_token_id=self.model.generation_config.pad_token_id or self.eos_token_ids[0],
        )
        device = self.device
        on_state = (lambda done: on_token(done, max_new_tokens)) if on_token else None
        with capture_last_positions(final_norm(self.model), on_state) as states, \
                torch.random.fork_rng(devices=cuda_indices(device)), torch.inference_mode():
            torch.manual_seed(seed)
            sequences = self.model.generate(**inputs, generation_config=generation)
        token_ids = sequences[0, inputs["input_ids"].shape[1]:].cpu()
        if len(states) != len(token_ids) or not min_new_tokens <= len(token_ids) <= max_new_tokens:
            raise RuntimeError(
                f"expected {min_new_tokens}..{max_new_tokens} generated tokens, one state each; got "
                f"{len(token_ids)} tokens and {len(states)} states: this transformers version generates "
                f"differently than expected"
            )
        return token_ids, torch.cat(states).float().cpu()
