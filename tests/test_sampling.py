"""GenerationConfig validation, the Sampler's strategies and penalties, token log-probabilities, and stop strings
across deltas."""
from __future__ import annotations

import numpy as np
import pytest

from realizar.sampling import LOGPROB_FLOOR, GenerationConfig, Sampler, StopStrings, _draw, token_logprob


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", 1.5), ("max_tokens", True), ("strategy", "beam"), ("temperature", -0.1),
    ("temperature", float("nan")), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1),
    ("repetition_penalty", 0.0), ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("seed", -1),
    ("seed", "1"), ("stop", [""]), ("stop", [1]), ("stop", ["x"] * 65), ("stop_token_ids", [-1]),
    ("ignore_eos", "yes"), ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 2.0),
    ("logit_bias", {"1": 2.0}), ("logit_bias", {1: 101}), ("logit_bias", {-1: 1}), ("logit_bias", [1]),
    ("logit_bias", {1: float("nan")}), ("logit_bias", {1: True}), ("logit_bias", dict.fromkeys(range(1025), 1.0)),
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        GenerationConfig(**{field: value})


def test_top_k_strategy_needs_k():
    with pytest.raises(ValueError, match="top_k"):
        GenerationConfig(strategy="top_k", top_k=0)


def test_from_fields():
    base = GenerationConfig(max_tokens=5)
    assert GenerationConfig.from_fields(base) is base
    assert GenerationConfig.from_fields(base, seed=3).seed == 3
    assert GenerationConfig.from_fields(None, stop="x").stop == ["x"]
    with pytest.raises(ValueError, match="^bogus:"):
        GenerationConfig.from_fields(None, bogus=1)


def _logits(n=1000, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32) * 3


def test_greedy_is_argmax_and_temperature_zero_is_greedy():
    x = _logits()
    assert Sampler(GenerationConfig()).sample(x) == int(np.argmax(x))
    assert Sampler(GenerationConfig(strategy="top_p", temperature=0.0, seed=1)).sample(x) == int(np.argmax(x))


def test_top_k_stays_in_the_top_k():
    x = _logits()
    top = set(np.argsort(-x)[:5].tolist())
    s = Sampler(GenerationConfig(strategy="top_k", top_k=5, temperature=5.0, seed=0))
    seen = {s.sample(x) for _ in range(300)}
    assert seen <= top and len(seen) > 1


def test_top_p_keeps_the_nucleus():
    x = np.full(100, -50.0, dtype=np.float32)
    x[[3, 7, 9]] = [2.0, 1.0, 0.0]  # probabilities ~0.665, 0.245, 0.090
    s = Sampler(GenerationConfig(strategy="top_p", top_p=0.8, top_k=0, seed=0))
    assert {s.sample(x) for _ in range(300)} == {3, 7}
    s = Sampler(GenerationConfig(strategy="top_p", top_p=0.5, top_k=0, seed=0))
    assert {s.sample(x) for _ in range(50)} == {3}


def test_min_p():
    x = np.full(100, -50.0, dtype=np.float32)
    x[[3, 7, 9]] = [2.0, 1.0, 0.0]
    s = Sampler(GenerationConfig(strategy="top_k", top_k=10, min_p=0.3, seed=0))  # 9 is 0.135 of the top
    assert {s.sample(x) for _ in range(300)} == {3, 7}


def test_sampling_follows_the_distribution():
    x = np.log(np.array([0.5, 0.3, 0.2], dtype=np.float32))
    s = Sampler(GenerationConfig(strategy="top_p", top_p=1.0, seed=42))
    counts = np.bincount([s.sample(x) for _ in range(4000)], minlength=3) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.2], atol=0.03)


def _vocab_row(probs: dict[int, float], n: int = 49152) -> np.ndarray:
    """Logits of a model-sized vocabulary: the given tokens' probabilities, about 1e-12 for each other one."""
    x = np.full(n, -40.0, dtype=np.float32)
    for t, pr in probs.items():
        x[t] = np.log(pr)
    return x


