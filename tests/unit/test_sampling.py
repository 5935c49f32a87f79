"""Unit tests for qwen2_model.engine.sampling: every knob must change the outcome when set.

Distribution tests put many identical rows in one batch (one sampler call), with the global RNG
seeded, so they are both fast and deterministic.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from qwen2_model.engine.sampling import (
    Sampler,
    SamplingParams,
    SamplingParamsError,
    SequenceSamplingState,
    make_generator,
)

V = 32
EOS = 7
sampler = Sampler()


@pytest.fixture(autouse=True)
def _seed_global_rng():
    torch.manual_seed(1234)


def state(params=None, prompt=(), output=(), eos=(EOS,), seed=None) -> SequenceSamplingState:
    params = params or SamplingParams()
    if seed is None:
        seed = params.seed
    return SequenceSamplingState(
        params=params,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=list(eos),
        generator=make_generator(seed) if seed is not None else None,
    )


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, **kw)


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs).log()  # [V]


def draw_many(row_logits: torch.Tensor, params: SamplingParams, n: int = 2000) -> Counter:
    """n independent unseeded draws of one row, as one batch of n identical rows."""
    logits = row_logits.expand(n, -1).clone()  # [n, V]
    out = sampler(logits, [state(params) for _ in range(n)])
    return Counter(out.token_ids)


# ---------------------------------------------------------------------------- greedy / temperature


def test_greedy_is_argmax_any_dtype():
    logits = torch.randn(6, V)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = logits.to(dtype)
        out = sampler(x, [state(greedy()) for _ in range(6)])
        assert out.token_ids == x.float().argmax(-1).tolist()
        assert out.logprobs == [None] * 6


def test_greedy_rows_in_mixed_batch_stay_argmax():
    logits = torch.randn(8, V)
    states = [state(greedy()) if i % 2 == 0 else state(SamplingParams(temperature=1.5)) for i in range(8)]
    out = sampler(logits, states)
    assert [out.token_ids[i] for i in range(0, 8, 2)] == logits[0::2].argmax(-1).tolist()


def test_caller_logits_not_modified():
    logits = torch.randn(3, V)
    before = logits.clone()
    sampler(logits, [state(SamplingParams(repetition_penalty=2.0, top_p=0.5, logprobs=2), prompt=[1, 2])] * 3)
    assert torch.equal(logits, before)


def test_temperature_changes_spread():
    row = torch.zeros(V)
    row[:4] = torch.tensor([2.0, 1.0, 0.5, 0.0])
    cold = draw_many(row, SamplingParams(temperature=0.05))
    hot = draw_many(row, SamplingParams(temperature=5.0))
    base = draw_many(row, SamplingParams(temperature=1.0))
    assert cold[0] / 2000 > 0.99
    assert hot[0] / 2000 < 0.15 and len(hot) > 20
    # temperature 1 follows softmax: p(0) = e^2 / (e^2 + e + e^.5 + 1 + 28)
    p0 = row.softmax(-1)[0].item()
    assert abs(base[0] / 2000 - p0) < 0.04


# ---------------------------------------------------------------------------- top_k / top_p / min_p


def test_top_k_1_equals_greedy():
    logits = torch.randn(64, V) * 3
    out = sampler(logits, [state(SamplingParams(temperature=1.0, top_k=1)) for _ in range(64)])
    assert out.token_ids == logits.argmax(-1).tolist()


def test_top_k_never_outside_top_k():
    row = torch.randn(V)
    top3 = set(row.topk(3).indices.tolist())
    counts = draw_many(row, SamplingParams(temperature=3.0, top_k=3))
    assert set(counts) == top3
    # disabled values (0, -1) do sample outside the top 3
    for k in (0, -1):
        assert set(draw_many(row, SamplingParams(temperature=3.0, top_k=k))) - top3


def test_top_p_keeps_minimal_nucleus():
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(draw_many(row, SamplingParams(top_p=0.75))) == {0, 1}
    assert set(draw_many(row, SamplingParams(top_p=0.85))) == {0, 1, 2}
    assert set(draw_many(row, SamplingParams(top_p=0.4))) == {0}
    assert set(draw_many(row, SamplingParams(top_p=1.0))) == {0, 1, 2, 3}


def test_top_p_renormalizes_after_top_k():
    # after top_k=2: probs 0.625, 0.375 -> top_p=0.6 keeps only token 0
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(draw_many(row, SamplingParams(top_k=2, top_p=0.6))) == {0}
    assert set(draw_many(row, SamplingParams(top_k=2, top_p=0.7))) == {0, 1}


def test_min_p_drops_tokens_below_scaled_max():
    row = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    assert set(draw_many(row, SamplingParams(min_p=0.2))) == {0, 1, 2}  # threshold 0.1
    assert set(draw_many(row, SamplingParams(min_p=0.5))) == {0, 1}  # threshold 0.25
    assert set(draw_many(row, SamplingParams(min_p=0.0))) == {0, 1, 2, 3}


def test_stages_are_per_row():
    # one batch: row 0 top_k=1, row 1 unrestricted; the restriction must not leak across rows
    row = logits_from_probs([0.4, 0.3, 0.2, 0.1])
    n = 1000
    logits = row.expand(2 * n, -1).clone()
    states = [state(SamplingParams(top_k=1)) for _ in range(n)] + [state(SamplingParams()) for _ in range(n)]
    toks = sampler(logits, states).token_ids
    assert set(toks[:n]) == {0}
    assert set(toks[n:]) == {0, 1, 2, 3}


# ---------------------------------------------------------------------------- penalties


def _two_token_logits(a: float, b: float) -> torch.Tensor:
    x = torch.full((1, V), -10.0)
    x[0, 3], x[0, 4] = a, b  # token 3 is the repeated one, token 4 the fresh one
    return x


@pytest.mark.parametrize("a,b", [(2.0, 1.5), (-1.0, -1.5)])
def test_repetition_penalty_both_signs(a, b):
    logits = _two_token_logits(a, b)
    assert sampler(logits, [state(greedy(), output=[3])]).token_ids == [3]
    # positive logit: 2.0 / 2 = 1.0 < 1.5; negative logit: -1.0 * 2 = -2.0 < -1.5
    assert sampler(logits, [state(greedy(repetition_penalty=2.0), output=[3])]).token_ids == [4]
    # prompt tokens count too (vLLM)
    assert sampler(logits, [state(greedy(repetition_penalty=2.0), prompt=[3])]).token_ids == [4]
    # penalty < 1 encourages: makes the fresh token lose even if it led
    flipped = _two_token_logits(b, a)
    assert sampler(flipped, [state(greedy(repetition_penalty=0.5), output=[3])]).token_ids == [3]


def test_presence_penalty_output_only_and_flat():
    logits = _two_token_logits(1.0, 0.8)
    assert sampler(logits, [state(greedy(presence_penalty=0.5), output=[3])]).token_ids == [4]
    assert sampler(logits, [state(greedy(presence_penalty=0.5), prompt=[3])]).token_ids == [3]
    # presence does not scale with count: 1.0 - 0.15 = 0.85 > 0.8 even with 3 occurrences
    assert sampler(logits, [state(greedy(presence_penalty=0.15), output=[3, 3, 3])]).token_ids == [3]
    # negative presence encourages
    assert sampler(_two_token_logits(0.8, 1.0), [state(greedy(presence_penalty=-0.5), output=[3])]).token_ids == [3]


def test_frequency_penalty_scales_with_count():
    logits = _two_token_logits(1.0, 0.8)
    p = greedy(frequency_penalty=0.15)
    assert sampler(logits, [state(p, output=[3])]).token_ids == [3]  # 0.85 > 0.8
    assert sampler(logits, [state(p, output=[3, 3])]).token_ids == [4]  # 0.70 < 0.8
    assert sampler(logits, [state(p, prompt=[3, 3, 3])]).token_ids == [3]  # output only


def test_penalties_exact_values_via_logprobs():
    logits = torch.randn(1, V)
    p = greedy(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2, logprobs=V)
    out = sampler(logits, [state(p, prompt=[1], output=[2, 2, 5])])
    expect = logits[0].clone()
    for t in (1, 2, 5):
        expect[t] = expect[t] / 1.3 if expect[t] > 0 else expect[t] * 1.3
    expect[2] -= 0.4 * 2 + 0.2
    expect[5] -= 0.4 * 1 + 0.2
    lp = dict(out.logprobs[0].top)
    ref = expect.log_softmax(-1)
    assert all(abs(lp[i] - ref[i].item()) < 1e-5 for i in range(V))


def test_penalties_on_a_batch_equal_a_dense_reference():
    """Several rows, repeated tokens, different penalties (and rows without): the sparse in-place
    update must equal the textbook dense computation."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, V, generator=g)
    rows = [(1.3, 0.4, 0.2, [1, 1, 3], [3, 3, 7, 7, 7]), (1.0, 0.0, 0.0, [2], [2]),
            (0.8, -0.5, 0.0, [], [4, 4, 9]), (1.0, 0.0, 1.5, [5, 6], [6])]
    states = [state(greedy(repetition_penalty=rp, frequency_penalty=fp, presence_penalty=pp, logprobs=V),
                    prompt=prompt, output=output) for rp, fp, pp, prompt, output in rows]
    out = sampler(logits, states)
    for r, (rp, fp, pp, prompt, output) in enumerate(rows):
        expect = logits[r].clone()
        for t in set(prompt + output):
            expect[t] = expect[t] / rp if expect[t] > 0 else expect[t] * rp
        for t in set(output):
            expect[t] -= fp * output.count(t) + pp
        ref = expect.log_softmax(-1)
        lp = dict(out.logprobs[r].top)
        assert all(abs(lp[i] - ref[i].item()) < 1e-5 for i in range(V)), r
        assert out.token_ids[r] == expect.argmax().item()


