"""Generation settings and the choice of the next token from a row of logits.

`GenerationConfig` is the one home of the per-request knobs (DESIGN §9); it validates itself and raises
ValueError naming the field. `Sampler` holds one request's random generator and token counts. `token_logprob`
gives a chosen token's log-probability and the most likely alternatives (the `logprobs` option). `StopStrings`
cuts the generated text at the first stop string, holding back any tail that could still become one, so that
nothing past a stop string is ever emitted, even when it spans several tokens.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["GenerationConfig", "Sampler", "StopStrings", "STRATEGIES", "TokenLogprob", "token_logprob"]

STRATEGIES = ("greedy", "top_k", "top_p")
MAX_STOP_STRINGS = 64
MAX_TOKENS_LIMIT = 1 << 20
MAX_LOGIT_BIAS = 1024    # tokens one request may bias
MAX_LOGPROBS = 20         # alternatives per token (vLLM's default limit; OpenAI's chat allows 20)
LOGPROB_FLOOR = -9999.0   # what a log-probability of -inf (or of a NaN logit) is reported as, as OpenAI does


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return (_is_int(v) or isinstance(v, (float, np.floating))) and math.isfinite(float(v))


@dataclass
class GenerationConfig:
    """How to generate: limits, sampling strategy, penalties, seed and stop conditions.

    strategy  'greedy' takes the most likely token; 'top_k' samples among the top_k most likely; 'top_p'
              samples from the smallest set whose probability reaches top_p (bounded by top_k when top_k > 0).
              temperature 0 makes either sampling strategy greedy.
    min_p     drops tokens whose probability is below min_p times the most likely one's (0 disables).
    repetition_penalty  divides positive (multiplies negative) logits of tokens already in the sequence;
              presence_penalty / frequency_penalty subtract a constant / a per-occurrence amount from the
              logits of tokens already in the sequence. The sequence is the prompt and the output so far.
    seed      makes sampling reproducible (None: fresh entropy each request).
    stop      strings that end generation; the text stops before the first of them.
    stop_token_ids  tokens that end generation (besides the model's end-of-generation tokens unless
              ignore_eos).
    logprobs  None, or report each generated token's log-probability with the `logprobs` (0-20) most likely
              tokens' (see `token_logprob`).
    prompt_logprobs  None, or the same for each prompt token after the first (given the tokens before it).
    logit_bias  {token id: bias in [-100, 100]} added to those tokens' logits before any choice (OpenAI's
              logit_bias: -100 in effect bans a token, 100 forces it); ids past the vocabulary are ignored.
    """

    max_tokens: int = 128
    strategy: str = "greedy"
    temperature: float = 1.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise bad("max_tokens", f"must be an integer in [1, {MAX_TOKENS_LIMIT}]")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"must be one of {', '.join(STRATEGIES)}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise bad("temperature", "must be a number in [0, 100]")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "must be an integer >= 0 (0 disables it)")
        if self.strategy == "top_k" and self.top_k < 1:
            raise bad("top_k", "must be >= 1 with strategy 'top_k'")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be a number in (0, 1]")
        if not _is_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 100.0:
            raise bad("repetition_penalty", "must be a number in (0, 100]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be a number in [-2, 2]")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 1 << 64):
            raise bad("seed", "must be None or an integer in [0, 2**64)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be a string or a list of non-empty strings")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        self.stop = list(self.stop)
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be a list of token ids (integers >= 0)")
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise bad("ignore_eos", "must be a bool")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise bad("logit_bias", f"must be a mapping of at most {MAX_LOGIT_BIAS} token ids to biases")
            for t, v in self.logit_bias.items():
                if not _is_int(t) or t < 0:
                    raise bad("logit_bias", f"token id {t!r} is not an integer >= 0")
                if not _is_number(v) or not -100.0 <= float(v) <= 100.0:
                    raise bad("logit_bias", f"the bias of token {t} must be a number in [-100, 100], not {v!r}")
            self.logit_bias = {int(t): float(v) for t, v in self.logit_bias.items()} or None
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                if not _is_int(value) or not 0 <= value <= MAX_LOGPROBS:
                    raise bad(name, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
                setattr(self, name, int(value))
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)
        self.min_p = float(self.min_p)
        self.repetition_penalty = float(self.repetition_penalty)
        self.presence_penalty = float(self.presence_penalty)
        self.frequency_penalty = float(self.frequency_penalty)

    @classmethod
    def from_fields(cls, config: GenerationConfig | None = None, **fields: Any) -> GenerationConfig:
        """`config` (or the defaults) with `fields` replaced; unknown field names raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown generation option (known: {', '.join(sorted(known))})")
        if config is None:
            return cls(**fields)
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"config: expected a GenerationConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **fields) if fields else config

    @property
    def greedy(self) -> bool:
        return self.strategy == "greedy" or self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether penalties or a logit bias change the logits before the choice."""
        return self.penalized or bool(self.logit_bias)


class Sampler:
    """Chooses tokens for one request.

    Either feed it the sequence each time (`sample(logits, tokens)`, tokens = prompt + output so far, as the
    engine does) or keep it up to date with `accept(token)` after each choice (`sample(logits)`). Penalties
    apply to every token of the sequence, prompt included (as llama.cpp's penalty window does).
    """

    def __init__(self, config: GenerationConfig, prompt_tokens: Iterable[int] = ()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self._counts: dict[int, int] = {}
        self._n_counted = 0
        if config.penalized:
            for t in prompt_tokens:
                self.accept(t)

    def accept(self, token: int) -> None:
        if self.config.penalized:
            token = int(token)
            self._counts[token] = self._counts.get(token, 0) + 1
            self._n_counted += 1

    @property
    def takes_argmax(self) -> bool:
        """Whether the row's argmax alone decides the token (greedy, no penalties or bias): see `sample`."""
        return self.config.greedy and not self.config.adjusts_logits

    def sample(self, logits: np.ndarray, tokens: Seq[int] | None = None, argmax: int | None = None) -> int:
        """The next token from a row of logits (n_vocab,); the row is not modified. `tokens`, when given,
        is the whole sequence so far (for the penalties). `argmax`, when given, is the row's numpy.argmax
        (the core finds it during the forward step): where `takes_argmax`, it is the answer."""
        c = self.config
        if argmax is not None and self.takes_argmax:
            return int(argmax)
        if c.penalized:
            if tokens is not None:
                if len(tokens) < self._n_counted:  # not a continuation of what was counted
                    self._counts.clear()
                    self._n_counted = 0
                for t in tokens[self._n_counted:]:
                    self.accept(t)
            logits = self._penalize(np.array(logits, dtype=np.float32))
        if c.logit_bias:
            logits = np.array(logits, dtype=np.float32, copy=not c.penalized)  # (the penalized row is a copy)
            ids = np.fromiter(c.logit_bias, dtype=np.int64, count=len(c.logit_bias))
            keep = ids < logits.size
            logits[ids[keep]] += np.fromiter(c.logit_bias.values(), dtype=np.float32, count=len(ids))[keep]
        if c.greedy:
            return int(np.argmax(logits))
        return self._sample(logits)

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        c = self.config
        if not self._counts:
            return logits
        ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
        ids_ok = ids < logits.size
        ids = ids[ids_ok]
        if c.repetition_penalty != 1.0:
            v = logits[ids]
            logits[ids] = np.where(v > 0, v / c.repetition_penalty, v * c.repetition_penalty)
        if c.presence_penalty or c.frequency_penalty:
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))[ids_ok]
            logits[ids] -= c.presence_penalty + c.frequency_penalty * counts
        return logits

    def _sample(self, logits: np.ndarray) -> int:
        """A token drawn from softmax(logits / temperature) restricted to the top_k, then to the nucleus (the most
        likely tokens whose probability reaches top_p), then to those at least min_p times the most likely.

        Without a nucleus (OpenAI's default top_p 1) nothing is sorted: a uniform draw over the probabilities'
        running sum, found block by block. A nucleus is looked for among the most likely 256 candidates, then 2,048,
        then 16,384, and only then all of them. For a 49,152-token row: about 0.05 ms without a nucleus, 0.1-0.25
        ms with one (sorting the whole row took 4.5 ms)."""
        c = self.config
        x = np.asarray(logits, dtype=np.float32)
        ids = None  # candidate j is token ids[j] (top_k), or token j
        if 0 < c.top_k < x.size:
            ids = np.argpartition(x, x.size - c.top_k)[x.size - c.top_k:]
            x = x[ids]
        with np.errstate(invalid="ignore", over="ignore"):  # float32, in place: numpy's float64 exp is scalar code
            p = x - x.max()
            p /= np.float32(c.temperature)
            np.exp(p, out=p)
        if c.strategy != "top_p" or c.top_p >= 1.0:
            if c.min_p > 0.0:  # (the most likely candidate's p is 1)
                p[p < c.min_p] = 0.0
            j = _draw(p, self.rng.random())
            return int(ids[j]) if ids is not None else j
        total = float(p.sum(dtype=np.float64))
        if not (math.isfinite(total) and total > 0.0):
            raise ValueError("sampling: the logits are not finite numbers")
        # the nucleus lies among the candidates with p >= 1e-8 whenever they hold top_p of the mass: leave out the
        # rest, often thousands of equal tiny (or underflowed) values that make a partition slow
        pool = np.flatnonzero(p >= np.float32(1e-8))
        if pool.size == p.size or float(p[pool].sum(dtype=np.float64)) < c.top_p * total:
            pool = np.arange(p.size)
        head = min(pool.size, 256)
        while True:  # the most likely `head` candidates, most likely first, until they hold the nucleus
            order = pool[np.argpartition(p[pool], pool.size - head)[pool.size - head:]] if head < pool.size else pool
            order = order[np.argsort(-p[order], kind="stable")]
            q = p[order].astype(np.float64) / total
            n = int(np.searchsorted(np.cumsum(q), c.top_p)) + 1
            if n <= q.size or head == pool.size:
                break
            head = min(pool.size, head * 8)
        n = min(n, q.size)
        if c.min_p > 0.0:
            n = min(n, max(1, int(np.count_nonzero(q[:n] >= c.min_p * q[0]))))
        j = int(order[self.rng.choice(n, p=q[:n] / q[:n].sum())])
        return int(ids[j]) if ids is not None else j


