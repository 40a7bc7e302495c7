"""The fast reasoning path against transformers' generate: same tokens, same states, same random draws."""

import copy
import threading

import pytest
import torch

from thinkdiff_core import decode
from thinkdiff_core.decode import (BackgroundCompilation, FastDecoder, attention_bias, attention_window, cache_length,
                                   compile_layer_pieces, decoder_layer_step, run_windows, sample_paper)

N = 48  # tokens per run: long enough for many sampled steps, short enough for a quick suite


def two_shot_inputs(reasoner, car_images, query="red"):
    white, blue = car_images
    prompt, images = reasoner.render_prompt(["white", white, "blue", blue, query])
    return reasoner.prepare_inputs(prompt, images)


def plain(reasoner, inputs, seed, **options):
    return reasoner.sample(inputs, seed=seed, **{"max_new_tokens": N, "min_new_tokens": N, **options}, fast=False)


def fast(reasoner, inputs, seed, **options):
    return reasoner.sample(inputs, seed=seed, max_new_tokens=N, min_new_tokens=N, fast=True, **options)


@pytest.mark.parametrize("seed", [0, 7])
def test_fast_path_gives_generates_tokens_and_states(reasoner, car_images, seed):
    inputs = two_shot_inputs(reasoner, car_images)
    plain_tokens, plain_states = plain(reasoner, inputs, seed)
    fast_tokens, fast_states = fast(reasoner, inputs, seed)
    assert torch.equal(fast_tokens, plain_tokens)
    assert fast_states.shape == (N, reasoner.hidden_size) and fast_states.dtype == torch.float32
    torch.testing.assert_close(fast_states, plain_states, atol=1e-5, rtol=1e-5)
    # Not a constant sequence: the check above covers many distinct sampled steps.
    assert len(set(fast_tokens.tolist())) > N // 4


def test_other_sampling_settings_match_too(reasoner):
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["sun", "moon", "star"]))
    for temperature, top_p in ((1.0, 1.0), (0.3, 0.5), (1.7, 0.95)):
        options = dict(temperature=temperature, top_p=top_p)
        plain_tokens, plain_states = plain(reasoner, inputs, 3, **options)
        fast_tokens, fast_states = fast(reasoner, inputs, 3, **options)
        assert torch.equal(fast_tokens, plain_tokens), (temperature, top_p)
        torch.testing.assert_close(fast_states, plain_states, atol=1e-5, rtol=1e-5)


def test_reason_takes_the_fast_path_by_default(reasoner, car_images):
    white, blue = car_images
    result = reasoner.reason(["white", white, "blue", blue, "red"], seed=0, max_new_tokens=N)
    tokens, states = plain(reasoner, two_shot_inputs(reasoner, car_images), 0)
    assert reasoner.fast and reasoner._decoder is not None
    assert torch.equal(result.token_ids, tokens)
    torch.testing.assert_close(result.hidden_states, states, atol=1e-5, rtol=1e-5)


def test_a_shorter_prompt_after_a_longer_one_reuses_the_cache_without_seeing_stale_entries(reasoner, car_images):
    long_inputs = two_shot_inputs(reasoner, car_images)
    short_inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["red"]))
    assert cache_length(long_inputs["input_ids"].shape[1], N) == cache_length(short_inputs["input_ids"].shape[1], N)
    fast(reasoner, long_inputs, 1)
    keys = reasoner.decoder._buffers.keys
    tokens, states = fast(reasoner, short_inputs, 1)
    assert reasoner.decoder._buffers.keys is keys
    plain_tokens, plain_states = plain(reasoner, short_inputs, 1)
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(states, plain_states, atol=1e-5, rtol=1e-5)


def test_forced_tokens_give_the_states_of_those_tokens(reasoner, car_images):
    inputs = two_shot_inputs(reasoner, car_images)
    tokens, states = plain(reasoner, inputs, 0)
    forced_tokens, forced_states = fast(reasoner, inputs, 12345, forced_tokens=tokens)
    assert torch.equal(forced_tokens, tokens)
    torch.testing.assert_close(forced_states, states, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="forced_tokens needs the fast path"):
        plain(reasoner, inputs, 0, forced_tokens=tokens)


