"""`draftwise bench`: the losslessness classifier, metric aggregation, prompt loading, the run loop, and two
--quick end-to-end runs on a tiny random llama that carries the real tokenizer and chat template."""

from __future__ import annotations

import json

import pytest
from conftest import (
    tiny_llama,
)
from transformers import AutoTokenizer

from draftwise.bench.datasets import Question, interleave_categories, load_questions
from draftwise.bench.metrics import aggregate, assign_verdicts, first_difference, tie_epsilon
from draftwise.bench.plots import load_profile
from draftwise.bench.report import BenchRun, render_report
from draftwise.bench.runner import PEERS, Settings, run_benchmark, run_engine, run_question, turn_record
from draftwise.cli import main
from draftwise.cli.bench import parse_method_options, parse_methods
from draftwise.core.errors import DraftwiseError
from draftwise.core.verify import compare_greedy


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], []) is None


def test_greedy_comparison_against_ar():
    """The classifier the bench applies (verify.compare_greedy), on the cases a benchmark run meets."""
    ref, margins = [5, 6, 7, 8], [2.0, 0.0001, 3.0, 1.0]
    assert compare_greedy(ref, margins, [5, 6, 7, 8], 1e-3) == "identical"
    assert compare_greedy(ref, margins, [5, 9, 1, 1], 1e-3) == "near_tie"  # ar itself nearly chose 9
    assert compare_greedy(ref, margins, [5, 6, 9, 8], 1e-3) == "mismatch"
    assert compare_greedy(ref, margins, [5, 6, 9, 8], 3.5) == "near_tie"  # bf16-sized epsilon
    assert compare_greedy(ref, margins, [5, 6, 9, 8], 3.0) == "mismatch"  # the bound is strict
    assert compare_greedy(ref, margins, [5, 6], 1e-3) == "mismatch"  # stopped early where ar was sure
    assert compare_greedy(ref, margins, [5, 6, 7, 8, 2], 1e-3) == "mismatch"  # ran on past ar's end


def test_tie_epsilon_by_dtype():
    assert tie_epsilon("float32") == tie_epsilon("fp32") == 1e-3
    assert tie_epsilon("bfloat16") == tie_epsilon("float16") == 1.0


def turn(
    tokens: list[int],
    wall_s: float,
    margins: list[float] | None = None,
    draft_calls: int = 0,
    accepted: list[int] | None = None,
    engine: bool = True,
    plain_rounds: int = 0,
) -> dict:
    """A turn record as the runner writes it; `engine=False` for a peer without engine stats."""
    accepted = accepted if accepted is not None else [1] * len(tokens)
    stats = {
        "rounds": len(accepted),
        "plain_rounds": plain_rounds,
        "accepted": accepted,
        "draft_calls": draft_calls,
        "verified_tokens": sum(accepted) + len(accepted),
        "prefill_s": 0.1 * wall_s,
        "draft_s": 0.2 * wall_s,
        "verify_s": 0.6 * wall_s,
        "overhead_s": 0.1 * wall_s,
    }
    margins = margins if margins is not None else [1.0] * len(tokens)
    return turn_record("", tokens, wall_s, margins if engine else None, stats if engine else None)


def record(index: int, category: str, method: str, turns: list[dict], error: str | None = None) -> dict:
    return {
        "index": index,
        "question_id": 100 + index,
        "category": category,
        "method": method,
        "error": error,
        "verdict": None,
        "peak_rss_mb": 500.0,
        "peak_gpu_mb": None,
        "turns": turns,
    }


def test_assign_verdicts_first_differing_turn_decides():
    ref = record(0, "a", "ar", [turn([1, 2, 3], 1.0, margins=[1.0, 0.0, 1.0]), turn([4, 5], 1.0)])
    same = record(0, "a", "pld", [turn([1, 2, 3], 1.0), turn([4, 5], 1.0)])
    tie_then_drift = record(0, "a", "z", [turn([1, 9, 9], 1.0), turn([7, 7], 1.0)])
    late = record(0, "a", "x", [turn([1, 2, 3], 1.0), turn([4, 6], 1.0)])
    failed = record(0, "a", "y", [], error="boom")
    records = [ref, same, tie_then_drift, late, failed]
    assign_verdicts(records, epsilon=1e-3)
    assert [r["verdict"] for r in records] == [None, "identical", "near_tie", "mismatch", None]
    assert tie_then_drift["divergence"] == {"turn": 0, "position": 1, "ref_margin": 0.0}
    assert late["divergence"] == {"turn": 1, "position": 1, "ref_margin": 1.0}


