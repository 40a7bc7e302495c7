"""train: an aligner trained with the paper's recipe (THINKDIFF.md, "Training the aligner").

Only the aligner learns; a frozen Flan-T5 decoder reads its output as encoder states. LVLM (on the shards
of prepare-lvlm): a random split s in [1, min(L-1, 128)]; the aligner reads the first s states and the
decoder must produce the T5 tokens of the text of generated tokens s..L. CLIP: the aligner reads BLIP-2's
65 tokens per image, the T5 encoder reads the caption (normalised as BLIP's `blip_caption`) up to a random
word, and the decoder must produce the rest. AdamW (lr 1e-4, linear warm-up from 1e-6 over 2000 steps,
cosine to 8e-5, weight decay 0.05 except biases and the norm), bf16 autocast over a bf16 T5, the
aligner's norm initialised from the T5 encoder's final norm. Multi-GPU through `accelerate launch` (DDP);
the batch size is per process, as the authors' per-GPU batch. All data trains (the authors hold nothing
out); `val_fraction` can hold a fixed share out.

Every step's batch, split points and dropout come from (seed, step, process index), so a resumed run
(on as many processes, with the same hyperparameters, which trainer.json records) continues exactly where
it stopped. A checkpoint is written aside and renamed into place, trainer.json (which one is current)
last: a kill at any moment leaves the previous checkpoint or the new one whole.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import torch

from ..aligner import PREFIX, Aligner
from ..files import (atomic_write_text, check_layers_held, check_model_folder, check_safetensors_folder, complete_lines,
                     json_kind, read_json, save_safetensors)
from .training_data import image_caption_samples, prepared_keys

# ---------------------------------------------------------------- data


def blip_caption(caption: str, max_words: int = 50) -> str:
    """The authors' caption normalisation (LAVIS's `blip_caption` processor): lowercase, . ! " ( ) * # : ; ~ to
    spaces, runs of two or more whitespace characters to one space, at most max_words space-separated words."""
    caption = re.sub(r'[.!"()*#:;~]', " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


def split_caption(caption: str, rng: random.Random) -> tuple[str, str]:
    """(start, rest) at a random space; a one-word caption is all rest, with an empty start (as the authors)."""
    words = caption.split(" ")
    if len(words) < 2:
        return "", caption
    cut = rng.randint(1, len(words) - 1)
    return " ".join(words[:cut]), " ".join(words[cut:])


def batch_keys(keys: list[str], batch_size: int, seed: int, step: int, process_index: int = 0,
               num_processes: int = 1) -> list[str]:
    """This process's batch_size keys at `step`: slices of one draw shared by all processes, so that processes get
    different samples whenever there are batch_size x processes keys or more (and a batch never repeats one)."""
    size = min(batch_size, len(keys))
    drawn = random.Random(f"{seed}/{step}").sample(keys, min(batch_size * num_processes, len(keys)))
    return [drawn[(process_index * size + i) % len(drawn)] for i in range(size)]


def is_validation(key: str, fraction: float) -> bool:
    """A fixed, content-free split: the same keys are held out on every run and every process."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10_000 < fraction * 10_000



# ---------------------------------------------------------------- the schedule


def learning_rate(step: int, total_steps: int, lr: float = 1e-4, min_lr: float = 8e-5, warmup_lr: float = 1e-6,
                  warmup_steps: int = 2000) -> float:
    """Linear warm-up from warmup_lr to lr, then cosine from lr to min_lr over all steps (as LAVIS runs it)."""
    if step < warmup_steps:
        return min(lr, warmup_lr + (lr - warmup_lr) * step / max(warmup_steps, 1))
    return (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1))) + min_lr


def warmup_warning(steps: int, lr: float, min_lr: float, warmup_lr: float, warmup_steps: int) -> str:
    """The one line train logs when the run ends inside the warm-up (steps < warmup_steps)."""
    last = learning_rate(steps - 1, steps, lr, min_lr, warmup_lr, warmup_steps)
    return (f"warning: --steps {steps} is shorter than the warm-up (--warmup-steps {warmup_steps}): the learning "
            f"rate never reaches its peak --lr {lr:g} (it ends at {last:.3g})")


