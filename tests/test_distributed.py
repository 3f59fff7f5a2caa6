"""Stages on 2 CPU processes (gloo) under `accelerate launch`: the same run as one process with the same
global batch, one metrics row per step, one checkpoint writer; PPO's resume and whitening over ranks; Stop
from the job manager; bad input."""

import json
import sqlite3

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.cli import main
from core.data.store import Store
from core.distributed import Distributed
from core.stages.events import Events
from core.runs.jobs import JobManager
from core.runs.launch import CONFIGS_DIR
from core.stages import make_config, sft
from core.stages.resume import STATE_FILE, TRAINING_FILE, checkpoint_path

SFT = ["--preset", "quick", "--set", "epochs=1", "--set", "n_demonstrations=96", "--set", "batch_size=8",
       "--set", "eval_prompts=0", "--set", "device=cpu"]
RM = ["--preset", "quick", "--set", "sft_model=bundled", "--set", "epochs=1", "--set", "n_prompts=48",
      "--set", "heldout_prompts=16", "--set", "batch_size=4", "--set", "device=cpu"]
# 3 PPO steps of 8 episodes (4 per rank), ptx on (2 blocks per rank), an EMA, a step checkpoint after step 2.
PPO = ["--preset", "quick", "--set", "sft_model=bundled", "--set", "reward_model=bundled", "--set", "batch_size=8",
       "--set", "total_episodes=24", "--set", "response_length=8", "--set", "ptx_batch_size=4",
       "--set", "save_every=2", "--set", "eval_prompts=0", "--set", "ema_decay=0.9", "--set", "device=cpu"]


def metric_rows(db_path, run_id: str, name: str) -> list[tuple[int, float]]:
    with sqlite3.connect(db_path) as db:
        return db.execute("SELECT step, value FROM metrics WHERE run_id = ? AND name = ? ORDER BY step",
                          (run_id, name)).fetchall()


def checkpoint_rows(db_path, run_id: str) -> list[str]:
    with sqlite3.connect(db_path) as db:
        return [r[0] for r in db.execute("SELECT name FROM checkpoints WHERE run_id = ?", (run_id,))]


def run_cli(stage: str, args: list[str], output, name: str, processes: int | None) -> None:
    launch = ["--processes", str(processes)] if processes else []
    assert main([stage, *args, "--output", str(output), "--name", name, *launch]) == 0


@pytest.fixture
def home(workbench_home, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return workbench_home


def test_sft_on_two_processes_matches_one(home, tmp_path):
    run_cli("sft", SFT, tmp_path / "one", "one", None)
    run_cli("sft", SFT, tmp_path / "two", "two", 2)
    db = home / "workbench.db"
    one, two = metric_rows(db, "one", "sft_loss"), metric_rows(db, "two", "sft_loss")
    # 92 training rows (4 held out) at a global batch of 8: 12 steps on either, each logged once.
    assert [s for s, _ in one] == [s for s, _ in two] == list(range(1, 13))
    # The loss is the mean over the global batch's answer tokens on either, so the runs are the same run:
    # a mean of the ranks' means would drift from step 2 (Adam's first step moves every weight by lr).
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-3)
    val_one = json.loads((tmp_path / "one" / "sft_summary.json").read_text())["val_loss"]
    val_two = json.loads((tmp_path / "two" / "sft_summary.json").read_text())["val_loss"]
    assert val_two == pytest.approx(val_one, rel=1e-3)
    assert checkpoint_rows(db, "two") == ["two-epoch-1", "two"]  # one writer, not one per rank
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two") is not None
    # Launched from a terminal, the launch is on record (the app resumes it on 2 processes); one process has none.
    assert Store(db).get_run("two")["launch"] == {"processes": 2, "accelerate_config": None}
    assert Store(db).get_run("one")["launch"] is None
    with sqlite3.connect(db) as db_conn:
        assert db_conn.execute("SELECT status FROM runs WHERE id = 'two'").fetchone() == ("done",)


def test_reward_model_on_two_processes_matches_one(home, tmp_path):
    run_cli("rm", RM, tmp_path / "one", "one", None)
    run_cli("rm", RM, tmp_path / "two", "two", 2)
    db = home / "workbench.db"
    one, two = metric_rows(db, "one", "rm_loss"), metric_rows(db, "two", "rm_loss")
    assert len(one) > 3 and [s for s, _ in one] == [s for s, _ in two]
    assert two[0][1] == pytest.approx(one[0][1], rel=0.05)  # the same 4 rankings, split 2 + 2
    acc_one = metric_rows(db, "one", "heldout_accuracy")[-1][1]
    acc_two = metric_rows(db, "two", "heldout_accuracy")[-1][1]
    assert abs(acc_two - acc_one) <= 0.1
    assert checkpoint_rows(db, "two") == ["two-epoch-1", "two"]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two")
    assert model.config.reward_bias != 0.0


