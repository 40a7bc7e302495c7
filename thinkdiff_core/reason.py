"""ThinkDiff-LVLM reasoning with Qwen2-VL: the paper's generation and the states it keeps.

For each generated token the kept vector is the final-norm hidden state at the position that
produced it: vector 0 is the state at the last prompt position, vector t >= 1 the state computed
when token t-1 was fed in; the last token is never fed back. A forward hook on the language
model's final norm that keeps the last position of every forward call gives exactly this, since
generation makes one forward call per new token.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .decode import SAMPLING_LOCK, FastDecoder, cuda_indices
from .files import check_safetensors_folder
from .prompt import Item, build_messages
from .versions import release

logger = logging.getLogger(__name__)

QWEN2_VL_MODEL_TYPE = "qwen2_vl"
FP16_REFUSAL = (
    "float16 is refused for Qwen2-VL: it overflows to NaN/inf in Qwen2-VL's activations "
    "(transformers#33294), and ThinkDiff's aligner was trained on bfloat16 states. Use bfloat16 "
    "(default on GPU) or float32."
)


@dataclass
class Reasoning:
    """What one reasoning call produced."""

    hidden_states: torch.Tensor  # [max_new_tokens, hidden] float32 on CPU
    token_ids: torch.Tensor  # [max_new_tokens] int64 on CPU
    text: str  # the decoded answer
    prompt: str  # the exact chat text given to the processor


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
    """Raise a clear error unless `folder` looks like a local Qwen2-VL Hugging Face folder."""
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
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{config_path} is not a readable model config ({e})") from e
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
    check_safetensors_folder(folder)


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
        folder, local_files_only=True, attn_implementation="sdpa", device_map={"": device}, **options
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
        image_processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, **pil_option)
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, image_processor=image_processor)
        return cls(load_qwen2_vl(folder, device, dtype, quantization), processor, **options)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return final_norm(self.model).weight.shape[0]

    def render_prompt(self, items: Sequence[Item], instruction: str | None = None):
        """The exact chat text and the images, in order, for `items`."""
        messages, images = build_messages(items, instruction)
        # The tokenizer's renderer passes add_vision_id ("Picture i:") to the template in every
        # transformers version; some processors' apply_chat_template drop it.
        prompt = self.processor.tokenizer.apply_chat_template(
            messages, chat_template=getattr(self.processor, "chat_template", None), tokenize=False,
            add_generation_prompt=True, add_vision_id=True,
        )
        return prompt, images

    def prepare_inputs(self, prompt: str, images: list) -> dict:
        inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
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
        prompt, images = self.render_prompt(items, instruction)
        # The paper's min_tokens = max_tokens with ignore_eos: EOS can never be sampled.
        return self.generate(prompt, images, seed, temperature, top_p, max_new_tokens, max_new_tokens, on_token)

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
        inputs = self.prepare_inputs(prompt, images)
        token_ids, hidden_states = self.sample(inputs, seed, temperature, top_p, max_new_tokens, min_new_tokens,
                                               on_token)
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True)
        return Reasoning(hidden_states=hidden_states, token_ids=token_ids, text=text, prompt=prompt)

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
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (the paper samples at 0.6), got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the paper uses 0.9), got {top_p}")
        if not 1 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"need 1 <= min_new_tokens <= max_new_tokens (the paper generates 128), got "
                             f"{min_new_tokens} and {max_new_tokens}")
        fast = self.fast if fast is None else fast
        if forced_tokens is not None and not (fast and min_new_tokens == max_new_tokens == len(forced_tokens)):
            raise ValueError("forced_tokens needs the fast path and exactly max_new_tokens = min_new_tokens tokens")
        with SAMPLING_LOCK:  # one run at a time in the process (see decode.SAMPLING_LOCK)
            if fast and min_new_tokens == max_new_tokens:
                return self.decoder.run(inputs, max_new_tokens, seed, temperature, top_p, self.eos_token_ids,
                                        forced_tokens, on_token)
            return self._generate_plain(inputs, seed, temperature, top_p, max_new_tokens, min_new_tokens, on_token)

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