def test_sampling_a_full_vocabulary_follows_the_distribution():
    # OpenAI's defaults (top_p 1, no top_k): the draw over the running sum, block by block, across blocks
    probs = {5: 0.4, 2047: 0.3, 40000: 0.2, 49151: 0.1}
    x = _vocab_row(probs)
    s = Sampler(GenerationConfig(strategy="top_p", top_p=1.0, top_k=0, seed=3))
    draws = [s.sample(x) for _ in range(4000)]
    assert set(draws) <= set(probs)
    for t, pr in probs.items():
        assert abs(draws.count(t) / 4000 - pr) < 0.03, t
    # min_p without a nucleus: only the tokens at least min_p times as likely as the most likely one
    s = Sampler(GenerationConfig(strategy="top_p", top_p=1.0, top_k=0, min_p=0.3, seed=3))
    assert {s.sample(x) for _ in range(500)} == {5, 2047, 40000}


def test_a_nucleus_wider_than_the_first_head():
    # 1,000 equally likely tokens hold 0.9 of the mass: the nucleus at 0.8 is ~889 of them, beyond the first 256
    x = np.full(49152, -40.0, dtype=np.float32)
    top = np.arange(0, 49152, 49)[:1000]
    x[top] = 0.0
    x[7] = np.log(0.1 * 1000 / 0.9) - 0.0  # one token with 0.1 of the mass: the most likely, always in
    s = Sampler(GenerationConfig(strategy="top_p", top_p=0.8, top_k=0, seed=4))
    seen = {s.sample(x) for _ in range(3000)}
    assert 7 in seen and seen <= set(top.tolist()) | {7} and len(seen) > 400


def test_draw_lands_on_a_drawable_token():
    p = np.zeros(5000, dtype=np.float32)
    p[[10, 1500, 2047]] = [1.0, 2.0, 1.0]
    assert _draw(p, 0.0) == 10
    assert _draw(p, 0.3) == 1500
    assert _draw(p, np.nextafter(1.0, 0.0)) == 2047  # never the zeros past the last one
    with pytest.raises(ValueError, match="not finite"):
        Sampler(GenerationConfig(strategy="top_p", top_p=1.0, seed=1)).sample(np.array([0.0, np.nan], np.float32))


def test_logit_bias_bans_and_forces_tokens():
    x = np.array([1.0, 3.0, 2.0, 0.5], dtype=np.float32)
    assert Sampler(GenerationConfig(logit_bias={1: -100})).sample(x) == 2
    assert Sampler(GenerationConfig(logit_bias={3: 100, 99: 5})).sample(x) == 3  # ids past the vocabulary: ignored
    assert list(x) == [1.0, 3.0, 2.0, 0.5]  # the caller's row is untouched
    assert not Sampler(GenerationConfig(logit_bias={1: -100})).takes_argmax  # the row's argmax is not the answer
    s = Sampler(GenerationConfig(strategy="top_p", top_p=1.0, temperature=1.0, logit_bias={1: -100, 2: -100}, seed=2))
    assert {s.sample(x) for _ in range(200)} == {0, 3}
    # with a penalty too: both change the same copy of the row
    s = Sampler(GenerationConfig(logit_bias={1: -100}, repetition_penalty=4.0), prompt_tokens=[2])
    assert s.sample(x) == 0 and list(x) == [1.0, 3.0, 2.0, 0.5]


def test_seed_reproducible_and_independent_per_request():
    x = _logits()
    cfg = GenerationConfig(strategy="top_k", top_k=50, temperature=2.0, seed=7)
    a = [Sampler(cfg).sample(x) for _ in range(1)] + [0]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1.sample(x) for _ in range(20)] == [s2.sample(x) for _ in range(20)]
    assert a[0] == Sampler(cfg).sample(x)