_DRAW_BLOCK = 1024


def _draw(p: np.ndarray, u: float) -> int:
    """The index j where u * sum(p) falls in the running sum of p (float32 weights, float64 sums): a draw with
    probability p[j] / sum(p) for u uniform in [0, 1). The sums of 1,024-element blocks find the block, then one
    block's running sum the index (numpy's cumsum over a whole 49,152-token row takes 0.4 ms)."""
    starts = np.arange(0, p.size, _DRAW_BLOCK)
    cum = np.cumsum(np.add.reduceat(p, starts, dtype=np.float64))
    total = float(cum[-1])
    if not (math.isfinite(total) and total > 0.0):
        raise ValueError("sampling: the logits are not finite numbers")
    target = min(u * total, math.nextafter(total, 0.0))  # below the total: in a block that holds some mass
    b = int(np.searchsorted(cum, target, side="right"))
    if b:
        target -= float(cum[b - 1])
    block = p[b * _DRAW_BLOCK:(b + 1) * _DRAW_BLOCK]
    j = min(int(np.searchsorted(np.cumsum(block, dtype=np.float64), target, side="right")), block.size - 1)
    while block[j] == 0.0 and j > 0:  # (the block's sums rounded apart: step back to a token that can be drawn)
        j -= 1
    return b * _DRAW_BLOCK + j


