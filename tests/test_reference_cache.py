"""The shared cache of reference log-probs (`training/reference.py`): its key must change with everything that
changes a reference log-prob — a config override that leaves the weights alone included — and stay the same
when nothing did, so that a run never reuses another setup's numbers."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import shared_path, tiny_llama
from datasets import Dataset

from prefalign.data.collate import PairCollator
from prefalign.modeling.packing import PrefixSharedCollator
from prefalign.training.reference import cache_key

ROWS = [{"row_index": i, "prompt_input_ids": [1, 5 + i, 7], "chosen_input_ids": [9, 2], "rejected_input_ids": [11, 2]}
        for i in range(4)]
SETTINGS = {"max_length": 96, "max_prompt_length": 48, "truncation": "keep_end", "bf16": False, "fp16": False,
            "packed": True, "seed": 0, "processes": 1, "ld_alpha": None, "batch": [2, 4],
            "data_seed": None, "train_sampling_strategy": "random", "group_by_length": None,
            "dataloader_drop_last": False, "torch_compile": False}


def tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16))


def with_config(model, **changes):
    """A copy of `model` (same weights) whose config differs in `changes`: what a config override loads."""
    other = copy.deepcopy(model)
    for name, value in changes.items():
        setattr(other.config, name, value)
    return other


def test_every_input_of_the_key_is_a_miss_and_nothing_else_is(monkeypatch):
    llama, gemma = tiny_llama(), tiny_gemma2()
    data = Dataset.from_list(ROWS)
    collator = PrefixSharedCollator(0)

    def key(model=llama, dataset=data, settings=SETTINGS, layout=collator, device=None):
        return cache_key(model, dataset, settings, layout, device=device)

    base, base_gemma = key(), key(model=gemma)
    rope = {**llama.config.rope_parameters, "rope_theta": 2 * llama.config.rope_parameters["rope_theta"]}
    changed = {
        "rope_theta": key(model=with_config(llama, rope_parameters=rope)),
        "rms_norm_eps": key(model=with_config(llama, rms_norm_eps=1e-3)),
        "device cuda": key(device=torch.device("cuda")),  # a stand-in: no GPU here, the key reads only its type
        "dtype": key(model=copy.deepcopy(llama).to(torch.bfloat16)),
        "attn_implementation": key(model=with_config(llama, _attn_implementation="eager")),
        "layout: unshared": key(layout=PairCollator(0)),
        "layout: pad id": key(layout=PrefixSharedCollator(3)),
        "data": key(dataset=Dataset.from_list(ROWS[:3] + [{**ROWS[3], "chosen_input_ids": [10, 2]}])),
        **{f"setting {name}": key(settings={**SETTINGS, name: "changed"}) for name in SETTINGS},
    }
    with monkeypatch.context() as m:
        m.setattr(torch, "get_float32_matmul_precision", lambda: "high")  # TF32 on (TrainingArguments.tf32)
        changed["fp32 matmul precision"] = key()
    gemma_changed = {
        "final_logit_softcapping": key(model=with_config(gemma, final_logit_softcapping=50.0)),
        "sliding_window": key(model=with_config(gemma, sliding_window=8)),
    }
    assert [name for name, k in changed.items() if k == base] == []
    assert [name for name, k in gemma_changed.items() if k == base_gemma] == []
    assert len(set(changed.values())) == len(changed)  # and each change is a key of its own
    # A hit: the same inputs again, a copy of the same model, a rebuilt equal dataset, an explicit cpu device.
    assert key() == base == key(model=copy.deepcopy(llama)) == key(dataset=Dataset.from_list(ROWS))
    assert key(device="cpu") == base == key(layout=PrefixSharedCollator(0))


def test_a_dataset_without_a_fingerprint_is_keyed_by_its_rows():
    """Before, such a dataset was keyed by its length alone: other pairs of the same count hit."""
    llama = tiny_llama()
    other = [{**r, "chosen_input_ids": [r["row_index"] + 20, 2]} for r in ROWS]
    assert cache_key(llama, ROWS, SETTINGS) == cache_key(llama, list(ROWS), SETTINGS)
    assert cache_key(llama, other, SETTINGS) != cache_key(llama, ROWS, SETTINGS)


def test_a_config_override_computes_its_own_reference_log_probs(tmp_path):
    """End to end through the trainer: the same weights and data, rope_theta changed at load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign import PreferenceConfig, PreferenceTrainer

    path = shared_path("models", "stories260K")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"prompt": "Once upon a time there was a cat.", "chosen": " The cat played in the sun.",
             "rejected": " Sun cat the."},
            {"prompt": "Tom had a red ball.", "chosen": " He threw it to Sam.", "rejected": " Ball ball."}]
    infos = []
    for run, overrides in (("a", {}), ("b", {"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}})):
        model = AutoModelForCausalLM.from_pretrained(path, **overrides)
        args = PreferenceConfig(output_dir=str(tmp_path / run), loss_type="dpo", max_length=64, max_steps=1,
                                per_device_train_batch_size=2, use_cpu=True, report_to="none", save_strategy="no",
                                disable_tqdm=True, seed=0, ref_cache_dir=str(tmp_path / "cache"))
        trainer = PreferenceTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
        trainer.prepare_reference()
        infos.append((trainer.reference_info[0], trainer._ref_tables["train"].values["chosen_sum"]))
    (a, a_values), (b, b_values) = infos
    assert a["source"] == b["source"] == "computed" and a["key"] != b["key"]
    assert not torch.allclose(a_values, b_values)  # the override moved the numbers a stale hit would have reused


# -- the reference pass scores what the run trains on, and its tables grow --------------------------------

PAIRS = [{"prompt": f"Once upon a time there were {i} cats on a hill.", "chosen": f" The cat number {i} played in the sun.",
          "rejected": f" Sun {i} cat the."} for i in range(20)]


def make_trainer(tmp_path, out: str, *, cache: str = "cache", **overrides):
    """stories260K on 20 short pairs, DPO (loss_type explicit: the default is not DPO everywhere), 2 pairs a batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefalign import PreferenceConfig, PreferenceTrainer

    path = shared_path("models", "stories260K")
    settings = dict(output_dir=str(tmp_path / out), loss_type="dpo", max_length=64, per_device_train_batch_size=2,
                    use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
                    ref_cache_dir=str(tmp_path / cache))
    args = PreferenceConfig(**{**settings, **overrides})
    return PreferenceTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args,
                             train_dataset=Dataset.from_list(PAIRS), processing_class=AutoTokenizer.from_pretrained(path))


def counting_scorer(monkeypatch) -> list[int]:
    """Rows the reference pass scores, counted where it calls the model (independently of what it reports)."""
    import prefalign.training.reference as reference

    counted: list[int] = []
    real = reference.pair_logps

    def counting(model, batch, **kw):
        counted.extend(batch["row_index"].tolist())
        return real(model, batch, **kw)

    monkeypatch.setattr(reference, "pair_logps", counting)
    return counted


def held(table) -> dict[int, tuple]:
    """{row: its four values} of the rows a table holds."""
    rows = table.scored.nonzero().flatten().tolist()
    return {r: tuple(table.values[k][r].item() for k in ("chosen_sum", "rejected_sum", "chosen_mean", "rejected_mean"))
            for r in rows}


def test_a_short_run_scores_exactly_the_pairs_it_trains_on(tmp_path, monkeypatch):
    """max_steps 2 × gradient accumulation 2 × 2 pairs: the pass scores 8 of the 20 pairs, in the batches the seeded
    sampler gives training again — every row training looks up is in the table, and the table holds no other."""
    import math

    from prefalign.run_files import read_jsonl, read_metrics
    from prefalign.training.reference import ReferenceTable

    looked_up: list[int] = []
    lookup = ReferenceTable.lookup
    monkeypatch.setattr(ReferenceTable, "lookup", lambda self, rows: looked_up.extend(rows.tolist()) or lookup(self, rows))
    counted = counting_scorer(monkeypatch)
    trainer = make_trainer(tmp_path, "run", max_steps=2, gradient_accumulation_steps=2)
    trainer.train()
    trained = [r for step in read_jsonl(tmp_path / "run" / "trained_pairs.jsonl") for r in step["rows"]]
    table = trainer._ref_tables["train"]
    assert len(trained) == len(set(trained)) == 8 and set(looked_up) == set(trained)
    assert set(held(table)) == set(trained) and sorted(counted) == sorted(trained)
    assert trainer.reference_info[0] | {"path": None, "key": None} == {
        "split": "train", "source": "computed", "pairs": 8, "scored": 8, "path": None, "key": None}
    # the values are those of the very batches training ran: each micro-batch's first DPO loss is log 2
    first = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][0]
    assert abs(first["loss"] - math.log(2)) < 1e-6


def test_a_longer_run_extends_the_cached_table_with_only_the_new_pairs(tmp_path, monkeypatch):
    """2 steps, then 4 steps into another run folder with the same cache: the second pass scores only the 4 new
    pairs, keeps the first run's values bit for bit, and its table equals a fresh 4-step computation's."""
    make_trainer(tmp_path, "two", max_steps=2).train()
    counted = counting_scorer(monkeypatch)
    longer = make_trainer(tmp_path, "four", max_steps=4)
    longer.train()
    assert len(counted) == 4 and longer.reference_info[0]["source"] == "cache"
    assert longer.reference_info[0]["pairs"] == 8 and longer.reference_info[0]["scored"] == 4
    fresh = make_trainer(tmp_path, "fresh", cache="other-cache", max_steps=4)
    fresh.train()
    assert len(counted) == 4 + 8  # the fresh run scored all of its 8
    two = make_trainer(tmp_path, "two-again", max_steps=2)
    two.prepare_reference(steps=2)  # the 2-step run's table, read back from the cache (now holding 8 rows)
    extended, full = held(longer._ref_tables["train"]), held(fresh._ref_tables["train"])
    assert len(extended) == 8 and extended == full  # == on floats: bit-identical
    assert all(extended[r] == v for r, v in held(two._ref_tables["train"]).items())


def test_a_pass_killed_midway_leaves_whole_tables_that_the_next_run_extends(tmp_path, monkeypatch):
    """The tables are rewritten atomically as the pass goes; a pass that dies in its 3rd batch has written the
    first two, and the next run into the same folder scores only the rest — to a fresh computation's values."""
    import prefalign.training.reference as reference
    from prefalign.training.reference import read_table, run_folder_file

    monkeypatch.setattr(reference, "FLUSH_SECONDS", 0.0)  # write after every batch
    real, calls, on_disk = reference.pair_logps, [], []

    def dies_in_batch_3(model, batch, **kw):
        calls.append(1)
        if len(calls) == 3:  # what a kill at this moment leaves: the files as they are now
            on_disk.extend(read_table(p, None, split="train")[0].n_scored for p in
                           [*(tmp_path / "cache").glob("*.safetensors"), run_folder_file(tmp_path / "run", "train")])
            raise KeyboardInterrupt
        return real(model, batch, **kw)

    monkeypatch.setattr(reference, "pair_logps", dies_in_batch_3)
    try:
        make_trainer(tmp_path, "run", max_steps=4).prepare_reference(steps=4)
        raise AssertionError("the pass was to be interrupted")
    except KeyboardInterrupt:
        pass
    assert on_disk == [4, 4]  # written before the kill, not by the interruption's handler
    monkeypatch.setattr(reference, "pair_logps", real)
    counted = counting_scorer(monkeypatch)
    again = make_trainer(tmp_path, "run", max_steps=4)
    rng = torch.get_rng_state()
    again.prepare_reference(steps=4)
    assert torch.equal(torch.get_rng_state(), rng)  # the pass leaves the RNG as it found it
    assert len(counted) == 4 and again.reference_info[0]["source"] == "run folder"
    fresh = make_trainer(tmp_path, "fresh", cache="other-cache", max_steps=4)
    fresh.prepare_reference(steps=4)
    assert held(again._ref_tables["train"]) == held(fresh._ref_tables["train"])
    assert read_table(run_folder_file(tmp_path / "run", "train"), None, split="train")[0].n_scored == 8


def test_a_truncated_or_altered_table_is_scored_again_never_read(tmp_path, monkeypatch, caplog):
    """A cache file cut short, a run-folder file with bytes changed and a temporary file a killed write left
    behind: the next run warns, ignores them, scores the rows again (the same values) and rewrites both files."""
    from prefalign.training.reference import read_table, run_folder_file

    first = make_trainer(tmp_path, "run", max_steps=2)
    first.prepare_reference(steps=2)
    cached = next((tmp_path / "cache").glob("*.safetensors"))
    own = run_folder_file(tmp_path / "run", "train")
    cached.write_bytes(cached.read_bytes()[: cached.stat().st_size // 2])
    data = bytearray(own.read_bytes())
    data[-8:] = bytes(8)  # the last row's values zeroed: a well-formed file with the wrong numbers
    own.write_bytes(bytes(data))
    (own.parent / f".{own.name}.x1.tmp").write_bytes(b"half a file")
    counted = counting_scorer(monkeypatch)
    with caplog.at_level("WARNING", logger="prefalign.training.reference"):
        again = make_trainer(tmp_path, "run", max_steps=2)
        again.prepare_reference(steps=2)
    assert len(counted) == 4 and again.reference_info[0]["source"] == "computed"
    assert held(again._ref_tables["train"]) == held(first._ref_tables["train"])
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "cannot be read" in warned and "does not match its digest" in warned
    assert read_table(cached, None, split="train")[0].n_scored == read_table(own, None, split="train")[0].n_scored == 4


def test_a_row_looked_up_but_never_scored_is_an_error_not_a_value():
    from prefalign.errors import PrefalignError
    from prefalign.training.reference import ReferenceTable

    table = ReferenceTable(split="train")
    table.fill(torch.tensor([0, 3]), torch.tensor([[-1.0, -2.0, -0.5, float("nan")], [-3.0, -4.0, -1.5, -2.0]]))
    sums, means = table.lookup(torch.tensor([3, 0]))
    assert sums.tolist() == [-3.0, -1.0, -4.0, -2.0] and means[3].isnan()  # a scored NaN is a value like any
    for rows in ([0, 1], [7]):  # a hole inside the table, a row past its end
        with pytest.raises(PrefalignError, match=r"^reference log-probs \(train\): none for dataset rows \[\d\]; "):
            table.lookup(torch.tensor(rows))
    assert table.fill(torch.tensor([3]), torch.tensor([[9.0, 9.0, 9.0, 9.0]])) == 0  # a held row keeps its values
    assert table.lookup(torch.tensor([3]))[0].tolist() == [-3.0, -4.0]


def test_the_pass_reports_progress_with_pairs_per_second_and_time_left(tmp_path, monkeypatch, caplog, capsys):
    """Not on a terminal (or with disable_tqdm): log lines at each 10 % with the rate and what is left; on a
    terminal, a tqdm bar in pairs."""
    with caplog.at_level("INFO", logger="prefalign.training.reference"):
        make_trainer(tmp_path, "logged", max_steps=5).prepare_reference(steps=5)
    lines = [r.getMessage() for r in caplog.records if "pairs/s" in r.getMessage()]
    assert len(lines) == 5 and lines[-1].startswith("reference log-probs (train): 10/10 pairs (100%), ")
    assert all(line.endswith(" left") for line in lines)
    capsys.readouterr()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    make_trainer(tmp_path, "bar", cache="other", max_steps=5, disable_tqdm=False).prepare_reference(steps=5)
    err = capsys.readouterr().err
    assert "reference log-probs (train)" in err and "10/10" in err and "pair" in err


def test_a_resumed_run_with_more_steps_scores_the_new_pairs_with_the_policy_as_loaded(tmp_path, monkeypatch):
    """Resumed with max_steps raised, the run folder lacks the new steps' pairs and the policy has trained: they
    are scored by the policy loaded again from its weights (its cache key proves it is the reference the run
    folder's table came from), to the values a fresh 2-step pass gives."""
    saving = dict(save_strategy="steps", save_steps=1, learning_rate=1e-3)
    make_trainer(tmp_path, "run", max_steps=1, **saving).train()
    counted = counting_scorer(monkeypatch)
    resumed = make_trainer(tmp_path, "run", max_steps=2, **saving)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.state.global_step == 2 and len(counted) == 2
    assert resumed.reference_info[0]["source"] == "run folder" and resumed.reference_info[0]["scored"] == 2
    fresh = make_trainer(tmp_path, "fresh", cache="other-cache", max_steps=2)
    fresh.prepare_reference(steps=2)
    assert held(resumed._ref_tables["train"]) == held(fresh._ref_tables["train"])


def test_a_resumed_run_that_needs_pairs_its_reference_cannot_give_says_so(tmp_path):
    """A policy with no weights on disk to load again (built in memory): resuming it with more steps than its
    reference pass covered is refused in one line, before any step."""
    from prefalign.errors import PrefalignError
    from prefalign.training.reference import reload_policy

    saving = dict(save_strategy="steps", save_steps=1, learning_rate=1e-3)
    make_trainer(tmp_path, "run", max_steps=1, **saving).train()
    resumed = make_trainer(tmp_path, "run", max_steps=2, **saving)
    unwrapped = resumed.accelerator.unwrap_model(resumed.model)
    unwrapped.name_or_path = ""  # as a model built in memory has
    assert reload_policy(unwrapped) is None
    with pytest.raises(PrefalignError, match=r"^resume: .*train\.safetensors lacks pairs this run trains on"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    assert resumed.state.global_step == 1


def test_a_cli_run_killed_in_its_reference_pass_is_rerun_into_the_same_folder(tmp_path, monkeypatch):
    """The issue's case end to end: `prefalign train` dies in the reference pass (before any checkpoint); the same
    command again restarts the run in its folder, and its pass scores only the pairs the first one had not."""
    import json

    import prefalign.training.reference as reference
    from prefalign.config import load_config
    from prefalign.training.pipeline import train

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    argv = ["--model_name_or_path", str(shared_path("models", "stories260K")), "--dataset", str(data),
            "--output_dir", str(tmp_path / "run"), "--loss_type", "dpo", "--max_steps", "4", "--use_cpu",
            "--report_to", "none", "--save_strategy", "no", "--per_device_train_batch_size", "2", "--max_length", "64",
            "--seed", "0", "--disable_tqdm", "true", "--ref_cache_dir", str(tmp_path / "cache")]
    monkeypatch.setattr(reference, "FLUSH_SECONDS", 0.0)
    real, calls = reference.pair_logps, []

    def dies_in_batch_3(model, batch, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(model, batch, **kw)

    monkeypatch.setattr(reference, "pair_logps", dies_in_batch_3)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, argv))
    monkeypatch.setattr(reference, "pair_logps", real)
    counted = counting_scorer(monkeypatch)
    summary = train(load_config(None, argv))
    assert summary["global_step"] == 4 and len(counted) == 4
    assert [(r["source"], r["pairs"], r["scored"]) for r in summary["reference"]] == [("cache", 8, 4)]


@pytest.mark.parametrize("plan", [dict(num_train_epochs=1), dict(max_steps=12),
                                  dict(max_steps=1, train_sampling_strategy="group_by_length")])
def test_a_run_of_an_epoch_or_more_or_an_unseeded_sampler_scores_every_pair(tmp_path, plan):
    """An epoch (10 steps of 2), more than one (the second epoch's batches are others), or a length-grouped
    sampler (it draws from the global RNG, so a second iteration would give other batches): all 20 pairs."""
    trainer = make_trainer(tmp_path, "run", **plan)
    trainer.train()
    assert len(held(trainer._ref_tables["train"])) == 20 and trainer.reference_info[0]["pairs"] == 20
