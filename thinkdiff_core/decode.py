"""The fast reasoning path: a static KV cache and a one-token decode step, replayed as a CUDA graph.

It computes what transformers' generate computes in the paper's setting (a fixed number of tokens
with EOS masked, temperature then top-p sampling, the final-norm state of every producing position):

- the prompt goes through the model's own forward, as in generate (vision tower, M-RoPE positions);
- each later token runs the model's own weights on one position, with rotary embedding and attention
  over a preallocated cache written here; the weights are read fused (FusedLayer: q/k/v one matrix,
  gate/up one, RMSNorm one kernel, residuals added by their projections' addmm, rotary as one product
  with a per-token rotation matrix), 389 operators per token on Qwen2-VL-7B instead of 1,055.
  The fused tensors are the model's storage (its nn.Linear weights are views into them), so nothing
  is held twice; in float32 the step gives the unfused step's values to float rounding, in bf16 it
  rounds differently (fewer roundings), as compiled code does. Layers that are not plain nn.Linear
  (bitsandbytes) run the model's own modules;
- tokens are drawn as transformers draws them: masked EOS, logits / temperature, the top-p filter,
  then torch.multinomial's own algorithm (argmax of probs / Exp(1) noise), so the same seed gives
  the same random numbers in the same order. They come from the decoder's own generator, seeded as
  torch.manual_seed seeds the global one (the same stream): nothing else in the process moves it, not
  even Dynamo, which puts the global generators back as they were when a compilation finishes (also
  one in another thread, while a run draws).

What changes is the bookkeeping. The cache length is bucketed (powers of two), so the buffers serve
every prompt of a bucket; a step's attention reads only the filled part of the cache, rounded up to a
window of ATTENTION_WINDOW slots, and on CUDA each window has its captured graph: the whole step (every
layer's kernels plus the sampler) is one graph replay with no host synchronisation between tokens;
states and tokens land in device buffers read once at the end. Optionally each decoder layer is
compiled (one layer's code, reused by all); by default in a background thread, so the first run
decodes with the eager graphs instead of waiting. A decoder for layers like ones compiled before in
the process (a reloaded VLM) uses that code at once.

Several seeds of one prompt (variations) decode together as rows of one batch: the prompt runs once and its
cache is copied into every row, each step computes a token of every row (reading the weights once), and each
row draws from its own generator what a single run of its seed draws.

Text generated after the prompt has the same M-RoPE position on all three axes, so its rotary
embedding is ordinary 1-D RoPE at that position (`next_position` continues from the prompt's).
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import inspect
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # PyTorch < 2.2, which has no cuDNN attention to avoid either
    SDPBackend = sdpa_kernel = None

logger = logging.getLogger(__name__)

MIN_BUCKET = 1024

# A step attends to the cache slots up to the one it writes, rounded up to a multiple of this: a 612-token
# prompt's 128 tokens read 640 or 768 slots instead of the bucket's 1024, at most two captured graphs a run.
ATTENTION_WINDOW = 128

# On CUDA progress is reported per this many tokens, once the device has computed them (see _Progress).
PROGRESS_CHUNK = 8

# A decoder's buffers (and generator) are shared by its runs, the plain path reseeds torch's global
# generators (transformers' generate draws from them), and sdpa_kernel's selection is process-wide:
# runs in one process take turns, on one model or several (re-entrant for a callback that reasons).
SAMPLING_LOCK = threading.RLock()

# Signatures (layer_signature) of decoder layers whose compilation succeeded in this process. Dynamo
# keeps their code, so a new decoder for such layers compiles in its warm-up steps at once.
_compiled_signatures: set[tuple] = set()


def reset_compiled_layers() -> None:
    """Drop all compiled code (torch._dynamo.reset) and with it what this module knows was compiled."""
    torch._dynamo.reset()
    _compiled_signatures.clear()


def layer_signature(layer, heads: int, kv_heads: int, rows: int = 1) -> tuple:
    """What the compiled layer code depends on: the rows of a step (variations decoded together), module types
    and parameter shapes, dtypes and devices (for a FusedLayer its tensors')."""
    if isinstance(layer, FusedLayer):
        return (rows, heads, kv_heads, FusedLayer, layer.eps,
                tuple((name, tuple(t.shape), t.dtype, t.device) for name, t in layer.tensors()))
    return (rows, heads, kv_heads, tuple(type(module) for module in layer.modules()),
            tuple((name, tuple(p.shape), p.dtype, p.device) for name, p in layer.named_parameters()))


def cache_length(prompt_tokens: int, new_tokens: int) -> int:
    """The static cache length: a power of two >= MIN_BUCKET, so prompt lengths share the buffers."""
    needed = prompt_tokens + new_tokens
    length = MIN_BUCKET
    while length < needed:
        length *= 2
    return length


def attention_window(slot: int, cache_len: int) -> int:
    """How many cache slots a step writing `slot` reads: slots 0..slot rounded up to a multiple of
    ATTENTION_WINDOW, at most the cache. The rest are masked anyway; not reading them saves the kernel's
    sequential pass over them (a one-query attention has few thread blocks)."""
    return min(cache_len, (slot // ATTENTION_WINDOW + 1) * ATTENTION_WINDOW)


def run_windows(prompt_tokens: int, new_tokens: int, cache_len: int) -> list[int]:
    """The windows a run's steps read, in order (the prefill draws token 1; step t writes slot prompt + t - 2)."""
    slots = range(prompt_tokens, prompt_tokens + new_tokens - 1)
    return sorted({attention_window(slot, cache_len) for slot in slots})


def sample_paper(logits: torch.Tensor, eos_mask: torch.Tensor, temperature: torch.Tensor,
                 top_p_floor: torch.Tensor, reciprocal: bool = False,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """One token per row, as transformers samples with min_new_tokens not yet reached.

    The processors in generate's order: EOS to -inf, divide by temperature, drop the smallest-probability
    tokens whose cumulative mass is <= 1 - top_p (keeping at least one), softmax; then what
    torch.multinomial(probs, 1) does (an Exp(1) draw per entry, argmax of probs / draw) without its
    validity checks, which read values back to the host.

    transformers divides by temperature as a Python float, which CUDA computes as a product with its
    float32 reciprocal and the CPU as a division; with `reciprocal`, `temperature` holds that
    reciprocal and is multiplied in, so both devices round as transformers does. The draws come from
    `generator` (default: torch's global one, as in torch.multinomial); given one generator per row, row i
    draws from generator i exactly what a single row would (the variations of a batch).
    """
    scores = logits.masked_fill(eos_mask, float("-inf"))
    scores = scores * temperature if reciprocal else scores / temperature
    sorted_scores, order = torch.sort(scores, descending=False)
    remove_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= top_p_floor
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    probs = scores.masked_fill(remove, float("-inf")).softmax(dim=-1)
    draws = torch.empty_like(probs)
    if isinstance(generator, Sequence):
        for row, row_generator in zip(draws, generator, strict=True):
            row.exponential_(1, generator=row_generator)
    else:
        draws.exponential_(1, generator=generator)
    return (probs / draws).argmax(dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_cos_sin(position: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """1-D rotary cos and sin at `position` ([1] int64), each [1, 1, 1, head_dim] in `dtype`."""
    freqs = position.float()[:, None] * inv_freq.float()
    angles = torch.cat((freqs, freqs), dim=-1)
    return ((angles.cos() * scaling).to(dtype).view(1, 1, 1, -1),
            (angles.sin() * scaling).to(dtype).view(1, 1, 1, -1))


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """[head_dim, head_dim] R with `row @ R == row * cos + rotate_half(row) * sin` for every head's row:
    cos on the diagonal, -sin / +sin where rotate_half takes an entry from (every entry of R is one of
    cos, sin, -sin or 0, so a product with it adds exact zeros to what the elementwise form sums)."""
    cos, sin = cos.reshape(-1), sin.reshape(-1)
    half = cos.shape[0] // 2
    # rotate_half(x)_j is -x_(j+half) for j < half, x_(j-half) after: column j takes row (j + half) mod head_dim.
    signed = torch.cat((-sin[:half], sin[half:]))
    return torch.diag_embed(cos) + torch.diag_embed(signed).roll(half, 0)


def rotary_inputs(fused: bool, position: torch.Tensor, inv_freq: torch.Tensor, scaling: float, dtype: torch.dtype):
    """What layer_inputs takes as (cos, sin): rotary_cos_sin's, or for FusedLayers (rotation_matrix, None)."""
    cos, sin = rotary_cos_sin(position, inv_freq, scaling, dtype)
    return (rotation_matrix(cos, sin), None) if fused else (cos, sin)


class FusedLayer:
    """A Qwen2-VL decoder layer's weights as the fused decode step reads them: q/k/v as one matrix (and bias),
    gate/up as one, plus the output and down projections and both norms' weights.

    The fused tensors are built once from the layer's weights and become the layer's storage: each
    nn.Linear's weight (and bias) is re-pointed at a view into them, so the model's own forward (prefill,
    generate) reads the same memory and no weight is held twice. Only for plain nn.Linear projections
    (bitsandbytes' layers keep the unfused step, see `fusable`). When the model moves or its parameters
    are replaced, the views no longer alias these tensors and the decoder builds them again
    (FastDecoder._ensure_fused, keyed by the weights' addresses).
    """

    def __init__(self, layer):
        attn, mlp = layer.self_attn, layer.mlp
        q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
        weight = q.weight
        # Made as the weights are: inference tensors exactly when they are (an inference tensor cannot be
        # written outside inference mode, e.g. by load_state_dict), and outside autograd.
        with torch.inference_mode(weight.is_inference()), torch.no_grad():
            self.qkv_weight = torch.cat((q.weight, k.weight, v.weight))
            self.qkv_bias = None if q.bias is None else torch.cat((q.bias, k.bias, v.bias))
            self.gate_up_weight = torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight))
            _repoint((q.weight, k.weight, v.weight), self.qkv_weight)
            if self.qkv_bias is not None:
                _repoint((q.bias, k.bias, v.bias), self.qkv_bias)
            _repoint((mlp.gate_proj.weight, mlp.up_proj.weight), self.gate_up_weight)
        self.o_weight = attn.o_proj.weight
        self.down_weight = mlp.down_proj.weight
        self.input_norm_weight = layer.input_layernorm.weight
        self.post_norm_weight = layer.post_attention_layernorm.weight
        self.eps = (float(layer.input_layernorm.variance_epsilon),
                    float(layer.post_attention_layernorm.variance_epsilon))
        self.intermediate = mlp.gate_proj.weight.shape[0]

    def tensors(self):
        return [(name, t) for name, t in vars(self).items() if isinstance(t, torch.Tensor)]

    def parameters(self):
        """Its tensors, as a module's parameters() (the weights, fused or the model's own)."""
        return iter([t for _, t in self.tensors()])

    @staticmethod
    def fusable(layer) -> bool:
        """Plain nn.Linear projections (q/k/v with biases or all without), RMSNorms, a SiLU MLP, one dtype
        and device; anything else (bitsandbytes' layers) keeps the unfused step."""
        try:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj]
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            act = mlp.act_fn
        except AttributeError:
            return False
        if not all(type(m) is torch.nn.Linear for m in linears) or attn.o_proj.bias is not None \
                or any(m.bias is not None for m in linears[4:]):
            return False
        if len({m.bias is None for m in linears[:3]}) != 1:
            return False
        if not all(hasattr(n, "variance_epsilon") and type(n).__name__.endswith("RMSNorm")
                   and set(dict(n.named_parameters())) == {"weight"} for n in norms):
            return False
        if not isinstance(act, torch.nn.SiLU) and type(act).__name__ != "SiLUActivation":
            return False
        tensors = [p for m in linears + norms for p in m.parameters()]
        return len({(t.dtype, t.device) for t in tensors}) == 1


def _repoint(parameters, fused: torch.Tensor) -> None:
    """Each parameter's data becomes its rows of `fused` (a view: the same values, one storage)."""
    start = 0
    for p in parameters:
        rows = p.shape[0]
        p.data = fused[start:start + rows]
        start += rows


def layer_inputs(layer, x, cos, sin, heads: int, kv_heads: int, head_dim: int):
    """A decoder layer's query, key and value for one position of each row, rotary embedding applied.

    x: [rows, 1, hidden] (a row per sequence, all at the same position); cos, sin: [1, 1, 1, head_dim];
    returns q [rows, heads, 1, head_dim], k and v [rows, kv_heads, 1, head_dim]. For a FusedLayer `cos` is
    rotation_matrix's [head_dim, head_dim] and `sin` None (see rotary_inputs): one norm kernel, one q/k/v
    product, one rotary product.
    """
    rows = x.shape[0]
    if isinstance(layer, FusedLayer):
        h = F.rms_norm(x.view(rows, -1), layer.input_norm_weight.shape, layer.input_norm_weight, layer.eps[0])
        qkv = F.linear(h, layer.qkv_weight, layer.qkv_bias).view(rows, heads + 2 * kv_heads, head_dim)
        qk = qkv[:, :heads + kv_heads] @ cos
        return qk[:, :heads].unsqueeze(2), qk[:, heads:].unsqueeze(2), qkv[:, heads + kv_heads:].unsqueeze(2)
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    # One position: [rows, 1, n * head_dim] viewed as [rows, n, 1, head_dim] is the usual transpose.
    q = attn.q_proj(h).view(rows, heads, 1, head_dim)
    k = attn.k_proj(h).view(rows, kv_heads, 1, head_dim)
    v = attn.v_proj(h).view(rows, kv_heads, 1, head_dim)
    # Rotary on queries and keys together: the same elementwise products, half the eager kernels.
    qk = torch.cat((q, k), dim=1)
    qk = qk * cos + rotate_half(qk) * sin
    return qk[:, :heads], qk[:, heads:], v


def layer_output(layer, x, attended):
    """The rest of the layer after attention: output projection, residual, MLP, residual.

    For a FusedLayer each residual is added by its projection's product (addmm), the norm is one kernel
    and gate/up one product."""
    rows = x.shape[0]
    if isinstance(layer, FusedLayer):
        x = torch.addmm(x.view(rows, -1), attended.reshape(rows, -1), layer.o_weight.t())
        h = F.rms_norm(x, layer.post_norm_weight.shape, layer.post_norm_weight, layer.eps[1])
        gate_up = h @ layer.gate_up_weight.t()
        act = F.silu(gate_up[:, :layer.intermediate]) * gate_up[:, layer.intermediate:]
        return torch.addmm(x, act, layer.down_weight.t()).view(rows, 1, -1)
    x = x + layer.self_attn.o_proj(attended.reshape(rows, 1, -1))
    return x + layer.mlp(layer.post_attention_layernorm(x))


def attention_bias(slot_ids: torch.Tensor, slot: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 for the cache slots up to `slot`, -inf after: what sdpa makes of a boolean mask, made once per
    token instead of once per layer."""
    return torch.zeros(slot_ids.shape, dtype=dtype, device=slot_ids.device).masked_fill_(slot_ids > slot,
                                                                                           float("-inf"))


def decoder_layer_step(layer, x, key_cache, value_cache, cos, sin, slot, bias, heads: int, kv_heads: int,
                       inputs=layer_inputs, output=layer_output):
    """One Qwen2-VL decoder layer on the single position `slot` of each row; writes its keys and values into the
    cache.

    x: [rows, 1, hidden]; key_cache, value_cache: [rows, kv_heads, window, head_dim], the cache's first
    `window` slots (slot < window); slot: [1] int64; bias: [1, 1, 1, window] from attention_bias. `inputs` and
    `output` may be compiled versions of layer_inputs and layer_output: the cache write and attention stay outside
    compiled code, so nothing compiled mutates its inputs.
    """
    head_dim = key_cache.shape[-1]
    q, k, v = inputs(layer, x, cos, sin, heads, kv_heads, head_dim)
    key_cache.index_copy_(2, slot, k)
    value_cache.index_copy_(2, slot, v)
    # One query position: the query heads that share a key/value head attend as one group, so the
    # cache is read once instead of being repeated per query head.
    grouped = q.reshape(q.shape[0], kv_heads, heads // kv_heads, head_dim)
    attended = F.scaled_dot_product_attention(grouped, key_cache, value_cache, attn_mask=bias,
                                              scale=head_dim ** -0.5)
    return output(layer, x, attended)


EAGER_PIECES = (layer_inputs, layer_output)


def decode_attention_backends(device: torch.device) -> list | None:
    """The sdpa backends the decode step's attention may use on `device`, in order; None: PyTorch's choice.

    On CUDA PyTorch may route the one-query attention with an additive mask to cuDNN's kernel on Hopper
    (PyTorch 2.5 preferred it there); naming memory-efficient attention, then math, keeps the step on
    kernels that take any additive mask and can be captured, whatever the release prefers. Elsewhere
    PyTorch's own choice stays (on the CPU its flash kernel, which generate uses too).
    """
    if device.type != "cuda" or sdpa_kernel is None:
        return None
    return [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def state_tolerance(dtype: torch.dtype) -> float:
    """How far (relative L2) a checked step's state may be from the eager one's: 16 ulps of the dtype, for
    bf16 about the benchmark's tolerance (cosine 0.99); a wrong graph or wrong code is off by far more."""
    return max(16 * torch.finfo(dtype).eps, 1e-3)


def compile_layer_pieces():
    """layer_inputs and layer_output compiled whole; one layer's code serves all layers (equal shapes)."""
    return (torch.compile(layer_inputs, fullgraph=True, dynamic=False),
            torch.compile(layer_output, fullgraph=True, dynamic=False))


class BackgroundCompilation:
    """Compiles the layer pieces in a thread by running them once on a private copy of one decoder layer.

    The copy (one layer's weights, ~0.5 GB for Qwen2-VL-7B, freed when done) keeps the thread
    independent of the model, which may move or be freed meanwhile; the thread draws no random
    numbers itself (Dynamo resetting the global generators when it is done does not touch the decoders'
    own). Its inputs are made as the decode step makes them, so the compiled code's guards hold for the
    real layers (the attention, which reads a window of the cache, is not compiled). No graph is captured
    while one runs (`running()`): Inductor's autotuning synchronises the whole device, which would break a
    capture, and a broken capture leaves older PyTorch's allocator unusable.
    """

    THREAD_NAME = "ThinkDiff decode compilation"

    @classmethod
    def running(cls) -> bool:
        """Whether any decoder's compilation thread is running in this process."""
        return any(thread.name == cls.THREAD_NAME and thread.is_alive() for thread in threading.enumerate())

    def __init__(self, layer, inv_freq: torch.Tensor, scaling: float, heads: int, kv_heads: int, head_dim: int,
                 rows: int = 1):
        self.pieces = None
        self.error: Exception | None = None
        self.seconds: float | None = None
        self.signature = layer_signature(layer, heads, kv_heads, rows)
        weight = _layer_weight(layer)
        shapes = dict(hidden=weight.shape[-1], heads=heads, kv_heads=kv_heads, head_dim=head_dim, rows=rows)
        # Dynamo's guards compare the inference-tensor flag, so the copy is made in inference mode exactly
        # when the weights are inference tensors (ComfyUI moves models in inference mode, except with
        # --highvram): otherwise the real layers would not match the copy's code and compile again.
        with torch.inference_mode(weight.is_inference()):
            scratch = (copy.deepcopy(layer), inv_freq.detach().clone())
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(weight.device))  # the thread's stream waits for the copies
        # The caller's context goes along: newer PyTorch keeps compiler settings in context variables.
        self._thread = threading.Thread(target=contextvars.copy_context().run,
                                        args=(self._compile, *scratch, scaling, shapes, copied),
                                        name=self.THREAD_NAME, daemon=True)
        self._thread.start()

    def _compile(self, layer, inv_freq, scaling, shapes, copied) -> None:
        started = time.perf_counter()
        try:
            pieces = compile_layer_pieces()
            weight = _layer_weight(layer)
            device, dtype = weight.device, weight.dtype
            # The inputs are inference tensors, as the decode step's are (it always runs in inference mode).
            with torch.inference_mode(), torch.cuda.device(device):
                stream = torch.cuda.Stream(device)
                stream.wait_event(copied)
                try:
                    with torch.cuda.stream(stream):
                        x = torch.zeros(shapes["rows"], 1, shapes["hidden"], dtype=dtype, device=device)
                        cos, sin = rotary_inputs(isinstance(layer, FusedLayer),
                                                 torch.zeros(1, dtype=torch.long, device=device), inv_freq,
                                                 scaling, dtype)
                        cache = torch.zeros(shapes["rows"], shapes["kv_heads"], ATTENTION_WINDOW, shapes["head_dim"],
                                            dtype=dtype, device=device)
                        slot = torch.zeros(1, dtype=torch.long, device=device)
                        bias = attention_bias(torch.arange(ATTENTION_WINDOW, device=device).view(1, 1, 1, -1),
                                              slot, dtype)
                        decoder_layer_step(layer, x, cache, cache.clone(), cos, sin, slot, bias, shapes["heads"],
                                           shapes["kv_heads"], *pieces)
                finally:
                    stream.synchronize()  # before the copy's memory goes back to the allocator, error or not
            self.pieces = pieces
            _compiled_signatures.add(self.signature)  # now, also if the decoder never runs again
        except Exception as e:  # noqa: BLE001 - reported by the decoder, which stays eager
            self.error = e
        finally:
            self.seconds = time.perf_counter() - started

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)


def _layer_weight(layer) -> torch.Tensor:
    """A weight of a decoder layer (or FusedLayer) whose last dimension is the hidden size."""
    return layer.qkv_weight if isinstance(layer, FusedLayer) else next(layer.parameters())


@dataclass
class _Buffers:
    """Everything one decode step reads and writes, allocated once per cache length and number of rows (the
    variations decoded together: the same prompt, so every row is at the same slot and position)."""

    keys: torch.Tensor  # [layers, rows, kv_heads, cache_len, head_dim]
    values: torch.Tensor
    slot_ids: torch.Tensor  # [1, 1, 1, cache_len]: 0..cache_len-1, compared with `slot`
    token: torch.Tensor  # [rows] the tokens fed next
    slot: torch.Tensor  # [1] their cache slot
    position: torch.Tensor  # [1] their rotary position
    step: torch.Tensor  # [1] the index of the states they produce
    states: torch.Tensor  # [max_tokens, rows, hidden]
    tokens: torch.Tensor  # [max_tokens, rows]
    forced: torch.Tensor  # [max_tokens, rows]: tokens to feed instead of sampled ones (teacher forcing)
    forcing: torch.Tensor  # [] bool
    eos_mask: torch.Tensor  # [vocab] bool
    temperature: torch.Tensor  # [] float32: T, or float32 1/T on CUDA (see sample_paper)
    top_p_floor: torch.Tensor  # [] float32: 1 - top_p
    generators: list[torch.Generator]  # the draws', one per row, seeded per run

    @property
    def rows(self) -> int:
        return self.token.shape[0]


class FastDecoder:
    """Runs the paper's sampling on a Qwen2-VL model with a static cache; CUDA graphs on CUDA.

    `compile=True` compiles the decoder layer step with torch.compile (fused norms and rotary, fewer
    kernels) for the CUDA graph; it falls back to eager with a warning where compilation fails (e.g.
    no Triton). With `compile_in_background` (the default) compilation starts in a thread once the
    first run has captured the uncompiled step, and runs replay those graphs until it is done; the next
    run then captures the compiled step. The two round differently in bf16, so a seed's tokens can
    change once, at that switch, where a draw is nearly tied. Otherwise the first run waits for
    compilation. `compile` may be switched between runs; compiled layers are kept for switching back.
    Layers compiled before in this process (same signature) are compiled at once instead: no eager run.

    Nothing is trusted unchecked: before compiled code serves a step, and before a newly captured graph
    is replayed, one step of it is compared with the launched step on the run's own first token (the same
    inputs and random draws); if the token or the state differs beyond rounding, or it raises, one
    warning says so and by how much, and the decoder goes on without it (eager layers / no graph).

    Call `release()` when the model moves or is unloaded: the cache and graphs hold device memory
    and the graphs hold the weights' addresses (a moved model is also detected and recaptured). The
    graphs of one decoder (one per attention window) share one memory pool: each holds only temporaries
    of one step, and they replay one at a time.
    `release()` also drops the fused layers (FusedLayer), which would otherwise keep the old device's
    q/k/v and gate/up storage alive after a move; a run fuses again whenever the weights' addresses
    changed. `fuse=False` runs the model's own modules per layer (as for bitsandbytes' layers).
    """

    def __init__(self, model, compile: bool = False, cuda_graph: bool | None = None,
                 compile_in_background: bool = True, fuse: bool = True):
        self.model = model
        self.compile = compile
        self.cuda_graph = cuda_graph
        self.compile_in_background = compile_in_background
        self.compile_seconds: float | None = None  # how long compilation took, once done
        decoder = model.get_decoder()
        self.layers = list(decoder.layers)
        self.norm = decoder.norm
        self.embed = model.get_input_embeddings()
        self.lm_head = model.get_output_embeddings()
        self.rotary = decoder.rotary_emb
        config = getattr(model.config, "text_config", model.config)
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.vocab_size = self.lm_head.weight.shape[0]
        self._compiled_pieces = None  # once compiled; in use while `compile` is on and checked (see _pieces)
        self._checked: set[tuple] = set()  # the signatures (rows included) for which _compiled_pieces passed the check
        # What the step's attention may use, and what PyTorch picks for it (for the benchmark), per device.
        self.attention_backends: list | None = None
        self.attention_backend: str | None = None
        self._buffers: _Buffers | None = None
        self._graphs: dict = {}  # attention window -> captured step, for the weights and pieces in _graph_key
        self._graph_key = None
        self._stream = None  # warm-up and capture stream, one per device
        self._compilation: BackgroundCompilation | None = None
        self._failed_compilations = 0
        self._failed_captures = 0
        self._forward_takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        # What the step runs per layer: FusedLayers (see _ensure_fused), or the model's own layers where
        # they cannot be fused (`fuse=False`, bitsandbytes); built on the first run.
        self._fusable = all(FusedLayer.fusable(layer) for layer in self.layers)
        self.fuse = fuse and self._fusable  # may be switched between runs (ignored where not fusable)
        self._step_layers: list | None = None
        self._fused_key = None  # the weights' addresses the FusedLayers were built for

    # -- public -------------------------------------------------------------------------------

    def run(self, inputs: dict, new_tokens: int, seed: int, temperature: float, top_p: float,
            eos_token_ids: list[int], forced_tokens: torch.Tensor | None = None,
            on_token: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`new_tokens` tokens [n] and the final-norm state that produced each [n, hidden], as int64 and
        float32 on CPU.

        `forced_tokens` [n] feeds the given tokens instead of the sampled ones (for comparing states on
        the same tokens); the returned tokens are then those.
        """
        tokens, states = self.run_variations(inputs, new_tokens, [seed], temperature, top_p, eos_token_ids,
                                             None if forced_tokens is None else forced_tokens.view(1, -1), on_token)
        return tokens[0], states[0]

    def run_variations(self, inputs: dict, new_tokens: int, seeds: Sequence[int], temperature: float, top_p: float,
                       eos_token_ids: list[int], forced_tokens: torch.Tensor | None = None,
                       on_token: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence per seed, decoded together (one step computes a token of each): tokens [rows, n] and
        states [rows, n, hidden], as run's.

        The prompt is computed once. Row i draws from its own generator, seeded with seeds[i], the random
        numbers a single run of seeds[i] draws; its states are that run's up to the rounding of batched
        products (on the same tokens), so a draw nearly tied may go the other way. `forced_tokens`: [rows, n].
        on_token(done, total) counts steps (each a token of every row).
        """
        seeds = list(seeds)
        if not seeds:
            raise ValueError("run_variations needs at least one seed")
        if forced_tokens is not None and tuple(forced_tokens.shape) != (len(seeds), new_tokens):
            raise ValueError(f"forced_tokens must be [{len(seeds)}, {new_tokens}] (a row per seed), got "
                             f"{list(forced_tokens.shape)}")
        with SAMPLING_LOCK:
            self._ensure_fused()
            return self._run(inputs, new_tokens, seeds, temperature, top_p, eos_token_ids, forced_tokens, on_token)

    def _ensure_fused(self) -> None:
        """The step's layers, fused again when the weights moved (new addresses: ComfyUI's .to(), a replaced
        parameter). Fusing re-points the model's q/k/v/gate/up weights into the fused tensors, so the
        model's own forward keeps working on the same storage."""
        if not (self.fuse and self._fusable):
            if self._step_layers is not self.layers:
                self._checked.clear()  # compiled code meets other layers: checked again
            self._step_layers = self.layers
            return
        if self._step_layers is self.layers:
            self._checked.clear()
        if self._step_layers is not None and self._step_layers is not self.layers \
                and self._fused_key == self._weights_key():
            return
        self._step_layers = None  # the old fused tensors go before the new ones are made
        self._step_layers = [FusedLayer(layer) for layer in self.layers]
        self._fused_key = self._weights_key()

    def _run(self, inputs, new_tokens, seeds, temperature, top_p, eos_token_ids, forced_tokens, on_token):
        device = self.embed.weight.device
        prompt_tokens = inputs["input_ids"].shape[1]
        # The buffers are always made and written in inference mode, whether or not the caller is in it
        # (ComfyUI is, a library user usually is not): inference tensors may only be written there.
        with torch.inference_mode():
            buffers = self._prepare(cache_length(prompt_tokens, new_tokens), new_tokens, len(seeds), device)
            buffers.eos_mask.zero_()
            buffers.eos_mask[eos_token_ids] = True
            if device.type == "cuda":
                buffers.temperature.copy_(torch.tensor(1.0) / torch.tensor(temperature))  # float32 on the host
            else:
                buffers.temperature.fill_(temperature)
            buffers.top_p_floor.fill_(1 - top_p)
            buffers.forcing.fill_(forced_tokens is not None)
            if forced_tokens is not None:
                buffers.forced[:new_tokens] = forced_tokens.t().to(device)

        length = buffers.keys.shape[3]
        windows = run_windows(prompt_tokens, new_tokens, length)
        with torch.inference_mode():
            for generator, seed in zip(buffers.generators, seeds):
                generator.manual_seed(seed)  # the stream torch.manual_seed(seed) gives generate
            self._prefill(inputs, buffers)
            progress = _Progress(on_token, new_tokens, self._asynchronous(device))
            progress.computed(1)
            # After the prefill, so that new compiled code and new graphs are checked on this run's step.
            graphs = self._ensure_graphs(buffers, windows) if self._use_graph(device) else {}
            for done, slot in enumerate(range(prompt_tokens, prompt_tokens + new_tokens - 1), start=2):
                window = attention_window(slot, length)
                graph = graphs.get(window)
                graph.replay() if graph is not None else self._step(buffers, window)
                progress.computed(done)
            # Copies: the buffers are overwritten by the next run (on CPU .cpu() would alias them).
            states = buffers.states[:new_tokens].transpose(0, 1).to("cpu", torch.float32, copy=True).contiguous()
            tokens = buffers.tokens[:new_tokens].t().to("cpu", copy=True).contiguous()
        return tokens, states

    def release(self) -> None:
        """Free the cache and the captured graphs (a compilation under way goes on; it holds no model memory).
        Waits for a run under way in another thread (e.g. ComfyUI unloading the model meanwhile)."""
        with SAMPLING_LOCK:
            self._graphs, self._graph_key, self._buffers = {}, None, None
            # The fused tensors are the weights' storage only until the model moves; after a move they
            # would keep the old device's copy alive. The next run fuses again.
            self._step_layers = self._fused_key = None

    def wait_for_compilation(self, timeout: float | None = None) -> bool:
        """Wait for a background compilation under way; True when the next run uses compiled layers."""
        if self._compilation is not None:
            self._compilation.wait(timeout)
            self._adopt_compilation()
        return self.compiled

    # -- steps --------------------------------------------------------------------------------

    def _prefill(self, inputs: dict, buffers: _Buffers) -> None:
        """The prompt through the model's own forward; its cache, state and first token into the buffers."""
        prompt_tokens = inputs["input_ids"].shape[1]
        captured = {}

        def keep_state(_module, _args, output):
            captured["state"] = output[:, -1]

        def keep_positions(_module, args, kwargs):
            positions = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
            captured["next_position"] = int(positions.max()) + 1

        hooks = [self.norm.register_forward_hook(keep_state),
                 self.rotary.register_forward_pre_hook(keep_positions, with_kwargs=True)]
        try:
            extra = {"logits_to_keep": 1} if self._forward_takes_logits_to_keep else {}
            cache_position = torch.arange(prompt_tokens, device=buffers.keys.device)
            output = self.model(**inputs, use_cache=True, cache_position=cache_position, **extra)
        finally:
            for hook in hooks:
                hook.remove()
        # transformers 5.x names the output's cache `cache`; earlier versions `past_key_values`.
        cache = output["cache"] if "cache" in output else output["past_key_values"]
        for i, (key, value) in enumerate(_cache_tensors(cache)):  # the one prompt's, into every row
            buffers.keys[i, :, :, :prompt_tokens] = key
            buffers.values[i, :, :, :prompt_tokens] = value
        # Vector 0 comes from the last prompt position; the logits are those generate samples from.
        state = captured["state"]
        logits = output.logits[:, -1].float().expand(buffers.rows, -1)
        token = sample_paper(logits, buffers.eos_mask, buffers.temperature, buffers.top_p_floor,
                             reciprocal=buffers.keys.is_cuda, generator=buffers.generators)
        token = torch.where(buffers.forcing, buffers.forced[0], token)
        buffers.states[0] = state[0]
        buffers.tokens[0] = token
        buffers.token.copy_(token)
        buffers.slot.fill_(prompt_tokens)
        buffers.position.fill_(captured["next_position"])
        buffers.step.fill_(1)

    def _step(self, b: _Buffers, window: int, pieces=None) -> None:
        """Feed `b.token`; record the state it produces and the next token. Device tensors only.

        `window`: the cache slots the attention reads (attention_window of `b.slot`, or more); `pieces`:
        the layer pieces to run (default: those in use, see _pieces)."""
        x = self.embed(b.token).view(b.rows, 1, -1)
        fused = self._fused()
        cos, sin = rotary_inputs(fused, b.position, self.rotary.inv_freq, self.rotary.attention_scaling, x.dtype)
        bias = attention_bias(b.slot_ids[..., :window], b.slot, x.dtype)
        inputs, output = pieces or self._pieces
        # Views of each layer's first `window` slots: the cache write lands in the buffers themselves.
        keys, values = b.keys[..., :window, :], b.values[..., :window, :]
        with self._attention():
            for layer, keys, values in zip(self._step_layers, keys, values):
                x = decoder_layer_step(layer, x, keys, values, cos, sin, b.slot, bias, self.heads, self.kv_heads,
                                       inputs, output)
        # The model's own final norm (8 operators once per token): forward hooks on it see every state.
        state = self.norm(x).view(b.rows, -1)
        token = self._next_token(b, state)
        b.states.index_copy_(0, b.step, state.unsqueeze(0))
        b.tokens.index_copy_(0, b.step, token.unsqueeze(0))
        b.token.copy_(token)
        b.slot.add_(1)
        b.position.add_(1)
        b.step.add_(1)

    def _fused(self) -> bool:
        """Whether the step runs FusedLayers."""
        if self._step_layers is None:
            self._ensure_fused()
        return isinstance(self._step_layers[0], FusedLayer)

    def _next_token(self, b: _Buffers, state: torch.Tensor) -> torch.Tensor:
        """The tokens [rows] the step draws after final-norm states [rows, hidden] (or the forced ones)."""
        token = sample_paper(self.lm_head(state).float(), b.eos_mask, b.temperature, b.top_p_floor,
                             reciprocal=b.keys.is_cuda, generator=b.generators)
        return torch.where(b.forcing, b.forced.index_select(0, b.step)[0], token)

    def _attention(self):
        """The step's attention backend selection (see decode_attention_backends). sdpa_kernel sets
        process-wide flags; only runs, which take turns (SAMPLING_LOCK), set them."""
        return sdpa_kernel(self.attention_backends) if self.attention_backends else contextlib.nullcontext()

    def _asynchronous(self, device: torch.device) -> bool:
        """Whether steps return before the device has computed them (CUDA: launches are queued)."""
        return device.type == "cuda"

    # -- checks against the eager step -----------------------------------------------------------

    def _differs(self, b: _Buffers, candidate: Callable[[], None], reference, window: int) -> str | None:
        """How one step by `candidate` differs from the launched step with `reference` pieces reading `window`
        slots on the same inputs and random draws, or the error it raised; None when the token agrees and the
        state is within rounding. The buffers' scalars and the random state are left as they were, so the
        run then takes this step itself."""
        scalars, random = _scalars(b), _random_states(b)
        row = int(b.step)

        def from_start():
            _restore_scalars(b, scalars)
            _restore_random_states(b, random)

        try:
            self._step(b, window, reference)
            want_tokens, want_state = b.tokens[row].clone(), b.states[row].clone()
            from_start()
            candidate()
            tokens, state = b.tokens[row].clone(), b.states[row].clone()
            from_start()
            off = float((state.float() - want_state.float()).norm() / want_state.float().norm())
            tolerance = state_tolerance(state.dtype)
            # A draw nearly tied may flip on rounding; then the candidate's token must be the one its own
            # state gives with the same draws, or the sampler in it is wrong.
            flipped = tokens != want_tokens
            token_ok = not flipped.any() or bool((self._next_token(b, state)[flipped] == tokens[flipped]).all())
            if token_ok and off <= tolerance:
                return None
            token_text = "" if not flipped.any() else \
                f"tokens {tokens[flipped].tolist()} instead of {want_tokens[flipped].tolist()}, "
            return f"{token_text}state off by {off:.3g} (relative L2; tolerance {tolerance:.3g})"
        except Exception as e:  # noqa: BLE001 - e.g. the compiler failing on its first call
            return f"{type(e).__name__}: {e}"
        finally:
            from_start()

    def _check_compiled(self, b: _Buffers, window: int) -> None:
        """Compiled layers against eager ones on this run's first step; given up unless they agree."""
        problem = self._differs(b, lambda: self._step(b, window, self._compiled_pieces), EAGER_PIECES, window)
        if problem is None:
            self._checked.add(self._signature())
            _compiled_signatures.add(self._signature())  # its check's step compiled it, if nothing had
            return
        logger.warning("ThinkDiff: the compiled decode step failed its check against the eager step (%s); using "
                       "eager layers", problem)
        self.compile = False
        self._compiled_pieces = None

    def _check_graph(self, b: _Buffers, graph, window: int) -> bool:
        """A new graph's replay against the launched step (same pieces and window) on this run's first step
        (its slot is in every window the run reads); graphs given up unless they agree."""
        problem = self._differs(b, graph.replay, self._pieces, window)
        if problem is None:
            return True
        logger.warning("ThinkDiff: the CUDA graph of the decode step failed its check against the launched step "
                       "(%s); decoding without graphs", problem)
        self.cuda_graph = False
        return False

    # -- buffers, compilation and graphs --------------------------------------------------------

    def _prepare(self, length: int, new_tokens: int, rows: int, device: torch.device) -> _Buffers:
        b = self._buffers
        dtype = self.embed.weight.dtype
        if b is not None and b.keys.shape[3] == length and b.states.shape[0] >= new_tokens and b.rows == rows \
                and b.keys.device == device and b.keys.dtype == dtype:
            return b
        self.release()
        shape = (len(self.layers), rows, self.kv_heads, length, self.head_dim)

        def scalar(value, dtype=torch.long):
            return torch.full((1,), value, dtype=dtype, device=device)

        max_tokens = max(new_tokens, 128)
        self._buffers = _Buffers(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            slot_ids=torch.arange(length, device=device).view(1, 1, 1, length),
            token=torch.zeros(rows, dtype=torch.long, device=device), slot=scalar(0), position=scalar(0),
            step=scalar(0),
            states=torch.zeros(max_tokens, rows, self.norm.weight.shape[0], dtype=dtype, device=device),
            tokens=torch.zeros(max_tokens, rows, dtype=torch.long, device=device),
            forced=torch.zeros(max_tokens, rows, dtype=torch.long, device=device),
            forcing=torch.zeros((), dtype=torch.bool, device=device),
            eos_mask=torch.zeros(self.vocab_size, dtype=torch.bool, device=device),
            temperature=torch.ones((), device=device),
            top_p_floor=torch.zeros((), device=device),
            generators=[torch.Generator(device) for _ in range(rows)],
        )
        self.attention_backends = decode_attention_backends(device)
        self.attention_backend = self._attention_choice(self._buffers)
        return self._buffers

    def _attention_choice(self, b: _Buffers) -> str | None:
        """The backend PyTorch picks for the step's attention under the selection; None where this PyTorch
        cannot say (torch._fused_sdp_choice is private). It only inspects the arguments; nothing runs."""
        query = b.keys.new_zeros(b.rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        bias = attention_bias(b.slot_ids, b.slot, b.keys.dtype)
        try:
            with self._attention():
                choice = torch._fused_sdp_choice(query, b.keys[0], b.values[0], bias, 0.0, False,
                                                 scale=self.head_dim ** -0.5)
            return SDPBackend(choice).name
        except Exception:  # noqa: BLE001 - only reported
            return None

    def _use_graph(self, device: torch.device) -> bool:
        # A graph draws from the decoder's generator only where it can register it (CUDAGraph.register_generator_state).
        if device.type != "cuda" or not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return False
        if self.cuda_graph is not None:
            return self.cuda_graph
        # bitsandbytes' int8 layers synchronise with the host; keep graphs to plain linear layers.
        return all(type(m) is torch.nn.Linear for m in self.layers[0].modules() if isinstance(m, torch.nn.Linear))

    @property
    def compiled(self) -> bool:
        return self.compile and self._compiled_pieces is not None

    @property
    def _pieces(self):
        """The layer pieces the step runs: compiled while `compile` is on and they passed their check, else
        eager (also a graph-less step never runs unchecked compiled code)."""
        return self._compiled_pieces if self.compiled and self._signature() in self._checked else EAGER_PIECES

    def _use_compiled(self, pieces) -> None:
        """New compiled pieces: used once they pass their check (_check_compiled), for each number of rows."""
        self._compiled_pieces = pieces
        self._checked.clear()

    def _adopt_compilation(self) -> None:
        """Use the background compilation's layers once it is done. A failed one is tried once more (it
        may have run out of memory while another model was loaded), then compilation is given up."""
        compilation = self._compilation
        if compilation is None or not compilation.done():
            return
        self._compilation = None
        self.compile_seconds = compilation.seconds
        if compilation.pieces is not None:
            self._use_compiled(compilation.pieces)
        elif self._failed_compilations == 0:
            self._failed_compilations += 1
            logger.warning("ThinkDiff: compiling the decode step failed (%s: %s); trying once more",
                           type(compilation.error).__name__, compilation.error)
        else:
            self._give_up_compiling(compilation.error)

    def _give_up_compiling(self, error: Exception) -> None:
        logger.warning("ThinkDiff: compiling the decode step failed (%s: %s); using eager layers",
                       type(error).__name__, error)
        self.compile = False
        self._compiled_pieces = None

    def _signature(self) -> tuple:
        """The layer signature of the step as the buffers' rows make it (compiled code is per number of rows)."""
        if self._step_layers is None:
            self._ensure_fused()
        rows = self._buffers.rows if self._buffers is not None else 1
        return layer_signature(self._step_layers[0], self.heads, self.kv_heads, rows)

    def _weights_key(self) -> tuple:
        return tuple(p.data_ptr() for p in self.model.parameters())

    def _ensure_graphs(self, b: _Buffers, windows: list[int]) -> dict:
        """The captured step for each of the run's attention windows, recaptured when the weights moved or
        compiled layers became ready; a window whose capture failed (and those after it) is left out. Starts
        the background compilation when it is wanted. Called after the prefill: new compiled code and new
        graphs are checked on the run's first step (warm-up steps, captures and checks leave the buffers'
        scalars as the prefill set them)."""
        self._adopt_compilation()
        idle = not BackgroundCompilation.running()
        signature = self._signature()
        # Compiled code is per number of rows: another number compiles again (in the background by default).
        compiled_for_rows = signature in _compiled_signatures
        if self.compile and (self._compiled_pieces is None or not compiled_for_rows) \
                and (not self.compile_in_background or (compiled_for_rows and idle)):
            self._use_compiled(self._compiled_pieces or compile_layer_pieces())  # compiled by their check's step
        # Only while no compilation runs, as a capture (compiled code may compile again, see
        # BackgroundCompilation); unchecked pieces are not used meanwhile.
        if self.compiled and signature not in self._checked and idle \
                and (compiled_for_rows or not self.compile_in_background):
            self._check_compiled(b, windows[0])
        graphs = {}
        for window in windows:
            graph = self._captured_step(b, window)
            if graph is None:
                break
            graphs[window] = graph
        # After the captures: none is made while a compilation runs.
        if graphs and self.compile and not (self.compiled and compiled_for_rows) and self.compile_in_background \
                and self._compilation is None:
            try:
                self._compilation = BackgroundCompilation(
                    self._step_layers[0], self.rotary.inv_freq, self.rotary.attention_scaling, self.heads,
                    self.kv_heads, self.head_dim, b.rows)
            except Exception as e:  # noqa: BLE001 - e.g. no memory for the layer's copy: decoding goes on
                self._give_up_compiling(e)
        return graphs

    def _captured_step(self, b: _Buffers, window: int):
        """The step reading `window` slots as a checked CUDA graph, captured now if need be; None if it cannot
        be (a compilation runs, capture failed, or the check did)."""
        key = (self._weights_key(), self._pieces, self.fuse)  # new buffers come with release(): no graphs
        if self._graph_key != key:
            self._graphs, self._graph_key = {}, key
        if window in self._graphs:
            return self._graphs[window]
        if BackgroundCompilation.running():
            return None  # this run decodes without a graph; the next captures one
        device = b.keys.device
        if self._stream is None or self._stream.device != device:
            # Kept: cuBLAS keeps a workspace per stream, and torch.cuda.graph's own default stream
            # belongs to whichever GPU captured first in the process.
            self._stream = torch.cuda.Stream(device)
        stream = self._stream
        scalars, random = _scalars(b), _random_states(b)  # the prefill's, which warm-ups move (see _park)
        stream.wait_stream(torch.cuda.current_stream(device))
        # Warm-up steps consume random numbers (restored below) and write junk into the window's last cache
        # slot and the last state row, which the run writes before it reads them, or never reads.
        with torch.inference_mode(), torch.cuda.device(device):
            try:
                with torch.cuda.stream(stream):
                    for _ in range(3):  # sets up cuBLAS and attention kernels (and compiled code) on this stream
                        self._warm_step(b, window)
                if self._pieces is not EAGER_PIECES:
                    _compiled_signatures.add(self._signature())
            except Exception as e:  # noqa: BLE001 - any compiler failure falls back to eager layers
                if self._pieces is EAGER_PIECES:
                    raise
                self._give_up_compiling(e)
                key = (self._weights_key(), self._pieces, self.fuse)
                self._graphs, self._graph_key = {}, key
                with torch.cuda.stream(stream):
                    self._warm_step(b, window)
            torch.cuda.current_stream(device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # The step draws from the rows' generators: a replay advances them as a launched step does.
            for generator in b.generators:
                graph.register_generator_state(generator)
            self._park(b, window)
            shared_pool = next(iter(self._graphs.values())).pool() if self._graphs else None
            try:
                # thread_local: only this thread's calls can break the capture (ComfyUI's server thread
                # may touch CUDA meanwhile). The outer stream context restores this thread's stream
                # also when the capture fails (torch.cuda.graph's own does not then).
                with torch.cuda.stream(stream), torch.cuda.graph(graph, pool=shared_pool, stream=stream,
                                                                 capture_error_mode="thread_local"):
                    self._step(b, window)
            except Exception as e:  # noqa: BLE001 - the eager step computes the same, only slower
                # Tried once more on the next run (memory may have been short while another model was
                # loaded); then graphs are given up for this decoder.
                self._failed_captures += 1
                again = self._failed_captures == 1
                logger.warning("ThinkDiff: capturing the decode step as a CUDA graph failed (%s: %s); decoding "
                               "without it%s", type(e).__name__, e, ", trying again next run" if again else "")
                if not again:
                    self.cuda_graph = False
                graph = None
            _restore_scalars(b, scalars)
            _restore_random_states(b, random)
            if graph is None or not self._check_graph(b, graph, window):
                return None
        self._graphs[window] = graph
        return graph

    def _warm_step(self, b: _Buffers, window: int) -> None:
        self._park(b, window)
        self._step(b, window)

    def _park(self, b: _Buffers, window: int) -> None:
        """Point the step at the window's last cache slot and the last state row: warm-up writes land where a
        run writes before it reads, or never reads (a slot beyond the run's is masked until written)."""
        b.slot.fill_(window - 1)
        b.step.fill_(b.states.shape[0] - 1)


class _Progress:
    """Calls on_token(done, total) for tokens the device has computed; on_token may raise to cancel.

    Where steps are synchronous (CPU) every token is reported as its step returns. On CUDA the host
    queues steps ahead of the device, so an event marks every PROGRESS_CHUNK-th token: finished chunks
    (queried, not waited for) are reported, and the host waits for the oldest only when two are in
    flight. That keeps the device one chunk ahead (no idle gaps), costs one host sync per chunk instead
    of per token, and lets a cancel stop the run at most a chunk after the last token reported.
    """

    def __init__(self, on_token: Callable[[int, int], None] | None, total: int, asynchronous: bool):
        self.on_token, self.total = on_token, total
        self.in_flight = collections.deque() if asynchronous else None

    def computed(self, done: int) -> None:
        """Token `done` (1-based) has been launched."""
        if self.on_token is None:
            return
        if self.in_flight is None:
            self.on_token(done, self.total)
            return
        if done % PROGRESS_CHUNK and done not in (1, self.total):
            return
        event = torch.cuda.Event()
        event.record()
        self.in_flight.append((done, event))
        last = done == self.total  # the final sync: everything is reported before the run returns
        while self.in_flight:
            finished, event = self.in_flight[0]
            if not (last or len(self.in_flight) > 1 or event.query()):
                break
            event.synchronize()
            self.in_flight.popleft()
            self.on_token(finished, self.total)


def _scalars(b: _Buffers) -> tuple[torch.Tensor, ...]:
    """Copies of the step's counters and fed token, which warm-up steps and checks change."""
    return tuple(t.clone() for t in (b.token, b.slot, b.position, b.step))


def _restore_scalars(b: _Buffers, scalars: tuple[torch.Tensor, ...]) -> None:
    for tensor, saved in zip((b.token, b.slot, b.position, b.step), scalars):
        tensor.copy_(saved)


def _random_states(b: _Buffers) -> list[torch.Tensor]:
    """The rows' generator states, which warm-up steps and checks advance."""
    return [generator.get_state() for generator in b.generators]


def _restore_random_states(b: _Buffers, states: list[torch.Tensor]) -> None:
    for generator, state in zip(b.generators, states):
        generator.set_state(state)


def cuda_indices(device: torch.device) -> list[int]:
    """The CUDA device whose random generator a run on `device` uses, for torch.random.fork_rng."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _cache_tensors(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers DynamicCache, whichever version made it."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))