def test_penalties_are_per_row():
    logits = _two_token_logits(2.0, 1.5).expand(2, -1).clone()
    out = sampler(logits, [state(greedy(repetition_penalty=2.0), output=[3]), state(greedy(), output=[3])])
    assert out.token_ids == [4, 3]


# ---------------------------------------------------------------------------- logit_bias


def test_logit_bias_forces_and_bans_per_row():
    logits = torch.randn(3, V)
    top = logits.argmax(-1).tolist()
    out = sampler(logits, [state(greedy(logit_bias={11: 100.0})), state(greedy(logit_bias={top[1]: -100.0})),
                           state(greedy())])
    second = logits[1].clone()
    second[top[1]] = float("-inf")
    assert out.token_ids == [11, second.argmax().item(), top[2]]  # the third row is untouched


def test_logit_bias_exact_values_via_logprobs_and_in_sampling():
    logits = torch.randn(1, V)
    out = sampler(logits, [state(greedy(logit_bias={3: 2.5, 9: -1.25}, logprobs=V))])
    expect = logits[0].clone()
    expect[3] += 2.5
    expect[9] -= 1.25
    lp = dict(out.logprobs[0].top)
    assert all(abs(lp[i] - expect.log_softmax(-1)[i].item()) < 1e-5 for i in range(V))
    # A sampled row: a -100 bias all but bans a token, +100 all but forces it.
    assert 0 not in draw_many(torch.zeros(V), SamplingParams(logit_bias={0: -100.0}))
    assert set(draw_many(torch.zeros(V), SamplingParams(logit_bias={5: 100.0}))) == {5}


