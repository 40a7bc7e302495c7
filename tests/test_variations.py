"""Variations: several seeds of one reasoning decoded together, each row as its own single run."""

import pytest
import torch

from thinkdiff_core.decode import FastDecoder, sample_paper
from thinkdiff_core.reason import variation_seeds

N = 24  # tokens per run


@pytest.fixture(scope="module")
def inputs(reasoner, car_images):
    white, blue = car_images
    return reasoner.prepare_inputs(*reasoner.render_prompt(["white", white, "blue", blue, "red"]))


def single(reasoner, inputs, seed, **options):
    return reasoner.sample(inputs, seed=seed, max_new_tokens=N, min_new_tokens=N, **options)


def test_each_row_of_a_batch_is_a_single_decode_of_its_tokens(reasoner, inputs):
    seeds = [3, 11, 12]
    decoder = FastDecoder(reasoner.model)
    tokens, states = decoder.run_variations(inputs, N, seeds, 0.6, 0.9, reasoner.eos_token_ids)
    assert tokens.shape == (3, N) and states.shape == (3, N, reasoner.hidden_size) and states.dtype == torch.float32
    assert len({tuple(row.tolist()) for row in tokens}) == 3  # the seeds differ, so do the rows
    for row, seed in enumerate(seeds):
        # On the same tokens, a row's states are the single sequence's, to float32 rounding of batched products.
        forced_tokens, forced_states = single(reasoner, inputs, seed, forced_tokens=tokens[row])
        assert torch.equal(forced_tokens, tokens[row])
        torch.testing.assert_close(states[row], forced_states, atol=1e-5, rtol=1e-5)
        # Each row draws its seed's random numbers: here (float32, no near tie) it is that seed's single run,
        # which is transformers' generate with that seed.
        alone_tokens, alone_states = single(reasoner, inputs, seed, fast=False)
        assert torch.equal(tokens[row], alone_tokens)
        torch.testing.assert_close(states[row], alone_states, atol=1e-5, rtol=1e-5)
    # Deterministic for the seeds, and a batch reuses its buffers.
    buffers = decoder._buffers
    again = decoder.run_variations(inputs, N, seeds, 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(again[0], tokens) and torch.equal(again[1], states) and decoder._buffers is buffers
    # Forced tokens per row give those rows' states.
    forced = decoder.run_variations(inputs, N, seeds, 0.6, 0.9, reasoner.eos_token_ids, forced_tokens=tokens.flip(0))
    assert torch.equal(forced[0], tokens.flip(0))
    torch.testing.assert_close(forced[1], states.flip(0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"forced_tokens must be \[3, 24\] \(a row per seed\), got \[24\]"):
        decoder.run_variations(inputs, N, seeds, 0.6, 0.9, reasoner.eos_token_ids, forced_tokens=tokens[0])


def test_one_row_per_generator_draws_what_each_row_alone_draws():
    vocab = 8
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0)) * 2
    eos = torch.zeros(vocab, dtype=torch.bool)
    eos[vocab - 1] = True
    temperature, floor = torch.tensor(0.6), torch.tensor(1 - 0.9)
    batch = [torch.Generator().manual_seed(seed) for seed in range(4)]
    alone = [torch.Generator().manual_seed(seed) for seed in range(4)]
    draws = torch.stack([sample_paper(logits, eos, temperature, floor, generator=batch) for _ in range(3000)])
    for row in range(4):
        expected = torch.cat([sample_paper(logits[row:row + 1], eos, temperature, floor, generator=alone[row])
                              for _ in range(3000)])
        assert torch.equal(draws[:, row], expected)
    # So each row follows its own distribution (the filtered softmax), whatever the others draw.
    for row in range(4):
        scores = (logits[row] / temperature).masked_fill(eos, float("-inf"))
        ordered, order = scores.sort()
        dropped = ordered.softmax(-1).cumsum(-1) <= floor
        dropped[-1] = False
        probs = scores.masked_fill(dropped.scatter(0, order, dropped), float("-inf")).softmax(-1)
        frequencies = torch.bincount(draws[:, row], minlength=vocab).float() / len(draws)
        assert (frequencies - probs).abs().max() < 0.03, (frequencies, probs)
        assert frequencies[probs == 0].sum() == 0


