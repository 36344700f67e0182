"""Tree policies (draftwise.policies) and the cost model (draftwise.policies.cost): every policy stays lossless, the
round logger's offline acceptance equals what the truncated trees really accept, the cost fit recovers a known
curve, RADAR and LTD training improve their objective on a synthetic log, and the CLI fails cleanly."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
import torch
from conftest import greedy_reference, run, tiny_eagle, tiny_llama
from scipy.stats import chisquare

from draftwise.core.drafter import Drafter
from draftwise.core.tree import DraftTree
from draftwise.core.verify import Sampling, accept_greedy, accept_sampling, target_probs
from draftwise.drafters.dynamic_tree import candidate_tree
from draftwise.drafters.eagle import TreeEagleDrafter
from draftwise.drafters.tree_policy import TreePolicy
from draftwise.policies.baselines import ConfidenceThreshold, HeuristicSchedule
from draftwise.policies.cost import CostModel, PiecewiseLinear
from draftwise.policies.learn.baselines import heuristic_calls, threshold_calls
from draftwise.policies.learn.logger import log_generation, prefix_size
from draftwise.policies.learn.ltd import train_ltd
from draftwise.policies.learn.offline import (
    RoundSet,
    best_choices,
    best_fixed,
    fixed,
    headroom,
    rounds_from_records,
    simulate,
    truncation_table,
)
from draftwise.policies.learn.radar import evaluate, train_radar
from draftwise.policies.ltd import LtdConfig, LtdPolicy, actors
from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy
from draftwise.targets.hf import TargetModel

TOP_K, DEPTH = 3, 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and much faster than on two when another job holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cost_model() -> CostModel:
    """This CPU's shape: a 1-token verify is cheap, 2+ tokens cost about twice as much, then a slow climb."""
    verify = PiecewiseLinear([1, 2, 4, 8, 16, 32], [66, 124, 155, 160, 173, 231], [20, 25, 30, 30, 35, 40])
    return CostModel(PiecewiseLinear([1, 16], [4.0, 5.0], [1.0, 1.0]), verify, 10.0)


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


# --- the round logger is an exact simulator ------------------------------------------------------------------


class ModelTreeDrafter(Drafter):
    """EAGLE-2 trees drafted by a small causal LM (a noisy copy of the target, so some drafts are accepted and
    some not), with the same policy hooks as EagleDrafter."""

    name = "model-tree"

    def __init__(self, model, top_k: int, depth: int):
        super().__init__()
        self.model, self.top_k, self.depth, self.policy = model, top_k, depth, TreePolicy()

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        self.draft_calls += 1
        return self.model(torch.tensor(sequences)).logits[:, -1].float().log_softmax(-1)

    def propose(self, context):
        tokens = context.tokens.tolist()
        token_of = {0: tokens[-1]}

        def step(frontier, frontier_tokens, parents):
            token_of.update(zip(frontier.tolist(), frontier_tokens.tolist(), strict=True))
            sequences = []
            for node in frontier.tolist():
                path = []
                while node > 0:
                    path.append(token_of[node])
                    node = int(parents[node])
                sequences.append(tokens + path[::-1])
            return self._logprobs(sequences)

        keep_going = self.policy.begin_round(len(tokens) - 1)
        root_lp = self._logprobs([tokens])[0]
        candidates = candidate_tree(tokens[-1], root_lp, step, self.top_k, self.depth, None, keep_going)
        return candidates.select_top(max(1, min(context.budget, self.policy.verify_size(candidates, context.budget))))


def noisy_copy(model, scale: float, seed: int = 0):
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std())
    return draft


def reach_of(tree: DraftTree, probs: torch.Tensor) -> torch.Tensor:
    reach = torch.ones(tree.size)
    for i in range(1, tree.size):
        reach[i] = reach[tree.parents[i]] * probs[tree.parents[i], tree.tokens[i]]
    return reach


