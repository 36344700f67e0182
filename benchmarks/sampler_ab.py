"""Sampling's code at --before (`torch.multinomial` draws, an acceptance loop that renormalised the residual after
every rejected child, top-p by sorting the vocabulary) against today's (an inverse-CDF draw, `verify.sample_token`,
a residual whose total is tracked, top-p sorting only the likeliest tokens, only the rows on the acceptance walk),
in one process. First the time of one draw over the vocabulary right after a target forward, then decoding
(--temperature, --top-p), every method on each variant in turn per question. The two consume the generator
differently, so the same seed gives different (equally distributed) text: compare tokens/s, not tokens, and expect
the spread of text-dependent speed on top.

    python benchmarks/sampler_ab.py --questions 4 --out benchmarks/runs/sampler-ab.json
    python benchmarks/sampler_ab.py --questions 4 --temperature 0.7 --top-p 0.95 \
        --out benchmarks/runs/sampler-ab-t07-p095.json
    python benchmarks/sampler_ab.py --questions 4 --temperature 0.7 --top-p 0.95 --before d1aa515 --before-as-is \
        --methods ar,eagle,pld,ltd --out benchmarks/runs/sampler-ab-nucleus.json  # top-p rescaled, not re-softmaxed
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

import draftwise
from draftwise import decode, verify
from draftwise.bench.datasets import load_questions
from draftwise.tree import DraftTree

sys.path.insert(0, str(Path(__file__).parent))
from kernel_ab import ab_parser, interleaved_decode, module_at  # noqa: E402


def multinomial(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    return int(torch.multinomial(weights, 1, generator=generator))


def every_row(accept):
    """`accept` from a verify.py whose acceptance took every node's row at once: decoding now hands over a function
    of the node, and this computes it for all of them (one call per node, where decoding then made one in all)."""
    return lambda tree, rows, generator=None: accept(tree, torch.stack([rows(i) for i in range(tree.size)]), generator)


@contextlib.contextmanager
def sampling_code(accept, draw, probs):
    """Decoding verifies with `accept` on `probs`, and sampled drafting (`dynamic_tree.sample_chain`) draws with
    `draw` from `probs`."""
    kept = decode.accept_sampling, verify.sample_token, verify.target_probs  # decoding's rows come through verify
    decode.accept_sampling, verify.sample_token, verify.target_probs = accept, draw, probs
    try:
        yield
    finally:
        decode.accept_sampling, verify.sample_token, verify.target_probs = kept


def draw_after_forward_us(target, draw, repeats: int = 40) -> float:
    """Median µs of one draw from the target's next-token distribution right after a one-node forward."""
    generator, probe, root, times = torch.Generator().manual_seed(0), torch.tensor([1, 2]), DraftTree.root_only(3), []
    for _ in range(repeats):
        target.prefill(probe)
        probs = target.forward_tree(root).logits[0].softmax(-1)
        start = time.perf_counter()
        draw(probs, generator)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = ab_parser(__doc__.splitlines()[0])
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--before", default="e48e54e", help="commit whose verify.py is the baseline")
    parser.add_argument(
        "--before-as-is",
        action="store_true",
        help="the baseline's acceptance and draw as they are (for a --before that already computes rows on demand)",
    )
    args = parser.parse_args()
    before = module_at(args.before, "src/draftwise/verify.py", "verify_before")
    as_it_is = (before.accept_sampling, before.sample_token, before.target_probs)
    as_it_was = (every_row(before.accept_sampling), multinomial, before.target_probs)
    variants = {
        "before": as_it_is if args.before_as_is else as_it_was,
        "after": (verify.accept_sampling, verify.sample_token, verify.target_probs),
    }
    torch.set_num_threads(2)
    options = {"rasd": {"datastore": "code"}}
    methods = args.methods.split(",")
    loaded = {method: draftwise.load(method=method, **options.get(method, {})) for method in methods}
    engines = {(method, name): loaded[method] for method in methods for name in variants}
    draw_us = defaultdict(list)
    for _ in range(3):
        for name, (_, draw, _) in variants.items():
            draw_us[name].append(draw_after_forward_us(loaded[methods[0]].target, draw))
    draw_us = {name: round(statistics.median(t), 1) for name, t in draw_us.items()}
    print(f"one draw after a forward: {draw_us['before']:.0f} -> {draw_us['after']:.0f} us")
    prompts = [q.turns[0] for q in load_questions(args.prompts, limit=args.questions, first_turn_only=True)]
    within = lambda name: sampling_code(*variants[name])  # noqa: E731
    rows, _ = interleaved_decode(
        engines,
        list(variants),
        methods,
        prompts,
        args.max_new_tokens,
        within,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=0,
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "decode_tokens_per_s": rows,
            "draw_us": draw_us,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "before": args.before,
        }
        args.out.write_text(json.dumps({**report, "prompts": args.prompts, "questions": args.questions}, indent=1))


if __name__ == "__main__":
    main()
