"""Tree policies in decoding: every policy stays lossless, alone and under rasd, and shapes the rounds."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    DEPTH,
    TOP_K,
    greedy_reference,
    run,
    tiny_eagle,
    tiny_llama,
)
from scipy.stats import chisquare

from draftwise.core.verify import Sampling, target_probs
from draftwise.drafters.eagle import TreeEagleDrafter
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.policies.baselines import ConfidenceThreshold, HeuristicSchedule
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread


def make_policies(model) -> dict[str, TreePolicy]:
    k = TOP_K
    radar = RadarPolicy(RadarNet(k), RadarConfig(top_k=k, depth=DEPTH, size=12))
    ltd_config = LtdConfig(top_k=k, max_depth=DEPTH, sizes=(1, 2, 4, 8, 12), default_depth=3, default_size=8)
    torch.manual_seed(1)
    ltd = LtdPolicy(*actors(ltd_config), ltd_config)
    return {
        "fixed": TreePolicy(),
        "threshold": ConfidenceThreshold(-1.0),
        "heuristic": HeuristicSchedule(DEPTH, start_calls=1),
        "radar": radar,
        "ltd": ltd,
    }


@pytest.mark.parametrize("name", ["fixed", "threshold", "heuristic", "radar", "ltd"])
def test_greedy_output_with_every_policy_equals_plain_decoding(tiny_model, name):
    for prompt, n in (([5, 17, 3], 30), (list(range(30, 50)), 17)):
        reference = greedy_reference(tiny_model, prompt, n)
        policy = make_policies(tiny_model)[name]
        drafter = tiny_eagle(tiny_model, top_k=TOP_K, depth=DEPTH, total_tokens=12)
        drafter = TreeEagleDrafter(drafter.head, top_k=TOP_K, depth=DEPTH, total_tokens=12, policy=policy)
        out, stats = run(tiny_model, drafter, prompt, n)
        assert out == reference, f"{name} diverged from plain decoding"
        assert stats.new_tokens == n
        assert all(1 <= c <= DEPTH + 1 for c in stats.round_draft_calls[1:])


@pytest.mark.parametrize("name", ["threshold", "radar", "ltd"])
def test_rasd_composed_with_a_policy_equals_plain_decoding(tiny_model, name):
    """Retrieval fused into a policy-shaped tree (`--method rasd --policy NAME`) stays lossless."""
    from draftwise.drafters.pld import PromptLookupRetriever
    from draftwise.drafters.rasd import FittedGate, RasdDrafter
    from draftwise.policies.load import policy_and_shape

    prompt, n = [7, 8, 9, 10, 7, 8, 9, 10, 7, 8], 24  # repeats, so prompt lookup finds branches to fuse
    reference = greedy_reference(tiny_model, prompt, n)
    policy, shape = policy_and_shape(make_policies(tiny_model)[name], "tiny", depth=DEPTH, top_k=TOP_K)
    head = tiny_eagle(tiny_model).head
    drafter = RasdDrafter(head, [PromptLookupRetriever()], gate=FittedGate(threshold=0.0), policy=policy, **shape)
    out, stats = run(tiny_model, drafter, prompt, n)
    assert out == reference
    assert stats.verified_tokens > stats.rounds  # trees, not bare roots, were verified


def test_policies_change_the_number_of_draft_calls(tiny_model):
    prompt = [5, 17, 3]
    calls = {}
    for name in ("fixed", "threshold"):
        drafter = tiny_eagle(tiny_model, top_k=TOP_K, depth=DEPTH, total_tokens=12)
        drafter = TreeEagleDrafter(drafter.head, top_k=TOP_K, depth=DEPTH, policy=make_policies(tiny_model)[name])
        calls[name] = run(tiny_model, drafter, prompt, 20)[1].round_draft_calls
    assert set(calls["fixed"][1:]) == {DEPTH + 1}
    assert sum(calls["threshold"]) < sum(calls["fixed"])


def test_sampling_with_a_learned_policy_preserves_the_target_distribution():
    """Chi-square of the first two sampled tokens against the exact law (as in test_lossless.py), RADAR
    sampling its stops and the drafter verifying deterministic trees at T = 1."""
    vocab, trials = 8, 1200
    model = tiny_llama(vocab, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.25)
    prompt = [1, 2, 3, 1, 2]
    sampling = Sampling(1.0)
    with torch.no_grad():
        first = target_probs(model(torch.tensor([prompt])).logits[0, -1], sampling)
        second = target_probs(model(torch.tensor([prompt + [t] for t in range(vocab)])).logits[:, -1], sampling)
    law = (first[:, None] * second).flatten()
    torch.manual_seed(0)
    policy = RadarPolicy(RadarNet(3), RadarConfig(top_k=3, depth=2, size=6))
    head = tiny_eagle(tiny_llama(vocab, seed=3), draft_vocab=5).head
    drafter = TreeEagleDrafter(head, top_k=3, depth=2, total_tokens=6, policy=policy)
    counts = torch.zeros(vocab * vocab)
    for seed in range(trials):
        out, _ = run(model, drafter, prompt, max_new_tokens=2, sampling=sampling, seed=seed)
        counts[out[0] * vocab + out[1]] += 1
    assert policy.queries > 0
    support = law > 0
    assert counts[~support].sum() == 0
    expected, observed = law[support] * trials, counts[support]
    rare = expected < 5  # merged so the chi-square approximation holds
    obs = torch.cat([observed[~rare], observed[rare].sum().view(1)]).numpy()
    exp = torch.cat([expected[~rare], expected[rare].sum().view(1)]).numpy()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-4
