"""prefalign bench (RewardBench, RM-Bench) and prefalign generate on the tiny real model: files in each
benchmark's schema written here, every score checked against the naive computation with the model's own
logits, the official aggregation checked by hand, and generation against one-prompt-at-a-time greedy decoding."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import shared_path

from prefalign.bench.rewardbench import EXAMPLE_COUNTS, rewardbench_scores
from prefalign.bench.run import run_bench
from prefalign.bench.scoring import score_pairs_with_model
from prefalign.cli import main as cli_main
from prefalign.data.tokenize import completion_ids, encode
from prefalign.errors import PrefalignError

PROMPTS = ["Once upon a time there was a cat.", "Tom had a red ball.", "The dog was sad.", "Mom made a cake.",
           "Lily saw a bird."]
GOOD = [" The cat played in the sun.", " He threw it to Sam and they laughed.", " A girl gave him a hug.",
        " It was sweet and warm.", " It sang a happy song."]
BAD = [" Sun cat the.", " Ball ball.", " Sad.", " It was a car.", " Bird bird bird bird."]


@pytest.fixture(scope="module")
def model_dir():
    return shared_path("models", "stories260K")


@pytest.fixture(scope="module")
def naive(model_dir):
    """score(prompt, response, kind) from the model's own full logits, the text tokenized as training does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def score(prompt: str, response: str, kind: str = "avg") -> float:
        p = encode(tokenizer, [prompt])[0]
        full = encode(tokenizer, [prompt + response])[0]
        c = completion_ids(tokenizer, p, full, response)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logp = model(ids).logits.float()[0, :-1].log_softmax(-1)
        tok = logp[len(p) - 1 :].gather(-1, ids[0, len(p) :, None]).squeeze(-1)
        return {"avg": tok.mean(), "sum": tok.sum(), "norm": -tok.norm()}[kind].item()

    return score


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rewardbench_sections_are_weighted_as_the_official_code():
    from prefalign.bench.rewardbench import OFFICIAL_PAIRS

    acc = {"alpacaeval-easy": 0.9, "mt-bench-med": 0.5, "llmbar-natural": 0.6, "math-prm": 0.25, "hep-go": 1.0,
           "made-up-subset": 0.1}
    out = rewardbench_scores(acc)
    chat = (0.9 * 100 + 0.5 * 40) / (100 + 40)
    reasoning = (0.25 * 984 + 1.0 * 164) / (984 + 164)  # math-prm counts 984, as many as the six code subsets
    assert out["sections"] == pytest.approx({"Chat": chat, "Chat Hard": 0.6, "Reasoning": reasoning})
    assert out["missing_sections"] == ["Safety"] and out["unknown_subsets"] == ["made-up-subset"]
    # The official helper scores a section without subsets 0, and its leaderboard mean counts it: a number
    # that measures nothing. The score is withheld instead (docs/benchmarks.md); the sections stay.
    assert out["score"] is None
    full = rewardbench_scores({**acc, "donotanswer": 0.5})
    assert full["score"] == pytest.approx((chat + 0.6 + 0.5 + reasoning) / 4) and full["missing_sections"] == []
    assert sum(EXAMPLE_COUNTS.values()) == 3522 and len(EXAMPLE_COUNTS) == 23
    assert sum(OFFICIAL_PAIRS.values()) == 2985  # the filtered split: math-prm has 447 of its 984


def test_rewardbench_data_gaps_name_what_differs_from_the_official_data():
    from prefalign.bench.rewardbench import OFFICIAL_PAIRS, data_gaps

    assert data_gaps(OFFICIAL_PAIRS) == []
    gaps = data_gaps({**{s: n for s, n in OFFICIAL_PAIRS.items() if s not in ("donotanswer", "hep-go")},
                      "llmbar-natural": 40, "made-up-subset": 3})
    safety = "refusals-dangerous, refusals-offensive, xstest-should-refuse, xstest-should-respond"
    assert gaps == ["subsets missing: donotanswer, hep-go",
                    "subsets with fewer pairs than the official data: llmbar-natural 40 of 100",
                    "subsets the official mapping does not know (in no section): made-up-subset"]
    gaps = data_gaps({s: OFFICIAL_PAIRS[s] for s in ("mt-bench-hard", "alpacaeval-easy")})
    assert gaps[0] == "sections missing (no subset scored; score withheld): Safety, Reasoning"
    assert safety not in gaps[1] and gaps[1].startswith("subsets missing: alpacaeval-length")


