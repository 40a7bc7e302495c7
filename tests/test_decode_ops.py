"""The fused decode step: operators per token on the 7B layout, and the same tokens and states as the unfused
step and generate, also after the model moves; the model's own forward on the fused storage."""

import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from thinkdiff_core.decode import (
    FastDecoder,
    FusedLayer,
    cache_length,
    run_windows,
    rotary_cos_sin,
    rotate_half,
    rotation_matrix,
)

N = 24

# Operators that only make views (no kernel, no memory traffic): not counted.
VIEWS = {"view", "_unsafe_view", "slice", "reshape", "unbind", "expand", "unsqueeze", "squeeze", "t", "transpose",
         "permute", "select", "alias", "as_strided", "detach"}


class Operators(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def kernels(self):
        return {name: n for name, n in self.counts.items() if name not in VIEWS}


def qwen2_vl_7b_layout(dtype):
    """Qwen2-VL-7B's decoder layout (28 layers, 28 query / 4 key-value heads, SiLU MLP, q/k/v biases) at tiny
    widths: the operator count of a step depends on the layout, not on the widths."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = 8
    config = Qwen2VLConfig(hidden_size=28 * head_dim, intermediate_size=64, num_hidden_layers=28,
                           num_attention_heads=28, num_key_value_heads=4, vocab_size=512,
                           rope_scaling={"type": "mrope", "mrope_section": [2, 1, 1]},
                           vision_config={"depth": 1, "embed_dim": 16, "num_heads": 2, "hidden_size": 28 * head_dim})
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(config).to(dtype).eval()


def step_operators(model, fuse):
    decoder = FastDecoder(model, fuse=fuse)
    decoder._ensure_fused()
    with torch.inference_mode():
        buffers = decoder._prepare(1024, 128, 1, torch.device("cpu"))
        decoder._step(buffers, 640)  # anything done once (lazy init) is not counted
        with Operators() as operators:
            decoder._step(buffers, 640)
    return operators.kernels()


def test_a_decode_step_on_the_7b_layout_launches_at_most_400_operators():
    model = qwen2_vl_7b_layout(torch.bfloat16)
    # Before fusion (measured): 1,055 kernels per step (201 mul, 197 linear, 141 add, 119 to, 58 index_copy_,
    # 57 each of cat/pow/mean/rsqrt, 28 each of neg/sdpa/silu, ...), 1,315 operators with views.
    unfused = step_operators(model, fuse=False)
    assert sum(unfused.values()) > 1000
    fused = step_operators(model, fuse=True)
    # After (measured): 389 - per layer 2 rms_norm, 1 q/k/v linear, 1 rotary matmul, 2 cache writes, 1 sdpa,
    # 2 addmm (projections with their residuals), 1 gate/up matmul, silu, mul; no per-layer casts.
    assert sum(fused.values()) <= 400, fused
    # The model's own final norm (once per token, so that its forward hooks see every state) is the only one
    # computed in pieces.
    assert fused.get("to", 0) <= 7 and fused.get("pow", 0) == 1 and fused.get("rsqrt", 0) == 1
    assert fused["rms_norm"] == 2 * 28


def test_the_rotation_matrix_is_the_rotary_embedding():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    cos, sin = rotary_cos_sin(torch.tensor([37]), inv_freq, 1.0, torch.float32)
    x = torch.randn(1, 6, 1, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x @ rotation_matrix(cos, sin), x * cos + rotate_half(x) * sin, atol=1e-6, rtol=1e-6)


@pytest.fixture
def inputs(reasoner):
    return reasoner.prepare_inputs(*reasoner.render_prompt(["sun", "moon", "star"]))


def run(decoder, reasoner, inputs, seed=0, forced_tokens=None):
    return decoder.run(inputs, N, seed, 0.6, 0.9, reasoner.eos_token_ids, forced_tokens=forced_tokens)


def generate(reasoner, inputs, seed=0):
    return reasoner.sample(inputs, seed=seed, max_new_tokens=N, min_new_tokens=N, fast=False)


def assert_matches(got, expected):
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)


def test_the_fused_step_gives_the_unfused_steps_and_generates_tokens_and_states(reasoner, inputs):
    model = copy.deepcopy(reasoner.model)
    fused = FastDecoder(model)
    for seed in (0, 5):
        got = run(fused, reasoner, inputs, seed)
        assert_matches(got, run(FastDecoder(copy.deepcopy(reasoner.model), fuse=False), reasoner, inputs, seed))
        assert_matches(got, generate(reasoner, inputs, seed))
    assert all(isinstance(layer, FusedLayer) for layer in fused._step_layers)


def test_in_bf16_the_fused_step_is_within_rounding_of_the_unfused_one(reasoner, inputs):
    model = copy.deepcopy(reasoner.model).to(torch.bfloat16)
    tokens, states = run(FastDecoder(model, fuse=False), reasoner, inputs)
    _, fused_states = run(FastDecoder(model), reasoner, inputs, forced_tokens=tokens)
    off = (fused_states - states).norm(dim=-1) / states.norm(dim=-1)
    # Measured: about 0.7 bf16 ulps (0.0056) per state; the decoder's own check allows 16.
    assert 0 < float(off.max()) <= 2 * torch.finfo(torch.bfloat16).eps


def test_fusion_shares_the_weights_storage_and_the_models_forward_is_unchanged(reasoner, inputs):
    model = copy.deepcopy(reasoner.model)
    with torch.no_grad():
        before = model(**inputs).logits
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    decoder = FastDecoder(model)
    run(decoder, reasoner, inputs)
    layer, fused = decoder.layers[0], decoder._step_layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for views, base in (((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight), fused.qkv_weight),
                        ((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias), fused.qkv_bias),
                        ((mlp.gate_proj.weight, mlp.up_proj.weight), fused.gate_up_weight)):
        assert all(v.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for v in views)
        assert torch.equal(torch.cat(views), base)
    # No weight held twice: as many storages as before, less the ones merged (q/k/v weights and biases, gate/up).
    merged = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(merged) == len(storages) - 5 * len(decoder.layers)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    # A write through the model's parameter is the fused tensor's.
    with torch.no_grad():
        attn.k_proj.bias.add_(1.0)
    assert torch.equal(fused.qkv_bias[attn.q_proj.bias.shape[0]:][:attn.k_proj.bias.shape[0]], attn.k_proj.bias)


def test_a_moved_or_reloaded_model_is_fused_again_and_still_matches(reasoner, inputs):
    model = copy.deepcopy(reasoner.model)
    decoder = FastDecoder(model)
    expected = generate(reasoner, inputs)
    assert_matches(run(decoder, reasoner, inputs), expected)
    first = decoder._step_layers

    model.to(torch.float64).to(torch.float32)  # every parameter at a new address, the views broken
    assert_matches(run(decoder, reasoner, inputs), expected)
    assert decoder._step_layers is not first
    assert decoder.layers[0].self_attn.k_proj.weight.data_ptr() == \
        decoder._step_layers[0].qkv_weight[decoder.layers[0].self_attn.q_proj.weight.shape[0]:].data_ptr()

    # Fresh weights loaded in place (load_state_dict copies into the parameters): the fused tensors see them.
    other = copy.deepcopy(reasoner.model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    fused = decoder._step_layers
    model.load_state_dict(other.state_dict())
    halved = run(decoder, reasoner, inputs)
    assert decoder._step_layers is fused  # same storage, nothing to rebuild
    assert_matches(halved, run(FastDecoder(other, fuse=False), reasoner, inputs))
    assert not torch.equal(halved[1], expected[1])

    decoder.release()  # ComfyUI moved the model: nothing of the old fusion is kept
    assert decoder._step_layers is None
    model.load_state_dict(reasoner.model.state_dict())
    assert_matches(run(decoder, reasoner, inputs), expected)


class QuantisedLinear(torch.nn.Linear):
    """What bitsandbytes' layers are to the decoder: an nn.Linear subclass whose weight is not a plain matrix."""


def test_layers_that_are_not_plain_linear_keep_the_unfused_step(reasoner, inputs):
    model = copy.deepcopy(reasoner.model)
    for layer in model.get_decoder().layers:
        old = layer.mlp.up_proj
        new = QuantisedLinear(old.in_features, old.out_features, bias=False)
        new.load_state_dict(old.state_dict())
        layer.mlp.up_proj = new
    decoder = FastDecoder(model)
    assert not decoder.fuse
    pointers = [p.data_ptr() for p in model.parameters()]
    assert_matches(run(decoder, reasoner, inputs), generate(reasoner, inputs))
    assert decoder._step_layers == decoder.layers and not any(isinstance(layer, FusedLayer)
                                                               for layer in decoder._step_layers)
    assert [p.data_ptr() for p in model.parameters()] == pointers  # nothing re-pointed


def test_fusion_switched_off_and_on_between_runs_captures_each_step(reasoner, inputs, emulated_graphs):
    decoder = FastDecoder(copy.deepcopy(reasoner.model))
    graphs = emulated_graphs(decoder)
    expected = generate(reasoner, inputs)
    prompt = inputs["input_ids"].shape[1]
    windows = len(run_windows(prompt, N, cache_length(prompt, N)))
    for fuse, captures in ((True, 1), (False, 2), (True, 3), (True, 3)):
        decoder.fuse = fuse
        assert_matches(run(decoder, reasoner, inputs), expected)
        assert graphs.captures == captures * windows
        assert all(isinstance(layer, FusedLayer) == fuse for layer in decoder._step_layers)
