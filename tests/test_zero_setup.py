"""What DeepSpeed cannot do is refused in one line before training (training/zero.py), and LoRA adapters start
from the same random values for the same seed on every process and every run (DeepSpeed's test compares two
processes with one; before, the adapters' initialisation was not seeded at all)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from prefalign.errors import PrefalignError
from prefalign.training.zero import check_setup, is_partitioned


def _accelerator(stage: int, gather: bool = True):
    config = {"zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather}}
    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config=config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))


def _args(**kw):
    return SimpleNamespace(**{"on_nonfinite": "error", "sync_ref_model": False, **kw})


def test_zero3_without_a_gathered_save_is_refused():
    check_setup(_args(), _accelerator(3))
    check_setup(_args(), _accelerator(2, gather=False))  # ZeRO-2 saves whole weights anyway
    with pytest.raises(PrefalignError, match="stage3_gather_16bit_weights_on_model_save") as e:
        check_setup(_args(), _accelerator(3, gather=False))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("setting", "words"), [({"on_nonfinite": "skip"}, "inside backward"),
                                                ({"sync_ref_model": True}, "sync_ref_model")])
def test_what_deepspeed_cannot_do_is_refused_in_one_line(setting, words):
    with pytest.raises(PrefalignError, match=words) as e:
        check_setup(_args(**setting), _accelerator(2))
    assert "\n" not in str(e.value)


def test_a_plain_model_is_not_partitioned():
    assert not is_partitioned(torch.nn.Linear(2, 2))
    weight = torch.nn.Parameter(torch.empty(0))
    weight.ds_id = 0  # what zero.Init leaves on a placeholder
    module = torch.nn.Module()
    module.weight = weight
    assert is_partitioned(module)


def test_lora_adapters_start_the_same_for_the_same_seed(stories260k, tmp_path):
    from prefalign.config import load_config
    from prefalign.training.pipeline import load_policy

    calls = iter(range(100))

    def adapters(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(1000 + next(calls))  # a different global random state before every load
        cfg = load_config(None, {"model_name_or_path": str(stories260k), "dataset": "unused", "use_peft": True,
                                 "lora_r": 4, "seed": seed, "output_dir": str(tmp_path / "run")})
        model, _ = load_policy(cfg)
        return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_A" in k}

    first, again, other = adapters(0), adapters(0), adapters(1)
    assert first and all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