# ---------------------------------------------------------------- batches


class LVLMData:
    """Prepared samples, read lazily from their shards; a batch is split at random points."""

    def __init__(self, folder, t5_tokenizer, vlm_tokenizer=None, max_split: int = 128, max_text_tokens: int = 128):
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.shards = prepared_keys(self.folder)
        if not self.shards:
            raise FileNotFoundError(f"no prepared shards (shard-*.safetensors) in {self.folder}; run prepare-lvlm")
        self.keys = sorted(self.shards)
        if vlm_tokenizer is None:
            check_model_folder(self.folder / "tokenizer")  # names a broken tokenizer file; refuses remote code
        self.vlm_tokenizer = vlm_tokenizer or AutoTokenizer.from_pretrained(self.folder / "tokenizer",
                                                                            local_files_only=True,
                                                                            trust_remote_code=False)
        self.t5_tokenizer, self.max_split, self.max_text_tokens = t5_tokenizer, max_split, max_text_tokens

    def sample(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        from safetensors import safe_open

        with safe_open(str(self.shards[key]), framework="pt") as f:
            return f.get_tensor(f"{key}.states"), f.get_tensor(f"{key}.ids")

    def split(self, key: str, rng: random.Random) -> tuple[torch.Tensor, str]:
        """The aligner's input (states of the first s tokens) and the target text (tokens s..L)."""
        states, ids = self.sample(key)
        s = rng.randint(1, max(1, min(len(ids) - 1, self.max_split)))
        return states[:s].float(), self.vlm_tokenizer.decode(ids[s:], skip_special_tokens=True)

    def batch(self, keys: list[str], rng: random.Random, device) -> dict:
        inputs, texts = zip(*(self.split(key, rng) for key in keys))
        length = max(len(x) for x in inputs)
        states = torch.zeros(len(inputs), length, inputs[0].shape[-1])
        mask = torch.zeros(len(inputs), length, dtype=torch.long)
        for i, x in enumerate(inputs):
            states[i, :len(x)], mask[i, :len(x)] = x, 1
        labels = self.t5_tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_text_tokens,
                                   return_tensors="pt")
        return {"states": states.to(device), "mask": mask.to(device), **labels_for(labels, self.t5_tokenizer, device)}


class CLIPData:
    """Images with normalised captions, each split at a random word: T5 reads the start, the decoder the rest."""

    def __init__(self, source, vision, t5_tokenizer, max_text_tokens: int = 32):
        self.samples = {key: (image.convert("RGB"), blip_caption(caption))
                        for key, image, caption in image_caption_samples(source) if caption is not None}
        if not self.samples:
            raise ValueError(f"{source}: no image with a caption (captions: same-stem .txt, or .txt/.json in .tar)")
        self.keys = sorted(self.samples)
        self.vision, self.t5_tokenizer, self.max_text_tokens = vision, t5_tokenizer, max_text_tokens

    def batch(self, keys: list[str], rng: random.Random, device) -> dict:
        firsts, rests = map(list, zip(*(split_caption(self.samples[key][1], rng) for key in keys)))
        features = self.vision.encode([self.samples[key][0] for key in keys])  # frozen: [b, 65, 1408]
        prefix = self.t5_tokenizer(firsts, padding="longest", truncation=True, max_length=self.max_text_tokens,
                                   return_tensors="pt")
        labels = self.t5_tokenizer(rests, padding="longest", truncation=True, max_length=self.max_text_tokens,
                                   return_tensors="pt")
        return {"states": features.to(device), "mask": torch.ones(features.shape[:2], dtype=torch.long, device=device),
                "prefix_ids": prefix.input_ids.to(device), "prefix_mask": prefix.attention_mask.to(device),
                **labels_for(labels, self.t5_tokenizer, device)}