def test_repetition_penalty():
    x = np.array([2.0, 1.9, -1.0, -1.1], dtype=np.float32)
    s = Sampler(GenerationConfig(repetition_penalty=2.0), prompt_tokens=[0, 2])
    assert s.sample(x) == 1  # 2.0 / 2 < 1.9
    assert x[0] == 2.0  # the caller's row is untouched
    s = Sampler(GenerationConfig(repetition_penalty=2.0))
    assert s.sample(x, tokens=[0]) == 1  # the engine's form: the whole sequence each time
    assert s.sample(x, tokens=[0, 1]) == 0  # both penalized: 1.0 > 0.95


def test_presence_and_frequency_penalties():
    x = np.array([1.0, 0.9, 0.0], dtype=np.float32)
    s = Sampler(GenerationConfig(presence_penalty=0.2))
    s.accept(0)
    assert s.sample(x) == 1
    s = Sampler(GenerationConfig(frequency_penalty=0.06))
    s.accept(0)
    assert s.sample(x) == 0  # 1.0 - 0.06 > 0.9
    s.accept(0)
    assert s.sample(x) == 1  # 1.0 - 0.12 < 0.9


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.sum(np.exp(x - x.max()))))


def test_token_logprob_is_the_log_softmax_with_the_top_alternatives():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(49152) * 4).astype(np.float32)
    ref = _log_softmax(logits)
    assert abs(np.logaddexp.reduce(ref)) < 1e-9
    for token in (0, int(np.argmax(logits)), 12345):
        lp = token_logprob(logits, token, 5)
        assert lp.token_id == token and lp.logprob == pytest.approx(ref[token], abs=1e-6)
        want = np.argsort(-ref, kind="stable")[:5]
        assert [t for t, _ in lp.top] == want.tolist()
        np.testing.assert_allclose([v for _, v in lp.top], ref[want], rtol=0, atol=1e-6)
    assert token_logprob(logits, 7).top == []
    assert len(token_logprob(logits[:3], 0, 20).top) == 3  # no more alternatives than tokens
    flat = np.zeros(1000, dtype=np.float32)
    flat[[3, 500]] = 1.0
    assert [t for t, _ in token_logprob(flat, 0, 4).top] == [3, 500, 0, 1]  # ties: the lower ids first


def test_token_logprob_ties_and_non_finite_logits():
    x = np.array([1.0, 3.0, 3.0, -np.inf, 2.0], dtype=np.float32)
    lp = token_logprob(x, 3, 3)
    assert lp.logprob == LOGPROB_FLOOR  # -inf is reported as OpenAI does, never as a non-JSON number
    assert [t for t, _ in lp.top] == [1, 2, 4]  # equal logits: the lower id first
    assert lp.top[0][1] == lp.top[1][1] == pytest.approx(_log_softmax(x)[1])
    nan = token_logprob(np.array([0.0, np.nan, 1.0], dtype=np.float32), 0, 2)
    assert nan.logprob == LOGPROB_FLOOR and all(v == LOGPROB_FLOOR for _, v in nan.top)
    assert [t for t, _ in nan.top] == [2, 0]  # a NaN logit is never among the most likely


def test_stop_strings_across_deltas():
    st = StopStrings(["END", "##"])
    out = []
    for d in ["Hello E", "N", "and more", " E", "ND tail"]:
        text, stopped = st.feed(d)
        out.append(text)
        if stopped:
            break
    assert "".join(out) == "Hello ENand more "
    assert stopped and st.feed("x") == ("", True)


def test_stop_strings_hold_back_only_possible_prefixes():
    st = StopStrings(["abc"])
    assert st.feed("xxa") == ("xx", False)
    assert st.feed("b") == ("", False)
    assert st.feed("d") == ("abd", False)
    assert st.feed("ab") == ("", False)
    assert st.flush() == "ab"


def test_no_stop_strings_pass_through():
    st = StopStrings([])
    assert st.feed("anything") == ("anything", False)
