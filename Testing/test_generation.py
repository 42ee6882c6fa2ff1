"""Streaming, cancellation, stop reasons, sampling and the image encoding cache."""

import threading
import warnings
from types import SimpleNamespace

import pytest
import torch

from RadFMSlicer.errors import ImageError, PromptError, RadFMError
from RadFMSlicer.generation import GenerationSettings, pick_token
from RadFMSlicer.tokenizer import EOS_ID, StreamDecoder


def report_prompt(engine):
    return engine.image_tag(0) + "Please write a radiology report for this scan."


@pytest.fixture
def image():
    torch.manual_seed(0)
    return torch.rand(3, 64, 64, 8)


def test_streamed_deltas_concatenate_to_the_answer(engine, image):
    generation = engine.stream(report_prompt(engine), [image], GenerationSettings(max_new_tokens=40))
    deltas = list(generation)
    assert len(deltas) > 5
    assert "".join(deltas) == generation.result.text
    assert generation.result.stop_reason == "length" and len(generation.result.token_ids) == 40


def test_stream_decoder_never_splits_characters_and_keeps_spaces(engine):
    text = "Pleural effusion — 肺结节 of 12 mm, naïve  reader."
    ids = engine.tokenizer.sp.EncodeAsIds(text)
    decoder = StreamDecoder(engine.tokenizer)
    deltas = [decoder.push(i) for i in ids] + [decoder.finish()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def test_generating_prints_no_deprecation_warning_into_the_answer(engine, image):
    """transformers warns once per process on a deprecated argument: that line landed in every CLI answer."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.answer(report_prompt(engine), [image], GenerationSettings(max_new_tokens=3))
    assert [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))] == []


def test_cancel_from_another_thread_stops_within_one_token(engine, image):
    generation = engine.stream(report_prompt(engine), [image], GenerationSettings(max_new_tokens=500))
    seen = []
    cancelled_at = []

    def consume():
        for token in generation.token_ids():
            seen.append(token)
            if len(seen) == 5:
                canceller = threading.Thread(target=lambda: (generation.cancel(), cancelled_at.append(len(seen))))
                canceller.start()
                canceller.join()

    worker = threading.Thread(target=consume)
    worker.start()
    worker.join(timeout=60)
    assert generation.result.stop_reason == "cancelled"
    assert len(seen) <= cancelled_at[0] + 1


def test_cancel_before_start_generates_nothing(engine, image):
    generation = engine.stream(report_prompt(engine), [image], GenerationSettings(max_new_tokens=10))
    generation.cancel()
    assert generation.run().stop_reason == "cancelled" and generation.result.token_ids == []


def test_stops_at_eos_2_not_the_configs_eos(engine, image, monkeypatch):
    """Force the model to say EOS at the third step: generation must stop there, reason eos."""
    lm = engine.model.lang_model
    real_forward = lm.forward
    calls = []

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out.logits[..., EOS_ID] = 1e4
        return out

    monkeypatch.setattr(lm, "forward", forward)
    result = engine.answer(report_prompt(engine), [image], GenerationSettings(max_new_tokens=50))
    assert result.stop_reason == "eos" and result.token_ids[-1] == EOS_ID and len(result.token_ids) == 3


def test_sampling_is_reproducible_with_a_seed(engine, image):
    def sample(seed):
        settings = GenerationSettings(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
        return engine.answer(report_prompt(engine), [image], settings).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_repetition_penalty_demotes_tokens_already_said():
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    said = torch.tensor([1, 3])
    assert pick_token(logits, GenerationSettings(), said, None) == 1
    assert pick_token(logits, GenerationSettings(repetition_penalty=1.2), said, None) == 2


class CountingCat:
    """``torch.cat``, counting its calls (the fake decoder below makes none: the count is generation.py's)."""

    def __init__(self):
        self.cats = 0
        self._cat = torch.cat

    def __call__(self, *args, **kwargs):
        self.cats += 1
        return self._cat(*args, **kwargs)


class FavouriteTokens:
    """A decoder whose every step prefers token 100, then 101, then 102 (logits 4, 3 and 2.5; 0 elsewhere)."""

    def prefill(self, embeds):
        return self.step(None, None)

    def step(self, token, position):
        logits = torch.zeros(1, 1, 32000)
        logits[0, 0, [100, 101, 102]] = torch.tensor([4.0, 3.0, 2.5])
        return logits


def test_only_a_repetition_penalty_keeps_the_ids_said_and_it_demotes_them(monkeypatch):
    """Off (the default) no per-token history is built (on a GPU a host-to-device copy each); on, it
    grows with the answer, so a token said is demoted later in the same answer."""
    from RadFMSlicer import generation

    counted = CountingCat()
    monkeypatch.setattr(torch, "cat", counted)
    tokenizer = SimpleNamespace(vocab_size=32000, decode=lambda ids: " ".join(map(str, ids)))
    prompt_ids = torch.tensor([[1, 7, 8]])  # none of the favourite tokens

    def answer(settings):
        run = generation.Generation(FavouriteTokens(), tokenizer, prompt_ids, torch.zeros(1, 3, 8), settings, 2048)
        return run.run().token_ids

    assert answer(GenerationSettings(max_new_tokens=3)) == [100, 100, 100] and counted.cats == 0
    assert answer(GenerationSettings(max_new_tokens=3, repetition_penalty=2.0)) == [100, 101, 102]  # 4/2 < 3; 3/2 < 2.5
    assert counted.cats == 2


def test_top_k_and_top_p_only_sample_the_head():
    logits = torch.tensor([5.0, 4.9, -3.0, -4.0, -5.0])
    generator = torch.Generator().manual_seed(0)
    for settings in (GenerationSettings(temperature=5.0, top_k=2), GenerationSettings(temperature=5.0, top_p=0.5)):
        picks = {pick_token(logits, settings, torch.tensor([], dtype=torch.long), generator) for _ in range(200)}
        assert picks <= {0, 1}


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(PromptError):
        GenerationSettings(**bad)


def test_follow_up_question_skips_the_vision_encoder(engine, image, monkeypatch):
    engine.cache.clear()
    calls = []
    real = engine.model.encode_images
    monkeypatch.setattr(engine.model, "encode_images", lambda x: calls.append(x.shape) or real(x))
    engine.answer(report_prompt(engine), [image], GenerationSettings(max_new_tokens=2))
    engine.answer(engine.image_tag(0) + "Is there a pleural effusion?", [image.clone()], GenerationSettings(max_new_tokens=2))
    assert len(calls) == 1 and engine.cache.hits >= 1


def test_cache_is_bounded_and_evicts_the_oldest(engine):
    engine.cache.clear()
    old_capacity, engine.cache.capacity = engine.cache.capacity, 2
    try:
        images = [torch.full((3, 32, 32, 4), v) for v in (0.1, 0.2, 0.3)]
        for img in images:
            engine.encode_images([img])
        assert len(engine.cache) == 2
        misses = engine.cache.misses
        engine.encode_images([images[2]])
        assert engine.cache.misses == misses  # newest kept
        engine.encode_images([images[0]])
        assert engine.cache.misses == misses + 1  # oldest evicted
    finally:
        engine.cache.capacity = old_capacity


@pytest.mark.parametrize(
    "shape, message",
    [((3, 60, 64, 8), "multiples of 32"), ((3, 64, 64, 6), "multiple of 4"), ((1, 64, 64, 8), "[3, H, W, D]"),
     ((3, 1024, 64, 8), "at most 512")],
)
def test_bad_image_shapes(engine, shape, message):
    with pytest.raises(ImageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        engine.encode_images([torch.rand(shape)])


def test_nan_image_is_refused(engine):
    img = torch.rand(3, 32, 32, 4)
    img[0, 0, 0, 0] = float("nan")
    with pytest.raises(ImageError, match="finite"):
        engine.encode_images([img])


def test_prompt_naming_more_images_than_given(engine, image):
    with pytest.raises(PromptError, match="image 2"):
        engine.answer(engine.image_tag(0) + engine.image_tag(1) + "Compare.", [image])


def test_images_of_different_depth_in_one_prompt(engine):
    """A prior study with another slice count: each image is encoded on its own."""
    current, prior = torch.rand(3, 64, 64, 16), torch.rand(3, 64, 64, 8)
    result = engine.answer(
        engine.image_tag(0) + engine.image_tag(1) + "Compare the two scans.", [current, prior],
        GenerationSettings(max_new_tokens=3),
    )
    assert len(result.token_ids) == 3


def test_gpu_out_of_memory_becomes_an_actionable_error(engine, image, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.model.lang_model, "forward", exhausted)
    with pytest.raises(RadFMError, match="out of memory while generating: use a lower precision"):
        engine.answer(report_prompt(engine), [image], GenerationSettings(max_new_tokens=5))


def test_a_prompt_filling_the_context_is_refused_and_a_near_full_one_is_cut_to_fit(engine):
    too_long = torch.full((1, 2048), 100, dtype=torch.long)
    with pytest.raises(PromptError, match="2048 tokens; the model's context holds 2048"):
        engine.start(too_long, [], GenerationSettings(max_new_tokens=5))
    near_full = engine.start(too_long[:, :2045], [], GenerationSettings(max_new_tokens=50))
    said = list(near_full.token_ids())
    assert len(said) <= 3
    # Told apart from max_new_tokens: 50 were asked for, the context had room for 3.
    assert near_full.result.stop_reason == ("eos" if said[-1] == EOS_ID else "context")
    asked = engine.start(too_long[:, :100], [], GenerationSettings(max_new_tokens=2))
    said = list(asked.token_ids())
    assert asked.result.stop_reason == ("eos" if said[-1] == EOS_ID else "length")


def test_each_decoded_token_costs_one_forward_and_a_bounded_amount_of_text_decoding(engine, monkeypatch):
    """The per-token work that is ours stays constant as the answer grows: one LLM forward per
    token (the prefill counts as the first), and the streamed text decodes a short window per
    token rather than the whole answer again (which would grow quadratically with its length)."""
    forwards, decoded_ids = [], []
    lm = engine.model.lang_model
    forward = lm.forward
    monkeypatch.setattr(lm, "forward", lambda *a, **kw: forwards.append(1) or forward(*a, **kw))
    decode = engine.tokenizer.decode
    monkeypatch.setattr(engine.tokenizer, "decode", lambda ids: decoded_ids.append(len(ids)) or decode(ids))
    new_tokens = 96
    generation = engine.stream("Please write a radiology report for this scan.", [],
                               GenerationSettings(max_new_tokens=new_tokens))
    text = "".join(generation)
    assert generation.result.stop_reason == "length" and text == generation.result.text
    assert len(forwards) == new_tokens
    full_decodes = 2  # the result's text and the stream's closing check, once each
    assert sum(decoded_ids) <= 8 * new_tokens + full_decodes * new_tokens, decoded_ids