def test_logged_acceptance_equals_running_each_truncated_tree():
    """For every round, every number of calls L and every size V: the accepted length computed offline from
    the union's verdict equals accept_greedy on that truncated tree verified alone, and P(A >= d) at T = 1
    equals the reach of the tree's own forward."""
    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    target = TargetModel(model)
    sizes = (1, 2, 4, 8, 12)
    direct = []

    def verify_truncations(candidates: DraftTree, context: int) -> None:
        past, outcome = target.length, {}
        for calls in range(DEPTH + 1):
            prefix = candidates.subtree(torch.arange(min(prefix_size(calls, TOP_K), candidates.size)))
            for v in sizes:
                tree = prefix.select_top(v)
                out = target.forward_tree(tree)
                path, _ = accept_greedy(tree, out.logits)
                reach = reach_of(tree, target_probs(out.logits, Sampling(1.0)))
                by_depth = [float(reach[tree.depths == d].sum()) for d in range(DEPTH + 2)]
                outcome[calls, v] = (len(path) - 1, tree.size, by_depth)
                target.truncate(past)
        direct.append(outcome)

    records = list(log_generation(target, drafter, [5, 7, 3, 9, 11], 48, sizes, before_verify=verify_truncations))
    assert len(records) == len(direct) > 5
    accepted_any = 0
    for record, outcome in zip(records, direct, strict=True):
        accepted, size, _, reach = truncation_table(record, TOP_K, DEPTH, sizes)
        for (calls, v), (a, n, by_depth) in outcome.items():
            j = sizes.index(v)
            assert accepted[calls, j] == a and size[calls, j] == n
            np.testing.assert_allclose(reach[calls, j], by_depth, atol=1e-5)
            accepted_any += a > 0
    assert accepted_any > 0 and len({r["accepted"] for r in records}) > 1  # the check saw real acceptances
    rounds = rounds_from_records(
        [{"prompt_id": 0, **r} for r in records], TOP_K, DEPTH, sizes
    )  # and the RoundSet agrees
    assert rounds.accepted.shape == (len(records), DEPTH + 1, len(sizes))


def test_reach_gives_accept_sampling_acceptance_law():
    """P(A = d) = reach(depth d) - reach(depth d + 1) is the law of accept_sampling on a deterministic tree."""
    torch.manual_seed(0)
    tree = DraftTree(torch.tensor([0, 1, 2, 3, 1, 2]), torch.tensor([-1, 0, 0, 0, 1, 1]), torch.zeros(6))
    probs = torch.softmax(torch.randn(6, 4) * 1.5, -1)
    reach = reach_of(tree, probs)
    at_least = torch.tensor([float(reach[tree.depths == d].sum()) for d in range(4)])
    law = at_least - torch.cat([at_least[1:], torch.zeros(1)])
    generator = torch.Generator().manual_seed(0)
    draws = torch.tensor([len(accept_sampling(tree, probs, generator)[0]) - 1 for _ in range(8000)])
    empirical = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(empirical, law, atol=0.02, rtol=0)


# --- cost model ---------------------------------------------------------------------------------------------


def test_cost_fit_recovers_a_known_curve(tmp_path):
    truth = PiecewiseLinear([1, 2, 4, 16, 64], [60, 120, 150, 170, 300], [10, 20, 20, 40, 90])
    rng = np.random.default_rng(0)
    samples = [
        (n, c, truth(n, c) * (1 + rng.normal(0, 0.01)))
        for n in (1, 2, 3, 4, 8, 16, 32, 64)
        for c in (64, 320, 768, 1024)
    ]
    fit = PiecewiseLinear.fit(samples)
    for n, c in [(1, 100), (3, 500), (6, 900), (12, 50), (40, 700), (64, 2000)]:
        assert fit(n, c) == pytest.approx(truth(n, c), rel=0.03)
    cost = CostModel(PiecewiseLinear.fit([(w, 300, 4.0) for w in (1, 8)]), fit, 12.0, {"model": "test"})
    cost.save(tmp_path / "cost.json")
    again = CostModel.load(tmp_path / "cost.json")
    assert again.round_s(6, 16, 300) == pytest.approx(cost.round_s(6, 16, 300))
    assert again.round_s(6, 16, 300) == pytest.approx(0.012 + 6 * 0.004 + fit(16, 300) / 1000, rel=1e-6)
    batch = again.round_s(np.array([1, 6]), np.array([1, 16]), np.array([300, 300]))
    assert batch[1] == pytest.approx(again.round_s(6, 16, 300))


