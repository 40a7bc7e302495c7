"""Model files: checks of downloaded files (JSON, safetensors, model folders) against what they claim, before
any loader trusts them, and the files this library writes (converted aligners, the extracted vision tower,
trained aligners)."""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import stat
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

MAX_SAFETENSORS_HEADER = 100_000_000  # bytes: the safetensors library's own limit
GIT_LFS_POINTER = b"version https://git-lfs"
# How every file torch.save writes opens: a zip archive, or (before PyTorch 1.6) its pickled magic number.
TORCH_ZIP_HEADER = b"PK\x03\x04"
TORCH_LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)
# The largest JSON files of a model folder are tokenizers of tens of MB; configs nest a few levels. Anything
# beyond serves only to exhaust memory or the stack of whatever parses it next (transformers copies configs
# recursively).
MAX_JSON_BYTES = 100_000_000
MAX_JSON_DEPTH = 64
# What each JSON file of a model folder is, for messages.
JSON_KINDS = {"config.json": "model config", "preprocessor_config.json": "image processor config",
              "tokenizer.json": "tokenizer", "tokenizer_config.json": "tokenizer config",
              "model_index.json": "diffusers model index", "generation_config.json": "generation config"}
# Files of a model folder that tokenizers and processors read (JSON files aside): an empty one or a Git LFS pointer
# in their place is a broken download. Weight files are checked where they are loaded (a folder may hold unused
# ones, e.g. .bin files beside the safetensors).
MODEL_FILE_SUFFIXES = (".txt", ".model", ".jinja", ".tiktoken")
# Bits per element of each safetensors dtype (a dtype not listed is left to the safetensors library).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "F8_E8M0": 8,
    "E8M0": 8, "U16": 16, "I16": 16, "F16": 16, "BF16": 16, "U32": 32, "I32": 32, "F32": 32, "U64": 64, "I64": 64,
    "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# Sizes a model config may give, at any nesting level (vision_config, text_config, ...): (smallest, largest).
# The largest are many times what any released model uses; beyond them a config only makes transformers or
# diffusers allocate for minutes, or crash in C code. None is accepted only where the libraries give it a meaning.
_COUNT, _WIDTH, _HEADS, _PICTURE = (0, 1024), (1, 1 << 18), (1, 4096), (1, 16384)
CONFIG_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "num_layers", "num_decoder_layers", "num_single_layers", "depth",
                     "layers_per_block", "max_window_layers"), _COUNT),
    **dict.fromkeys(("hidden_size", "d_model", "embed_dim", "intermediate_size", "d_ff", "d_kv", "head_dim",
                     "attention_head_dim", "joint_attention_dim", "pooled_projection_dim", "projection_dim",
                     "encoder_hidden_size", "in_channels", "out_channels", "latent_channels", "in_chans",
                     "block_out_channels", "norm_num_groups", "axes_dims_rope"), _WIDTH),
    **dict.fromkeys(("num_attention_heads", "num_key_value_heads", "num_heads"), _HEADS),
    **dict.fromkeys(("image_size", "patch_size", "spatial_patch_size", "temporal_patch_size", "spatial_merge_size",
                     "sample_size"), _PICTURE),
    "vocab_size": (1, 1 << 22), "max_position_embeddings": (1, 1 << 24), "n_positions": (1, 1 << 24),
    "num_train_timesteps": (1, 1 << 20), "mlp_ratio": (1, 64),
}
CONFIG_LISTS = {"block_out_channels", "axes_dims_rope", "image_size", "patch_size"}  # one per block or axis
CONFIG_REALS = {"mlp_ratio"}
CONFIG_NULLABLE = {"out_channels", "num_decoder_layers", "head_dim", "num_key_value_heads", "attention_head_dim",
                   "projection_dim", "sample_size", "max_window_layers"}
# Keys of a config.json that give a number of stacked layers, whose weights are numbered blocks.
LAYER_COUNTS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "num_single_layers", "depth")
# The classes a folder's JSON files name for transformers to build.
CLASS_KEYS = ("tokenizer_class", "processor_class", "image_processor_type", "feature_extractor_type",
              "video_processor_type")


