"""The core's public objects called from several threads, and in and out of torch.inference_mode."""

import threading

import pytest
import torch

from thinkdiff_core import decode

TOKENS = 6


def items(car_images, query):
    white, blue = car_images
    return ["white", white, "blue", blue, query]


def in_threads(calls):
    """Run each call in its own thread, all released at once; their results (or errors), in order."""
    barrier = threading.Barrier(len(calls))
    results = [None] * len(calls)

    def worker(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as e:  # noqa: BLE001 - asserted by the test
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish (deadlock?)"
    return results


@pytest.mark.parametrize("fast", [True, False])
def test_threads_on_one_reasoner_each_get_what_they_get_alone(reasoner, car_images, fast):
    jobs = [("red", 1), ("green", 2), ("red", 3), ("yellow", 4)]
    reasoner.fast = fast
    try:
        alone = [reasoner.reason(items(car_images, q), seed=s, max_new_tokens=TOKENS) for q, s in jobs]
        # A callback that yields the interpreter at every token makes interleaving certain without a lock.
        together = in_threads([lambda q=q, s=s: reasoner.reason(items(car_images, q), seed=s, max_new_tokens=TOKENS,
                                                                  on_token=lambda *_: threading.Event().wait(0.001))
                               for q, s in jobs])
    finally:
        reasoner.fast = True
    for one, other in zip(alone, together):
        assert not isinstance(other, Exception), other
        assert torch.equal(one.token_ids, other.token_ids)
        assert torch.equal(one.hidden_states, other.hidden_states)
        assert one.text == other.text


def test_threads_on_two_reasoners_draw_what_their_seeds_give(reasoner, tiny_models, car_images):
    # Two models in one process share torch's global generator (as transformers' generate does).
    from thinkdiff_core import Reasoner

    second = Reasoner.from_pretrained(tiny_models["vlm"], device="cpu")
    alone = [r.reason(items(car_images, "red"), seed=seed, max_new_tokens=TOKENS)
             for r, seed in ((reasoner, 5), (second, 6))]
    together = in_threads([lambda r=r, seed=seed: r.reason(items(car_images, "red"), seed=seed, max_new_tokens=TOKENS,
                                                           on_token=lambda *_: threading.Event().wait(0.001))
                           for r, seed in ((reasoner, 5), (second, 6))])
    for one, other in zip(alone, together):
        assert torch.equal(one.token_ids, other.token_ids)
        assert torch.equal(one.hidden_states, other.hidden_states)


def test_a_fast_decoder_used_directly_from_threads_serialises_its_runs(reasoner, car_images):
    decoder = decode.FastDecoder(reasoner.model)
    inputs = reasoner.prepare_inputs(*reasoner.render_prompt(items(car_images, "red")))
    run = lambda seed: decoder.run(inputs, TOKENS, seed, 0.6, 0.9, reasoner.eos_token_ids,  # noqa: E731
                                   on_token=lambda *_: threading.Event().wait(0.001))
    alone = [run(seed) for seed in (7, 8, 9)]
    together = in_threads([lambda seed=seed: run(seed) for seed in (7, 8, 9)])
    for (tokens, states), (other_tokens, other_states) in zip(alone, together):
        assert torch.equal(tokens, other_tokens) and torch.equal(states, other_states)


def test_threads_on_one_vision_encoder_each_get_what_they_get_alone(tiny_models, car_images):
    from PIL import Image

    from thinkdiff_core import VisionEncoder

    vision = VisionEncoder.from_pretrained(tiny_models["blip2"], device="cpu")
    batches = [list(car_images), [Image.new("RGB", (64, 48), (200, 10, 10))], [car_images[1]]]
    alone = [vision.encode(batch) for batch in batches]
    together = in_threads([lambda batch=batch: vision.encode(batch) for batch in batches])
    for one, other in zip(alone, together):
        assert torch.equal(one, other)


@pytest.mark.parametrize("first_inside", [True, False])
def test_a_reasoner_works_in_and_out_of_inference_mode_alike(reasoner, car_images, first_inside):
    # ComfyUI runs every node under torch.inference_mode(); a library user usually does not.
    reasoner.release()  # buffers are made by the first of the two calls
    call = lambda: reasoner.reason(items(car_images, "red"), seed=11, max_new_tokens=TOKENS)  # noqa: E731
    results = []
    for inside in (first_inside, not first_inside, first_inside):
        if inside:
            with torch.inference_mode():
                results.append(call())
        else:
            results.append(call())
    for result in results[1:]:
        assert torch.equal(result.token_ids, results[0].token_ids)
        assert torch.equal(result.hidden_states, results[0].hidden_states)
