"""`prefalign data inspect` through the CLI dispatcher."""

from __future__ import annotations

import gzip
import json

from conftest import shared_path as shared

from prefalign.cli import main
from prefalign.data.formats import implicit_prompt


def test_inspect_json_on_hh_rlhf(capsys):
    path = shared("data", "hh-rlhf", "helpful-base-test.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    identical = sum(r["chosen"] == r["rejected"] for r in raw)
    blank = 0
    for r in raw:
        prompt = implicit_prompt(r["chosen"], r["rejected"])
        sides = (r["chosen"][len(prompt) :], r["rejected"][len(prompt) :])
        blank += r["chosen"] != r["rejected"] and not all(side.strip() for side in sides)

    assert main(["data", "inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == {
        "source": str(path),
        "format": "implicit",
        "n_rows": 2354,
        "n_pairs": 2354 - identical - blank,
        "skipped": {"empty_completion": blank, "identical": identical},
    }
    assert (identical, blank) == (2, 4)


def test_inspect_with_tokenizer_reports_length_percentiles(capsys, tmp_path):
    tokenizer = shared("models", "stories260K")
    data = tmp_path / "pairs.jsonl"
    rows = [{"q": "Once upon a time" + " there was" * i, "good": " a cat", "bad": " a dog" * (i + 1)} for i in range(10)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    argv = ["data", "inspect", str(data), "--columns", "prompt=q,chosen=good,rejected=bad", "--tokenizer", str(tokenizer)]

    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["format"], report["n_rows"], report["n_pairs"], report["skipped"]) == ("explicit", 10, 10, {})
    lengths = report["token_lengths"]
    assert list(lengths) == ["prompt", "completion", "prompt+longer completion"]
    for stats in lengths.values():
        assert list(stats) == ["p50", "p90", "p95", "p99", "max"]
        assert list(stats.values()) == sorted(stats.values())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    prompt_max = len(tok(rows[-1]["q"]).input_ids)
    assert lengths["prompt"]["max"] == prompt_max
    assert lengths["completion"]["max"] == len(tok(rows[-1]["q"] + rows[-1]["bad"]).input_ids) - prompt_max + 1  # + EOS

    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "format:     explicit\nrows read:  10\npairs kept: 10\nskipped:    none\n" in text
    assert "prompt+longer completion" in text


def test_inspect_error_is_one_line(capsys, tmp_path):
    assert main(["data", "inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err == f"prefalign: error: {tmp_path / 'missing.jsonl'}: no such file or folder\n"