def lfs_pointer_error(path, what: str = "the weights") -> ValueError:
    return ValueError(f"{path} is a Git LFS pointer, not {what}: download the file itself "
                      f"(e.g. `git lfs pull` in that clone)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(value, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def parse_json(data: bytes | str, source, what: str = "a JSON object", expected: type = dict):
    """The JSON object in `data`, or a ValueError that names `source` (a file, or where in one) and `what` was
    expected: for text that is not UTF-8, not JSON, nested too deep, a number no float holds (NaN, 1e999), or
    another value than an object."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not {what}: it is not UTF-8 text ({e})") from e
    except RecursionError as e:  # json's scanner recurses once per level
        raise ValueError(f"{source} is not {what}: it nests deeper than {MAX_JSON_DEPTH} levels") from e
    except ValueError as e:  # json.JSONDecodeError, and int's limit on digits
        raise ValueError(f"{source} is not {what}: it is not readable JSON ({e})") from e
    if not isinstance(value, expected):
        names = {dict: "an object", list: "an array", str: "a string", bool: "true or false", type(None): "null"}
        raise ValueError(f"{source} is not {what}: it holds {names.get(type(value), 'a number')} where a JSON "
                         f"{names[expected].split()[-1]} is expected")
    if _too_deep(value, MAX_JSON_DEPTH):
        raise ValueError(f"{source} is not {what}: it nests deeper than {MAX_JSON_DEPTH} levels")
    return value


def read_json(path: str | os.PathLike, what: str = "a JSON object", expected: type = dict):
    """parse_json of a file, which is read only if it is a regular file of a plausible size (a FIFO or a
    multi-GB file named config.json is refused, not read); an empty file or a Git LFS pointer is named as such."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found ({what} expected)")
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file ({what} expected)")
    if info.st_size == 0:
        # A model folder's file was downloaded; other JSON (run records) was written by an interrupted run.
        downloaded = path.name in JSON_KINDS or path.name.endswith(".index.json")
        raise ValueError(f"{path} is empty (0 bytes) where {what} is expected"
                         + ("; download it again" if downloaded else ""))
    if info.st_size > MAX_JSON_BYTES:
        raise ValueError(f"{path} is {info.st_size:,} bytes, more than {what} can be ({MAX_JSON_BYTES:,})")
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if data.startswith(GIT_LFS_POINTER):
        raise lfs_pointer_error(path, what)
    return parse_json(data, path, what, expected)


def json_kind(name: str) -> str:
    """What a JSON file of a model folder is, for read_json's messages."""
    kind = "safetensors index" if name.endswith(".index.json") else JSON_KINDS.get(name)
    return f"a {kind} (a JSON object)" if kind else "a JSON object"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_config_sizes(config: dict, source, bounds: dict = CONFIG_BOUNDS) -> None:
    """Every size `bounds` names, at any nesting level of `config`, is a number in its range (see CONFIG_BOUNDS)."""
    stack = [config]
    while stack:
        item = stack.pop()
        for key, value in item.items() if isinstance(item, dict) else enumerate(item):
            if key not in bounds or isinstance(value, dict):
                if isinstance(value, (dict, list)):
                    stack.append(value)
                continue
            low, high = bounds[key]
            for number in value if key in CONFIG_LISTS and isinstance(value, list) else [value]:
                if number is None and key in CONFIG_NULLABLE:
                    continue
                kinds = (int, float) if key in CONFIG_REALS else (int,)
                if type(number) not in kinds or not low <= number <= high:
                    kind = "a number" if key in CONFIG_REALS else "a whole number"
                    raise ValueError(f"{source}: {key} is {_shown(value)}; expected {kind} from {low} to {high:,} "
                                     f"(far more than any released model uses)")


def known_class(name, library) -> bool:
    """Whether `library` (transformers or diffusers) has the class `name` itself (its "...Fast" twin counts)."""
    return isinstance(name, str) and name.isidentifier() and (
        hasattr(library, name) or (name.endswith("Fast") and hasattr(library, name[:-4])))


