"""Does the draft head lose accuracy on the features of the engine it runs next to? The shipped head was trained on
transformers' bf16 features; the default lean engine computes in `float32+w4a8`. On the same texts (the lean
engine's own greedy answers to ShareGPT tuning prompts the head never saw), top-1 accuracy of each unrolled step
with features from one engine and labels (the target's greedy next tokens) from another.

    python benchmarks/head_accuracy_by_engine.py --prompts 16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse

import torch

import draftwise
from draftwise.targets.models import load_model
from draftwise.training.distill import untrained_sharegpt_prompts
from draftwise.training.train_draft import sequence_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = draftwise.load(method="eagle", engine="lean")
    head = engine.drafter("eagle").head
    layers = head.config.feature_layers
    target_to_draft = torch.full((head.config.target_vocab_size,), -1, dtype=torch.long)
    target_to_draft[head.draft_to_target] = torch.arange(head.config.draft_vocab_size)
    texts = []
    for prompt in untrained_sharegpt_prompts(3000, args.prompts, 4000):
        messages = [{"role": "user", "content": prompt}]
        ids = engine.encode(messages)
        out = engine.generate(messages, method="ar", max_new_tokens=args.max_new_tokens)
        texts.append((torch.tensor(ids + list(out.token_ids)), len(ids)))

    lean = engine.target
    lean.feature_layers = layers

    def lean_run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lean.reset()
        logits, features = lean._run(ids, torch.arange(ids.numel()), None, slice(None))
        return features.float(), logits.argmax(-1)

    def hf_run(model):
        @torch.inference_mode()
        def run(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = model(ids[None], output_hidden_states=True)
            return torch.stack([out.hidden_states[i][0] for i in layers], 1).float(), out.logits[0].argmax(-1)

        return run

    runs = {engine.dtype_name: lean_run}
    for dtype in ("bf16", "fp32"):
        runs[f"hf {dtype}"] = hf_run(load_model("smollm2-135m", dtype=dtype)[0])
    computed = {name: [run(ids) for ids, _ in texts] for name, run in runs.items()}
    total_response = sum(ids.numel() - start for ids, start in texts)
    print(f"{len(texts)} texts, {total_response} response tokens")
    for features_from in runs:
        for labels_from in runs:
            totals = [[0, 0] for _ in range(args.steps)]
            for (ids, start), (features, _), (_, labels) in zip(
                texts, computed[features_from], computed[labels_from], strict=True
            ):
                sample = {"ids": ids, "response_from": torch.tensor([start]), "features": features, "labels": labels}
                with torch.no_grad():
                    _, stats = sequence_loss(head, sample, list(range(len(layers))), target_to_draft, args.steps)
                for k, (correct, counted) in enumerate(stats):
                    totals[k][0] += correct
                    totals[k][1] += counted
            accuracy = " / ".join(f"{100 * c / n:.1f}%" for c, n in totals)
            print(f"features {features_from:14s} labels {labels_from:14s} top-1 by step: {accuracy}")
    lean_labels = [labels for _, labels in computed[engine.dtype_name]]
    for name, rows in computed.items():
        same = sum(
            int((labels == ref)[start:].sum())
            for (_, labels), ref, (_, start) in zip(rows, lean_labels, texts, strict=True)
        )
        print(f"labels of {name} equal to {engine.dtype_name}'s at {100 * same / total_response:.1f}% of positions")


if __name__ == "__main__":
    main()
