"""The headless CLI: clear errors before any work, and the whole demo pipeline end to end."""

import json

from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.cli import main
from core.store import Store


def test_invalid_config_fails_before_any_work(workbench_home, tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", "--preset", "quick", "--set", "learning_rate=-0.1", "--output", str(out)]) == 2
    assert "learning_rate must be > 0" in capsys.readouterr().err
    assert main(["ppo", "--set", "cliprange=0", "--output", str(out)]) == 2
    assert "cliprange" in capsys.readouterr().err
    assert main(["ppo", "--set", "sft_model=/nowhere/sft", "--set", "reward_model=/nowhere/rm", "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sft", "--name", "../escape", "--output", str(out)]) == 2
    assert "invalid run name" in capsys.readouterr().err
    assert not out.exists()
    assert Store().counts()["runs"] == 0


def test_demo_pipeline_end_to_end(workbench_home, tmp_path, capsys):
    out = tmp_path / "pipe"
    code = main([
        "pipeline", "--demo", "--preset", "quick", "--output", str(out), "--eval-prompts", "32",
        "--set", "sft:epochs=1", "--set", "sft:n_demonstrations=320", "--set", "sft:eval_prompts=16",
        "--set", "rm:n_prompts=48", "--set", "rm:heldout_prompts=16", "--set", "rm:epochs=1",
        "--set", "ppo:total_episodes=32", "--set", "ppo:batch_size=16", "--set", "ppo:response_length=12",
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("base", "sft", "ppo", "ppo_no_ptx"):
        assert 0 <= report[key]["gold"] <= 1 and report[key]["pretrain_loss"] > 0
    assert report["sft"]["gold"] > report["base"]["gold"]
    assert 0 <= report["rm"]["heldout_accuracy"] <= 1
    assert {"kl", "reward", "ptx_loss"} <= set(report["ppo"]) and report["ppo"]["ptx_loss"] > 0
    assert report["ppo_no_ptx"]["ptx_loss"] is None  # plain PPO computes no ptx term
    AutoModelForCausalLM.from_pretrained(out / "sft")
    AutoModelForSequenceClassification.from_pretrained(out / "rm")
    AutoModelForCausalLM.from_pretrained(out / "ppo")
    runs = {r["id"]: r["status"] for r in Store().list_runs()}
    assert len(runs) == 4 and set(runs.values()) == {"done"}


def test_set_reads_numbers_as_people_type_them():
    from core.cli import _parse_sets

    assert _parse_sets(["learning_rate=2e-4", "epochs=3", "adaptive_kl=true", "model=out/sft"]) == {
        "learning_rate": 2e-4, "epochs": 3, "adaptive_kl": True, "model": "out/sft"}