# ---------------------------------------------------------------------------- min_tokens


def test_min_tokens_bans_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 9], logits[0, 11] = 10.0, 9.0, 1.0
    p = greedy(min_tokens=3, stop_token_ids=[9])
    assert sampler(logits, [state(p, output=[1, 2])]).token_ids == [11]  # both banned
    assert sampler(logits, [state(p, output=[1, 2, 3])]).token_ids == [EOS]  # reached
    # sampled rows are banned too, even with eos far ahead
    ps = SamplingParams(min_tokens=1, stop_token_ids=[9])
    counts = draw_many(logits[0], ps, n=500)
    assert EOS not in counts and 9 not in counts
    # multiple eos ids from the config are all banned
    logits2 = logits.clone()
    logits2[0, 12] = 9.5
    assert sampler(logits2, [state(greedy(min_tokens=1), eos=[EOS, 12])]).token_ids == [9]


def test_min_tokens_with_ignore_eos_leaves_eos_alone():
    # EOS does not end the sequence with ignore_eos, so there is nothing to ban (as vLLM)
    logits = torch.zeros(1, V)
    logits[0, EOS], logits[0, 9] = 10.0, 9.0
    p = greedy(min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert sampler(logits, [state(p)]).token_ids == [EOS]


# ---------------------------------------------------------------------------- logprobs


def test_logprobs_chosen_and_top_k():
    logits = torch.randn(4, V) * 2
    ks = [None, 0, 3, 5]
    states = [state(SamplingParams(temperature=0.7, logprobs=k)) for k in ks]
    out = sampler(logits, states)
    ref = logits.log_softmax(-1)
    assert out.logprobs[0] is None
    for i, k in enumerate(ks[1:], start=1):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert math.isclose(lp.logprob, ref[i, tok].item(), abs_tol=1e-5)  # before temperature
        assert len(lp.top) == k
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert [t for t, _ in lp.top] == ref[i].topk(k).indices.tolist()
        assert all(math.isclose(v, ref[i, t].item(), abs_tol=1e-5) for t, v in lp.top)


def test_logprobs_greedy_bf16():
    logits = torch.randn(2, V).to(torch.bfloat16)
    out = sampler(logits, [state(greedy(logprobs=1)) for _ in range(2)])
    ref = logits.float().log_softmax(-1)
    for i in range(2):
        assert out.logprobs[i].top[0][0] == out.token_ids[i]
        assert math.isclose(out.logprobs[i].logprob, ref[i].max().item(), abs_tol=1e-5)


# ---------------------------------------------------------------------------- seeds


def _run_steps(seed_row_index: int, batch: int, steps: int = 20, seed: int = 42) -> list[int]:
    """Generate `steps` tokens for a seeded row placed among `batch - 1` other rows."""
    torch.manual_seed(0)
    target_logits = torch.randn(steps, V)  # the seeded row sees the same logits in every run
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
    target = state(params)
    others = []
    for j in range(batch - 1):
        kind = j % 3
        p = (
            SamplingParams(temperature=0.8, seed=1000 + j) if kind == 0
            else SamplingParams(temperature=1.3, top_k=5) if kind == 1
            else greedy()
        )
        others.append(state(p))
    torch.manual_seed(seed_row_index + batch)  # the global RNG differs between runs
    toks = []
    for s in range(steps):
        noise = torch.randn(batch, V)
        noise[seed_row_index] = target_logits[s]
        states = others[:seed_row_index] + [target] + others[seed_row_index:]
        out = sampler(noise, states)
        toks.append(out.token_ids[seed_row_index])
        target.output_token_ids.append(toks[-1])
    return toks


def test_seeded_row_independent_of_batch():
    alone = _run_steps(0, 1)
    assert _run_steps(3, 8) == alone
    assert _run_steps(7, 8) == alone
    assert len(set(alone)) > 3  # really sampling, not collapsed


def test_different_seeds_differ():
    assert _run_steps(0, 1, seed=1) != _run_steps(0, 1, seed=2)


def test_make_generator_any_int():
    for seed in (0, -1, 2**70):
        g1, g2 = make_generator(seed), make_generator(seed)
        assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))


