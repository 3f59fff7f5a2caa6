"""Configs: defaults, presets, YAML round-trip, and errors that name the field."""

import pytest

from core.config import PPOConfig, RewardConfig, SFTConfig
from core.stages import make_config
def test_instructgpt_defaults_and_scaled_presets():
    assert SFTConfig().epochs == 16 and SFTConfig().dropout == 0.2
    assert RewardConfig().epochs == 1 and PPOConfig().kl_coef == 0.02 and PPOConfig().ptx_coef == 27.8
    assert make_config("sft", "quick").epochs < 16


def test_yaml_round_trip(tmp_path):
    config = make_config("ppo", "quick", {"kl_coef": 0.3, "ema_decay": 0.992})
    path = tmp_path / "ppo.yaml"
    path.write_text(config.to_yaml())
    assert PPOConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    "stage, values, field",
    [
        ("sft", {"learning_rate": -1e-3}, "learning_rate"),
        ("sft", {"epochs": 0}, "epochs"),
        ("sft", {"dropout": "high"}, "dropout"),
        ("rm", {"k": 1}, "k"),
        ("rm", {"k": 10}, "k"),
        ("ppo", {"kl_coef": -0.1}, "kl_coef"),
        ("ppo", {"cliprange": 0}, "cliprange"),
        ("ppo", {"response_length": 0}, "response_length"),
        ("ppo", {"kl_estimator": "k2"}, "kl_estimator"),
        ("ppo", {"batch_size": 10, "num_minibatches": 3}, "batch_size"),
        ("ppo", {"adaptive_kl": "yes"}, "adaptive_kl"),
        ("sft", {"device": "tpu"}, "device"),
        ("ppo", {"precision": "fp16"}, "precision"),
        ("grpo", {"precision": "half"}, "precision"),
    ],
)
def test_invalid_values_are_rejected_naming_the_field(stage, values, field):
    with pytest.raises(ValueError, match=field):
        make_config(stage, None, values)


def test_unknown_keys_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*learning_rat\\b"):
        make_config("sft", None, {"learning_rat": 1e-3})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        SFTConfig.from_yaml(bad)