def test_attention_bias_is_what_sdpa_makes_of_the_boolean_mask():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=generator, dtype=torch.bfloat16) for n in (3, 16, 16))
    slot_ids, slot = torch.arange(16).view(1, 1, 1, 16), torch.tensor([6])
    bias = attention_bias(slot_ids, slot, q.dtype)
    assert bias.dtype == torch.bfloat16 and (bias[..., :7] == 0).all() and bias[..., 7:].isneginf().all()
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=slot_ids <= slot)
    assert torch.equal(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)


def test_cache_length_buckets():
    assert cache_length(280, 128) == 1024
    assert cache_length(896, 128) == 1024
    assert cache_length(897, 128) == 2048
    assert cache_length(5000, 128) == 8192


def test_attention_windows():
    assert [attention_window(slot, 1024) for slot in (0, 127, 128, 611, 639, 640, 1023)] == \
        [128, 128, 256, 640, 640, 768, 1024]
    assert attention_window(2000, 2048) == 2048
    # A 612-token prompt's 128 tokens: slots 612..738 (the prefill draws the first token).
    assert run_windows(612, 128, 1024) == [640, 768]
    assert run_windows(100, 1, 1024) == []


def test_each_step_reads_only_the_filled_part_of_the_cache_and_crossing_a_window_changes_nothing(
        reasoner, monkeypatch):
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["sun", "moon", "star"]))
    prompt, n = inputs["input_ids"].shape[1], 24
    assert attention_window(prompt, 1024) < attention_window(prompt + n - 2, 1024)  # this run crosses a window
    decoder = FastDecoder(reasoner.model)
    reads, in_step = [], []
    sdpa, step = torch.nn.functional.scaled_dot_product_attention, decoder._step

    def recorded_step(b, window, pieces=None):
        in_step.append(window)
        step(b, window, pieces)
        in_step.pop()

    def recorded(query, key, value, attn_mask=None, **kwargs):
        if in_step:  # not the prefill's attention (the model's own) nor generate's
            slot = int(decoder._buffers.slot)
            reads.append((slot, key.shape[-2]))
            # The window's slots up to `slot` are attended, the rest masked.
            assert attn_mask.shape[-1] == key.shape[-2] and bool((attn_mask[..., :slot + 1] == 0).all())
            assert bool(attn_mask[..., slot + 1:].isneginf().all())
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(decode.F, "scaled_dot_product_attention", recorded)
    monkeypatch.setattr(decoder, "_step", recorded_step)
    tokens, states = decoder.run(inputs, n, 5, 0.6, 0.9, reasoner.eos_token_ids)
    layers = len(decoder.layers)
    assert reads == [(slot, attention_window(slot, 1024)) for slot in range(prompt, prompt + n - 1)
                     for _ in range(layers)]
    assert decoder._buffers.keys.shape[3] == 1024
    expected_tokens, expected_states = plain(reasoner, inputs, 5, max_new_tokens=n, min_new_tokens=n)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_draws_come_from_the_decoders_own_generator_whatever_moves_the_global_one(
        reasoner, car_images, emulated_graphs, monkeypatch, graphs):
    """Dynamo puts torch's global generators back as they were when a compilation finishes, also one in
    another thread while a run draws; other code may seed or draw from them. A run's draws are its seed's."""
    inputs = two_shot_inputs(reasoner, car_images)
    expected = plain(reasoner, inputs, 4)
    decoder = FastDecoder(reasoner.model)
    if graphs:
        emulation = emulated_graphs(decoder)
    step, rewound = decoder._step, torch.get_rng_state()

    def disturbed_step(b, window, pieces=None):
        torch.set_rng_state(rewound)  # as a compilation finishing meanwhile does
        torch.rand(7)  # and a draw by someone else
        step(b, window, pieces)

    monkeypatch.setattr(decoder, "_step", disturbed_step)
    torch.manual_seed(123)
    outside = torch.get_rng_state()
    tokens, states = decoder.run(inputs, N, 4, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(states, expected[1], atol=1e-5, rtol=1e-5)
    if graphs:
        assert emulation.captures and all(graph.generators == decoder._buffers.generators
                                          for graph in decoder._graphs.values())
    else:  # the run itself leaves the global generator alone
        monkeypatch.setattr(decoder, "_step", step)
        torch.set_rng_state(outside)
        decoder.run(inputs, N, 4, 0.6, 0.9, reasoner.eos_token_ids)
        assert torch.equal(torch.get_rng_state(), outside)


def test_release_frees_the_cache(reasoner):
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(["a"]))
    fast(reasoner, inputs, 0)
    assert reasoner.decoder._buffers is not None
    reasoner.release()
    assert reasoner.decoder._buffers is None
    tokens, _ = fast(reasoner, inputs, 0)  # still usable: buffers come back on demand
    assert torch.equal(tokens, plain(reasoner, inputs, 0)[0])


