"""The fast path's safety nets, on the CPU: checked graphs and compiled code, the attention backend
selection, the compilation copy's inference flags, and progress / cancel on a device that lags the host."""

import copy
import logging
import threading

import pytest
import torch
import torch._dynamo

from thinkdiff_core import decode
from thinkdiff_core.decode import (
    EAGER_PIECES,
    PROGRESS_CHUNK,
    BackgroundCompilation,
    FastDecoder,
    cache_length,
    layer_inputs,
    layer_output,
    run_windows,
)

N = 24  # tokens per run: three progress chunks


@pytest.fixture
def inputs(reasoner):
    return reasoner.prepare_inputs(*reasoner.render_prompt(["sun", "moon", "star"]))


def windows(inputs):
    """The attention windows a run on `inputs` reads (two here: the 109-token prompt's 24 tokens cross 128)."""
    prompt = inputs["input_ids"].shape[1]
    return run_windows(prompt, N, cache_length(prompt, N))


def run(decoder, reasoner, inputs, seed=0, on_token=None):
    return decoder.run(inputs, N, seed, 0.6, 0.9, reasoner.eos_token_ids, on_token=on_token)


def eager(reasoner, inputs, seed=0):
    """The launched eager step, no graph: what every check compares with."""
    return run(FastDecoder(reasoner.model), reasoner, inputs, seed)


def assert_same(got, expected):
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == decode.__name__]


# -- checks before trusting a graph or compiled code -------------------------------------------------


def scale_state(b):
    b.states[b.step - 1] *= 1.5


def shift_token(b):
    row = int(b.step) - 1
    wrong = (b.tokens[row] + 1) % b.eos_mask.shape[0]
    b.tokens[row] = wrong
    b.token.copy_(wrong)


def illegal_access(_b):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("fault, problem", [
    (scale_state, "state off by 0.5 (relative L2; tolerance "),
    (shift_token, "tokens ["),
    (illegal_access, "RuntimeError: CUDA error: an illegal memory access was encountered"),
])
def test_a_graph_failing_its_check_is_never_replayed(reasoner, inputs, emulated_graphs, monkeypatch, caplog,
                                                     fault, problem):
    expected = eager(reasoner, inputs)
    decoder = FastDecoder(reasoner.model)
    graphs = emulated_graphs(decoder)
    replays = []

    class FaultyGraph(torch.cuda.CUDAGraph):  # the emulation's graph, replaying wrongly
        def replay(self):
            replays.append(1)
            super().replay()
            fault(decoder._buffers)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FaultyGraph)
    assert_same(run(decoder, reasoner, inputs), expected)
    [warning] = warnings_of(caplog)
    assert warning.startswith("ThinkDiff: the CUDA graph of the decode step failed its check against the launched "
                              "step (") and warning.endswith("); decoding without graphs") and problem in warning
    assert len(replays) == 1 and decoder.cuda_graph is False and not decoder._graphs
    # Later runs decode eagerly: no capture, no replay, no check, no warning.
    assert_same(run(decoder, reasoner, inputs), expected)
    assert graphs.captures == 1 and len(replays) == 1 and len(warnings_of(caplog)) == 1


def faulty_output(layer, x, attended):
    faulty_output.calls += 1
    return layer_output(layer, x, attended) * 1.25


def compiler_failing_on_first_call(layer, x, attended):
    faulty_output.calls += 1
    raise RuntimeError("no working C compiler")


@pytest.mark.parametrize("output, problem", [
    (faulty_output, "state off by "),
    (compiler_failing_on_first_call, "RuntimeError: no working C compiler"),
])
def test_compiled_code_failing_its_check_is_never_used(reasoner, inputs, emulated_graphs, monkeypatch, caplog,
                                                       output, problem):
    faulty_output.calls = 0
    monkeypatch.setattr(decode, "compile_layer_pieces", lambda: (layer_inputs, output))
    expected = eager(reasoner, inputs)
    decoder = FastDecoder(reasoner.model, compile=True, compile_in_background=False)
    graphs = emulated_graphs(decoder)
    assert_same(run(decoder, reasoner, inputs), expected)
    [warning] = warnings_of(caplog)
    assert warning.startswith("ThinkDiff: the compiled decode step failed its check against the eager step (")
    assert warning.endswith("); using eager layers") and problem in warning
    assert not decoder.compile and not decoder.compiled and decoder._graph_key[1] is EAGER_PIECES
    calls = faulty_output.calls
    assert 1 <= calls <= len(decoder.layers)  # the check's step only
    assert_same(run(decoder, reasoner, inputs), expected)
    assert graphs.captures == len(windows(inputs)) and faulty_output.calls == calls and len(warnings_of(caplog)) == 1