# ---------------------------------------------------------------------------- validate


def test_defaults_valid():
    SamplingParams().validate()
    assert not SamplingParams().greedy
    assert SamplingParams(temperature=0).greedy
    SamplingParams(seed=-5, logprobs=0, top_k=-1, n=16, min_tokens=16, max_tokens=16).validate()


@pytest.mark.parametrize(
    "field,value",
    [
        ("n", 0), ("n", 17), ("n", 1.5),
        ("max_tokens", 0), ("max_tokens", "3"),
        ("min_tokens", -1), ("min_tokens", 17),
        ("temperature", -1), ("temperature", float("nan")),
        ("top_k", -2), ("top_k", 2.5), ("top_k", True),
        ("top_p", 0.0), ("top_p", 1.01),
        ("min_p", -0.1), ("min_p", 1.5),
        ("repetition_penalty", 0.0), ("repetition_penalty", -1.0),
        ("presence_penalty", 2.5), ("presence_penalty", -2.1),
        ("frequency_penalty", 2.1), ("frequency_penalty", -3),
        ("seed", 1.5), ("seed", "7"),
        ("stop_token_ids", [-1]), ("stop_token_ids", [1.0]), ("stop_token_ids", 5),
        ("logprobs", -1), ("logprobs", 21),
        ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {"1": 1.0}), ("logit_bias", [1]),
    ],
)
def test_validate_rejects_bad_field(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError) as e:
        p.validate()
    assert str(e.value).startswith(field + " ")
    assert isinstance(e.value, SamplingParamsError) and e.value.param == field


def test_validate_message_shape():
    with pytest.raises(ValueError, match=r"^temperature must be >= 0, got -1$"):
        SamplingParams(temperature=-1).validate()