def check_no_remote_code(folder: Path, configs: dict[str, dict]) -> None:
    """Refuse a folder whose JSON files ask transformers to run the folder's own Python code: an `auto_map`, or
    a tokenizer, processor or image processor class that transformers does not have. The loaders pass
    trust_remote_code=False too; this names the file and says why before anything loads."""
    import transformers

    for name, config in configs.items():
        if "auto_map" in config:
            raise ValueError(f"{folder / name} asks to run the model's own Python code (auto_map "
                             f"{_shown(config['auto_map'])}); ThinkDiff never runs code from a model folder: use a "
                             f"model that transformers supports itself")
        for key in CLASS_KEYS:
            if key in config and config[key] is not None and not known_class(config[key], transformers):
                raise ValueError(f"{folder / name}: {key} {_shown(config[key])} is not a class of transformers "
                                 f"{transformers.__version__}, so it would be the folder's own code, which ThinkDiff "
                                 f"never runs")


def check_model_folder(folder: str | os.PathLike) -> dict[str, dict]:
    """The JSON files at the top of a Hugging Face or diffusers folder, each read with read_json, after the
    checks every loader needs before transformers or diffusers reads the folder: no file a loader reads is empty
    or a Git LFS pointer, no file asks for the folder's own code to run, the sizes in config.json (or a
    diffusers scheduler_config.json) are plausible (CONFIG_BOUNDS)."""
    folder = Path(folder)
    for path in sorted(folder.iterdir()):
        if path.suffix in MODEL_FILE_SUFFIXES and path.is_file():
            if path.stat().st_size == 0:
                raise ValueError(f"{path} is empty (0 bytes); download it again")
            with open(path, "rb") as f:
                if f.read(len(GIT_LFS_POINTER)) == GIT_LFS_POINTER:
                    raise lfs_pointer_error(path, "its content")
    configs = {path.name: read_json(path, json_kind(path.name)) for path in sorted(folder.glob("*.json"))
               if path.is_file()}
    check_no_remote_code(folder, configs)
    for name in ("config.json", "scheduler_config.json"):
        if name in configs:
            check_config_sizes(configs[name], folder / name)
    return configs


def check_layers_held(config: dict, source, shapes: dict[str, list[int]]) -> None:
    """A config's layer counts (at any nesting level) are no more than the weights hold as numbered blocks: the
    layers a config adds beyond its weights would be initialised at random, the whole model's size of memory
    for a config that claims hundreds."""
    blocks: dict[str, int] = {}
    for name in shapes:
        # The first number in a name numbers the model's outermost stacks (model.layers.3.mlp.net.0.weight).
        if match := re.search(r"\.(\d+)(?=\.)", dotted := f".{name}"):
            prefix = dotted[1:match.start()]
            blocks[prefix] = max(blocks.get(prefix, 0), int(match.group(1)) + 1)
    if not blocks:  # weights without numbered blocks (none found): nothing to compare
        return
    held_prefix, held = max(blocks.items(), key=lambda item: item[1])
    stack = [config]
    while stack:
        item = stack.pop()
        for key, value in item.items():
            if isinstance(value, dict):
                stack.append(value)
            elif key in LAYER_COUNTS and type(value) is int and value > held:
                raise ValueError(f"{source}: {key} is {value}, but its weights hold at most {held} numbered "
                                 f"layer{'s' if held > 1 else ''} (in {held_prefix}.*); the config does not belong "
                                 f"to these weights: download the folder again")


