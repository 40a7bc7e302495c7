"""The tiny Flan-T5 after a short autoencoding run, kept as a committed test asset.

Like the real Flan-T5, its decoder can read encoder states (a random decoder barely can, so no aligner could
steer it), which the aligner-training test needs. Training it takes minutes on a CPU, so it is done once,
deterministically, and its weights are committed (tests/assets/readable_flan_t5*.safetensors) with the
fingerprint of the tiny Flan-T5 they fit (architecture and vocabulary). transformers 5 builds the tiny
Flan-T5 with its output embedding tied to the input one (whatever the config asks), so there is an asset
per layout: `readable_flan_t5.safetensors` (transformers 4, untied) and `readable_flan_t5_tied.safetensors`
(transformers 5). When make_tiny_models changes the tiny Flan-T5, the tests say to make them again, each
under its transformers:

    python -m thinkdiff_core.testing.readable_t5 tests/assets/readable_flan_t5.safetensors
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .tiny_models import CORPUS, make_tiny_models

STEPS, BATCH, LR, SEED = 1500, 32, 3e-3, 0
ARCHITECTURE_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "feed_forward_proj", "tie_word_embeddings", "decoder_start_token_id", "pad_token_id",
                     "eos_token_id")


def fingerprint(flan_t5: Path) -> str:
    """What the weights depend on: the architecture and the tokenizer's vocabulary (not file layouts, which
    differ between library versions)."""
    config = json.loads((flan_t5 / "config.json").read_text())
    vocab = json.loads((flan_t5 / "tokenizer.json").read_text())["model"]["vocab"]
    # A Unigram vocabulary: [token, score] pairs in id order.
    text = json.dumps({"architecture": {key: config.get(key) for key in ARCHITECTURE_KEYS}, "vocab": vocab})
    return hashlib.sha256(text.encode()).hexdigest()


def train_readable(flan_t5: Path):
    """The tiny Flan-T5 trained to reproduce short texts (corpus words and random characters) from its
    encoder's states."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(flan_t5, local_files_only=True, trust_remote_code=False)
    model = T5ForConditionalGeneration.from_pretrained(flan_t5, local_files_only=True, trust_remote_code=False).train()
    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    words = " ".join(CORPUS).split()
    # Sorted: the order of get_vocab()'s dict changes from process to process.
    chars = sorted(t for t in tokenizer.get_vocab() if len(t) == 1 and t.isprintable())

    def text():
        if rng.random() < 0.5:
            return " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))
        return "".join(rng.choice(chars) for _ in range(rng.randint(1, 8)))

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(STEPS):
        batch = tokenizer([text() for _ in range(BATCH)], padding=True, return_tensors="pt")
        labels = batch.input_ids.masked_fill(batch.input_ids == tokenizer.pad_token_id, -100)
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def write_asset(flan_t5: Path, out: Path) -> None:
    """Train and write the weights (one file, no tied duplicates) with the fingerprint they fit."""
    from safetensors.torch import save_model

    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"fingerprint": fingerprint(flan_t5), "recipe": f"{STEPS} steps, batch {BATCH}, Adam {LR}, seed {SEED}"}
    save_model(train_readable(flan_t5), str(out), metadata=metadata)


def readable_copy(flan_t5: Path, assets: list[Path], out: Path) -> Path:
    """`flan_t5`'s folder with the weights of the asset made for it, in `out`. Refuses when none was."""
    from safetensors import safe_open
    from safetensors.torch import load_model
    from transformers import T5ForConditionalGeneration

    wanted = fingerprint(flan_t5)
    for asset in assets:
        with safe_open(str(asset), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == wanted:
                break
    else:
        names = ", ".join(str(asset) for asset in assets)
        raise ValueError(f"{names} were made for another tiny Flan-T5 (architecture or vocabulary changed): make "
                         f"the one for this transformers again with python -m thinkdiff_core.testing.readable_t5 "
                         f"OUT.safetensors")
    shutil.copytree(flan_t5, out, dirs_exist_ok=True)
    model = T5ForConditionalGeneration.from_pretrained(flan_t5, local_files_only=True, trust_remote_code=False)
    load_model(model, str(asset))  # strict: every weight is the asset's
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m thinkdiff_core.testing.readable_t5 OUT.safetensors")
    with tempfile.TemporaryDirectory() as scratch:
        write_asset(make_tiny_models(scratch)["flan_t5"], Path(sys.argv[1]))