def test_sampler_draws_what_transformers_and_torch_multinomial_draw():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 500, generator=generator)
    eos = torch.zeros(500, dtype=torch.bool)
    eos[[7, 499]] = True
    temperature, top_p = 0.6, 0.9
    reference = logits.clone()
    reference[:, eos] = float("-inf")
    reference = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, reference))
    reference_probs = reference.softmax(dim=-1)
    torch.manual_seed(42)
    expected = [torch.multinomial(reference_probs, 1).item() for _ in range(300)]
    torch.manual_seed(42)
    drawn = [sample_paper(logits, eos, torch.tensor(temperature), torch.tensor(1 - top_p)).item() for _ in range(300)]
    assert drawn == expected
    assert not set(drawn) & {7, 499}
    assert len(set(drawn)) > 5
    # The CUDA rounding of transformers' `scores / temperature`: a product with the float32 reciprocal.
    reciprocal = torch.tensor(1.0) / torch.tensor(temperature)
    reference = logits.clone()
    reference[:, eos] = float("-inf")
    reference = TopPLogitsWarper(top_p)(None, reference * reciprocal).softmax(dim=-1)
    torch.manual_seed(42)
    expected = [torch.multinomial(reference, 1).item() for _ in range(300)]
    torch.manual_seed(42)
    drawn = [sample_paper(logits, eos, reciprocal, torch.tensor(1 - top_p), reciprocal=True).item()
             for _ in range(300)]
    assert drawn == expected


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
def test_compiled_layer_parts_are_one_graph_each_for_all_layers_and_equal_eager(reasoner, fused):
    """torch.compile traces each part whole (fullgraph) and reuses it across layers (regional compile)."""
    import torch._dynamo

    decoder = FastDecoder(copy.deepcopy(reasoner.model), compile=True, fuse=fused)
    decoder._ensure_fused()
    assert all(isinstance(layer, decode.FusedLayer) == fused for layer in decoder._step_layers)
    inputs, output = compile_layer_pieces()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    generator = torch.Generator().manual_seed(0)
    length, head_dim = 32, decoder.head_dim
    with torch.inference_mode():
        for layer in decoder._step_layers:
            x = torch.randn(1, 1, reasoner.hidden_size, generator=generator)
            keys = torch.randn(1, decoder.kv_heads, length, head_dim, generator=generator)
            values = torch.randn(1, decoder.kv_heads, length, head_dim, generator=generator)
            cos, sin = torch.randn(2, 1, 1, 1, head_dim, generator=generator)
            if fused:
                cos, sin = decode.rotation_matrix(cos, sin), None
            slot = torch.tensor([5])
            bias = attention_bias(torch.arange(length).view(1, 1, 1, length), slot, x.dtype)
            copies, original = (keys.clone(), values.clone()), keys.clone()
            args = cos, sin, slot, bias, decoder.heads, decoder.kv_heads
            expected = decoder_layer_step(layer, x, keys, values, *args)
            got = decoder_layer_step(layer, x, *copies, *args, inputs, output)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(copies, (keys, values))
            changed = (keys != original).any(dim=-1)[0]  # [kv_heads, length]: only slot 5 was written
            assert changed[:, 5].all() and not changed[:, :5].any() and not changed[:, 6:].any()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("compile", [False, True])