def test_in_place_fit_recovers_what_rounds_add(tiny_model):
    """Generations record every round's shape and wall time; the in-place fit recovers the overhead, per-call and
    per-node extras that real rounds add to an isolated cost model, and drops a term that would fit negative."""
    from draftwise.core.decode import GenerationStats
    from draftwise.policies.learn.measure import fit_in_place

    _, stats = run(tiny_model, tiny_eagle(tiny_model, depth=2, total_tokens=6), [5, 9, 11, 3], 20)
    assert len(stats.round_s) == len(stats.round_verified) == stats.rounds
    assert sum(stats.round_s) == pytest.approx(stats.total_s - stats.prefill_s, rel=0.05)
    rng = np.random.default_rng(0)
    isolated = CostModel(
        PiecewiseLinear([1.0, 8.0], [0.5, 0.7], [0.0, 0.1]), PiecewiseLinear([1.0, 16.0], [6.0, 20.0], [1.0, 5.0]), 0.0
    )
    generations = []
    for _ in range(20):
        calls, size = rng.integers(0, 4, 30), rng.integers(1, 17, 30)
        accepted = rng.integers(1, 4, 30)
        context = 40 - 1 + np.concatenate([[0], np.cumsum(accepted)[:-1]])
        seconds = isolated.round_s(calls, size, context) + (0.8 + 0.3 * calls + 0.05 * (size - 1)) / 1000
        generations.append(
            GenerationStats(
                "x",
                prompt_tokens=40,
                accepted=accepted.tolist(),
                round_draft_calls=calls.tolist(),
                round_verified=size.tolist(),
                round_s=(seconds * (1 + rng.normal(0, 0.01, 30))).tolist(),
            )
        )
    overhead, per_call, per_node = fit_in_place(generations, isolated)
    assert (overhead, per_call, per_node) == pytest.approx((0.8, 0.3, 0.05), abs=0.05)
    for g in generations:  # rounds that cost less per node than the isolated model says: that term is dropped
        g.round_s = (np.asarray(g.round_s) - 0.2e-3 * (np.asarray(g.round_verified) - 1)).tolist()
    assert fit_in_place(generations, isolated)[2] == 0.0
    priced = CostModel(isolated.head, isolated.verify, 0.8, call_extra_ms=0.3, node_extra_ms=0.05)
    assert priced.round_s(2, 5, 100) == pytest.approx(isolated.round_s(2, 5, 100) + (0.8 + 0.6 + 0.2) / 1000)


def test_profile_measurements_on_a_tiny_model(tiny_model):
    from draftwise.policies.learn.measure import measure_head, measure_verify

    verify = measure_verify(TargetModel(tiny_model), (1, 4), (8, 24), repeats=1)
    head = measure_head(tiny_eagle(tiny_model).head, (1, 3), (8,), repeats=1)
    assert [(n, c) for n, c, _ in verify] == [(1, 8), (4, 8), (1, 24), (4, 24)]
    assert [(w, c) for w, c, _ in head] == [(1, 8), (3, 8)]
    assert all(ms > 0 for *_, ms in verify + head)
    assert PiecewiseLinear.fit(verify)(2, 16) > 0


# --- training on a synthetic log --------------------------------------------------------------------------------


