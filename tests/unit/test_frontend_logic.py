"""The Frontend's pure logic against independent references: stop strings under every chunking
(property test), the QA span against brute force, entity grouping against transformers' pipeline,
and the error mapping of Router / Ray / engine failures (`to_serve_error`, `map_engine_error`)."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.errors import (
    ContextLengthExceededError,
    InternalError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
    UnavailableError,
    to_serve_error,
)
from deployments.frontend.postprocess import best_span, group_entities
from deployments.frontend.results import TokenLabel
from deployments.frontend.text import StopMatcher
from deployments.router import map_engine_error
from qwen2_model.engine.engine import EngineDead, EngineError, QueueFull

# ---------------------------------------------------------------------------------------------
# Stop strings: whatever the chunking, the output is the text up to the first stop string to complete


def _feed(stop: list[str], chunks: list[str]) -> tuple[str, bool, int]:
    """-> (all emitted text, stopped, largest held-back tail seen)."""
    m = StopMatcher(stop)
    out, held_max = [], 0
    for i, chunk in enumerate(chunks):
        text, stopped = m.feed(chunk, final=i == len(chunks) - 1)
        out.append(text)
        held_max = max(held_max, len(m.held))
        if stopped:
            return "".join(out), True, held_max
    return "".join(out), False, held_max


def _reference(text: str, stop: list[str]) -> tuple[str, bool]:
    """Read the whole text one character at a time: the first stop string to complete ends it."""
    for end in range(len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            return text[:end - len(max(done, key=len))], True
    return text, False


ALPHABET = "ab c\n"  # few letters: stop strings and their near-misses occur often


@st.composite
def chunked(draw):
    text = draw(st.text(alphabet=ALPHABET, max_size=40))
    stop = draw(st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), min_size=0, max_size=3))
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0] + cuts + [len(text)]
    return text, stop, [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=400, deadline=None)
@given(chunked())
def test_stop_strings_under_every_chunking(case):
    text, stop, chunks = case
    emitted, stopped, held_max = _feed(stop, chunks)
    assert (emitted, stopped) == _reference(text, stop), (text, stop, chunks)
    # Only a tail that could still become a stop string is held back.
    assert held_max <= max((len(s) - 1 for s in stop), default=0)


def test_stop_strings_across_every_split_point_exhaustively():
    text, stop = "say hello world\n and more", ["lo w", "\n a", "xyz"]
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _feed(stop, [text[:i], text[i:j], text[j:]])[:2] == ("say hel", True)


def test_held_text_is_released_when_it_cannot_become_a_stop_string():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)  # "ST" may start "STOP"
    assert m.feed("ay") == ("STay", False)
    assert m.feed("ST", final=True) == ("ST", False)  # the end: nothing is held


# ---------------------------------------------------------------------------------------------
# Extractive QA: best_span is the brute-force argmax of p_start * p_end


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


logits = st.floats(min_value=-20, max_value=20, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.lists(logits, min_size=n, max_size=n),
                                                      st.lists(logits, min_size=n, max_size=n))),
       st.integers(1, 8))
def test_best_span_is_the_brute_force_best(starts_ends, max_len):
    starts, ends = starts_ends
    n = len(starts)
    context = "".join(f"w{i:02d} " for i in range(n))
    offsets = [(4 * i, 4 * i + 3) for i in range(n)]
    ps, pe = _softmax(starts), _softmax(ends)
    spans = [(ps[i] * pe[j], i, j) for i in range(n) for j in range(i, min(n, i + max_len))]
    best = max(s for s, _, _ in spans)
    got = best_span(starts, ends, offsets, context, max_len=max_len)
    assert got.score == pytest.approx(best, rel=1e-9)
    # The answer is one of the best spans (ties: any), with its text and offsets.
    i, j = next((i, j) for s, i, j in spans if (offsets[i][0], offsets[j][1]) == (got.start, got.end))
    assert ps[i] * pe[j] == pytest.approx(best, rel=1e-9) and 0 <= j - i < max_len
    assert got.answer == context[got.start:got.end]


# ---------------------------------------------------------------------------------------------
# Token classification: entity grouping equals transformers' TokenClassificationPipeline ("simple")

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "MISC"]


class _JoinTokenizer:
    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(LABELS), st.floats(0.0, 1.0), st.text(alphabet="ab ", min_size=1,
                                                                                   max_size=3)),
                min_size=1, max_size=12))
def test_entity_grouping_equals_the_transformers_pipeline(rows):
    transformers = pytest.importorskip("transformers")
    text, tokens, hf = "", [], []
    for index, (label, score, word) in enumerate(rows):
        start, text = len(text), text + word  # contiguous offsets: the pipeline's word is the joined tokens
        tokens.append(TokenLabel(word, label, score, start, len(text)))
        hf.append({"entity": label, "score": score, "index": index, "word": word, "start": start, "end": len(text)})
    pipeline = object.__new__(transformers.TokenClassificationPipeline)
    pipeline.tokenizer = _JoinTokenizer()
    expected = [g for g in pipeline.group_entities(hf) if g["entity_group"] != "O"]  # the pipeline drops "O"
    got = group_entities(tokens, text)
    assert [(e.entity_group, e.start, e.end, e.word) for e in got] == \
        [(g["entity_group"], g["start"], g["end"], g["word"].strip()) for g in expected]
    assert [e.score for e in got] == pytest.approx([float(g["score"]) for g in expected])


# ---------------------------------------------------------------------------------------------
# Error mapping


def test_map_engine_error():
    err = map_engine_error(EngineError("too long", param="max_tokens", code="context_length_exceeded"))
    assert isinstance(err, ContextLengthExceededError) and err.param == "max_tokens"
    err = map_engine_error(EngineError("bad top_p", param="top_p"))
    assert type(err) is InvalidRequestError and (err.param, err.message) == ("top_p", "bad top_p")
    err = map_engine_error(QueueFull("the queue is full"))
    assert isinstance(err, QueueFullError) and err.retry_after == 1.0 and "queue is full" in err.message
    assert isinstance(map_engine_error(EngineDead("rank 1 died")), UnavailableError)
    already = UnavailableError("x")
    assert map_engine_error(already) is already
    other = KeyError("x")
    assert map_engine_error(other) is other  # not the engine's: passes through


def test_to_serve_error_unwraps_what_ray_wraps():
    from ray import exceptions as rex
    from ray.serve import exceptions as sex

    original = ContextLengthExceededError("too long", param="prompt")
    wrapped = rex.RayTaskError("generate", "Traceback ...", original).as_instanceof_cause()
    assert isinstance(wrapped, ContextLengthExceededError)  # Ray's dual class
    assert to_serve_error(wrapped) is original  # the plain one, as raised in the replica
    chained = RuntimeError("outer")
    chained.__cause__ = original
    assert to_serve_error(chained) is original

    assert isinstance(to_serve_error(sex.BackPressureError(num_queued_requests=5, max_queued_requests=5)),
                      QueueFullError)
    assert isinstance(to_serve_error(rex.RayActorError()), UnavailableError)
    assert isinstance(to_serve_error(rex.TaskCancelledError()), UnavailableError)
    assert isinstance(to_serve_error(asyncio.TimeoutError()), RequestTimeoutError)
    err = to_serve_error(ZeroDivisionError("boom"))
    assert isinstance(err, InternalError) and "ZeroDivisionError: boom" in err.message


# --- the per-token deadline ----------------------------------------------------------------------

def test_deadline_never_swallows_a_cancel_that_lands_with_the_next_token():
    """A client's cancel and the engine's next token can arrive in the same loop iteration. The
    cancel must still win: Python 3.11's asyncio.wait_for returned the token instead, so the
    stream's generator went on and the request ran on to max_tokens for nobody."""
    from deployments.frontend.core import _Deadline

    async def main() -> None:
        next_token = asyncio.get_running_loop().create_future()
        consumer = asyncio.create_task(_Deadline(60).run(next_token))
        await asyncio.sleep(0)  # the consumer now awaits the token
        next_token.set_result("token")
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

    asyncio.run(main())


def test_deadline_times_out_with_the_request_timeout_error():
    from deployments.errors import RequestTimeoutError
    from deployments.frontend.core import _Deadline

    async def main() -> None:
        with pytest.raises(RequestTimeoutError, match="within 0.05 seconds"):
            await _Deadline(0.05).run(asyncio.sleep(5))
        assert await _Deadline(5).run(asyncio.sleep(0, result="ok")) == "ok"

    asyncio.run(main())