def test_captured_step_replays_give_generates_tokens(reasoner, car_images, emulated_graphs, compile):
    decoder = FastDecoder(reasoner.model, compile=compile, compile_in_background=False)
    graphs = emulated_graphs(decoder)
    inputs = two_shot_inputs(reasoner, car_images)
    eos = reasoner.eos_token_ids
    windows = set(run_windows(inputs["input_ids"].shape[1], N, cache_length(inputs["input_ids"].shape[1], N)))
    for seed in (0, 1):  # the second run replays the same captures
        tokens, states = decoder.run(inputs, N, seed, 0.6, 0.9, eos)
        expected_tokens, expected_states = plain(reasoner, inputs, seed)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    assert graphs.captures == len(windows) == len(decoder._graphs) and decoder.compiled == compile
    # Another prompt length in the same cache bucket: only the windows not captured yet are (no compilation).
    short = reasoner.prepare_inputs(*reasoner.render_prompt(["red"]))
    assert short["input_ids"].shape[1] < inputs["input_ids"].shape[1]
    short_windows = set(run_windows(short["input_ids"].shape[1], N, cache_length(short["input_ids"].shape[1], N)))
    assert short_windows != windows
    tokens, _ = decoder.run(short, N, 2, 0.6, 0.9, eos)
    assert graphs.captures == len(windows | short_windows) and torch.equal(tokens, plain(reasoner, short, 2)[0])
    # One memory pool for the decoder's graphs: the first capture's.
    first = next(iter(decoder._graphs.values()))
    assert graphs.pools == [None] + [first.pool()] * (graphs.captures - 1)

    # Weights at new addresses (the model moved): the stale captures are not replayed.
    layer = decoder.layers[0].mlp.up_proj
    layer.weight.data = layer.weight.data.clone()
    before = graphs.captures
    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, eos)
    assert graphs.captures == before + len(windows) and torch.equal(tokens, plain(reasoner, inputs, 0)[0])
    assert set(decoder._graphs) == windows


def test_background_compilation_lets_the_first_run_decode_eagerly_then_the_compiled_step_is_captured(
        reasoner, car_images, emulated_graphs, monkeypatch, dynamo_only):
    import torch._dynamo

    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    gate = threading.Event()  # holds compilation back until the first run is over
    compile_once = BackgroundCompilation._compile
    monkeypatch.setattr(BackgroundCompilation, "_compile", lambda self, *args: (gate.wait(), compile_once(self, *args)))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    inputs = two_shot_inputs(reasoner, car_images)
    eos = reasoner.eos_token_ids

    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, eos)
    assert torch.equal(tokens, plain(reasoner, inputs, 0)[0])
    assert graphs.captures == 1 and not decoder.compiled and not decoder._compilation.done()

    random_state = torch.get_rng_state()
    gate.set()
    assert decoder.wait_for_compilation(timeout=600)
    assert torch.equal(torch.get_rng_state(), random_state)  # the thread drew no random numbers
    assert decoder.compile_seconds > 0
    for seed in (0, 1):
        tokens, states = decoder.run(inputs, N, seed, 0.6, 0.9, eos)
        expected_tokens, expected_states = plain(reasoner, inputs, seed)
        assert torch.equal(tokens, expected_tokens)
        torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    assert graphs.captures == 2  # once eager, once compiled
    # The model's own layers run the code compiled on the thread's copy: nothing compiled again.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2


def test_a_background_compilation_failing_twice_leaves_the_eager_graph(reasoner, car_images, emulated_graphs,
                                                                        monkeypatch, caplog):
    def no_compiler():
        raise RuntimeError("no working C compiler")

    monkeypatch.setattr(decode, "compile_layer_pieces", no_compiler)
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    inputs = two_shot_inputs(reasoner, car_images)
    expected = plain(reasoner, inputs, 0)[0]
    runs = []
    for _ in range(3):  # compiles, fails; compiles again, fails; eager from then on
        runs.append(decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)[0])
        assert not decoder.wait_for_compilation(timeout=60)
    assert "compiling the decode step failed (RuntimeError: no working C compiler); trying once more" in caplog.text
    assert "compiling the decode step failed (RuntimeError: no working C compiler); using eager layers" in caplog.text
    assert not decoder.compile and decoder._compilation is None
    assert graphs.captures == 1 and all(torch.equal(tokens, expected) for tokens in runs)