def labels_for(tokens, tokenizer, device) -> dict:
    labels = tokens.input_ids.masked_fill(tokens.input_ids == tokenizer.pad_token_id, -100)
    return {"labels": labels.to(device), "decoder_mask": tokens.attention_mask.to(device)}


def t5_loss(t5, aligner, batch: dict) -> torch.Tensor:
    """The frozen T5 decoder's cross-entropy on the batch's labels, reading the aligner's output (+ T5's text)."""
    encoded, mask = aligner(batch["states"]), batch["mask"]
    if "prefix_ids" in batch:  # CLIP: [image tokens, T5-encoded caption start]
        text = t5.encoder(input_ids=batch["prefix_ids"], attention_mask=batch["prefix_mask"]).last_hidden_state
        encoded, mask = torch.cat([encoded, text.to(encoded.dtype)], dim=1), torch.cat([mask, batch["prefix_mask"]], 1)
    return t5(encoder_outputs=(encoded,), attention_mask=mask, labels=batch["labels"],
              decoder_attention_mask=batch["decoder_mask"]).loss


# ---------------------------------------------------------------- training


LOG_FIELDS = ["step", "loss", "lr", "samples_per_s", "val_loss"]
# The folders accelerate's save_state fills: state-<step> (current or stale), .state-<step>.partial (being
# written, or a kill's leftover) and `state`, the single folder of runs from before checkpoints were numbered.
STATE_FOLDER = re.compile(r"state|state-\d{7}|\.state-\d{7}\.partial")
# What `--override-hyperparameters` names: flags as typed, and the process count accelerate launch sets.
SETTING_NAMES = {"processes": "processes (accelerate launch --num_processes)"}


def save_aligner(aligner: Aligner, path: Path, variant: str, step: int) -> None:
    state = {PREFIX + k: v.detach().float().cpu().contiguous() for k, v in aligner.state_dict().items()}
    save_safetensors(state, path, metadata={"format": "pt", "variant": variant, "d_in": str(aligner.in_features),
                                            "d_out": str(aligner.out_features), "step": str(step),
                                            "architecture": "mlp2x_gelu_t5_norm"})


def read_progress(progress_file: Path) -> tuple[int, str, dict | None]:
    """(step, checkpoint folder name, hyperparameters) of trainer.json; runs from before numbered checkpoints
    kept theirs in `state/` and recorded no hyperparameters."""
    try:
        record = read_json(progress_file, "the record of a training run")
        return int(record["step"]), str(record.get("state", "state")), record.get("hyperparameters")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{progress_file} does not say which step to resume from ({type(e).__name__}: {e}); "
                         f"continue in another --out, or remove {progress_file.parent} to start again") from e


def changed_hyperparameters(stored: dict, now: dict) -> list[str]:
    """`--lr: stored 0.01, now 0.02` for each hyperparameter both record and that differs."""
    def shown(value):
        return "(none)" if value is None else str(value)

    return [f"{SETTING_NAMES.get(name, '--' + name.replace('_', '-'))}: stored {shown(stored[name])}, now "
            f"{shown(value)}" for name, value in now.items() if name in stored and stored[name] != value]


def resume_log(log_file: Path, step: int, log) -> None:
    """log.csv as of the checkpoint of `step`: a row cut off by a kill is dropped (with a warning), and so are
    the rows past the checkpoint, which the resumed run logs again, so that it reads as one uninterrupted run."""
    def valid(line):
        fields = line.split(",")
        return len(fields) == len(LOG_FIELDS) and (fields == LOG_FIELDS or fields[0].isdigit())

    lines = complete_lines(log_file, valid, log)
    kept = [line for line in lines if line.split(",")[0] == "step" or int(line.split(",")[0]) <= step]
    if kept[1:] and kept[0].split(",")[0] == "step":
        if kept != lines:
            atomic_write_text(log_file, "".join(line + "\n" for line in kept))
    else:  # no row left (or none with its header): start the file again
        log_file.unlink(missing_ok=True)