def synthetic_rounds(n: int = 600, seed: int = 0, top_k: int = 4, depth: int = 4) -> RoundSet:
    """Half the rounds are easy (a confident frontier; every drafted level is accepted), half hopeless (a flat,
    unlikely frontier; nothing is accepted): drafting deep pays on the first and is waste on the second."""
    rng = np.random.default_rng(seed)
    sizes = (1, 2, 4, 8, 16)
    easy = rng.random(n) < 0.5
    k = top_k
    scores = np.zeros((n, k + depth * k * k), dtype=np.float32)
    best = np.where(easy, -0.05, -2.5) + rng.normal(0, 0.02, n)
    scores[:, :k] = best[:, None] - np.arange(k) * np.where(easy, 2.0, 0.3)[:, None]
    for c in range(1, depth + 1):
        best = best + np.where(easy, -0.05, -1.5)
        start = k + (c - 1) * k * k
        scores[:, start : start + k * k] = best[:, None] - np.arange(k * k) * np.where(easy, 1.0, 0.1)[:, None]
    calls = np.arange(depth + 1)[None, :, None]
    v = np.asarray(sizes)[None, None, :]
    size = np.minimum(v, 1 + k + calls * k * k).repeat(n, 0)
    tree_depth = np.minimum(calls + 1, size - 1)
    accepted = np.where(easy[:, None, None], tree_depth, 0)
    q = np.where(easy, 0.9, 0.05)[:, None, None, None]
    d = np.arange(depth + 2)[None, None, None, :]
    reach = np.where(d <= tree_depth[..., None], q**d, 0.0)
    return RoundSet(
        prompt_id=np.arange(n) // 10,
        context=rng.integers(100, 600, n),
        last_accepted=rng.integers(1, 4, n),
        level_scores=scores,
        accepted=accepted.astype(np.int16),
        size=size.astype(np.int16),
        tree_depth=tree_depth.astype(np.int16),
        reach=reach.astype(np.float32),
        top_k=k,
        depth=depth,
        sizes=sizes,
    )


def test_radar_training_improves_its_objective():
    rounds = synthetic_rounds()
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    config = RadarConfig(top_k=4, depth=4, size=16, alpha=0.05, beta=0.05, sample=False)
    torch.manual_seed(0)
    before = evaluate(RadarNet(4), validation, cost, config)
    net, history = train_radar(train, validation, cost, config, epochs=8, batch_size=32, lr=3e-3, progress=False)
    after = evaluate(net, validation, cost, config)
    assert len(history) == 8
    assert after["speed_ratio"] > before["speed_ratio"]
    assert after["speed_ratio"] > 1.05  # stopping at once on hopeless rounds beats the fixed depth
    assert after["calls_reduction"] > 0.2 and after["tau_ratio"] > 0.98


def test_ltd_training_improves_its_objective():
    from draftwise.policies.learn.ltd import PpoSettings, argmax_actor
    from draftwise.policies.learn.ltd import evaluate as ltd_evaluate

    rounds = synthetic_rounds(400)
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    config = LtdConfig(top_k=4, max_depth=4, sizes=(1, 2, 4, 8, 16), default_depth=2, default_size=8)
    config.depth_arch, config.size_arch = [64], [64]
    ppo = PpoSettings(n_steps=256, batch_size=64, n_epochs=4, learning_rate=3e-3)
    steps = {"size0": 512, "depth0": 1024, "size1": 256, "depth2": 0, "size3": 0}
    policy, log = train_ltd(train, validation, cost, config, steps, ppo, progress=False)
    default = ltd_evaluate(validation, cost, config, None, None)
    trained = ltd_evaluate(validation, cost, config, argmax_actor(policy.depth_actor), argmax_actor(policy.size_actor))
    assert [entry["stage"] for entry in log][:3] == [
        "size alone (uniform depth)",
        "depth alone (default V)",
        "iter0: both",
    ]
    assert trained["tokens_per_s"] > 1.1 * default["tokens_per_s"]


def test_baseline_replays(tiny_model):
    rounds = synthetic_rounds(100)
    calls = threshold_calls(rounds, -1.0, 4)
    easy = rounds.level_scores[:, 0] > -1.0
    assert (calls[easy] == 4).all() and (calls[~easy] == 0).all()
    schedule = heuristic_calls(rounds, 4, rounds.size_index(16))
    assert schedule.min() >= 0 and schedule.max() <= 4
    sim = simulate(rounds, cost_model(), *fixed(rounds, 4, 16))
    assert sim.summary(rounds.sizes)["draft_calls"] == 5


