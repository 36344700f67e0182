"""`draftwise train-draft` (draftwise.training.train_draft) learns, resumes and reads soft labels."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    tiny_llama,
)

from draftwise.core.errors import DraftwiseError
from draftwise.training.train_draft import load_checkpoint


def test_train_draft_learns_and_resumes(tmp_path):
    """A few steps on distilled data from a tiny target lower the loss; a rerun resumes from the checkpoint."""
    import argparse
    import json

    from transformers import AutoTokenizer

    from draftwise.targets import models
    from draftwise.training.distill import build_distill_data
    from draftwise.training.train_draft import train

    target = tiny_llama(vocab_size=49152)
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m"))
    prompts = [f"count to {i}" for i in range(12)]
    build_distill_data(target, tokenizer, prompts, tmp_path / "data", (0, 1, 2), max_new_tokens=24, batch_size=6)
    args = argparse.Namespace(
        model="tiny",
        data=str(tmp_path / "data"),
        out=str(tmp_path / "head"),
        feature_layers="0,1,2",
        draft_vocab=256,
        ttt_steps=3,
        epochs=6,
        accumulate=2,
        lr=3e-3,
        max_len=128,
        holdout_every=6,
        eval_every=1000,
        checkpoint_every=5,
        max_minutes=0,
        seed=0,
        precision="auto",
        soft_labels=0.0,
        init_head="",
    )
    train(args, target=target)
    log = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 30
    assert sum(r["loss"] for r in log[-5:]) < 0.8 * sum(r["loss"] for r in log[:5])
    assert (tmp_path / "head" / "head" / "head.safetensors").exists()
    args.epochs = 7  # a longer schedule resumes at the checkpoint instead of starting over
    train(args, target=target)
    log = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log[30:]] == list(range(31, 36))
    args.lr = 1e-3  # ... but not with another learning rate: that would be another run under the same name
    with pytest.raises(DraftwiseError, match="--lr 0.003 then, 0.001 now"):
        train(args, target=target)
    args.lr = 3e-3
    # fine-tuning starts where the trained head is, not where the target's layer starts
    args.init_head, args.out, args.epochs = str(tmp_path / "head" / "head"), str(tmp_path / "tuned"), 1
    train(args, target=target)
    tuned = [json.loads(line) for line in (tmp_path / "tuned" / "log.jsonl").read_text().splitlines()]
    assert tuned[0]["loss"] < 0.8 * log[0]["loss"]
    # ... and the summary and card say where it started: the given head on the same held-out split
    summary = json.loads((tmp_path / "tuned" / "summary.json").read_text())
    trained = json.loads((tmp_path / "head" / "summary.json").read_text())["heldout_top1_per_step"]
    assert summary["heldout_top1_before"] == pytest.approx(trained, abs=1e-3)
    assert "Before fine-tuning" in (tmp_path / "tuned" / "head" / "README.md").read_text()


def test_soft_labels_are_the_targets_own_distribution(tmp_path):
    """The stored final-layer features give back the target's greedy tokens; a soft-label run learns too."""
    import argparse
    import json

    from transformers import AutoTokenizer

    from draftwise.targets import models
    from draftwise.training.distill import build_distill_data, load_distill_data
    from draftwise.training.train_draft import SoftLabels, train

    target = tiny_llama(vocab_size=49152)
    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model("smollm2-135m"))
    build_distill_data(target, tokenizer, [f"spell {i}" for i in range(8)], tmp_path / "data", (1, 2), 16, 4)
    soft = SoftLabels(target.lm_head.weight.detach(), final_index=1, weight=1.0)
    for sample in load_distill_data(tmp_path / "data"):
        ids, start = sample["ids"].long(), int(sample["response_from"])
        greedy = soft.probabilities(sample["features"]).argmax(-1)
        assert torch.equal(greedy[start - 1 : -1], ids[start:])  # each response token is the target's argmax
    args = argparse.Namespace(
        model="tiny", data=str(tmp_path / "data"), out=str(tmp_path / "head"), feature_layers="1,2",
        draft_vocab=256, ttt_steps=2, epochs=8, accumulate=2, lr=3e-3, max_len=64, holdout_every=8,
        eval_every=1000, checkpoint_every=100, max_minutes=0, seed=0, precision="auto", soft_labels=1.0, init_head="",
    )  # fmt: skip
    train(args, target=target)
    log = [json.loads(line) for line in (tmp_path / "head" / "log.jsonl").read_text().splitlines()]
    assert sum(r["loss"] for r in log[-4:]) < 0.9 * sum(r["loss"] for r in log[:4])  # above the entropy floor
    assert "--soft-labels 1.0" in (tmp_path / "head" / "head" / "README.md").read_text()


class Planted:
    def __reduce__(self):
        return (print, ("planted code ran",))


def test_resuming_never_runs_code_from_a_checkpoint(tmp_path, capsys):
    """checkpoint.pt is read with weights_only: a planted pickle is refused with one clear line, not run."""
    torch.save({"head": Planted()}, tmp_path / "checkpoint.pt")
    with pytest.raises(DraftwiseError, match="cannot resume from"):
        load_checkpoint(tmp_path / "checkpoint.pt", None)
    assert "planted code ran" not in capsys.readouterr().out
