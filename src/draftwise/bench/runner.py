"""Running methods over questions: draftwise's own methods through the engine, peers through their own code.

Every method is a runner, `(messages, settings, seed) -> turn`, timed by the bench's own wall clock around the
whole call (tokenising and detokenising included), so engine methods and peers are measured alike. A peer is
one function in PEERS.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from transformers import GenerationConfig

from draftwise.bench.datasets import Question
from draftwise.core.errors import DraftwiseError
from draftwise.engine import Engine
from draftwise.methods import METHODS
from draftwise.targets.llama_cpp import import_llama_cpp, silence_llama_logs
from draftwise.targets.load import llama_parts
from draftwise.targets.models import model_gguf

Messages = list[dict[str, str]]
WARMUP_TOKENS = 16  # enough to touch every code path (prefill, drafting, verification) once
# A fixed short prompt, so a question the model cannot take (too long) is not mistaken for a broken method.
WARMUP_PROMPT = "Repeat after me: the quick brown fox jumps over the lazy dog, the quick brown fox."


@dataclass(frozen=True)
class Settings:
    """What every method gets alike."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False  # every method generates max_new_tokens: the same tokens timed at any temperature


Runner = Callable[[Messages, Settings, int], dict]


def turn_record(
    text: str,
    token_ids: list[int],
    wall_s: float,
    margins: list[float] | None = None,
    stats: dict | None = None,
    ttft_s: float | None = None,
) -> dict:
    return {
        "new_tokens": len(token_ids),
        "wall_s": wall_s,
        "ttft_s": ttft_s,
        "token_ids": token_ids,
        "text": text,
        "margins": [round(m, 5) for m in margins] if margins is not None else None,
        "stats": stats,
    }


def run_engine(engine: Engine, messages: Messages, settings: Settings, seed: int) -> dict:
    start = time.perf_counter()
    generation = engine.generate(
        messages,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        seed=seed,
        ignore_eos=settings.ignore_eos,
    )
    wall_s = time.perf_counter() - start
    stats = generation.stats
    return turn_record(
        generation.text,
        generation.token_ids,
        wall_s,
        stats.margins,
        {**stats.summary(), "accepted": stats.accepted, "round_draft_calls": stats.round_draft_calls},
        ttft_s=stats.first_token_s,
    )


def run_hf_generate(engine: Engine, messages: Messages, settings: Settings, seed: int, **generate_options) -> dict:
    """transformers' own `model.generate` on the same weights and chat template."""
    start = time.perf_counter()
    prompt_ids = engine.encode(messages)
    stop = sorted(engine.stop_token_ids)
    # Explicit neutral values: None would be filled from the model's generation_config, whose penalties or
    # sampling defaults draftwise does not apply, and the peers must decode the same distribution.
    sampling = settings.temperature > 0
    warpers = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k}
    config = GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        **(warpers if sampling else {}),
        num_beams=1,
        min_length=0,
        min_new_tokens=settings.max_new_tokens if settings.ignore_eos else 0,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        typical_p=1.0,
        eos_token_id=stop,
        pad_token_id=stop[0],
        # the step logits are kept (not copied) so that greedy peers have top-2 margins: `hf-pld` is checked
        # against `hf`, and a near-tie must be told from a bug
        output_logits=not sampling,
        return_dict_in_generate=True,
        **generate_options,
    )
    input_ids = torch.tensor([prompt_ids], device=engine.target.device)
    torch.manual_seed(seed)
    with torch.inference_mode():
        output = engine.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
    token_ids = output.sequences[0, len(prompt_ids) :].tolist()
    text = engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    wall_s = time.perf_counter() - start
    margins = None
    if not sampling and output.logits:
        top = torch.cat(output.logits).float().topk(2, dim=-1).values
        margins = (top[:, 0] - top[:, 1]).tolist()
    return turn_record(text, token_ids, wall_s, margins)


@functools.cache
def _llama_cpp(model_name: str, prompt_lookup: bool):
    """llama-cpp-python's own `Llama` on the model's GGUF, as its users run it (all cores, same context)."""
    llama_cpp = import_llama_cpp()
    silence_llama_logs(llama_cpp)
    gguf = model_gguf(model_name)
    if gguf is None:
        raise DraftwiseError(f"llama.cpp needs a GGUF model; '{model_name}' is not one")
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # the optional [llama] extra

    draft = LlamaPromptLookupDecoding(num_pred_tokens=10) if prompt_lookup else None
    threads = os.cpu_count() or 1
    return llama_cpp.Llama(
        str(gguf), n_ctx=8192, n_batch=512, n_threads=threads, n_threads_batch=threads, draft_model=draft, verbose=False
    )


def run_llama_cpp(
    engine: Engine, messages: Messages, settings: Settings, seed: int, prompt_lookup: bool = False
) -> dict:
    """llama-cpp-python's `Llama.generate` on the same token ids (the chat template is applied by draftwise)."""
    start = time.perf_counter()
    prompt_ids = engine.encode(messages)
    llm = _llama_cpp(engine.model_name, prompt_lookup)
    llm.reset()  # no prefix reuse from the last prompt: every method prefills in full
    llm.set_seed(seed)
    stop = engine.stop_token_ids
    token_ids: list[int] = []
    ttft_s = None
    warpers = dict(top_k=settings.top_k, top_p=settings.top_p, min_p=0.0) if settings.temperature > 0 else {}
    for token in llm.generate(prompt_ids, temp=settings.temperature, repeat_penalty=1.0, **warpers):
        ttft_s = ttft_s or time.perf_counter() - start
        token_ids.append(int(token))
        if (token in stop and not settings.ignore_eos) or len(token_ids) >= settings.max_new_tokens:
            break
    text = engine.tokenizer.decode(token_ids, skip_special_tokens=True)
    return turn_record(text, token_ids, time.perf_counter() - start, ttft_s=ttft_s)