def sync_folder(folder: Path) -> None:
    """The files accelerate wrote reach the disk before the folder is renamed into place (see written_aside)."""
    for path in folder.rglob("*"):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)


def check_t5_folder(folder: Path) -> None:
    """Fail early and clearly on a folder that is no T5 (transformers would fail deep inside the model's code)."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no config.json; --t5 expects a Flan-T5 folder (google/flan-t5-xxl)")
    model_type = read_json(config, json_kind(config.name)).get("model_type")
    if model_type != "t5":
        raise ValueError(f"{folder}: not a Flan-T5 folder (its config.json has model_type {model_type!r}); --t5 "
                         f"expects one with model_type 't5', such as google/flan-t5-xxl")
    # Every JSON file read safely, no remote code, sizes plausible and no more layers than the weights hold.
    check_layers_held(check_model_folder(folder)["config.json"], config, check_safetensors_folder(folder))


def stored_encoder_norm(folder: Path, t5) -> torch.Tensor:
    """The T5 encoder's final norm as stored (fp32 for Flan-T5): the authors copied it before casting T5 to bf16."""
    from safetensors import safe_open

    name = "encoder.final_layer_norm.weight"
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return t5.encoder.final_layer_norm.weight  # a folder of .bin files: as loaded


def train(variant: str, t5, data, out, vision=None, steps: int = 200_000, batch_size: int | None = None,
          lr: float = 1e-4, min_lr: float = 8e-5, warmup_lr: float = 1e-6, warmup_steps: int = 2000,
          weight_decay: float = 0.05, max_split: int = 128, max_text_tokens: int | None = None,
          val_fraction: float = 0.0, val_every: int = 1000, save_every: int = 5000, log_every: int = 10,
          seed: int = 42, precision: str | None = None, resume: bool = False, cpu: bool | None = None,
          override_hyperparameters: bool = False, log=print) -> dict:
    """Train an aligner. Checkpoints: out/aligner.safetensors (+ one per save step), out/state-<step> (to
    resume), named by out/trainer.json with the run's hyperparameters.

    batch_size is per process; precision "bf16" (the default on GPU) also holds the frozen T5 in bf16, as the
    authors did. Resuming with other hyperparameters than the stored ones is refused unless
    override_hyperparameters. Returns the last logged values ("last"), the trained aligner and the frozen T5, the
    path of out/aligner.safetensors ("aligner_file") and whether this is the main process ("main_process")."""
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from ..versions import release

    if variant not in ("lvlm", "clip"):
        raise ValueError(f"variant must be lvlm or clip, got {variant!r}")
    if steps < 1:
        raise ValueError(f"--steps must be 1 or more, got {steps}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size must be 1 or more, got {batch_size}")
    if variant == "clip" and vision is None:
        raise ValueError("the clip variant needs --vision (BLIP-2 vision file or folder)")
    t5_folder = Path(t5)
    check_t5_folder(t5_folder)
    out = Path(out)
    progress_file, log_file = out / "trainer.json", out / "log.csv"
    if progress_file.is_file() and not resume:  # starting over would overwrite its checkpoints and log
        raise FileExistsError(f"{out} holds a training run ({progress_file.name}); pass --resume to continue it, "
                              f"or another --out to start a new one")
    cpu = not torch.cuda.is_available() if cpu is None else cpu
    precision = precision or ("fp32" if cpu else "bf16")
    tensorboard = bool(is_tensorboard_available())  # logs to out/ as well when TensorBoard is installed
    accelerator = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=cpu,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    batch_size = batch_size or (32 if variant == "lvlm" else 42)
    max_text_tokens = max_text_tokens or (128 if variant == "lvlm" else 32)
    if steps < warmup_steps and accelerator.is_main_process:
        log(warmup_warning(steps, lr, min_lr, warmup_lr, warmup_steps))
    # What the trained weights depend on: a resumed run must continue with the same (before anything loads).
    hyperparameters = {
        "variant": variant, "t5": str(t5_folder.resolve()), "data": str(Path(data).resolve()),
        "vision": str(Path(vision).resolve()) if isinstance(vision, (str, os.PathLike)) else None, "steps": steps,
        "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "warmup_lr": warmup_lr, "warmup_steps": warmup_steps,
        "weight_decay": weight_decay, "max_split": max_split, "max_text_tokens": max_text_tokens,
        "val_fraction": val_fraction, "seed": seed, "precision": precision, "processes": accelerator.num_processes}
    step, state_name = 0, None
    if resume and progress_file.is_file():
        step, state_name, stored = read_progress(progress_file)
        changes = changed_hyperparameters(stored or {}, hyperparameters)
        if changes and not override_hyperparameters:
            raise ValueError(f"{out} was trained with other hyperparameters ({'; '.join(changes)}); resume with the "
                             f"stored ones, pass --override-hyperparameters to continue with the new ones, or "
                             f"another --out to start a new run")
        if not (out / state_name).is_dir():
            raise ValueError(f"{progress_file} names the checkpoint {out / state_name}, which is missing; continue in "
                             f"another --out, or remove {out} to start again")
        if changes and accelerator.is_main_process:
            log(f"overriding the stored hyperparameters: {'; '.join(changes)}")
    t5_tokenizer = AutoTokenizer.from_pretrained(t5_folder, local_files_only=True, trust_remote_code=False)
    # The data first: its mistakes are reported before the frozen T5 (11B parameters for Flan-T5-XXL) loads.
    if variant == "lvlm":
        dataset = LVLMData(data, t5_tokenizer, max_split=max_split, max_text_tokens=max_text_tokens)
        d_in = dataset.sample(dataset.keys[0])[0].shape[-1]
    else:
        from ..vision import VisionEncoder

        encoder = VisionEncoder.from_pretrained(vision, device=accelerator.device) \
            if isinstance(vision, (str, os.PathLike)) else vision
        dataset = CLIPData(data, encoder, t5_tokenizer, max_text_tokens=max_text_tokens)
        d_in = encoder.hidden_size
    train_keys = [k for k in dataset.keys if not is_validation(k, val_fraction)]
    val_keys = [k for k in dataset.keys if is_validation(k, val_fraction)]
    if not train_keys:
        raise ValueError(f"no training samples in {data} (all {len(dataset.keys)} held out for validation)")

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    dtype_option = "dtype" if release(transformers) >= (4, 56) else "torch_dtype"
    t5 = T5ForConditionalGeneration.from_pretrained(t5_folder, local_files_only=True, trust_remote_code=False,
                                                    **{dtype_option: dtype})
    encoder_norm = stored_encoder_norm(t5_folder, t5).detach().clone()
    if variant == "lvlm":  # the decoder reads the aligner's output directly; like the authors, drop the encoder
        t5.encoder = None  # (about 9.5 GB of Flan-T5-XXL in bf16) before anything reaches the GPU
    # .to(dtype) as well: from_pretrained keeps T5's `wo` layers in fp32, the authors cast every layer to bf16.
    t5 = t5.to(accelerator.device, dtype)
    t5.requires_grad_(False).train()  # frozen, but in training mode (dropout) as in the authors' runner
    if accelerator.is_main_process:  # only now, so that bad arguments or data leave no empty folder behind
        out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    aligner = Aligner(d_in, t5.config.d_model)  # LVLM: PyTorch's default init (the authors skip post_init there)
    with torch.no_grad():
        if variant == "clip":  # the authors' CLIP model is a Blip2PreTrainedModel: its _init_weights, range 0.02
            for linear in (aligner[0], aligner[2]):
                linear.weight.normal_(0.0, 0.02)
                linear.bias.zero_()
        aligner[3].weight.copy_(encoder_norm)  # the paper: the T5 encoder's final norm
    no_decay = [p for name, p in aligner.named_parameters() if name.endswith("bias") or name.startswith("3.")]
    decay = [p for name, p in aligner.named_parameters() if not (name.endswith("bias") or name.startswith("3."))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=warmup_lr)
    aligner, optimizer = accelerator.prepare(aligner, optimizer)

    if state_name is not None:
        accelerator.load_state(str(out / state_name))
        if accelerator.is_main_process:
            log(f"resumed at step {step}" if step < steps else
                f"{out} is already at step {step} of --steps {steps}: nothing to train")
            resume_log(log_file, step, log)
    else:
        if resume and accelerator.is_main_process:
            log(f"--resume: no checkpoint in {out} (no trainer.json), starting from step 0")
        if accelerator.is_main_process and log_file.exists():
            log_file.unlink()

    def batch_at(step_number: int) -> dict:
        index = accelerator.process_index
        rng = random.Random(f"{seed}/{step_number}/{index}")  # split points: this process's own
        torch.manual_seed(rng.getrandbits(63))  # dropout: its own per process too, as the authors seed + rank
        keys = batch_keys(train_keys, batch_size, seed, step_number, index, accelerator.num_processes)
        return dataset.batch(keys, rng, accelerator.device)

    def validation_loss() -> float | None:
        if not val_keys:
            return None
        unwrapped = accelerator.unwrap_model(aligner)
        with torch.no_grad(), accelerator.autocast():
            t5.eval()
            losses = [t5_loss(t5, unwrapped, dataset.batch(val_keys[i:i + batch_size], random.Random(f"val/{i}"),
                                                           accelerator.device)).item()
                      for i in range(0, len(val_keys), batch_size)]
            t5.train()
        return sum(losses) / len(losses)

    if tensorboard:
        accelerator.init_trackers("tensorboard", config={"variant": variant, "steps": steps, "batch_size": batch_size,
                                                         "lr": lr, "min_lr": min_lr, "seed": seed})
    def save_checkpoint() -> None:
        """accelerate's state written aside and renamed into place, the aligners, then trainer.json naming the
        new state, then the old state removed: whenever a kill comes, trainer.json names a whole checkpoint."""
        name = f"state-{step:07d}"
        partial = out / f".{name}.partial"
        if accelerator.is_main_process and partial.exists():
            shutil.rmtree(partial)  # a killed run's
        accelerator.wait_for_everyone()
        accelerator.save_state(str(partial))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            sync_folder(partial)
            if (out / name).exists():  # renamed into place by a run killed before its trainer.json: never current
                shutil.rmtree(out / name)
            partial.rename(out / name)
            unwrapped = accelerator.unwrap_model(aligner)
            save_aligner(unwrapped, out / f"aligner-{step:07d}.safetensors", variant, step)
            save_aligner(unwrapped, out / "aligner.safetensors", variant, step)
            atomic_write_text(progress_file, json.dumps({"step": step, "state": name,
                                                         "hyperparameters": hyperparameters}) + "\n")
            for folder in out.iterdir():
                if folder.name != name and folder.is_dir() and STATE_FOLDER.fullmatch(folder.name):
                    shutil.rmtree(folder)

    saved = step if state_name is not None else None  # the step of the checkpoint trainer.json names
    last, started, samples = {}, time.perf_counter(), 0
    try:
        while step < steps:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, steps, lr, min_lr, warmup_lr, warmup_steps)
            batch = batch_at(step)
            with accelerator.autocast():
                loss = t5_loss(t5, aligner, batch)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            samples += len(batch["labels"]) * accelerator.num_processes
            if step % log_every == 0 or step == steps or (val_every and step % val_every == 0):
                mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
                last = {"step": step, "loss": round(mean_loss, 5), "lr": optimizer.param_groups[0]["lr"],
                        "samples_per_s": round(samples / (time.perf_counter() - started), 2), "val_loss": ""}
                if val_every and (step % val_every == 0 or step == steps):
                    value = validation_loss()
                    last["val_loss"] = "" if value is None else round(value, 5)
                if tensorboard:
                    accelerator.log({k: v for k, v in last.items() if k != "step" and v != ""}, step=step)
                if accelerator.is_main_process:
                    new_file = not log_file.exists()
                    with open(log_file, "a", newline="") as f:
                        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS, lineterminator="\n")
                        if new_file:
                            writer.writeheader()
                        writer.writerow(last)
                    log(f"step {step}/{steps} loss {last['loss']} lr {last['lr']:.3g} {last['samples_per_s']} "
                        f"samples/s" + (f" val {last['val_loss']}" if last["val_loss"] != "" else ""))
            if step % save_every == 0 or step == steps:
                save_checkpoint()
                saved = step
    except KeyboardInterrupt:
        kept = (f"the checkpoint of step {saved} is kept in {out}; rerun with --resume to continue from it"
                if saved is not None else f"no checkpoint yet (--save-every {save_every}); rerun to start again")
        raise KeyboardInterrupt(f"interrupted at step {step}; {kept}") from None
    accelerator.end_training()
    return {"last": last, "aligner": accelerator.unwrap_model(aligner), "t5": t5,
            "aligner_file": out / "aligner.safetensors", "main_process": accelerator.is_main_process}


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train an aligner (the paper's recipe; `accelerate launch` for DDP)")
    parser.add_argument("--variant", choices=["lvlm", "clip"], required=True,
                        help="lvlm: on prepare-lvlm's Qwen2-VL states; clip: on BLIP-2's image tokens")
    parser.add_argument("--t5", required=True, help="Flan-T5 folder (google/flan-t5-xxl): its decoder stays frozen")
    parser.add_argument("--data", required=True, help="lvlm: a prepare-lvlm folder; clip: images + .txt captions "
                        "or .tar shards")
    parser.add_argument("--vision", help="clip: BLIP-2 vision file or folder")
    parser.add_argument("--out", required=True, help="folder of the run: aligner.safetensors, log.csv, checkpoints")
    parser.add_argument("--steps", type=int, default=200_000, help="the paper's 40 epochs x 5000 steps")
    parser.add_argument("--batch-size", type=int, help="per process (default: 32 for lvlm, 42 for clip)")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak learning rate, reached after the warm-up")
    parser.add_argument("--min-lr", type=float, default=8e-5, help="learning rate the cosine ends at")
    parser.add_argument("--warmup-lr", type=float, default=1e-6, help="learning rate the warm-up starts from")
    parser.add_argument("--warmup-steps", type=int, default=2000, help="steps of the linear warm-up to --lr")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, except biases and the norm")
    parser.add_argument("--max-text-tokens", type=int, help="T5 target length (default: 128 for lvlm, 32 for clip)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="share of samples held out for validation (the authors hold none out)")
    parser.add_argument("--val-every", type=int, default=1000, help="steps between validation losses")
    parser.add_argument("--save-every", type=int, default=5000, help="steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=10, help="steps between log.csv rows")
    parser.add_argument("--seed", type=int, default=42, help="batches, split points and dropout")
    parser.add_argument("--precision", choices=["bf16", "fp32"], help="(default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is there")
    parser.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint, with the "
                        "hyperparameters it was trained with (a change is refused)")
    parser.add_argument("--override-hyperparameters", action="store_true",
                        help="with --resume: continue with the hyperparameters given now where they differ from "
                        "the stored ones (e.g. more --steps); the run is then no longer the same as an "
                        "uninterrupted one")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "variant", "t5", "data", "out")}
    options["cpu"] = True if options["cpu"] else None
    result = train(args.variant, args.t5, args.data, args.out, **options)
    if result["main_process"]:  # one line under accelerate launch too
        print(f"aligner: {result['aligner_file']}")