def test_peers_are_checked_against_plain_decoding_on_their_own_arithmetic():
    """transformers' dense weights are another model than lean's 4-bit grid: `hf-pld` is held to `hf`, `hf` only
    reports how far it agrees with `ar`, and no difference between arithmetics is a losslessness failure."""
    ar = record(0, "a", "ar", [turn([1, 2, 3], 1.0, margins=[1.0, 1.0, 1.0])])
    hf = record(0, "a", "hf", [turn([1, 2, 4], 1.0, engine=False, margins=[1.0, 1.0, 1.0])])
    hf_pld = record(0, "a", "hf-pld", [turn([1, 2, 4], 1.0, engine=False)])
    hf_pld_bad = record(0, "a", "hf-pld~x", [turn([1, 5, 4], 1.0, engine=False)])
    llama_peer = record(0, "a", "llama.cpp", [turn([1, 2, 3], 1.0, engine=False)])  # no ar@llama: not checked
    records = [ar, hf, hf_pld, hf_pld_bad, llama_peer]
    assign_verdicts(records, epsilon=1e-3)
    assert hf.get("verdict") is None and hf["cross_engine"]["verdict"] == "mismatch"
    assert hf["cross_engine"]["divergence"]["position"] == 2
    assert hf_pld["verdict"] == "identical" and hf_pld["reference"] == "hf"
    assert hf_pld_bad["verdict"] == "mismatch"
    assert llama_peer.get("verdict") is None
    assert parse_methods("pld,hf-pld,llama.cpp") == ["ar", "ar@llama", "hf", "pld", "hf-pld", "llama.cpp"]


def test_aggregate_spec_bench_conventions():
    records = [
        record(0, "qa", "ar", [turn([1] * 10, 1.0)]),
        record(1, "rag", "ar", [turn([1] * 30, 1.0)]),
        record(0, "qa", "pld", [turn([1] * 10, 0.5, draft_calls=0, accepted=[2] * 5)]),
        record(1, "rag", "pld", [turn([1] * 30, 0.5, draft_calls=0, accepted=[3] * 10, plain_rounds=6)]),
        record(0, "qa", "hf", [turn([1] * 10, 0.25, engine=False)]),
        record(1, "rag", "hf", [], error="too long"),
    ]
    records[2]["verdict"], records[3]["verdict"], records[4]["verdict"] = "identical", "near_tie", "identical"
    summary = aggregate(records, ["ar", "pld", "hf"])
    overall = summary["overall"]
    assert overall["ar"]["tokens_per_s"] == pytest.approx(20.0)  # 40 tokens / 2 s
    assert overall["ar"]["tokens_per_s_mean"] == pytest.approx(20.0)  # mean of 10 and 30
    assert overall["pld"]["tokens_per_s"] == pytest.approx(40.0)
    assert overall["pld"]["speedup"] == pytest.approx(2.0)
    assert overall["pld"]["tau"] == pytest.approx((10 + 30) / 15)  # pooled over rounds, not over questions
    assert overall["pld"]["verified_per_round"] == pytest.approx((40 + 15) / 15)
    assert overall["pld"]["draft_calls_per_round"] == 0
    assert overall["pld"]["plain_round_share"] == pytest.approx(6 / 15) and overall["ar"]["plain_round_share"] == 0
    assert overall["hf"]["plain_round_share"] is None
    assert overall["pld"]["time_split_s"]["verify_s"] == pytest.approx(0.6)
    assert (overall["pld"]["identical"], overall["pld"]["near_tie"], overall["pld"]["mismatch"]) == (1, 1, 0)
    assert overall["hf"]["errors"] == 1 and overall["hf"]["questions"] == 1
    assert overall["hf"]["tau"] is None and overall["hf"]["time_split_s"] is None
    assert overall["ar"]["peak_rss_mb"] == 500.0
    by_category = summary["categories"]
    assert list(by_category) == ["qa", "rag"]
    assert by_category["qa"]["hf"]["speedup"] == pytest.approx(4.0)
    assert by_category["rag"]["pld"]["speedup"] == pytest.approx(2.0)
    assert by_category["rag"]["hf"]["tokens_per_s"] is None and by_category["rag"]["hf"]["speedup"] is None


def test_report_flags_mismatches_loudly():
    records = [record(0, "qa", "ar", [turn([1, 2], 1.0)]), record(0, "qa", "pld", [turn([1, 3], 1.0)])]
    assign_verdicts(records, epsilon=1e-3)
    summary = aggregate(records, ["ar", "pld"])
    env = {
        "model": "m",
        "dtype": "float32",
        "device": "cpu",
        "gpu": None,
        "cpu": "cpu",
        "torch_threads": 2,
        "torch": "t",
        "transformers": "x",
        "draftwise": "d",
    }
    settings = {"prompts": "p", "questions": 1, "max_new_tokens": 2, "temperature": 0.0, "seed": 0}
    run = BenchRun(env, settings, ["ar", "pld", "gone"], {"gone": "not installed"}, summary, records)
    text = render_report(run, 1e-3, [])
    assert "LOSSLESSNESS FAILURE: 1 of 1" in text
    assert "| pld | ar | 100 | qa | MISMATCH | 1 | 1 |" in text
    assert "| gone | **unavailable:** not installed |" in text
    assert "## Rounds without speculation (back-off) by category" in text and "| 0% |" in text