# Methods outside draftwise's engine: name -> function(engine, messages, settings, seed) -> turn record.
# The engine is the plain `ar` one: peers use its model, tokenizer, chat template and stop tokens.
PEERS: dict[str, Callable[..., dict]] = {
    "hf": run_hf_generate,
    "hf-pld": partial(run_hf_generate, prompt_lookup_num_tokens=10),
    "llama.cpp": run_llama_cpp,
    "llama.cpp-pld": partial(run_llama_cpp, prompt_lookup=True),
}
ENGINE_SUFFIXES = ("@hf", "@llama")  # `pld@llama`: a draftwise method on another engine than the bench's


def known_methods() -> list[str]:
    return [*METHODS, *PEERS, *(m + suffix for suffix in ENGINE_SUFFIXES for m in METHODS)]


def build_runners(
    names: list[str], model, tokenizer, model_name: str, options: dict[str, dict], target=None
) -> tuple[dict[str, Runner], dict[str, str]]:
    """A runner per method sharing one set of weights (and `target`, the bench's engine; transformers when
    None), and the reason for each method that cannot be built."""
    baseline = Engine(model, tokenizer, model_name=model_name, method="ar", target=target)
    llama_target = None
    runners: dict[str, Runner] = {}
    unavailable: dict[str, str] = {}
    for name in names:
        method, _, engine_name = name.partition("~")[0].partition("@")
        try:
            if name in PEERS:
                runners[name] = partial(PEERS[name], baseline)
            elif name == "ar":
                runners[name] = partial(run_engine, baseline)
            elif engine_name == "llama":
                llama_target = llama_target or llama_parts(model_name)[1]  # one llama.cpp context for all
                engine = Engine(
                    None,
                    tokenizer,
                    model_name=model_name,
                    method=method,
                    target=llama_target,
                    **options.get(name, options.get(method, {})),
                )
                runners[name] = partial(run_engine, engine)
            else:
                engine = Engine(
                    model,
                    tokenizer,
                    model_name=model_name,
                    method=method,
                    target=None if engine_name == "hf" else target,
                    **options.get(name, options.get(method, {})),
                )
                runners[name] = partial(run_engine, engine)
        except Exception as exc:  # a method that cannot run is reported, not dropped
            unavailable[name] = describe(exc)
    return runners, unavailable


def describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, DraftwiseError) else f"{type(exc).__name__}: {exc}"


def reset_peak_memory() -> None:
    """Start a new peak: Linux lets a process reset its high-water mark (VmHWM) through clear_refs."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float | None]:
    """Peak resident memory (MiB) since the last reset on Linux, since the process started elsewhere; and the
    peak GPU memory allocated by torch when a GPU is in use."""
    try:
        rss = next(
            int(line.split()[1]) / 1024
            for line in Path("/proc/self/status").read_text().splitlines()
            if line.startswith("VmHWM:")
        )
    except (OSError, StopIteration):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        rss = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {"peak_rss_mb": rss, "peak_gpu_mb": gpu}


def run_question(runner: Runner, question: Question, settings: Settings, seed: int) -> tuple[list[dict], dict]:
    """All turns of a question as one conversation: turn k is asked after the method's own earlier answers."""
    messages: Messages = []
    turns = []
    reset_peak_memory()
    for content in question.turns:
        messages.append({"role": "user", "content": content})
        turn = runner(list(messages), settings, seed)
        turns.append(turn)
        messages.append({"role": "assistant", "content": turn["text"]})
    return turns, peak_memory()


def warm_up(runners: dict[str, Runner], settings: Settings, seed: int) -> dict[str, str]:
    """One short generation per method before timing; returns the methods that failed, with the reason."""
    short = replace(settings, max_new_tokens=min(settings.max_new_tokens, WARMUP_TOKENS))
    failed = {}
    for name, runner in runners.items():
        try:
            runner([{"role": "user", "content": WARMUP_PROMPT}], short, seed)
        except Exception as exc:
            failed[name] = describe(exc)
    return failed


def run_benchmark(
    runners: dict[str, Runner],
    questions: list[Question],
    settings: Settings,
    seed: int,
    on_record: Callable[[dict], None] = lambda record: None,
) -> list[dict]:
    """Every question through every method. The method order rotates per question, so slow drift (thermal,
    other load) and order effects hit all methods alike. Every method samples question i with seed + i."""
    names = list(runners)
    records = []
    for index, question in enumerate(questions):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            record = {
                "index": index,
                "question_id": question.question_id,
                "category": question.category,
                "method": name,
                "error": None,
                "verdict": None,
                "turns": [],
            }
            try:
                record["turns"], memory = run_question(runners[name], question, settings, seed + index)
                record.update(memory)
            except Exception as exc:
                record["error"] = describe(exc)
            records.append(record)
            on_record(record)
    return records