def test_a_capture_failing_twice_decodes_eagerly_and_gives_graphs_up(reasoner, car_images, emulated_graphs, caplog,
                                                                     dynamo_only):
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    graphs.failing_captures = 2
    inputs = two_shot_inputs(reasoner, car_images)
    for _ in range(3):  # fails, fails again, no capture tried from then on
        tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
        assert torch.equal(tokens, plain(reasoner, inputs, 0)[0])
    assert graphs.captures == 2 and decoder.cuda_graph is False and not decoder._graphs
    assert decoder._compilation is None  # compiled layers only serve a captured step
    failure = "capturing the decode step as a CUDA graph failed (RuntimeError: operation not permitted when stream " \
              "is capturing); decoding without it"
    assert caplog.text.count(failure + ", trying again next run\n") == 1
    assert caplog.text.count(failure + "\n") == 1


def test_a_capture_failing_once_is_tried_again_on_the_next_run(reasoner, car_images, emulated_graphs):
    decoder = FastDecoder(reasoner.model, compile=False)
    graphs = emulated_graphs(decoder)
    graphs.failing_captures = 1
    inputs = two_shot_inputs(reasoner, car_images)
    for seed in (0, 1):
        tokens, _ = decoder.run(inputs, N, seed, 0.6, 0.9, reasoner.eos_token_ids)
        assert torch.equal(tokens, plain(reasoner, inputs, seed)[0])
    assert graphs.captures == 2 and bool(decoder._graphs) and decoder.cuda_graph is not False


def test_no_graph_is_captured_while_a_compilation_runs(reasoner, car_images, emulated_graphs, monkeypatch, dynamo_only):
    """Inductor's autotuning synchronises the device, which would break a capture in another thread."""
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    gate = threading.Event()
    compile_once = BackgroundCompilation._compile
    monkeypatch.setattr(BackgroundCompilation, "_compile", lambda self, *args: (gate.wait(), compile_once(self, *args)))
    inputs = two_shot_inputs(reasoner, car_images)
    expected = plain(reasoner, inputs, 0)[0]
    decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)  # captured; compilation started after
    assert graphs.captures == 1 and bool(decoder._graphs) and BackgroundCompilation.running()

    # The model moved while compiling: this run decodes without a graph rather than capture now.
    layer = decoder.layers[0].mlp.up_proj
    layer.weight.data = layer.weight.data.clone()
    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, expected) and graphs.captures == 1 and not decoder._graphs
    assert decoder.cuda_graph is not False

    gate.set()
    assert decoder.wait_for_compilation(timeout=600) and not BackgroundCompilation.running()
    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, expected)
    assert graphs.captures == 2 and bool(decoder._graphs) and decoder.compiled


def test_no_memory_for_the_compilation_copy_leaves_the_eager_graph(reasoner, car_images, emulated_graphs,
                                                                    monkeypatch, caplog):
    def no_memory(*_args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 466.00 MiB")

    monkeypatch.setattr(BackgroundCompilation, "__init__", no_memory)
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    inputs = two_shot_inputs(reasoner, car_images)
    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, plain(reasoner, inputs, 0)[0])
    assert "compiling the decode step failed (OutOfMemoryError: CUDA out of memory. Tried to allocate 466.00 MiB); " \
           "using eager layers" in caplog.text
    assert not decoder.compile and bool(decoder._graphs) and graphs.captures == 1


def test_compilation_switched_off_and_on_between_runs(reasoner, car_images, emulated_graphs, monkeypatch):
    compilations = []

    def counted():
        compilations.append(1)
        return compile_layer_pieces()

    monkeypatch.setattr(decode, "compile_layer_pieces", counted)
    decoder = FastDecoder(reasoner.model, compile=True, compile_in_background=False)
    graphs = emulated_graphs(decoder)
    inputs = two_shot_inputs(reasoner, car_images)
    expected = plain(reasoner, inputs, 0)[0]
    for compile, captures in ((True, 1), (False, 2), (True, 3)):
        decoder.compile = compile
        tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
        assert torch.equal(tokens, expected)
        assert decoder.compiled == compile and graphs.captures == captures
    assert len(compilations) == 1  # switching back reuses the compiled layers