@dataclass
class TokenLogprob:
    """A generated token's log-probability, and the most likely tokens' as (token id, log-probability), most
    likely first (ties: lower id first). The chosen token may or may not be among them."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def token_logprob(logits: np.ndarray, token: int, top: int = 0) -> TokenLogprob:
    """`token`'s log-probability under the model: the log-softmax of the raw logits row (before temperature,
    penalties and truncation, as vLLM reports by default); with the `top` most likely tokens'. A log-probability
    below LOGPROB_FLOOR (or NaN) is reported as LOGPROB_FLOOR. About 0.1 ms for a 49,152-token row: float32
    exponentials (numpy's are vectorized, its float64 ones are not) summed in float64, one partition for the top."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max()
    with np.errstate(invalid="ignore", over="ignore"):
        lse = float(m) + math.log(float(np.exp(x - m).sum(dtype=np.float64)))

    def logprob(v: float) -> float:
        lp = float(v) - lse
        return lp if lp >= LOGPROB_FLOOR else LOGPROB_FLOOR  # (NaN compares false)

    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(int(top), x.size)
        xs = np.where(np.isnan(x), -np.inf, x) if np.isnan(m) else x
        kth = np.partition(xs, x.size - k)[x.size - k]  # the k-th largest value
        above = np.flatnonzero(xs > kth)
        ids = np.concatenate([above, np.flatnonzero(xs == kth)[:k - above.size]])  # ties: the lower ids
        ids = ids[np.lexsort((ids, -xs[ids]))]
        best = [(int(i), logprob(x[i])) for i in ids]
    return TokenLogprob(int(token), logprob(x[int(token)]), best)


class StopStrings:
    """Incremental stop-string matching over streamed text.

    feed(delta) returns (text safe to emit now, stopped). Text that could be the start of a stop string is
    held back until it is decided; once a stop string appears, everything from its start on is dropped.
    """

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return delta, False
        text = self._held + delta
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return text[:cut], True
        keep = 0  # longest tail of text that is a proper prefix of a stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back text, at the end of generation without a stop."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out