@pytest.mark.parametrize("kind", ["avg", "sum", "norm"])
def test_rewardbench_scores_every_pair_as_the_naive_computation(kind, model_dir, naive, tmp_path):
    subsets = ["alpacaeval-easy", "alpacaeval-easy", "llmbar-natural", "hep-python", "refusals-dangerous"]
    rows = [{"id": i, "prompt": p, "chosen": g, "rejected": b, "subset": s}
            for i, (p, g, b, s) in enumerate(zip(PROMPTS, GOOD, BAD, subsets))]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    scored = score_pairs_with_model(str(model_dir), rows, score=kind, batch_size=2)
    for row, (c, r) in zip(rows, scored.scores):
        assert c == pytest.approx(naive(row["prompt"], row["chosen"], kind), abs=2e-4)
        assert r == pytest.approx(naive(row["prompt"], row["rejected"], kind), abs=2e-4)
    result = run_bench("rewardbench", str(model_dir), dataset=str(data), score=kind, batch_size=2)
    expected = {}
    for row in rows:
        right = naive(row["prompt"], row["chosen"], kind) > naive(row["prompt"], row["rejected"], kind)
        expected.setdefault(row["subset"], []).append(right)
    assert {k: v["accuracy"] for k, v in result["subsets"].items()} == {k: sum(v) / len(v) for k, v in expected.items()}
    assert result["subsets"]["alpacaeval-easy"]["n_pairs"] == 2
    assert set(result["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"}
    assert result["score"] == pytest.approx(sum(result["sections"].values()) / 4)
    assert result["scoring"] == kind and result["chat_template"] is False


def test_rm_bench_matrix_from_a_folder_of_domain_files(model_dir, naive, tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    styles = [lambda t: t, lambda t: t + " It was a long and happy day.", lambda t: t + "\n\n**The end.**"]
    prompts = {"chat": PROMPTS[:3], "safety-refuse": PROMPTS[3:]}
    for domain, ps in prompts.items():
        # the official files differ in their extra columns (and ids are numbers): they must still join
        extra = {"language": "python", "task_id": "t"} if domain == "chat" else {"error_key": "k", "error": "e"}
        rows = [{"id": i, "subset": "x", "prompt": p, **extra,
                 "chosen": [f(GOOD[PROMPTS.index(p)]) for f in styles],
                 "rejected": [f(BAD[PROMPTS.index(p)]) for f in styles]} for i, p in enumerate(ps)]
        (folder / f"{domain}_filtered.json").write_text(json.dumps(rows))
    result = run_bench("rm-bench", str(model_dir), dataset=str(folder), batch_size=4)
    assert set(result["domains"]) == {"chat", "safety"}  # safety-refuse pools into safety
    for domain, ps in (("chat", prompts["chat"]), ("safety", prompts["safety-refuse"])):
        m = [[0.0] * 3 for _ in range(3)]
        for p in ps:
            k = PROMPTS.index(p)
            sc = [naive(p, f(GOOD[k])) for f in styles]
            sr = [naive(p, f(BAD[k])) for f in styles]
            for i in range(3):
                for j in range(3):
                    m[i][j] += (sc[i] > sr[j]) / len(ps)
        d = result["domains"][domain]
        assert d["hard"] == pytest.approx((m[0][1] + m[0][2] + m[1][2]) / 3)
        assert d["normal"] == pytest.approx((m[0][0] + m[1][1] + m[2][2]) / 3)
        assert d["easy"] == pytest.approx((m[1][0] + m[2][0] + m[2][1]) / 3)
        assert d["avg"] == pytest.approx((d["easy"] + d["normal"] + d["hard"]) / 3)
        assert sum(result["matrices"][domain], []) == pytest.approx(sum(m, []))
    assert result["score"] == pytest.approx((result["domains"]["chat"]["avg"] + result["domains"]["safety"]["avg"]) / 2)
    assert result["truncated_pairs"] == 0 and result["missing_domains"] == ["math", "code"]
    assert result["comparable_to_official"] is False
    assert "domains missing: math, code (the score is the mean of 2 of 4)" in result["not_comparable_because"]
    assert result["hard"] == pytest.approx((result["domains"]["chat"]["hard"] + result["domains"]["safety"]["hard"]) / 2)


def test_reference_scoring_is_the_implicit_reward_and_a_tie_is_wrong(model_dir, tmp_path):
    rows = [{"prompt": p, "chosen": g, "rejected": b, "subset": "hep-go"} for p, g, b in zip(PROMPTS, GOOD, BAD)]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    result = run_bench("rewardbench", str(model_dir), dataset=str(data), reference=str(model_dir))
    assert result["scoring"] == "reference"
    assert result["subsets"]["hep-go"]["accuracy"] == 0.0  # the policy is its own reference: every reward is 0


def test_the_json_and_the_table_and_a_run_folders_result(model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(model_dir, run)
    (run / "prefalign_config.json").write_text(json.dumps({"loss_type": "amapo"}))
    rows = [{"prompt": p, "chosen": g, "rejected": b, "subset": "mt-bench-hard"} for p, g, b in zip(PROMPTS, GOOD, BAD)]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    argv = ["bench", "rewardbench", "--model", str(run), "--dataset", str(data), "--json"]
    assert cli_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"benchmark", "model", "subsets", "sections", "score"}
    saved = json.loads((run / "bench" / "rewardbench-avg.json").read_text())
    assert saved["sections"] == printed["sections"] and list(saved["sections"]) == ["Chat Hard"]
    assert saved["score"] is None and saved["comparable_to_official"] is False  # three sections missing
    assert cli_main(argv) != 0  # an earlier result is kept unless --overwrite
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("prefalign: error: ") and "--overwrite" in err
    assert cli_main([*argv[:-1], "--overwrite"]) == 0
    table = capsys.readouterr().out
    assert "Chat Hard" in table and "mt-bench-hard" in table and "(5 pairs)" in table
    assert "score —  (withheld: no subset scored in Chat, Safety, Reasoning)" in table
    assert "comparable to the official score: no (sections missing" in table


def cut_at(max_length: int, prompt: str, *responses: str) -> bool:
    """Naively: does prompt + the longer response exceed max_length tokens (so scoring cuts it)?"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("models", "stories260K"))
    p = encode(tokenizer, [prompt])[0]
    longer = max(len(completion_ids(tokenizer, p, encode(tokenizer, [prompt + r])[0], r)) for r in responses)
    return len(p) + longer > max_length


def test_rewardbench_counts_truncated_pairs_per_subset_and_withholds_a_score_missing_a_section(model_dir, tmp_path,
                                                                                                 capsys):
    subsets = ["alpacaeval-easy", "alpacaeval-easy", "llmbar-natural", "hep-python", "math-prm"]  # no Safety
    rows = [{"prompt": p, "chosen": g, "rejected": b, "subset": s} for p, g, b, s in zip(PROMPTS, GOOD, BAD, subsets)]
    data = write_jsonl(tmp_path / "rb.jsonl", rows)
    result = run_bench("rewardbench", str(model_dir), dataset=str(data), max_length=23, save=False)
    expected = {}
    for row in rows:
        expected[row["subset"]] = expected.get(row["subset"], 0) + cut_at(23, row["prompt"], row["chosen"],
                                                                           row["rejected"])
    assert {k: v["truncated_pairs"] for k, v in result["subsets"].items()} == expected
    assert result["truncated_pairs"] == sum(expected.values()) == 3 and result["skipped"] == {}
    assert result["score"] is None and set(result["sections"]) == {"Chat", "Chat Hard", "Reasoning"}
    reasons = result["not_comparable_because"]
    assert reasons[0] == "sections missing (no subset scored; score withheld): Safety"
    assert "3 of 5 scored pairs truncated to max_length 23" in reasons
    assert result["comparable_to_official"] is False
    argv = ["bench", "rewardbench", "--model", str(model_dir), "--dataset", str(data), "--max-length", "23"]
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    assert "(2 pairs, 1 truncated)" in table and "3 of 5 scored pairs truncated" in table


def test_rm_bench_counts_truncated_pairs_per_domain_and_names_the_missing_domains(model_dir, tmp_path, capsys):
    folder = tmp_path / "rm"
    folder.mkdir()
    styles = [lambda t: t, lambda t: t + " It was a long and happy day with friends.", lambda t: t + " The end."]
    rows = [{"id": i, "prompt": PROMPTS[i], "chosen": [f(GOOD[i]) for f in styles],
             "rejected": [f(BAD[i]) for f in styles]} for i in range(2)]
    (folder / "chat_filtered.json").write_text(json.dumps(rows))  # one domain only
    result = run_bench("rm-bench", str(model_dir), dataset=str(folder), max_length=28, save=False)
    expected = sum(cut_at(28, r["prompt"], c, b) for r in rows for c, b in zip(r["chosen"], r["rejected"]))
    assert 0 < expected < 6 and result["skipped"] == {}
    assert result["domains"]["chat"]["truncated_pairs"] == result["truncated_pairs"] == expected
    assert result["comparable_to_official"] is False and result["missing_domains"] == ["math", "code", "safety"]
    assert result["not_comparable_because"][:2] == [
        "domains missing: math, code, safety (the score is the mean of 1 of 4)",
        f"{expected} of 6 scored pairs truncated to max_length 28"]
    argv = ["bench", "rm-bench", "--model", str(model_dir), "--dataset", str(folder), "--max-length", "28"]
    assert cli_main(argv) == 0
    table = capsys.readouterr().out
    assert f"{expected} of 6" in table and "comparable to the official score: no (domains missing: math" in table


def test_rm_bench_on_the_shared_folder_at_a_short_max_length_says_it_is_not_the_official_score(model_dir):
    result = run_bench("rm-bench", str(model_dir), dataset=str(shared_path("data", "rm-bench")), limit=1,
                       max_length=64, save=False)
    reasons = "; ".join(result["not_comparable_because"])
    assert result["comparable_to_official"] is False and result["truncated_pairs"] > 0
    assert "math" in result["missing_domains"] and "--limit 1: at most 1 prompts per domain" in reasons
    assert "scored pairs truncated to max_length 64" in reasons


def test_compare_lists_the_bench_results_that_are_not_the_official_score():
    from types import SimpleNamespace

    from prefalign.analysis.compare import bench_caveats

    runs = [SimpleNamespace(label="amapo", bench={
        "rm-bench-avg": {"comparable_to_official": False,
                         "not_comparable_because": ["35 of 45 scored pairs truncated"]},
        "rewardbench-avg": {"comparable_to_official": True, "not_comparable_because": []}}),
        SimpleNamespace(label="dpo", bench={"rm-bench-avg": {"score": 0.5}})]
    assert bench_caveats(runs) == [
        "amapo, rm-bench-avg: comparable to the official score: no (35 of 45 scored pairs truncated).",
        "dpo, rm-bench-avg: comparable to the official score: not recorded (an older result: rerun prefalign bench)."]


def test_a_file_in_another_schema_is_one_line(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "good": "a", "bad": "b"}])
    with pytest.raises(PrefalignError, match="not RewardBench's schema: missing column prompt"):
        run_bench("rewardbench", str(model_dir), dataset=str(data))
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "misc.json").write_text(json.dumps([{"prompt": "p", "chosen": ["a"] * 3, "rejected": ["b"] * 3}]))
    with pytest.raises(PrefalignError, match="no domain"):
        run_bench("rm-bench", str(model_dir), dataset=str(folder))


# -- prefalign generate ----------------------------------------------------------------------------------------
def _one_by_one(model_dir, prompts, max_new_tokens, eos):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    for p in prompts:
        ids = torch.tensor([encode(tokenizer, [p])[0]])
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                               pad_token_id=eos)[0, ids.shape[1] :].tolist()
        out.append(g[: g.index(eos) + 1] if eos in g else g)
    return out


def test_generate_batched_left_padded_equals_one_prompt_at_a_time_and_stops_at_eos(model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    # Make a token the model really produces its EOS, so that some completions stop early.
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    first = _one_by_one(model_dir, PROMPTS[:1], 6, tokenizer.eos_token_id)[0]
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(first[3])
    tokenizer.save_pretrained(model)
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "chosen": g, "rejected": b}
                                                  for p, g, b in zip(PROMPTS + PROMPTS[:1], GOOD + GOOD[:1],
                                                                     BAD + BAD[:1])])
    out = tmp_path / "gen.jsonl"
    assert cli_main(["generate", "--model", str(model), "--dataset", str(data), "--max_new_tokens", "12",
                     "--batch-size", "3", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS  # each distinct prompt once
    expected = _one_by_one(model, PROMPTS, 12, tokenizer.eos_token_id)
    assert [r["n_tokens"] for r in rows] == [len(e) for e in expected]
    assert [r["stopped_at_eos"] for r in rows] == [tokenizer.eos_token_id in e for e in expected]
    assert rows[0]["stopped_at_eos"] and rows[0]["n_tokens"] == 4  # stopped at the token made EOS
    lengths = sorted(len(e) for e in expected)
    assert summary["mean_tokens"] == pytest.approx(sum(lengths) / 5) and summary["max_tokens"] == lengths[-1]
    assert summary["median_tokens"] == lengths[2]
    assert summary["eos_fraction"] == pytest.approx(sum(tokenizer.eos_token_id in e for e in expected) / 5)
    assert all(math.isfinite(summary[k]) for k in ("p10_tokens", "p90_tokens"))
    assert cli_main(["generate", "--model", str(model), "--dataset", str(data), "--out", str(out)]) != 0  # kept


def test_a_limit_keeps_the_first_rows_of_each_part_in_file_order():
    from prefalign.bench.run import first_of_each

    rows = [{"subset": s, "i": i} for i, s in enumerate("aaabbc")]
    assert [r["i"] for r in first_of_each(rows, "subset", 2)] == [0, 1, 3, 4, 5]
    assert first_of_each(rows, "subset", None) == rows


def test_the_shared_rm_bench_folder_loads_as_one_benchmark():
    """The official per-domain files (../shared/data/rm-bench) differ in their extra columns; all four load."""
    from prefalign.bench.rmbench import load_rmbench

    folder = shared_path("data", "rm-bench")
    rows = load_rmbench(str(folder))
    by_domain = {d: sum(r["domain"] == d for r in rows) for d in ("chat", "code", "safety")}
    assert sum(by_domain.values()) == len(rows) and min(by_domain.values()) > 0
    assert all(len(r["chosen"]) == len(r["rejected"]) == 3 for r in rows)
