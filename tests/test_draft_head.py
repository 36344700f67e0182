"""The draft head: training-time test unrolling matches cached inference exactly, and training learns."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

from draftwise.core.kernels import avx512_kernel
from draftwise.heads.model import DraftHead, DraftHeadConfig, KVCache
from draftwise.targets.lean.linears import quantize_draft_linears


@pytest.fixture(scope="module")
def head_and_data():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=50)
    config = DraftHeadConfig.from_target(model.config, (0, 1, 2), draft_vocab_size=50)
    head = DraftHead(config).eval().attach_embedding(model.get_input_embeddings().weight)
    ids = torch.randint(0, 50, (20,))
    features = torch.randn(20, 3, config.hidden_size)
    return head, ids, features


@torch.no_grad()
def test_unrolled_steps_equal_drafting_with_the_kv_cache(head_and_data):
    head, ids, features = head_and_data
    c = head.config
    unrolled = [head.lm_head(x) for x in head.unroll(features, ids, steps=3)]
    n = ids.numel() - 2
    assert [u.shape[0] for u in unrolled] == [n, n - 1, n - 2]
    for t in (0, 5, n - 3):
        cache = KVCache(c.num_kv_heads, c.head_dim, 4, torch.float32, "cpu")  # small: exercises growth
        mask = torch.ones(t + 1, t + 1, dtype=torch.bool).tril()
        logits, hidden = head.step(head.fuse(features[: t + 1]), ids[1 : t + 2], torch.arange(t + 1), cache, mask)
        torch.testing.assert_close(logits, unrolled[0][: t + 1], atol=1e-5, rtol=1e-5)
        h = hidden[-1:]
        for k in (1, 2):  # draft ahead on the head's own hidden state, as a chain
            mask = torch.ones(1, cache.length + 1, dtype=torch.bool)
            logits, h = head.step(h, ids[t + k + 1 : t + k + 2], torch.tensor([t + k]), cache, mask)
            torch.testing.assert_close(logits[0], unrolled[k][t], atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path, head_and_data):
    head, ids, features = head_and_data
    head.save(tmp_path, card="# card\n", dtype=torch.float32)
    loaded = DraftHead.load(tmp_path).attach_embedding(head.embed)
    assert (tmp_path / "README.md").read_text() == "# card\n"
    with torch.no_grad():
        torch.testing.assert_close(loaded.unroll(features, ids, 2)[1], head.unroll(features, ids, 2)[1])


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


def test_a_loaded_head_computes_in_the_dtype_asked_for(tmp_path, head_and_data):
    """The head runs in its target's dtype: in bf16 a head call costs half the fp32 one on CPUs with bf16 units."""
    head, ids, features = head_and_data
    head.save(tmp_path / "head")
    loaded = DraftHead.load(tmp_path / "head", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert loaded.draft_to_target.dtype == torch.long
    loaded.attach_embedding(head.embed.to(torch.bfloat16))
    cache = KVCache(loaded.config.num_kv_heads, loaded.config.head_dim, 32, torch.bfloat16, "cpu")
    n = 5
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        logits, _ = loaded.step(loaded.fuse(features[:n].bfloat16()), ids[1 : n + 1], torch.arange(n), cache, mask)
    assert logits.dtype == torch.bfloat16 and logits.shape == (n, loaded.config.draft_vocab_size)


@pytest.mark.skipif(avx512_kernel() is None, reason="no AVX-512 VNNI on this machine")
@torch.no_grad()
def test_the_packed_layer_step_is_the_ops_step(head_and_data):
    """On quantized linears, the head's one-call layer (csrc/avx512.cpp's decoder_layer) against its PyTorch ops, for a
    catch-up of several pairs and a frontier drafted on top of it, cache contents included."""
    head, ids, features = head_and_data
    head = copy.deepcopy(head)
    assert quantize_draft_linears(head) >= 7
    head.kernel = avx512_kernel()
    head.pack_layer()
    assert head.packed is not None
    c, results = head.config, []
    for packed in (head.packed, None):
        head.packed = packed
        cache = KVCache(c.num_kv_heads, c.head_dim, 8, torch.float32, "cpu")
        mask = torch.ones(12, 12, dtype=torch.bool).tril()
        first = head.step(head.fuse(features[:12]), ids[1:13], torch.arange(12), cache, mask)
        frontier = torch.ones(3, 15, dtype=torch.bool)
        frontier[:, 12:] = torch.eye(3, dtype=torch.bool)
        second = head.step(first[1][-3:], ids[13:16], torch.full((3,), 12), cache, frontier)
        results.append((*first, *second, cache.data[:, :, : cache.length].clone()))
    for fused, ops in zip(*results, strict=True):
        torch.testing.assert_close(fused, ops, atol=1e-4, rtol=1e-4)