def test_a_new_decoder_for_layers_compiled_before_uses_the_compiled_step_from_its_first_run(
        reasoner, car_images, emulated_graphs, dynamo_only):
    """A reloaded VLM: dynamo still holds the layer code, so its first run need not decode eagerly."""
    import torch._dynamo

    first = FastDecoder(reasoner.model, compile=True)
    emulated_graphs(first)
    inputs = two_shot_inputs(reasoner, car_images)
    eos = reasoner.eos_token_ids
    first.run(inputs, N, 0, 0.6, 0.9, eos)
    assert first.wait_for_compilation(timeout=600)
    torch._dynamo.utils.counters.clear()

    reloaded = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(reloaded)
    tokens, states = reloaded.run(inputs, N, 0, 0.6, 0.9, eos)
    expected_tokens, expected_states = plain(reasoner, inputs, 0)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(states, expected_states, atol=1e-5, rtol=1e-5)
    assert reloaded.compiled and reloaded._compilation is None and graphs.captures == 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0  # nothing compiled again

    decode.reset_compiled_layers()  # the code is gone: a new decoder compiles in the background again
    fresh = FastDecoder(reasoner.model, compile=True)
    emulated_graphs(fresh)
    fresh.run(inputs, N, 0, 0.6, 0.9, eos)
    assert not fresh.compiled and fresh._compilation is not None
    assert fresh.wait_for_compilation(timeout=600)


def test_compiled_code_is_per_number_of_rows_and_a_new_number_compiles_in_the_background(
        reasoner, car_images, emulated_graphs, dynamo_only):
    """Variations decoded together (decoder.run_variations): compiled code is checked and used per number of rows."""
    inputs = two_shot_inputs(reasoner, car_images)
    decoder = FastDecoder(reasoner.model, compile=True)
    emulated_graphs(decoder)
    eos = reasoner.eos_token_ids
    two = [1, 2]
    reference = FastDecoder(reasoner.model).run_variations(inputs, N, two, 0.6, 0.9, eos)
    decoder.run_variations(inputs, N, two, 0.6, 0.9, eos)  # eager, while two rows compile
    assert not decoder.compiled and decoder._compilation is not None
    assert decoder.wait_for_compilation(timeout=600)
    tokens, states = decoder.run_variations(inputs, N, two, 0.6, 0.9, eos)
    assert decoder._pieces is decoder._compiled_pieces  # checked and in use for two rows
    assert torch.equal(tokens, reference[0])
    torch.testing.assert_close(states, reference[1], atol=1e-5, rtol=1e-5)
    rows = {signature[0] for signature in decode._compiled_signatures}
    assert rows == {2}
    # One row has no compiled code yet: decoded eagerly (unchecked code never serves it), compiled meanwhile.
    tokens, _ = decoder.run_variations(inputs, N, [1], 0.6, 0.9, eos)
    assert torch.equal(tokens, reference[0][:1]) and decoder._compilation is not None
    assert decoder.wait_for_compilation(timeout=600)
    assert {signature[0] for signature in decode._compiled_signatures} == {1, 2}


def test_the_compiled_signature_tells_other_layers_apart(reasoner):
    layer = reasoner.model.get_decoder().layers[0]
    signature = decode.layer_signature(layer, 4, 2)
    assert decode.layer_signature(copy.deepcopy(layer), 4, 2) == signature  # equal weights' shapes, same code
    assert decode.layer_signature(copy.deepcopy(layer).to(torch.float64), 4, 2) != signature
    assert decode.layer_signature(layer, 4, 1) != signature
    wider = copy.deepcopy(layer)
    wider.mlp.up_proj = torch.nn.Linear(layer.mlp.up_proj.in_features, 2 * layer.mlp.up_proj.out_features)
    assert decode.layer_signature(wider, 4, 2) != signature


def test_layers_compiled_before_wait_while_another_compilation_runs(reasoner, car_images, emulated_graphs,
                                                                     monkeypatch, dynamo_only):
    """Compiled code runs only inside the guarded warm-up and capture, which wait for a running compilation."""
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    decode._compiled_signatures.add(decoder._signature())
    monkeypatch.setattr(BackgroundCompilation, "running", classmethod(lambda cls: True))
    inputs = two_shot_inputs(reasoner, car_images)
    tokens, _ = decoder.run(inputs, N, 0, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, plain(reasoner, inputs, 0)[0])
    assert not decoder.compiled and graphs.captures == 0