def test_faulty_code_from_the_background_compilation_leaves_the_eager_graph(reasoner, inputs, emulated_graphs,
                                                                             monkeypatch, caplog):
    faulty_output.calls = 0
    monkeypatch.setattr(decode, "compile_layer_pieces", lambda: (layer_inputs, faulty_output))
    expected = eager(reasoner, inputs)
    decoder = FastDecoder(reasoner.model, compile=True)
    graphs = emulated_graphs(decoder)
    assert_same(run(decoder, reasoner, inputs), expected)  # the eager graph, compiling meanwhile
    assert decoder.wait_for_compilation(timeout=60)
    for _ in range(2):
        assert_same(run(decoder, reasoner, inputs), expected)
    assert graphs.captures == len(windows(inputs)) and not decoder.compiled and decoder._compilation is None
    [warning] = warnings_of(caplog)
    assert "the compiled decode step failed its check against the eager step (state off by" in warning


def test_a_correct_graph_and_compiled_code_pass_their_checks_and_are_used(reasoner, inputs, emulated_graphs,
                                                                          monkeypatch, caplog):
    calls = []

    def counted_inputs(*args):
        calls.append(1)
        return layer_inputs(*args)

    pieces = (counted_inputs, layer_output)  # other functions computing the same: "compiled", correct
    monkeypatch.setattr(decode, "compile_layer_pieces", lambda: pieces)
    expected = eager(reasoner, inputs)
    decoder = FastDecoder(reasoner.model, compile=True, compile_in_background=False)
    graphs = emulated_graphs(decoder)
    for _ in range(2):
        assert_same(run(decoder, reasoner, inputs), expected)
    assert warnings_of(caplog) == []
    assert decoder.compiled and bool(decoder._graphs) and decoder._graph_key[1] is pieces
    # First run: the compiled check's step; per window three warm-ups, the capture, the graph check's two
    # steps (launched and replayed); N - 1 replays; the second run only replays.
    layers, captured = len(decoder.layers), len(windows(inputs))
    assert graphs.captures == captured == len(decoder._graphs) == 2
    assert len(calls) == layers * (1 + captured * (3 + 1 + 2) + 2 * (N - 1))


# -- attention backend ---------------------------------------------------------------------------


def test_the_decode_attention_is_kept_off_cudnn_on_cuda():
    from torch.nn.attention import SDPBackend

    assert decode.decode_attention_backends(torch.device("cuda", 0)) == [SDPBackend.EFFICIENT_ATTENTION,
                                                                         SDPBackend.MATH]
    assert decode.decode_attention_backends(torch.device("cpu")) is None


def test_the_selection_is_active_in_every_decode_step_and_changes_nothing_on_the_cpu(
        reasoner, inputs, emulated_graphs, monkeypatch):
    expected = eager(reasoner, inputs)
    unselected = FastDecoder(reasoner.model)
    run(unselected, reasoner, inputs)
    assert unselected.attention_backends is None and unselected.attention_backend == "FLASH_ATTENTION"

    from torch.nn.attention import SDPBackend

    monkeypatch.setattr(decode, "decode_attention_backends", lambda _device: [SDPBackend.EFFICIENT_ATTENTION,
                                                                              SDPBackend.MATH])
    backends = torch.backends.cuda

    def enabled():
        return (backends.flash_sdp_enabled(), backends.cudnn_sdp_enabled(), backends.mem_efficient_sdp_enabled(),
                backends.math_sdp_enabled())

    default, calls = enabled(), []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recorded(query, key, *args, **kwargs):
        calls.append((key.shape[-2], enabled()))
        return sdpa(query, key, *args, **kwargs)

    monkeypatch.setattr(decode.F, "scaled_dot_product_attention", recorded)
    decoder = FastDecoder(reasoner.model)
    emulated_graphs(decoder)  # warm-ups, capture, check and replays all go through the step
    tokens, states = run(decoder, reasoner, inputs)
    assert decoder.attention_backend == "MATH"  # the CPU has no memory-efficient kernel
    # The decode steps' calls attend over windows of the cache (the prefill's, the model's own, over the prompt).
    steps = [flags for length, flags in calls if length in windows(inputs)]
    assert len(steps) >= len(decoder.layers) * (N - 1) and set(steps) == {(False, False, True, True)}
    assert {flags for length, flags in calls if length not in windows(inputs)} == {default}
    assert enabled() == default  # restored after each step
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(states, expected[1], atol=1e-5, rtol=1e-5)  # math vs flash rounding


# -- the compilation copy's inference flags ----------------------------------------------------------


def eager_backend_pieces():
    """The pieces through dynamo without Inductor: the same guards, compiled in a moment."""
    return tuple(torch.compile(piece, fullgraph=True, dynamic=False, backend="eager") for piece in EAGER_PIECES)


