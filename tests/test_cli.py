"""The headless CLI: clear errors before any work, and the whole demo pipeline end to end."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.cli import main
from core.data.store import Store


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
    assert report["sft"]["gold"] > report["base"]["gold"]
    # The alignment tax: response-only SFT raises the held-out pretraining loss of the base.
    assert report["sft"]["pretrain_loss"] > report["base"]["pretrain_loss"] + 0.1
    for key in ("ppo", "ppo_no_ptx"):
        assert report[key]["pretrain_drift"] == report[key]["pretrain_loss"] - report["sft"]["pretrain_loss"]
    rm = report["rm"]
    assert rm["heldout_accuracy"] == rm["accuracy"] and rm["pairs_all"] > 0 and rm["epochs_done"] == 1
    assert {"kl", "reward", "ptx_loss"} <= set(report["ppo"]) and report["ppo"]["ptx_loss"] > 0
    assert report["ppo_no_ptx"]["ptx_loss"] is None  # plain PPO computes no ptx term
    AutoModelForCausalLM.from_pretrained(out / "sft")
    AutoModelForSequenceClassification.from_pretrained(out / "rm")
    AutoModelForCausalLM.from_pretrained(out / "ppo")
    runs = {r["id"]: r["status"] for r in Store().list_runs()}
    assert len(runs) == 5 and set(runs.values()) == {"done"}  # the pipeline run and its four stage runs
    # The demo went through the store (issue 11): its data is there, PPO kept a rollout sample, and the
    # pipeline run's report is what Home's results card shows.
    from core.analysis import results
    from core.data import rollouts

    store = Store()
    counts = store.counts()
    assert counts["demonstrations"] == 320 and counts["rankings"] == report["imported"]["rankings"] > 0
    assert {r["labeler"] for r in store.list_rankings()} == {"simulated"}
    ppo_run = next(r for r in runs if r.endswith("-ppo"))
    assert 0 < rollouts.count(store, ppo_run)["samples"] <= 8 * rollouts.count(store, ppo_run)["steps"]
    run, shown = results.latest_report(store)
    assert shown == report and run["stage"] == "pipeline"
    # The run doctor's findings on every stage run and on the report, as `rlhf doctor <pipeline run>` gives them,
    # and its verdict in each stage run's log.
    from core.analysis import doctor

    assert report["doctor"] == [f.to_dict() for f in doctor.diagnose_run(store, run["id"])]
    for stage_run in (r for r in runs if r != run["id"]):
        assert any(line["message"].startswith("doctor: ") for line in store.run_log(stage_run)), stage_run


def test_set_and_yaml_read_numbers_as_people_type_them(tmp_path):
    """YAML 1.1 reads '2e-4' (no dot) as text: a float field takes it as the number, from --set and
    from a config file alike; text that is no number is still refused."""
    from core.cli import parse_sets
    from core.config import SFTConfig

    values = parse_sets(["learning_rate=2e-4", "epochs=3", "dropout=0", "model=out/sft"])
    config = SFTConfig.from_dict(values)
    assert (config.learning_rate, config.epochs, config.dropout, config.model) == (2e-4, 3, 0.0, "out/sft")
    path = tmp_path / "sft.yaml"
    path.write_text("learning_rate: 1e-4\nwarmup_ratio: 5e-2\n")
    assert (SFTConfig.from_yaml(path).learning_rate, SFTConfig.from_yaml(path).warmup_ratio) == (1e-4, 0.05)
    with pytest.raises(ValueError, match="learning_rate must be of type float, got str 'fast'"):
        SFTConfig.from_dict({"learning_rate": "fast"})


def test_help_does_not_import_torch():
    """`rlhf --help` and a stage's --help are instant: building the parser imports no torch."""
    code = ("import sys\nfrom core.cli import main\n"
            "for argv in (['--help'], ['ppo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "kl_coef: beta" in out  # field help comes from the config's metadata
    assert out.strip().splitlines()[-1] == "False"


def test_a_named_cli_run_resumes_in_place(workbench_home, tmp_path, monkeypatch, capsys):
    """`rlhf sft --name X` on X's interrupted run resumes it under the same name and output, its
    curve continuing; a done run or a different config under that name is refused."""
    import core.stages.sft

    calls = []

    def stage(config, store, events, output_dir):
        calls.append(Path(output_dir))
        events.log(f"call {len(calls)}")
        events.metrics(len(calls), {"sft_loss": 1.0 / len(calls)})
        if len(calls) == 1:
            raise KeyboardInterrupt
        return Path(output_dir)

    monkeypatch.setattr(core.stages.sft, "run", stage)
    args = ["sft", "--name", "mine", "--output", str(tmp_path / "out"), "--set", "epochs=2"]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    store = Store()
    assert store.get_run("mine")["status"] == "interrupted"
    assert main(args) == 0
    assert calls == [tmp_path / "out", tmp_path / "out"]
    assert [r["id"] for r in store.list_runs()] == ["mine"] and store.get_run("mine")["status"] == "done"
    assert [(m["step"], m["value"]) for m in store.metrics(["mine"], ["sft_loss"])] == [(1, 1.0), (2, 0.5)]
    # The stage's summary ends with the run doctor's line, kept in the run's log too (two points: no trend yet).
    assert [line["message"] for line in store.run_log("mine")] == ["call 1", "call 2", "doctor: nothing looks "
                                                                    "wrong in mine"]
    assert capsys.readouterr().out.splitlines()[-1] == "doctor: nothing looks wrong in mine"
    assert main(args) == 2
    assert "already done" in capsys.readouterr().err
    store.set_run_status("mine", "stopped")
    assert main([*args[:-1], "epochs=3"]) == 2
    assert "exists with another config (differs in: epochs)" in capsys.readouterr().err
    assert len(calls) == 2


def test_another_base_of_the_same_corpus_shares_the_tokenizer_not_the_weights(tmp_path, capsys):
    """`rlhf pretrain-demo --init-seed S`: the corpus and its tokenizer as the default seed's, other weights (the
    members of an ensemble from different bases need one tokenizer); the same init seed twice, the same weights.
    Without --output it would overwrite the bundled model: refused."""
    import torch
    from safetensors.torch import load_file

    from core.models.loading import load_tokenizer
    from core.models.pretrain import pretrain_demo

    tiny = dict(n_documents=120, n_layer=1, n_embd=32, n_head=2, epochs=1, device="cpu", log=lambda *_: None)
    bases = {name: pretrain_demo(tmp_path / name, init_seed=s, **tiny) for name, s in (("a", 1), ("b", 2), ("a2", 1))}
    weights = {name: load_file(path / "model.safetensors") for name, path in bases.items()}
    assert load_tokenizer(bases["a"]).get_vocab() == load_tokenizer(bases["b"]).get_vocab()
    assert all(torch.equal(weights["a"][k], weights["a2"][k]) for k in weights["a"])
    assert max((weights["a"][k] - weights["b"][k]).abs().max().item() for k in weights["a"]) > 1e-2
    assert main(["pretrain-demo", "--init-seed", "1"]) == 2
    assert "--output" in capsys.readouterr().err