def test_ppo_on_two_processes_logs_once_writes_once_and_resumes(home, tmp_path):
    run_cli("ppo", PPO, tmp_path / "out", "two", 2)
    db = home / "workbench.db"
    for name in ("reward", "kl", "ptx_loss", "episodes_per_s"):
        assert [s for s, _ in metric_rows(db, "two", name)] == [1, 2, 3], name  # one row per step, not per rank
    assert metric_rows(db, "two", "kl")[0][1] == pytest.approx(0.0, abs=1e-4)  # step 1: policy = reference
    assert checkpoint_rows(db, "two") == ["two-step-2", "two-step-3", "two"]  # one writer
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    step_2 = checkpoint_path(tmp_path / "out", "step", 2)
    for saved in (tmp_path / "out" / "ema", step_2, step_2 / "ema"):  # the EMA, a step checkpoint and its EMA
        assert AutoModelForCausalLM.from_pretrained(saved) is not None
    state = json.loads((checkpoint_path(tmp_path / "out", "step", 3) / STATE_FILE).read_text())
    assert (state["step"], state["episodes"], state["processes"]) == (3, 24, 2)  # episodes counted globally
    with sqlite3.connect(db) as db_conn:  # the rollout browser's rows: rank 0's 4 answers of each step, once
        rewards = db_conn.execute("SELECT rewards FROM rollout_steps WHERE run_id = 'two' ORDER BY step").fetchall()
        assert [len(json.loads(r)) for r, in rewards] == [4, 4, 4]

    # Two more steps into the same output: the run resumes after step 3 (also on 2 processes).
    run_cli("ppo", [*PPO, "--set", "total_episodes=40"], tmp_path / "out", "more", 2)
    assert [s for s, _ in metric_rows(db, "more", "reward")] == [4, 5]
    state = json.loads((checkpoint_path(tmp_path / "out", "step", 5) / STATE_FILE).read_text())
    assert (state["step"], state["episodes"]) == (5, 40)


