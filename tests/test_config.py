"""Recipes + command-line overrides, unknown keys with suggestions, impossible values."""

import pytest

from prefalign.config import load_config
from prefalign.errors import ConfigError


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss_type: simpo\nbeta: 2.0\nlearning_rate: 1e-6\nuse_cpu: true\nreport_to: none\n")
    cfg = load_config(recipe, ["--beta", "2.5", "--learning_rate=3e-7", "--gamma", "0.8", "--bf16"])
    assert cfg.loss_type == "simpo"
    assert cfg.beta == 2.5 and cfg.gamma == 0.8
    assert cfg.learning_rate == pytest.approx(3e-7)
    assert cfg.bf16 is True
    assert cfg.loss_hparams() == {"beta": 2.5, "gamma": 0.8}  # unset keys take the loss's defaults
    assert cfg.reference_mode() == "none"


def test_yaml_float_written_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-6 as a string; the config must still get a float.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-6\nuse_cpu: true\n")
    assert load_config(recipe).learning_rate == pytest.approx(1e-6)


def test_unknown_key_suggests_the_nearest(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learnig_rate: 1e-6\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown key 'learnig_rate'; did you mean 'learning_rate'\?"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'bta'; did you mean 'beta'\?"):
        load_config(None, ["--bta", "1"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--beta", "-1"], "beta: must be > 0"),
        (["--label_smoothing", "0.5"], r"label_smoothing: must be in \[0, 0.5\)"),
        (["--loss_type", "dppo"], "did you mean 'dpo'"),
        (["--amapo_variant", "papper"], "amapo_variant: must be one of official, paper"),
        (["--max_prompt_length", "600"], "max_prompt_length"),
        (["--beta", "abc"], "beta='abc'"),
        (["--use_peft", "maybe"], "use_peft='maybe'"),
    ],
)
def test_impossible_values(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*flags, "--use_cpu"])


def test_reference_mode_follows_the_loss():
    assert load_config(None, ["--loss_type", "dpo", "--use_cpu"]).reference_mode() == "precomputed"
    assert load_config(None, ["--loss_type", "dpo", "--use_peft", "--use_cpu"]).reference_mode() == "adapter"
    assert load_config(None, ["--loss_type", "dpo", "--reference", "model", "--use_cpu"]).reference_mode() == "model"
    assert load_config(None, ["--loss_type", "amapo", "--use_cpu"]).reference_mode() == "none"


def test_amapo_switches_reach_the_loss():
    cfg = load_config(None, ["--loss_type", "amapo", "--amapo_variant", "paper", "--amapo_exponential", "false",
                             "--use_cpu"])
    assert cfg.loss_hparams() == {
        "amapo_variant": "paper",
        "z_norm": True,
        "exponential": False,
        "zero_margin": True,
    }


def test_shipped_recipes_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "recipes"
    recipes = sorted(p for p in root.rglob("*.yaml") if "sweeps" not in p.parts)
    assert len(recipes) >= 11
    for r in recipes:
        cfg = load_config(r, ["--use_cpu", "--bf16", "false"])
        assert cfg.loss_type in r.name


def test_shipped_sweeps_load_and_every_cell_is_a_valid_config():
    from pathlib import Path

    from prefalign.config import PreferenceConfig
    from prefalign.sweep.spec import load_sweep

    sweeps = sorted((Path(__file__).resolve().parents[1] / "recipes" / "sweeps").glob("*.yaml"))
    assert len(sweeps) >= 5
    for path in sweeps:
        sweep = load_sweep(path)
        methods, seeds = {"study-task-hard-6seeds": (3, 6), "study-offline-vs-online": (4, 3)}.get(path.stem, (5, 3))
        assert sweep.baseline == "dpo" and len(sweep.methods) == methods and len(sweep.cells) == methods * seeds
        for cell in sweep.cells:
            PreferenceConfig(**{**cell.values, "use_cpu": True, "bf16": False})


def test_old_names_are_aliases(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("warmup_ratio: 0.1\nevaluation_strategy: 'no'\nuse_cpu: true\n")
    cfg = load_config(recipe)
    assert cfg.warmup_steps == pytest.approx(0.1)


def test_recipe_inputs_resolve_from_the_recipe_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    recipe = folder / "r.yaml"
    recipe.write_text("dataset: ../data/train.jsonl\neval_dataset: test.jsonl\nmodel_name_or_path: org/model\n"
                      "output_dir: runs/x\nuse_cpu: true\n")
    monkeypatch.chdir(tmp_path)  # elsewhere: the recipe's paths still point at its own files
    cfg = load_config(recipe)
    assert cfg.dataset == str(tmp_path / "project" / "data" / "train.jsonl")
    assert cfg.eval_dataset == str(folder / "test.jsonl")
    assert cfg.model_name_or_path == "org/model"  # a hub id stays a hub id
    assert cfg.output_dir == "runs/x"  # outputs go where prefalign runs
    # a command-line value is relative to where the command runs, as any shell path
    assert load_config(recipe, ["--dataset", "mine.jsonl"]).dataset == "mine.jsonl"


def test_list_keys_from_the_command_line_take_their_element_type():
    cfg = load_config(None, ["--loss_type", "sigmoid,sft", "--loss_weights", "1.0,0.5", "--report_to", "none"])
    assert cfg.loss_type == ["dpo", "sft"] and cfg.loss_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"^command line: loss_weights='1,x': could not convert string to float"):
        load_config(None, ["--loss_type", "sigmoid,sft", "--loss_weights", "1,x", "--report_to", "none"])


@pytest.mark.parametrize("launched", ["simple", "plain"])
def test_accelerate_cpu_launcher_starting_one_process_is_said(monkeypatch, caplog, launched):
    """accelerate's CPU launcher (a MULTI_CPU config, or --cpu --num_processes 2) starts one process without
    mpirun, with MASTER_PORT set and no world size: that run trains alone (2 pairs a step where the DDP run it
    was meant to be takes 4) and is said; a plain run is not (torchrun's processes, which have LOCAL_RANK and
    WORLD_SIZE, are not either: test_multiprocess.py)."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT",
                "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    if launched != "plain":
        monkeypatch.setenv("MASTER_PORT", "29500")
        monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    with caplog.at_level("WARNING", logger="prefalign.config"):
        load_config(None, ["--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2"])
    said = [r.getMessage() for r in caplog.records if "started one process" in r.getMessage()]
    assert said == (["accelerate launch started one process, not several: its CPU launcher (a MULTI_CPU config, or "
                     "--cpu) starts more only under mpirun, so this run trains alone, 2 pairs a step; for N processes "
                     "over gloo launch with --multi_gpu --num_processes N (without a GPU prefalign sets use_cpu)"]
                    if launched == "simple" else [])
