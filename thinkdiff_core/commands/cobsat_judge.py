"""A local vision-language judge for CoBSAT: answers a multiple-choice question about an image.

Any Hugging Face image-text-to-text model folder works (Qwen2-VL by default); decoding is greedy, as the
benchmark's judges run at temperature 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image

# CoBSAT's system prompt for its Qwen judge (evaluation_icl.py).
SYSTEM_PROMPT = ("You are a professional assistant and always answer my question directly and perfectly without any "
                 "excuses. If I ask you to predict, you should always give me the prediction with the highest "
                 "probability or even random guess.")
# Its LLaVA-1.5 judge (the paper's) runs LLaVA's own llava_v1 conversation, whose system message is this.
LLAVA_SYSTEM_PROMPT = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                       "helpful, detailed, and polite answers to the human's questions.")
SYSTEM_PROMPTS = {"llava": LLAVA_SYSTEM_PROMPT}  # by config model_type; the others get the Qwen judge's


def check_judge_folder(folder: Path) -> None:
    from ..files import check_layers_held, check_model_folder, check_safetensors_folder

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"judge: {folder} is not a Hugging Face model folder (config.json missing)")
    # Every JSON file read safely, no remote code, sizes plausible and no more layers than the weights hold.
    check_layers_held(check_model_folder(folder)["config.json"], folder / "config.json",
                      check_safetensors_folder(folder))


class VLMJudge:
    # CoBSAT's judges answer in up to 512 greedy tokens and every digit of the answer is read, so a judge
    # that states its option number after a sentence is scored as in the benchmark.
    def __init__(self, model, processor, max_new_tokens: int = 512):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.system_prompt = SYSTEM_PROMPTS.get(model.config.model_type, SYSTEM_PROMPT)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "VLMJudge":
        import transformers
        from transformers import AutoProcessor

        from ..versions import release

        folder = Path(folder)
        check_judge_folder(folder)  # also refuses a folder that asks for its own code (trust_remote_code stays off)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        model_class = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        dtype_option = "dtype" if release(transformers) >= (4, 56) else "torch_dtype"
        model = model_class.from_pretrained(folder, local_files_only=True, trust_remote_code=False,
                                            **{dtype_option: dtype})
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        return cls(model.to(device), processor)

    def prompt(self, question: str) -> str:
        """The chat text for one question about one image."""
        # Content as a list: templates such as llava-hf's render only typed parts, and would drop a plain string.
        messages = [{"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.tokenizer.apply_chat_template(
            messages, chat_template=getattr(self.processor, "chat_template", None), tokenize=False,
            add_generation_prompt=True)

    def ask(self, image: Image.Image, question: str) -> str:
        inputs = self.processor(text=[self.prompt(question)], images=[image.convert("RGB")], return_tensors="pt")
        device = next(self.model.parameters()).device
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        with torch.inference_mode():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