@pytest.mark.parametrize("inference_weights", [False, True], ids=["highvram", "moved_in_inference_mode"])
def test_the_compilation_copy_has_the_weights_inference_flags_and_nothing_compiles_again(
        reasoner, inputs, emulated_graphs, monkeypatch, inference_weights):
    model = copy.deepcopy(reasoner.model)
    if inference_weights:  # as ComfyUI's ModelPatcher moves a model, in inference mode
        with torch.inference_mode():
            model._apply(lambda t: t.clone())
    flags = [p.is_inference() for p in model.get_decoder().layers[0].parameters()]
    assert set(flags) == {inference_weights}
    copied, gate = [], threading.Event()  # compilation held back until the first run is over, as dynamo
    compile_once = BackgroundCompilation._compile  # resets the global random state after compiling

    def recording(self, layer, *args):
        copied.append([p.is_inference() for p in layer.parameters()])
        gate.wait()
        compile_once(self, layer, *args)

    monkeypatch.setattr(BackgroundCompilation, "_compile", recording)
    monkeypatch.setattr(decode, "compile_layer_pieces", eager_backend_pieces)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    expected = eager(reasoner, inputs)
    decoder = FastDecoder(model, compile=True)
    emulated_graphs(decoder)
    assert_same(run(decoder, reasoner, inputs), expected)
    gate.set()
    assert decoder.wait_for_compilation(timeout=60)
    # The copy is of the step's (fused) layer, whose tensors are made as the weights are.
    assert [set(c) for c in copied] == [{inference_weights}]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the thread's two pieces
    tokens, states = run(decoder, reasoner, inputs)  # check, warm-ups and capture on the model's layers
    assert decoder.compiled and decoder._graph_key[1] is decoder._compiled_pieces
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the copy's code served: no recompilation
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(states, expected[1], atol=1e-5, rtol=1e-5)


# -- progress and cancel on a device that lags the host ---------------------------------------------


class LaggingDevice:
    """CUDA's asynchrony on the CPU for a decoder's captured graph: its replays queue up and run as the host
    waits on events, or one per event query (the device advancing meanwhile), in order."""

    def __init__(self, monkeypatch, decoder):
        self.queue, self.enqueued, self.executed = [], 0, 0
        device = self
        for graph in decoder._graphs.values():
            def queued(replay=graph.replay):
                device.queue.append(replay)
                device.enqueued += 1

            monkeypatch.setattr(graph, "replay", queued)

        class Event:
            def record(self, _stream=None):
                self.mark = device.enqueued

            def query(self):
                device.advance(1)
                return device.executed >= self.mark

            def synchronize(self):
                device.advance(self.mark - device.executed)

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(decoder, "_asynchronous", lambda _device: True)

    def advance(self, steps):
        for _ in range(min(steps, len(self.queue))):
            self.queue.pop(0)()
            self.executed += 1

    def finish(self):
        """What the device does with work still queued: it runs it (the next run's work queues after)."""
        with torch.inference_mode():  # the mode the steps were queued in
            self.advance(len(self.queue))
        self.enqueued = self.executed = 0


def lagging_decoder(reasoner, inputs, emulated_graphs, monkeypatch):
    decoder = FastDecoder(reasoner.model)
    emulated_graphs(decoder)
    run(decoder, reasoner, inputs)  # captured and checked while the device keeps up
    return decoder, LaggingDevice(monkeypatch, decoder)


def test_progress_reports_only_tokens_the_device_has_computed(reasoner, inputs, emulated_graphs, monkeypatch):
    expected = eager(reasoner, inputs)
    decoder, device = lagging_decoder(reasoner, inputs, emulated_graphs, monkeypatch)
    reported = []

    def on_token(done, total):
        assert total == N and done - 1 <= device.executed  # token 1 is the prefill's
        reported.append(done)

    assert_same(run(decoder, reasoner, inputs, on_token=on_token), expected)
    assert reported == [1, *range(PROGRESS_CHUNK, N + 1, PROGRESS_CHUNK)]
    assert device.executed == device.enqueued == N - 1 and not device.queue


def test_a_cancel_stops_decoding_within_a_chunk_and_leaves_the_decoder_usable(reasoner, inputs, emulated_graphs,
                                                                               monkeypatch):
    expected = eager(reasoner, inputs, seed=3)
    decoder, device = lagging_decoder(reasoner, inputs, emulated_graphs, monkeypatch)

    class Cancelled(Exception):
        pass

    def cancel(done, _total):
        if done >= PROGRESS_CHUNK:
            raise Cancelled(done)

    with pytest.raises(Cancelled) as cancelled:
        run(decoder, reasoner, inputs, seed=3, on_token=cancel)
    reported = cancelled.value.args[0]
    assert reported == PROGRESS_CHUNK
    assert device.enqueued <= reported - 1 + PROGRESS_CHUNK  # at most a chunk launched beyond it
    device.finish()
    assert_same(run(decoder, reasoner, inputs, seed=3, on_token=lambda *_: None), expected)
