"""The Python API: load a model once, generate many times, stream text, read the stats."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import torch

from draftwise.core.backoff import BackoffMemory
from draftwise.core.decode import GenerationStats, generate_tokens
from draftwise.core.drafter import Drafter
from draftwise.core.errors import DraftwiseError
from draftwise.core.target import Target
from draftwise.core.verify import Sampling
from draftwise.methods import FEATURE_METHODS, make_drafter
from draftwise.targets.hf import HFTarget
from draftwise.targets.load import backend_for, load_target
from draftwise.targets.models import DEFAULT_MODEL

Prompt = str | list[dict[str, str]]


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: GenerationStats


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int) -> Sampling:
    """Validate decoding parameters with messages a user can act on."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1 or max_new_tokens > 1_000_000:
        raise DraftwiseError(f"max_new_tokens must be an integer in [1, 1000000], got {max_new_tokens!r}")
    if not math.isfinite(temperature) or temperature < 0:
        raise DraftwiseError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0 < top_p <= 1):
        raise DraftwiseError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or top_k < 0:
        raise DraftwiseError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    return Sampling(float(temperature), float(top_p), int(top_k))


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` before the stop string that is complete first (the earliest end; the longest of those), and
    whether there is one: what streaming one character at a time would give, however the text was chunked."""
    found = [(i + len(s), i) for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(found)[1]], True) if found else (text, False)


def held_back(text: str, stop: list[str]) -> int:
    """How many trailing characters of `text` could begin a stop string: they are not streamed yet."""
    return max(
        (k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-k:])), default=0
    )


class TextStream:
    """Iterates over text pieces as rounds are accepted; `.generation` holds the result once exhausted."""

    def __init__(
        self, engine: Engine, token_chunks: Generator[list[int], None, None], stats: GenerationStats, stop: list[str]
    ):
        self._engine, self._chunks, self._stats, self._stop = engine, token_chunks, stats, stop
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        """Decodes incrementally (as vLLM does): each round decodes only the tokens since the last complete piece,
        with the piece before them as left context, so a long generation costs linear time, not quadratic (a full
        decode of a long output costs a sizeable share of a round). The final text is one full decode."""
        tokenizer = self._engine.tokenizer

        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        token_ids: list[int] = []
        emitted, decoded, stopped = "", "", False
        prefix, read = 0, 0  # tokens [prefix, read) give the context; [read, ...) are not emitted yet
        for chunk in self._chunks:
            token_ids.extend(chunk)
            tail = decode(token_ids[prefix:])
            if tail.endswith("\ufffd"):  # a multi-byte character is still incomplete
                continue
            text = decoded + tail[len(decode(token_ids[prefix:read])) :]
            prefix, read, decoded = read, len(token_ids), text
            text, stopped = cut_at_stop(text, self._stop)
            if stopped:
                self._stats.finish_reason = "stop"
            # a possible start of a stop string waits for the next round: where rounds end must not matter
            ready = text if stopped else text[: len(text) - held_back(text, self._stop)]
            if len(ready) > len(emitted):
                yield ready[len(emitted) :]
                emitted = ready
            if stopped:
                self.close()
                break
        if not stopped:
            text, stopped = cut_at_stop(decode(token_ids), self._stop)
            if stopped:
                self._stats.finish_reason = "stop"
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted) :]
            emitted = text
        self.generation = Generation(emitted, token_ids, self._stats)

    def close(self) -> None:
        """Stop generating (a client went away); the model is free again at once."""
        self._chunks.close()


BACKOFF_CHOICES = ("on", "off")


def choose_engine(engine: str, method: str) -> str:
    """The backend `engine` names for `method` (see targets.load.backend_for); llama.cpp exposes no hidden features,
    so the methods that read them cannot run there."""
    choice = backend_for(engine)
    if choice == "llama" and method in FEATURE_METHODS:
        raise DraftwiseError(f"method '{method}' reads the target's hidden features: use --engine lean or hf")
    return choice


class Engine:
    """A target model plus drafters, by method name. Drafters are built once and reused.

    `model` is the HF model (None when `target` runs elsewhere, as with llama.cpp); `config` its HF config.
    `backoff` ("on" | "off"): whether rounds where speculation does not pay verify the root alone (core/backoff.py)."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str = "custom",
        method: str = "pld",
        target=None,
        backoff: str = "off",
        **method_options,
    ):
        if backoff not in BACKOFF_CHOICES:
            raise DraftwiseError(f"backoff must be one of {', '.join(BACKOFF_CHOICES)}, got {backoff!r}")
        self.backoff = backoff
        self.backoff_memory = BackoffMemory()  # what earlier generations learned about when speculation pays
        self.model, self.tokenizer, self.model_name = model, tokenizer, model_name
        self.target: Target = target if target is not None else HFTarget(model)
        self.engine_name = self.target.backend  # who runs the target: hf, lean or llama
        self.default_method = method
        self._drafters: dict[str, Drafter] = {}
        self._options = {method: method_options}
        self._thread = threading.get_ident()  # the thread whose OpenMP team torch used to build the model
        self.drafter(method)  # fail early on a bad method

    @classmethod
    def load(
        cls,
        model: str = DEFAULT_MODEL,
        method: str = "pld",
        dtype: str = "auto",
        device: str = "cpu",
        engine: str = "auto",
        backoff: str = "off",
        **method_options,
    ) -> Engine:
        """Load a model and return an Engine (see Engine.generate / Engine.stream). `engine`: auto | lean | hf |
        llama; `backoff`: on | off (rounds where speculation does not pay verify the root alone, docs/backoff.md);
        `method_options` go to the method's drafter."""
        choose_engine(engine, method)  # before the slow load
        hf_model, tokenizer, target = load_target(model, engine, dtype, device)
        return cls(
            hf_model, tokenizer, model_name=model, method=method, target=target, backoff=backoff, **method_options
        )

    @property
    def dtype_name(self) -> str:
        """What the target computes in: a torch dtype, or the GGUF's own quantization under llama.cpp."""
        return self.target.compute.name

    def drafter(self, method: str) -> Drafter:
        if method not in self._drafters:
            self._drafters[method] = make_drafter(method, self, **self._options.get(method, {}))
        return self._drafters[method]

    @property
    def stop_token_ids(self) -> frozenset[int]:
        eos = (self.model.generation_config if self.model is not None else self.target.config).eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return frozenset(i for i in [*ids, self.tokenizer.eos_token_id] if i is not None)

    def encode(self, prompt: Prompt, chat_template: bool = True) -> list[int]:
        """Token ids of a prompt: a string (wrapped in the chat template unless told not to) or chat messages."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise DraftwiseError("the prompt is empty")
            messages = [{"role": "user", "content": prompt}]
        else:
            messages = prompt
            if not messages or not any(str(m.get("content", "")).strip() for m in messages):
                raise DraftwiseError("the messages are empty")
        if (chat_template or not isinstance(prompt, str)) and self.tokenizer.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self.tokenizer(
                prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in messages),
                add_special_tokens=True,
            )["input_ids"]
        if not ids:  # e.g. "\x16": byte-level vocabularies can lack a token for a control byte
            raise DraftwiseError("the prompt has no tokens: the tokenizer drops every character of it")
        if len(ids) >= self.target.max_length:
            raise DraftwiseError(
                f"the prompt is {len(ids)} tokens; the model's context window is {self.target.max_length}"
            )
        return list(ids)

    def stream(
        self,
        prompt: Prompt,
        *,
        method: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        chat_template: bool = True,
        stop: list[str] | None = None,
        drafter: Drafter | None = None,
        ignore_eos: bool = False,
    ) -> TextStream:
        """Start a generation; iterate the result for text pieces. `drafter` runs a drafter of your own (any
        draftwise.drafters.Drafter) instead of a method's; `ignore_eos` generates max_new_tokens whatever the
        model says (benchmarks: every method then times the same number of tokens)."""
        sampling = check_sampling(max_new_tokens, temperature, top_p, top_k)
        if drafter is not None and method is not None:
            raise DraftwiseError("pass a method or a drafter, not both")
        self._check_thread()
        drafter = drafter or self.drafter(method or self.default_method)
        prompt_ids = self.encode(prompt, chat_template)
        generator = torch.Generator()  # per generation, so the global RNG is never touched
        if seed is None:
            generator.seed()
        elif not isinstance(seed, int) or not -(2**63) <= seed < 2**64:
            raise DraftwiseError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
        else:
            generator.manual_seed(seed)
        self.target.feature_layers = drafter.feature_layers
        stats = GenerationStats(method=drafter.name)
        chunks = generate_tokens(
            self.target,
            drafter,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stats=stats,
            stop_token_ids=frozenset() if ignore_eos else self.stop_token_ids,
            generator=generator,
            backoff=self.backoff_memory.backoff((drafter.name, sampling)) if self.backoff == "on" else None,
        )
        return TextStream(self, chunks, stats, [s for s in (stop or []) if s])

    def _check_thread(self) -> None:
        """Warn once when torch work moves to a second thread on CPU. torch then starts a second OpenMP team,
        and with more OpenMP threads than cores libgomp stops spin-waiting in every team: tree forwards run much
        slower for the rest of the process (docs/results.md). Load and generate on one thread (as `serve` does)."""
        here = threading.get_ident()
        if here == self._thread or self.model is None or self.target.device.type != "cpu":
            return
        self._thread = here  # once: the second team exists from now on anyway
        if torch.get_num_threads() > 1:
            warnings.warn(
                "draftwise: this engine was loaded on another thread; on CPU, torch work on a second thread can "
                "make every forward ~1.7x slower (libgomp stops spin-waiting once OpenMP threads outnumber "
                "cores). Load the engine on the thread that generates.",
                RuntimeWarning,
                stacklevel=3,
            )

    def generate(self, prompt: Prompt, **kwargs) -> Generation:
        stream = self.stream(prompt, **kwargs)
        for _ in stream:
            pass
        assert stream.generation is not None
        return stream.generation


load = Engine.load  # draftwise.load(model, method=..., ...) is Engine.load