def test_policies_save_and_load(tmp_path):
    torch.manual_seed(0)
    radar = RadarPolicy(RadarNet(4), RadarConfig(top_k=4, depth=3, size=8, sample=False))
    radar.save(tmp_path)
    loaded = RadarPolicy.load(tmp_path)
    scores = torch.tensor([-0.1, -1.0, -2.0, -3.0])
    radar.begin_round(0)
    loaded.begin_round(0)
    assert [radar.keep_going(i, scores, scores) for i in range(3)] == [
        loaded.keep_going(i, scores, scores) for i in range(3)
    ]
    config = LtdConfig(top_k=4, max_depth=3, sizes=(1, 4, 8), default_depth=2, default_size=4)
    ltd = LtdPolicy(*actors(config), config)
    ltd.save(tmp_path)
    again = LtdPolicy.load(tmp_path)
    tree = DraftTree(torch.zeros(21, dtype=torch.long), torch.tensor([-1] + [0] * 20), -torch.arange(21.0) / 5)
    assert ltd.verify_size(tree, 8) == again.verify_size(tree, 8)


# --- commands ---------------------------------------------------------------------------------------------------


def write_logs(directory, records: list[dict], top_k: int, depth: int, sizes: tuple[int, ...]) -> None:
    import json

    from draftwise.policies.learn.logger import write_part

    directory.mkdir(parents=True, exist_ok=True)
    settings = {"top_k": top_k, "depth": depth, "sizes": list(sizes)}
    (directory / "meta.json").write_text(json.dumps({"settings": settings}))
    for prompt_id in sorted({r["prompt_id"] for r in records}):
        write_part(directory / f"part-{prompt_id:05d}.parquet", [r for r in records if r["prompt_id"] == prompt_id])


