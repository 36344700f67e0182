"""The CUDA path, for the day a GPU is lent (benchmarks/gpu_check.sh runs `pytest -m cuda`): both targets agree with
transformers on the device, and speculation with pld and eagle equals plain decoding there."""

from __future__ import annotations

import pytest
import torch
from conftest import RandomDrafter, run, tiny_eagle, tiny_llama
from test_families import PROMPT, family_model, path_logits

from draftwise.core.drafter import NoDraft
from draftwise.core.tree import DraftTree
from draftwise.core.verify import NEAR_TIE_EPSILON, compare_greedy
from draftwise.drafters.eagle import EagleDrafter
from draftwise.drafters.pld import PromptLookup
from draftwise.targets.hf import HFTarget
from draftwise.targets.lean.model import LeanTarget

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral"])
def test_targets_on_cuda_match_transformers(family):
    model = (tiny_llama() if family == "llama" else family_model(family)).to("cuda")
    tree = DraftTree(torch.tensor([7, 11, 12, 13, 14, 15]), torch.tensor([-1, 0, 0, 1, 2, 2]), torch.zeros(6))
    with torch.no_grad():
        reference = path_logits(model, PROMPT, tree)
    for target in (HFTarget(model), LeanTarget(model)):
        assert target.device.type == "cuda"
        target.prefill(torch.tensor(PROMPT))
        logits = target.forward_tree(tree).logits
        assert logits.device.type == "cuda"
        torch.testing.assert_close(logits, reference, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("target_class", [HFTarget, LeanTarget])
def test_speculation_on_cuda_equals_plain_decoding(target_class):
    """fp32 on the GPU: a tree forward may take other kernels than a step, so a near-tie may flip, nothing else."""
    model = tiny_llama().to("cuda")
    reference, plain = run(model, NoDraft(), PROMPT, 32, target_class=target_class)
    drafters = [PromptLookup(), EagleDrafter(tiny_eagle(model).head.to("cuda")), RandomDrafter(96, nodes=12)]
    for drafter in drafters:
        out, _ = run(model, drafter, PROMPT, 32, target_class=target_class)
        verdict = compare_greedy(reference, plain.margins, out, NEAR_TIE_EPSILON["fp32"])
        assert verdict != "mismatch", f"{drafter.name} on {target_class.backend} diverged from plain decoding on cuda"