def write_jsonl(path, items: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n")


def test_load_questions_from_file(tmp_path):
    path = tmp_path / "q.jsonl"
    write_jsonl(
        path,
        [
            {"question_id": 1, "category": "a", "turns": ["one", "one more"]},
            {"question_id": 2, "category": "a", "turns": ["two"]},
            {"question_id": 3, "category": "b", "turns": ["three"]},
            {"turns": ["no id, no category"]},
        ],
    )
    questions = load_questions(str(path))
    assert [q.question_id for q in questions] == [1, 3, 4, 2]  # round-robin over a, b, default
    assert questions[0].turns == ("one", "one more")
    assert questions[2].category == "default"
    assert [q.question_id for q in load_questions(str(path), categories=["a"], limit=1)] == [1]
    with pytest.raises(DraftwiseError, match="unknown categories c"):
        load_questions(str(path), categories=["c"])
    path.write_text('{"turns": ["ok"]}\n{"turns": []}\n')
    with pytest.raises(DraftwiseError, match=r"q.jsonl:2: expected an object with 'turns'"):
        load_questions(str(path))
    with pytest.raises(DraftwiseError, match="neither one of spec-bench"):
        load_questions(str(tmp_path / "missing.jsonl"))


def test_spec_bench_ships_with_the_package():
    questions = load_questions("spec-bench", limit=13)
    assert len({q.category for q in questions}) == 13  # the round-robin prefix covers every subtask
    assert len(load_questions("spec-bench", categories=["writing"])) == 10


def test_interleave_keeps_order_within_categories():
    qs = [Question(i, c, ("x",)) for i, c in enumerate("aaab")]
    assert [q.question_id for q in interleave_categories(qs)] == [0, 3, 1, 2]


def test_method_and_option_parsing():
    assert parse_methods("pld,hf") == ["ar", "pld", "hf"]
    assert parse_methods("hf, ar ,hf") == ["hf", "ar"]
    assert "hf-pld" in parse_methods("all")
    with pytest.raises(DraftwiseError, match="unknown methods nope"):
        parse_methods("pld,nope")
    assert parse_method_options(["pld.total_tokens=32", "pld.name=x"], "dm") == {
        "draft-model": {"draft_model": "dm"},
        "pld": {"total_tokens": 32, "name": "x"},
    }
    with pytest.raises(DraftwiseError, match="METHOD.KEY=VALUE"):
        parse_method_options(["total_tokens=3"], None)
    assert parse_methods("pld~short,pld@llama") == ["ar", "ar@llama", "pld~short", "pld@llama"]
    with pytest.raises(DraftwiseError, match="unknown methods nope~x"):
        parse_methods("nope~x")
    assert parse_method_options(["eagle~d0.depth=0"], None) == {"eagle~d0": {"depth": 0}}


def test_load_profile(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"verify_ms": {"8": 48, "1": 43.5}}')
    assert load_profile(path) == {1: 43.5, 8: 48.0}
    path.write_text('{"ms": 1}')
    with pytest.raises(DraftwiseError, match="verify_ms"):
        load_profile(path)


def test_multi_turn_questions_continue_the_conversation():
    seen = []

    def runner(messages, settings, seed):
        seen.append(messages)
        return turn_record(f"answer {len(seen)}", [len(seen)], 0.1)

    turns, memory = run_question(runner, Question(1, "a", ("first", "second")), Settings(4), seed=0)
    assert [t["text"] for t in turns] == ["answer 1", "answer 2"]
    assert seen[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "answer 1"},
        {"role": "user", "content": "second"},
    ]
    assert memory["peak_rss_mb"] > 0