def test_graphs_of_a_batch_register_every_rows_generator_and_replay_its_tokens(reasoner, inputs, emulated_graphs):
    decoder = FastDecoder(reasoner.model)
    expected = FastDecoder(reasoner.model).run_variations(inputs, N, [5, 6], 0.6, 0.9, reasoner.eos_token_ids)
    emulation = emulated_graphs(decoder)
    for _ in range(2):  # captured, then replayed
        tokens, states = decoder.run_variations(inputs, N, [5, 6], 0.6, 0.9, reasoner.eos_token_ids)
        assert torch.equal(tokens, expected[0])
        torch.testing.assert_close(states, expected[1], atol=1e-5, rtol=1e-5)
    assert emulation.captures == len(decoder._graphs) >= 1
    assert all(graph.generators == decoder._buffers.generators and len(graph.generators) == 2
               for graph in decoder._graphs.values())
    # Another number of rows: new buffers, new graphs.
    tokens, _ = decoder.run_variations(inputs, N, [5], 0.6, 0.9, reasoner.eos_token_ids)
    assert torch.equal(tokens, expected[0][:1]) and decoder._buffers.rows == 1


def test_reasoner_variations_are_their_seeds_single_reasonings(reasoner, car_images):
    white, blue = car_images
    items = ["white", white, "blue", blue, "red"]
    seeds = variation_seeds(40, 3)
    assert seeds == [40, 41, 42]
    for fast in (True, False):
        reasoner.fast = fast
        try:
            steps = []
            results = reasoner.reason_variations(items, seeds=seeds, max_new_tokens=N,
                                                 on_token=lambda done, total: steps.append((done, total)))
        finally:
            reasoner.fast = True
        # The fast path counts its steps (a token of every variation each), the plain path every variation's.
        total = N if fast else 3 * N
        assert steps == [(done, total) for done in range(1, total + 1)]
        assert [result.seed for result in results] == seeds
        for result, seed in zip(results, seeds):
            alone = reasoner.reason(items, seed=seed, max_new_tokens=N)
            assert torch.equal(result.token_ids, alone.token_ids) and result.text == alone.text
            assert result.prompt == alone.prompt and alone.seed == seed
            torch.testing.assert_close(result.hidden_states, alone.hidden_states, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed, variations, message", [
    (0, 0, "variations must be an integer >= 1 (1 = a single sampling), got 0"),
    (0, True, "variations must be an integer >= 1 (1 = a single sampling), got True"),
    (0, 2.0, "variations must be an integer >= 1 (1 = a single sampling), got 2.0"),
    (2**64 - 2, 3, "variation i samples with seed + i, so seed + variations - 1 must be at most 2**64 - 1; got seed "
                   "18446744073709551614 and 3 variations"),
    (-1, 2, "seed must be an integer from 0 to 2**64 - 1, got -1"),
])
def test_bad_variation_counts_are_named(seed, variations, message):
    with pytest.raises(ValueError) as error:
        variation_seeds(seed, variations)
    assert str(error.value) == message


def test_decode_memory_counts_every_variations_cache(reasoner):
    config = reasoner.model.config.text_config if hasattr(reasoner.model.config, "text_config") \
        else reasoner.model.config
    one, four = reasoner.decode_memory(600, 128, 1), reasoner.decode_memory(600, 128, 4)
    head_dim = config.hidden_size // config.num_attention_heads
    cache_per_row = 2 * config.num_hidden_layers * config.num_key_value_heads * 1024 * head_dim * 4  # float32
    states_per_row = 128 * config.hidden_size * 4
    sampler_per_row = 8 * config.vocab_size * 4
    assert four - one == 3 * (cache_per_row + states_per_row + sampler_per_row)
    # A longer prompt: the next cache bucket.
    assert reasoner.decode_memory(1000, 128, 1) - reasoner.decode_memory(600, 128, 1) > cache_per_row