@pytest.mark.parametrize("lora_r", [0, 8])
def test_ppo_ranks_hold_the_same_weights_after_a_step_on_different_prompts(home, lora_r):
    import re
    import subprocess
    from pathlib import Path

    from core.runs import launch

    argv = launch.command(2, None, cpu=True, cli_args=[str(lora_r)], module="tests.distributed_ppo_step")
    done = subprocess.run(argv, env=launch.environment(), cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    gap, to_one, change = map(float, re.search(r"max weight gap (\S+) gap to one process (\S+) max change (\S+)",
                                               done.stdout).groups())
    assert change > 1e-4  # the step trained ...
    assert gap == 0.0  # ... every rank took the same (averaged) update: policy, value head and ptx term ...
    assert to_one < change * 1e-2  # ... and it is the one-process update on the whole batch


def test_ptx_and_minibatch_sizes_must_divide_over_the_processes(home, tmp_path, capsys):
    for bad, message in ((["--set", "ptx_batch_size=3"], "ptx_batch_size=3"),
                         (["--set", "num_minibatches=8"], "batch_size / num_minibatches=1"),
                         (["--accelerate-config", str(CONFIGS_DIR / "fsdp2.yaml")], "GPUs only")):
        assert main(["ppo", *PPO, *bad, "--output", str(tmp_path / "out"), "--name", "bad", "--processes", "2"]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (home / "workbench.db").exists()


def test_whitening_with_a_reduction_over_ranks_equals_whitening_the_whole_batch():
    import threading

    import torch

    from core.stages.rl import whiten

    torch.manual_seed(0)
    x = torch.randn(6, 5) * 3 + 1
    mask = (torch.rand(6, 5) > 0.3).float()
    shares = [(x[r::2], mask[r::2]) for r in range(2)]  # the rows each of 2 ranks holds
    # A fake process group: two threads in lockstep, each collective returns the sum of both inputs.
    barrier, sent, whitened = threading.Barrier(2), [None, None], [None, None]

    def rank(r: int) -> None:
        def all_reduce_sum(t):
            sent[r] = t
            barrier.wait()
            total = sent[0] + sent[1]
            barrier.wait()  # both have read before the next collective overwrites `sent`
            return total

        whitened[r] = whiten(*shares[r], all_reduce_sum=all_reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    whole = whiten(x, mask)
    for r in range(2):
        torch.testing.assert_close(whitened[r], whole[r::2])
    # Without the reduction a rank whitens with its own share's statistics, which differ.
    assert not torch.allclose(whiten(*shares[0]), whole[0::2], atol=1e-3)


def test_stop_from_the_job_manager_ends_both_ranks_within_a_step(home, store, tmp_path):
    manager = JobManager(store, runs_dir=tmp_path / "runs")
    config = make_config("sft", "quick", dict(epochs=1, n_demonstrations=1200, batch_size=8, eval_prompts=0,
                                              device="cpu"))
    run_id = manager.submit("sft", config, processes=2)
    import time

    deadline = time.monotonic() + 300
    while store.last_step(run_id) < 2:
        assert manager.get(run_id).status == "running", manager.get(run_id).error
        assert time.monotonic() < deadline
        time.sleep(0.2)
    while manager.get(run_id).done < 1:  # progress comes back from the subprocess's output file, polled
        assert time.monotonic() < deadline
        time.sleep(0.2)
    manager.stop(run_id)
    asked_at = store.last_step(run_id)
    job = manager.wait(run_id, timeout=300)
    assert job.status == "stopped", job.error
    steps = [s for s, _ in metric_rows(store.path, run_id, "sft_loss")]
    assert steps == list(range(1, len(steps) + 1))  # one row per step: no rank wrote its own
    assert steps[-1] <= asked_at + 1  # the step in flight at most, then both ranks stopped
    assert steps[-1] < 148  # well before the epoch's 148 steps
    assert AutoModelForCausalLM.from_pretrained(job.output_dir) is not None


# -- bad input: a clear message, nothing written, no process launched ---------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--processes", "0"], "at least 1"),
    (["--processes", "3"], "divide evenly over 3"),
    (["--processes", "2", "--accelerate-config", "/no/such.yaml"], "does not exist"),
    (["--processes", "2", "--accelerate-config", "BROKEN"], "distributed_type"),
    (["--processes", "2", "--accelerate-config", str(CONFIGS_DIR / "zero2.yaml")], "DeepSpeed"),
])
def test_bad_launch_requests_are_refused_before_any_work(home, tmp_path, capsys, extra, message):
    broken = tmp_path / "broken.yaml"
    broken.write_text("- just\n- a list\n")
    extra = [str(broken) if e == "BROKEN" else e for e in extra]
    if "zero2.yaml" in " ".join(extra):
        pytest.importorskip("accelerate")
        if __import__("importlib").util.find_spec("deepspeed") is not None:
            pytest.skip("deepspeed is installed here")
    code = main(["sft", *SFT, "--output", str(tmp_path / "out"), "--name", "bad", *extra])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not (home / "workbench.db").exists()  # the store was not even opened


def test_stages_not_wired_for_several_processes_are_refused(home, tmp_path, capsys):
    assert main(["dpo", "--set", "sft_model=bundled", "--output", str(tmp_path / "o"), "--processes", "2"]) == 2
    assert "one process" in capsys.readouterr().err


def test_ppo_on_a_config_that_shards_parameters_is_refused_on_gpus(monkeypatch):
    # Where FSDP2/ZeRO-3 would apply (GPUs), PPO is refused: its sampling, scoring and ptx read the policy outside
    # the prepared module, which holds a shard there. Simulated GPUs: the check runs before any device is touched.
    import torch

    from core.runs import launch
    from core.models import loading

    monkeypatch.setattr(loading, "pick_device", lambda _: loading.Device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    config = make_config("ppo", "quick", dict(sft_model="bundled", reward_model="bundled", batch_size=8, ptx_batch_size=4))
    with pytest.raises(ValueError, match="DDP or ZeRO-2"):
        launch.check("ppo", config, 2, CONFIGS_DIR / "fsdp2.yaml")
    with pytest.raises(ValueError, match="more than the 2 GPU"):
        launch.check("ppo", config, 4, None)
    assert launch.check("ppo", config, 2, CONFIGS_DIR / "ddp.yaml")


class ShardedOptimizerState(Distributed):
    """One process that says its optimizer state is sharded (as DeepSpeed/FSDP ranks do)."""

    sharded = True


def test_a_checkpoint_with_sharded_optimizer_state_resumes_with_fresh_moments(store, tmp_path):
    config = make_config("sft", "quick", dict(epochs=1, n_demonstrations=48, batch_size=8, eval_prompts=0,
                                              device="cpu"))
    store.create_run("sharded", "sft", config.to_dict(), str(tmp_path / "out"))
    sft.run(config, store, Events(store, "sharded", dist=ShardedOptimizerState()), tmp_path / "out")
    training = torch.load(checkpoint_path(tmp_path / "out", "epoch", 1) / TRAINING_FILE, weights_only=True)
    assert "optimizer" not in training and "scheduler" in training  # rank 0's shard alone would be wrong
    steps = [s for s, _ in metric_rows(store.path, "sharded", "sft_loss")]

    config.epochs = 2
    sft.run(config, store, Events(store, "sharded"), tmp_path / "out")  # resumed on one, unsharded process
    more = [s for s, _ in metric_rows(store.path, "sharded", "sft_loss")]
    assert more[: len(steps)] == steps and more[len(steps)] == steps[-1] + 1  # the step counter continued
    assert any("moments start afresh" in line for line in (r["message"] for r in store.run_log("sharded")))
    # A checkpoint from an unsharded run keeps its optimizer state for an exact resume.
    training = torch.load(checkpoint_path(tmp_path / "out", "epoch", 2) / TRAINING_FILE, weights_only=True)
    assert training["optimizer"]["state"]


def test_job_manager_refuses_bad_processes_before_recording(store, tmp_path):
    manager = JobManager(store, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="divide evenly"):
        manager.submit("sft", make_config("sft", "quick", dict(batch_size=9, device="cpu")), processes=2)
    assert store.list_runs() == []