def test_run_benchmark_rotates_methods_and_keeps_errors():
    order = []

    def make(name: str, fail: bool = False):
        def runner(messages, settings, seed):
            order.append((name, seed))
            if fail:
                raise RuntimeError("out of memory")
            return turn_record("x", [1], 0.1)

        return runner

    questions = [Question(i, "a", ("q",)) for i in range(3)]
    records = run_benchmark(
        {"ar": make("ar"), "pld": make("pld"), "bad": make("bad", fail=True)}, questions, Settings(4), seed=10
    )
    assert [name for name, _ in order] == ["ar", "pld", "bad", "pld", "bad", "ar", "bad", "ar", "pld"]
    assert {seed for name, seed in order if name == "ar"} == {10, 11, 12}
    assert [r["error"] for r in records if r["method"] == "bad"] == ["RuntimeError: out of memory"] * 3


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer llama with SmolLM2's tokenizer and chat template, so the normal CLI path loads it."""
    from draftwise.targets.models import resolve_model

    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(49152, max_positions=512, peaked=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(path)
    return path


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    write_jsonl(
        path,
        [
            {"question_id": 1, "category": "chat", "turns": ["Name three colours.", "And three more?"]},
            {"question_id": 2, "category": "copy", "turns": ["Repeat: one two three one two three."]},
        ],
    )
    return path


@pytest.mark.real_model
def test_quick_run_end_to_end(tiny_model_dir, prompt_file, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "fp32",
            "--prompts",
            str(prompt_file),
            "--methods",
            "ar,pld,hf,hf-pld",
            "--quick",
            "--max-new-tokens",
            "12",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["dtype"] == "float32" and results["environment"]["torch_threads"] >= 1
    assert results["settings"]["max_new_tokens"] == 12
    records = results["records"]
    assert len(records) == 2 * 4 and not any(r["error"] for r in records)
    assert all(len(r["turns"]) == (2 if r["question_id"] == 1 else 1) for r in records)
    assert all(0 < t["new_tokens"] <= 12 for r in records for t in r["turns"])
    # greedy through the same weights: the engine's methods agree with ar, HF's prompt lookup with HF's generate,
    # and HF's generate (dense fp32, like ar here) is reported as agreeing with ar
    assert {r["verdict"] for r in records if r["method"] not in ("ar", "hf")} <= {"identical", "near_tie"}
    assert {r["cross_engine"]["verdict"] for r in records if r["method"] == "hf"} <= {"identical", "near_tie"}
    assert results["summary"]["overall"]["ar"]["speedup"] == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "✅ Lossless" in report and "| hf-pld |" in report
    for name in ("speedup_by_category", "tau_by_method", "draft_calls_per_round", "time_split"):
        assert (out / f"{name}.png").stat().st_size > 1000


@pytest.mark.real_model
def test_broken_and_missing_peers_are_reported(tiny_model_dir, prompt_file, tmp_path, monkeypatch, capsys):
    def broken(engine, messages, settings, seed):
        result = run_engine(engine, messages, settings, seed)
        result["token_ids"] = [result["token_ids"][0] + 1, *result["token_ids"][1:]]
        return result

    def missing(engine, messages, settings, seed):
        raise DraftwiseError("llama-cpp-python is not installed")

    monkeypatch.setitem(PEERS, "broken", broken)
    monkeypatch.setitem(PEERS, "missing", missing)
    out = tmp_path / "out"
    code = main(
        [
            "bench",
            "--model",
            str(tiny_model_dir),
            "--dtype",
            "fp32",
            "--prompts",
            str(prompt_file),
            "--methods",
            "broken,missing",
            "--limit",
            "1",
            "--max-new-tokens",
            "4",
            "--tie-epsilon",
            "0",
            "--out",
            str(out),
        ]
    )
    assert code == 1
    assert "LOSSLESSNESS FAILURE" in capsys.readouterr().err
    report = (out / "report.md").read_text()
    assert "LOSSLESSNESS FAILURE: 1 of 1" in report
    assert "| missing | **unavailable:** llama-cpp-python is not installed |" in report
    assert json.loads((out / "results.json").read_text())["unavailable"] == {
        "missing": "llama-cpp-python is not installed"
    }


def test_speedup_interval_brackets_the_speedup_and_narrows_with_agreement():
    """The bootstrap interval contains the headline speedup; questions that agree give a narrow one, questions
    that disagree a wide one; too few questions give none."""
    from draftwise.bench.metrics import speedup_interval

    def record(method: str, index: int, tokens: int, wall: float) -> dict:
        turn = {"new_tokens": tokens, "wall_s": wall}
        return {"method": method, "index": index, "error": None, "turns": [turn]}

    steady = [record("ar", q, 100, 1.0) for q in range(8)] + [record("x", q, 100, 0.8) for q in range(8)]
    low, high = speedup_interval(steady, "x")
    assert low == pytest.approx(1.25) and high == pytest.approx(1.25)
    walls = [0.5, 1.0, 0.6, 1.4, 0.7, 1.2, 0.5, 1.3]
    mixed = [record("ar", q, 100, 1.0) for q in range(8)] + [record("x", q, 100, w) for q, w in enumerate(walls)]
    speedup = 800 / sum(walls) / 100
    low, high = speedup_interval(mixed, "x")
    assert low < speedup < high and high - low > 0.2
    assert speedup_interval(mixed[:2] + mixed[8:10], "x") is None