def test_train_policy_command_on_logged_rounds(tmp_path, capsys):
    """log_generation -> Parquet -> `draftwise train-policy --method radar` -> a policy the drafter loads."""
    from draftwise.cli import main
    from draftwise.policies.learn.offline import load_rounds
    from draftwise.policies.load import make_policy

    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    sizes = (1, 2, 4, 8)
    records = []
    for prompt_id, prompt in enumerate([[5, 7, 3], [1, 2, 3, 4], [9, 9, 8], [20, 21], [3, 1, 4, 1, 5], [6, 6]]):
        for i, record in enumerate(log_generation(TargetModel(model), drafter, prompt, 16, sizes)):
            records.append({"prompt_id": prompt_id, "source": "test", "round": i, **record})
    write_logs(tmp_path / "rounds", records, TOP_K, DEPTH, sizes)
    assert len(load_rounds(tmp_path / "rounds")) == len(records)
    cost_model().save(tmp_path / "cost.json")
    out = tmp_path / "policies"
    argv = ["train-policy", "--method", "radar", "--rounds", str(tmp_path / "rounds"), "--cost"]
    argv += [str(tmp_path / "cost.json"), "--out", str(out), "--depth", "3", "--size", "8", "--epochs", "2"]
    assert main(argv + ["--alphas", "0.02"]) == 0
    printed = capsys.readouterr().out
    assert "offline validation" in printed and "radar" in printed and "threshold" in printed
    assert (out / "radar.safetensors").exists() and (out / "cost.json").exists() and (out / "README.md").exists()
    policy = make_policy("radar", "unused", 3, out)
    assert policy.config.depth == 3 and policy.config.top_k == TOP_K


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-policy", "--method", "eagle"], "unknown policy method"),
        (["train-policy", "--method", "radar", "--rounds", "/nonexistent/rounds"], "no logged rounds"),
        (["train-policy", "--method", "radar", "--max-tau-loss", "1.5"], "--max-tau-loss must be in"),
        (["generate", "hi", "--method", "pld", "--policy", "radar"], "--policy applies to --method eagle and rasd"),
        (["generate", "hi", "--method", "eagle", "--policy", "bogus"], "unknown policy 'bogus'"),
        (["log-rounds", "--sizes", "0,4"], "--sizes must be positive"),
        (["log-rounds", "--trajectory", "beam"], "--trajectory must be greedy or sampled"),
        (["profile", "--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_cli_errors(argv, message, capsys, tmp_path):
    from draftwise.cli import main

    if argv[0] == "train-policy" and "--rounds" not in argv:
        argv = argv + ["--rounds", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_missing_policy_files_are_a_clear_error(tmp_path):
    from draftwise.core.errors import DraftwiseError
    from draftwise.policies.load import make_policy

    for name in ("radar", "ltd"):
        with pytest.raises(DraftwiseError, match="train-policy"):
            make_policy(name, "no-such-model", 5, tmp_path)
    with pytest.raises(DraftwiseError, match="unknown policy"):
        make_policy("nope", "no-such-model", 5)


def testbest_choices_is_the_exact_ratio_optimum():
    rng = np.random.default_rng(1)
    tokens, seconds = rng.uniform(1, 4, (6, 3)), rng.uniform(0.5, 2, (6, 3))
    groups = np.asarray([0, 0, 1, 1, 2, 2])
    rows = np.arange(6)
    speeds = [
        tokens[rows, np.asarray(pick)[groups]].sum() / seconds[rows, np.asarray(pick)[groups]].sum()
        for pick in itertools.product(range(3), repeat=3)
    ]
    found = best_choices(tokens, seconds, groups)[groups]
    assert tokens[rows, found].sum() / seconds[rows, found].sum() == pytest.approx(max(speeds))


def test_headroom_bounds_the_fixed_tree_and_reads_the_confidence_signal():
    rounds = synthetic_rounds(400)
    train, validation = rounds.split_by_prompt(0.2)
    cost = cost_model()
    rows = headroom(train, validation, cost, rounds.depth, bins=2)
    _, _, fixed_speed = best_fixed(validation, cost, rounds.depth)
    oracle, bins = rows["hindsight oracle"]["tokens_per_s"], rows["confidence bins (2)"]["tokens_per_s"]
    assert oracle >= bins > 1.05 * fixed_speed  # confident rounds draft deep, hopeless ones verify the root alone


@pytest.mark.parametrize("native_bf16", [True, False])
def test_shipped_policies_are_chosen_by_the_target_compute(monkeypatch, native_bf16):
    from draftwise.policies.load import policy_dir

    monkeypatch.setattr("draftwise.policies.cost.cpu_has_native_bf16", lambda: native_bf16)
    default = policy_dir("smollm2-135m")
    assert (default / "cost.json").exists()
    assert policy_dir("smollm2-135m", "float32") == default  # no separate fit: the default one
    lean = policy_dir("smollm2-135m", "bfloat16+int4")
    assert lean == default / ("bfloat16-int4" if native_bf16 else "bfloat16-int4-avx2")
    assert (lean / "radar.safetensors").exists()
    assert json.loads((lean / "cost.json").read_text())["meta"]["engine"] == "lean"
    assert json.loads((policy_dir("smollm2-135m", "bfloat16") / "cost.json").read_text())["meta"]["engine"] == "hf"


def test_radar_keeps_the_fastest_run_that_keeps_tau():
    from draftwise.training.train_policy import fastest_keeping_tau

    fast_lossy = (1.20, -1.5, "fast", {"tau_ratio": 0.95})
    slower_keeps = (1.10, -2.0, "keeps", {"tau_ratio": 0.995})
    slowest_keeps = (1.05, -3.0, "slowest", {"tau_ratio": 1.0})
    assert fastest_keeping_tau([fast_lossy, slower_keeps, slowest_keeps], 0.01)[2] == "keeps"
    assert fastest_keeping_tau([fast_lossy, slower_keeps], 0.10)[2] == "fast"
    assert fastest_keeping_tau([fast_lossy], 0.01)[2] == "fast"  # nothing keeps τ: the fastest
    slow_lossy = (1.10, -1.4, "slow but keeps more", {"tau_ratio": 0.98})
    assert fastest_keeping_tau([fast_lossy, slow_lossy], 0.01)[2] == "slow but keeps more"  # the least τ lost
    never_stops = (0.99, -4.0, "never stops", {"tau_ratio": 1.0})
    assert fastest_keeping_tau([fast_lossy, never_stops], 0.01)[2] == "fast"


def test_radar_query_matches_its_network():
    """The NumPy query runs the same LSTM cell and MLP as RadarNet (the network training fits), round after round."""
    from draftwise.policies.radar import RadarConfig, RadarNet, RadarPolicy

    torch.manual_seed(0)
    net = RadarNet(8).eval()
    policy = RadarPolicy(net, RadarConfig(top_k=8, depth=4, sample=False))  # thresholded: comparable
    for _ in range(5):
        policy.begin_round(0)
        states = -torch.rand(4, 8).sort().values * 6  # the round's frontier score vectors, one per call
        with torch.inference_mode():
            logits = net(states[None])[0]
            hidden = net.lstm(states[None])[0][0]
        for call, scores in enumerate(states):
            assert policy.keep_going(call, scores, scores) == bool(logits[call, 1] >= logits[call, 0])
            assert np.allclose(policy.h, hidden[call].numpy(), atol=1e-5)


def test_ltd_query_matches_its_networks():
    """The NumPy queries read the observations depth_obs / size_obs build and act as the torch actors do."""
    from draftwise.policies.ltd import depth_obs, size_obs

    config = LtdConfig(top_k=4, max_depth=3, sizes=(1, 2, 4, 8), depth_arch=[32], size_arch=[32, 16])
    k, actions = config.top_k, set()
    for trial in range(40):
        torch.manual_seed(trial)
        depth_actor, size_actor = actors(config)
        for layer in (*depth_actor, *size_actor):  # larger weights: the logits must not tie
            if isinstance(layer, torch.nn.Linear):
                torch.nn.init.normal_(layer.weight, std=1.0)
        policy = LtdPolicy(depth_actor, size_actor, config)
        calls, context = trial % (config.max_depth + 1), 37 + trial
        scores = -torch.rand(k + calls * k * k).sort().values * 40  # some under the floor
        policy.begin_round(context)
        latest = scores[-k:] if calls == 0 else scores[-k * k :]
        obs = depth_obs(latest.numpy()[None], np.array([context]), np.array([calls]), config)
        assert np.array_equal(policy._observe(policy.depth_buffer, latest, calls), obs[0])
        with torch.inference_mode():
            expected = bool(depth_actor(torch.from_numpy(obs))[0].argmax() == 1)
        assert policy.keep_going(calls, scores[:k], scores) == expected
        parents = torch.zeros(1 + scores.numel(), dtype=torch.long)
        parents[0] = -1
        tree = DraftTree(torch.zeros_like(parents), parents, torch.cat([torch.zeros(1), scores]))
        obs = size_obs(scores.numpy()[None], np.array([context]), np.array([calls]), config)
        with torch.inference_mode():
            size = config.sizes[int(size_actor(torch.from_numpy(obs))[0].argmax())]
        assert policy.verify_size(tree, 100) == size
        actions.update({("go", expected), ("size", size)})
    assert {("go", True), ("go", False)} <= actions and len(actions) >= 4  # the actions were exercised


def test_in_place_samples_replace_isolated_ones_and_join_them_smoothly():
    from draftwise.policies.learn.measure import in_place_samples

    isolated = [(n, c, float(n)) for n in (1, 2, 4, 8, 16, 32) for c in (64, 320)]
    in_place = [(n, 100 + i, 2.0 * n) for n in (1, 2, 4) for i in range(25)] + [(8, 50, 99.0)] * 3  # 8: too few
    merged = in_place_samples(isolated, in_place)
    assert not [r for r in merged if r[0] <= 4 and r[1] in (64, 320)]  # in place replaces isolated there
    assert all(ms == 2.0 * x for x, _, ms in merged if x <= 4)
    assert [ms for x, _, ms in merged if x == 8] == [16.0, 16.0]  # past the in-place sizes: x 2, the ratio at 4
    assert in_place_samples(isolated, []) == isolated


def test_logged_text_can_follow_the_sampling_law():
    """`--trajectory sampled`: the text is drawn by rejection sampling (reproducibly per seed, unlike greedy's),
    and the verdicts logged on it stay exact (greedy `correct` is still the argmax of each node's parent)."""
    model = tiny_llama(vocab_size=32)
    drafter = ModelTreeDrafter(noisy_copy(model, 0.25), TOP_K, DEPTH)
    prompt, sizes = [5, 7, 3, 9, 11], (1, 2, 4, 8)

    def logged(seed: int | None) -> list[dict]:
        draws = None if seed is None else torch.Generator().manual_seed(seed)
        return list(log_generation(TargetModel(model), drafter, prompt, 40, sizes, sampled=draws))

    greedy, first, again, other = logged(None), logged(0), logged(0), logged(1)
    assert first == again and first != other and first != greedy
    contexts = [r["context"] for r in first]
    assert contexts == sorted(contexts) and len(set(contexts)) == len(contexts)


def test_per_mode_fits_serve_their_own_decoding_mode(tmp_path, tiny_model):
    """A policy directory with a `sampling/` fit loads as PerMode: greedy rounds ask the greedy fit, rounds at the
    fit's temperature or above the sampling fit, and a sampling fit for another tree shape is refused."""
    from draftwise.core.errors import DraftwiseError
    from draftwise.policies.load import make_policy
    from draftwise.policies.per_mode import PerMode

    config = RadarConfig(top_k=TOP_K, depth=DEPTH, size=12)
    RadarPolicy(RadarNet(TOP_K), config).save(tmp_path)
    RadarPolicy(RadarNet(TOP_K), config).save(tmp_path / "sampling")
    policy = make_policy("radar", "unused", DEPTH, tmp_path)
    assert isinstance(policy, PerMode) and policy.config == config
    head = tiny_eagle(tiny_model).head
    for sampling, asked, idle in ((Sampling(), policy.greedy, policy.sampling), (Sampling(1.0), policy.sampling, None)):
        drafter = TreeEagleDrafter(head, top_k=TOP_K, depth=DEPTH, total_tokens=12, policy=policy)
        before = asked.queries
        run(tiny_model, drafter, [5, 17, 3], 16, sampling=sampling)
        assert asked.queries > before and (idle is None or idle.queries == 0)
    policy.use(Sampling(0.7))  # below the T = 1 its text was drawn at: the greedy fit
    assert policy.active is policy.greedy
    (tmp_path / "sampling" / "radar-validation.json").write_text(json.dumps({"logged": {"temperature": 0.5}}))
    policy = make_policy("radar", "unused", DEPTH, tmp_path)
    policy.use(Sampling(0.7))
    assert policy.active is policy.sampling and policy.temperature == 0.5
    RadarPolicy(RadarNet(TOP_K), RadarConfig(top_k=TOP_K, depth=DEPTH - 1, size=12)).save(tmp_path / "sampling")
    with pytest.raises(DraftwiseError, match="draft different trees"):
        make_policy("radar", "unused", DEPTH, tmp_path)


def test_profile_times_rounds_of_random_shapes_in_place():
    """`draftwise profile`'s in-place pass: generations whose rounds draw random tree shapes (RandomShapes, a
    TreePolicy), with every forward and head call timed where it ran, and the per-round extras fitted on them."""
    from transformers import AutoTokenizer

    from draftwise.engine import Engine
    from draftwise.policies.learn.measure import fit_in_place, random_shape_rounds
    from draftwise.targets.models import resolve_model

    model = tiny_llama(49152, max_positions=512, peaked=False)
    engine = Engine(model, AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")), model_name="tiny", method="ar")
    head = tiny_eagle(model).head
    rounds = random_shape_rounds(engine, head, ["Name three colours.", "Count to five."], 12)
    assert len(rounds.generations) == 2 and "profile" not in engine._drafters
    assert len({n for n, _, _ in rounds.verify_ms}) > 2 and all(ms > 0 for *_, ms in rounds.head_ms)
    partial = CostModel(PiecewiseLinear.fit(rounds.head_ms), PiecewiseLinear.fit(rounds.verify_ms), 0.0)
    assert all(extra >= 0 for extra in fit_in_place(rounds.generations, partial))
