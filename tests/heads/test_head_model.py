"""The draft head (draftwise.heads.model): training's unrolled steps equal drafting with the cache; save, load."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    tiny_llama,
)

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