def _header_entries(header: dict) -> dict[str, tuple[list[int], int, int]]:
    """name -> (shape, start, end) of a parsed safetensors header, each entry's bytes checked against its shape
    and the entries against each other (they tile the data from its start, as safetensors writes them), so that
    no claimed shape exceeds the bytes stored for it."""
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ is not a map of strings")
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"the entry of {_shown(name)} is not an object")
        shape, offsets, dtype = entry.get("shape"), entry.get("data_offsets"), entry.get("dtype")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise ValueError(f"the shape of {_shown(name)} is {_shown(shape)}, not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise ValueError("data_offsets are not integers")
        start, end = offsets
        bits = SAFETENSORS_DTYPE_BITS.get(dtype) if isinstance(dtype, str) else None
        claimed = math.prod(shape) * bits if bits else None
        if claimed is not None and (claimed % 8 or claimed // 8 != end - start):
            raise ValueError(f"{_shown(name)} claims shape {_shown(shape)} of {dtype} ({claimed / 8:,.0f} bytes) but "
                             f"its data_offsets hold {end - start:,} bytes")
        entries[name] = (shape, start, end)
    position = 0
    for name, (_, start, end) in sorted(entries.items(), key=lambda item: item[1][1:]):
        if start != position or end < start:
            raise ValueError(f"the data of {_shown(name)} ({start:,} to {end:,}) does not follow the tensor before it "
                             f"(which ends at {position:,})")
        position = end
    return entries


def check_safetensors_file(path: str | os.PathLike) -> dict[str, list[int]]:
    """Raise a clear error unless `path` is a whole .safetensors file whose header describes its bytes (a few
    KB read, not the weights); returns each tensor's shape.

    A cut-off download otherwise fails deep inside the loader with safetensors' "incomplete metadata,
    file not fully covered", naming no file; a Git LFS pointer (a clone without `git lfs pull`) with a
    header-length error.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        start = f.read(8)
        if start + f.read(len(GIT_LFS_POINTER) - 8) == GIT_LFS_POINTER:
            raise lfs_pointer_error(path)
        length = int.from_bytes(start, "little") if len(start) == 8 else -1
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path} is not a .safetensors file, or an incomplete download ({size} bytes); "
                             f"download it again")
        f.seek(8)
        try:
            entries = _header_entries(parse_json(f.read(length), "the header", "a JSON object"))
        except ValueError as e:
            raise ValueError(f"{path} has an unreadable .safetensors header ({e}); download it again") from e
    end = max((entry[2] for entry in entries.values()), default=0)
    expected = 8 + length + end
    if size != expected:
        problem = "an incomplete download" if size < expected else "longer than its header says"
        raise ValueError(f"{path} is {problem}: {size:,} bytes where its header describes {expected:,}; "
                         f"download it again")
    return {name: shape for name, (shape, _, _) in entries.items()}


def read_weight_map(index: str | os.PathLike) -> dict[str, str]:
    """The weight_map of a *.safetensors.index.json: tensor name -> shard, a plain file name beside the index
    (a path elsewhere would make the loader open a file outside the model folder)."""
    index = Path(index)
    weight_map = read_json(index, json_kind(index.name)).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(shard, str) and shard not in ("", ".", "..") and Path(shard).name == shard
            and "\\" not in shard for shard in weight_map.values()):
        raise ValueError(f"{index} is not a readable safetensors index (expected a weight_map of tensor names to "
                         f"shard file names beside it); download it again")
    return weight_map


def check_torch_file(path: str | os.PathLike, expected: str = "a PyTorch checkpoint", error=ValueError) -> None:
    """Refuse, as `error` naming the file and `expected`, a file for torch.load(weights_only=True) whose sizes
    torch would trust before checking them: torch checks each storage the pickle claims against its zip record,
    but a compressed record (a few KB that inflate to any size) or one reaching past the end of the file is
    refused here, as is the format before PyTorch 1.6, whose loader allocates each storage at the size the
    pickle claims before reading it. A Git LFS pointer or an empty file is named as such."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(max(len(GIT_LFS_POINTER), len(TORCH_LEGACY_HEADER)))
    if header.startswith(GIT_LFS_POINTER):
        raise error(str(lfs_pointer_error(path)))
    if header.startswith(TORCH_LEGACY_HEADER):
        raise error(f"{path}: saved in the format of PyTorch before 1.6, whose sizes cannot be checked before "
                    f"loading; load it and save it again with a current PyTorch (torch.save)")
    if not header.startswith(TORCH_ZIP_HEADER):
        problem = "empty (0 bytes)" if not header else "not a PyTorch checkpoint or safetensors file"
        raise error(f"{path}: {problem} (expected {expected})")
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise error(f"{path}: not a readable PyTorch checkpoint ({e})") from e
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise error(f"{path}: {record.filename} is compressed ({record.compress_size:,} bytes for "
                        f"{record.file_size:,}); torch.save writes no compressed records, so this is not a "
                        f"checkpoint it wrote")
        if record.header_offset + record.file_size > size:
            raise error(f"{path}: {record.filename} claims {record.file_size:,} bytes past the end of the file "
                        f"({size:,} bytes); an incomplete download or not a PyTorch checkpoint")


def check_safetensors_folder(folder: str | os.PathLike) -> dict[str, list[int]]:
    """check_safetensors_file for the weight files of a Hugging Face or diffusers folder: the shards that
    its *.safetensors.index.json names (each must be there), else every *.safetensors. Returns the shape of
    every tensor they hold."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        shards = sorted(set(read_weight_map(indexes[0]).values()))
        return check_shards(folder, shards, f" of the weight files its {indexes[0].name} lists")
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        shapes.update(check_safetensors_file(path))
    return shapes


def check_shards(folder: Path, shards, which: str) -> dict[str, list[int]]:
    """Each of `shards` (file names in `folder`) is there and whole; `which` follows the missing ones' names
    in the error, saying where the list came from. Returns the shape of every tensor they hold."""
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}{which}; download the missing ones")
    shapes = {}
    for shard in shards:
        shapes.update(check_safetensors_file(folder / shard))
    return shapes


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' save_file, written aside and renamed into place (`written_aside`: a kill never leaves
    part of a file), readable as any other new file of the user's.

    safetensors 0.8 writes through a temporary file made with mode 0600 (safetensors issue #782), so a
    ComfyUI running as another user (a container, a service account) could not read the model.
    """
    from safetensors.torch import save_file

    with written_aside(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def give_new_file_mode(path: str | os.PathLike) -> None:
    """The mode of any new file of the user's (0666 less the umask), for a file first made private (0600)."""
    if os.name == "posix":
        umask = os.umask(0)  # reading the umask means setting it; restored at once
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


@contextmanager
def written_aside(path: str | os.PathLike):
    """Yield a temporary path beside `path` to write the new file to; when the block ends, the file is synced
    to disk and renamed over `path`. A rename within a folder is atomic, so a crash or kill at any moment
    leaves the old file or the new one, never part of one. The temporary name is hidden
    (`.<name>.<random>.tmp`), so a kill's leftover is never taken for an output (globs such as
    `shard-*.safetensors` skip it); an exception, Ctrl-C included, removes it."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    try:
        yield Path(temporary)
        descriptor = os.open(temporary, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # the data reaches the disk before the new name does (a power cut, too)
        finally:
            os.close(descriptor)
        give_new_file_mode(temporary)  # mkstemp makes it 0600
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with written_aside(path) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def complete_lines(path: str | os.PathLike, valid=lambda line: True, log=print) -> list[str]:
    """The lines of an append-only log (results.jsonl, log.csv), made safe to append to after a crash.

    A process killed while appending leaves a last line without its newline. That line, and any line that
    `valid` rejects (returns False, or raises ValueError, KeyError or TypeError), is dropped with one warning
    naming the file and what was dropped, and the file is rewritten (atomically) with the complete lines
    alone: every complete record is kept and the next append starts a line of its own.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    *lines, tail = data.split(b"\n")  # tail: what follows the last newline, a cut-off line unless empty
    kept, dropped = [], 1 if tail else 0
    for line in lines:
        try:
            text = line.decode().removesuffix("\r")  # the csv module's lines end in \r\n
            complete = valid(text)
        except (UnicodeDecodeError, ValueError, KeyError, TypeError):
            complete = False
        if complete:
            kept.append(text)
        else:
            dropped += 1
    if dropped:
        text = "".join(line + "\n" for line in kept)
        atomic_write_text(path, text)
        log(f"warning: {path}: dropped {dropped} incomplete line{'s' if dropped > 1 else ''} "
            f"({len(data) - len(text.encode())} bytes) left by an interrupted write; kept the {len(kept)} "
            f"complete one{'s' if len(kept) != 1 else ''}")
    return kept
