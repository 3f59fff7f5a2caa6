"""Bad input, one place: every case a user can cause is rejected with a sentence they understand,
and the database is unchanged (every table snapshotted before and after).

Cases (issue 6, promise 3), by entry point:
  import (Prompts page, `core.data.formats`): malformed JSON line, wrong column names, empty prompt,
    empty completion, prompt over the limit, response over the limit, non-UTF-8 bytes, an empty
    file, a JSON line that is not an object, a CSV 'responses' cell that is not a list,
    a 200 MB upload (bytes and path), a tie (chosen == rejected), duplicate responses after
    whitespace, K = 1 and K = 10 in a batch (all or nothing);
  store: ranking for a prompt that was deleted, an edit that collides with another prompt,
    run/checkpoint names with '../' or '/';
  configs (CLI and job manager): out-of-range values, values of the wrong type, unknown keys,
    a CUDA request without CUDA;
  models: a model directory without weights, one holding only pickle `.bin` weights, a reward
    model whose tokenizer does not match the SFT model's (PPO);
  jobs: a stop request for a finished job, resume of a run whose checkpoint was deleted;
  checkpoints: disk full while writing one (the previous checkpoint stays intact and listed).

Some shapes of these cases are also tested beside their module (test_store_formats.py,
test_models.py, test_config.py); the cases here reach them through other entry points or values.
"""

from __future__ import annotations

import errno
import json
import mmap
import re
import sqlite3
from pathlib import Path

import pytest
from conftest import orphan
import torch
import yaml

from core import cli
from core.data.formats import MAX_IMPORT_BYTES, import_file, read_bytes
from core.runs.jobs import JobManager
from core.models.loading import load_policy, load_tokenizer, save_checkpoint
from core.paths import atomic_write_text
from core.paths import checkpoints_dir
from core.data.store import MAX_PROMPT_CHARS, MAX_RESPONSE_CHARS

TABLES = ("prompts", "demonstrations", "rankings", "runs", "metrics", "checkpoints")


def snapshot(store) -> dict[str, list]:
    db = sqlite3.connect(store.path)
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in TABLES}
    finally:
        db.close()


@pytest.fixture
def seeded(store):
    """A store with one of everything, so 'unchanged' means something."""
    pid = store.add_prompt("What is 2 plus 2?")
    store.add_demonstration("What is 2 plus 2?", "The answer is 4.")
    store.add_ranking(pid, ["The answer is 4.", "4", "The answer is 5."], labeler="ana")
    store.create_run("seed-run", "sft", {"epochs": 1})
    store.log_metrics("seed-run", 1, {"sft_loss": 2.0})
    store.set_run_status("seed-run", "done")
    return store


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


GOOD_DEMO = {"prompt": "Say hi.", "completion": "hi"}

IMPORT_CASES = {
    "malformed-json-line": (jsonl(GOOD_DEMO, GOOD_DEMO, '{"prompt": "p", "completion": '), "d.jsonl",
                            r"line 3: malformed JSON"),
    "wrong-column-names": (b"question,answer\nWhat is 1 plus 1?,2\n", "d.csv",
                           r"unrecognised columns \['answer', 'question'\].*prompt"),
    "columns-change-midway": (jsonl(GOOD_DEMO, {"prompt": "p", "answer": "a"}), "d.jsonl",
                              r"line 2: columns \['answer', 'prompt'\] differ"),
    "empty-prompt": (jsonl(GOOD_DEMO, {"prompt": "   ", "completion": "x"}), "d.jsonl", r"line 2: prompt is empty"),
    "empty-completion": (jsonl({"prompt": "p", "completion": ""}), "d.jsonl", r"line 1: completion is empty"),
    "completion-not-text": (jsonl({"prompt": "p", "completion": 5}), "d.jsonl", r"line 1: completion must be text"),
    "prompt-over-limit": (jsonl({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}), "p.jsonl",
                          rf"line 1: prompt is {MAX_PROMPT_CHARS + 1} characters long; the limit is {MAX_PROMPT_CHARS}"),
    "response-over-limit": (jsonl({"prompt": "p", "responses": ["ok", "y" * (MAX_RESPONSE_CHARS + 1)]}), "r.jsonl",
                            rf"line 1: response 2 is {MAX_RESPONSE_CHARS + 1} characters long"),
    "non-utf8-bytes": (b"prompt,completion\nhi,caf\xe9\n", "d.csv", r"line 2: not valid UTF-8"),
    "empty-file": (b"\n\n", "d.jsonl", r"holds no rows"),
    "line-not-an-object": (jsonl(GOOD_DEMO, "[1, 2]"), "d.jsonl", r"line 2: expected a JSON object, got list"),
    "csv-responses-not-a-list": (b"prompt,responses\nhi,hello\n", "r.csv", r"line 2: 'responses' must be a JSON list"),
    "tie-chosen-equals-rejected": (jsonl({"prompt": "p", "chosen": "4 ", "rejected": "4"}), "pairs.jsonl",
                                   r"line 1: chosen and rejected are the same text: a tie"),
    "duplicate-response-k4": (jsonl({"prompt": "p", "responses": ["a", "b", " c", "c"]}), "r.jsonl",
                              r"line 1: responses 3 and 4 are the same text"),
    "k-1-after-good-rows": (jsonl({"prompt": "p", "responses": ["a", "b"]}, {"prompt": "q", "responses": ["a"]}),
                            "r.jsonl", r"line 2: a ranking needs between 2 and 9 responses \(K\), got K = 1"),
    "k-10-csv": (b'prompt,responses\np,"' + json.dumps([f"r{i}" for i in range(10)]).replace('"', '""').encode()
                 + b'"\n', "r.csv", r"line 2: .*K = 10"),
}


@pytest.mark.parametrize("data, name, message", IMPORT_CASES.values(), ids=IMPORT_CASES.keys())
def test_bad_import_is_rejected_whole(seeded, data, name, message):
    before = snapshot(seeded)
    with pytest.raises(ValueError, match=message):
        import_file(seeded, data, name)
    assert snapshot(seeded) == before


def _sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(size)  # sparse: 200 MB long, no blocks written
    return path


def test_200_mb_upload_is_refused_before_it_is_read(seeded, tmp_path):
    big = _sparse_file(tmp_path / "huge.jsonl", 200 * 2**20)
    before = snapshot(seeded)
    with pytest.raises(ValueError, match=r"huge.jsonl is 200 MB; the import limit is 50 MB"):
        read_bytes(big)
    # The page hands import_file the upload's bytes: a memory map stands in for 200 MB of them.
    with open(big, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        with pytest.raises(ValueError, match=r"200 MB; the import limit is 50 MB"):
            import_file(seeded, data, "huge.jsonl")
    assert snapshot(seeded) == before
    # And the server refuses it before the page sees it: Streamlit's upload cap matches ours.
    import tomllib

    server = tomllib.loads((Path(__file__).parent.parent / ".streamlit" / "config.toml").read_text())["server"]
    assert server["maxUploadSize"] * 2**20 <= MAX_IMPORT_BYTES


def test_ranking_for_a_deleted_prompt(seeded):
    pid = seeded.add_prompt("Soon gone")
    seeded.delete_prompt(pid)
    before = snapshot(seeded)
    with pytest.raises(ValueError, match=rf"no prompt with id {pid}: add the prompt before ranking"):
        seeded.add_ranking(pid, ["a", "b"], labeler="bo")
    assert snapshot(seeded) == before


def test_k_out_of_range_in_a_batch_writes_nothing(seeded):
    rows = [{"prompt": "new prompt", "responses": ["a", "b"]},
            {"prompt": "other", "responses": [f"r{i}" for i in range(10)]}]
    before = snapshot(seeded)
    with pytest.raises(ValueError, match="K = 10"):
        seeded.add_rankings(rows)
    assert snapshot(seeded) == before


def test_prompt_edit_that_collides_with_another(seeded):
    other = seeded.add_prompt("Say hi.")
    before = snapshot(seeded)
    with pytest.raises(ValueError, match=r"another prompt \(id 1\) already has this text"):
        seeded.update_prompt(other, "  What is 2 plus 2?  ")
    assert snapshot(seeded) == before


# -- names that could become paths ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["../evil", "a/b", "/etc/x", "..", "ok/../../x"])
def test_run_and_checkpoint_names_with_slashes_or_dotdot(seeded, tmp_path, name, capsys):
    before = snapshot(seeded)
    with pytest.raises(ValueError, match=r"invalid run name .*no '/', no '\.\.'"):
        seeded.create_run(name, "sft", {})
    with pytest.raises(ValueError, match=r"invalid checkpoint name"):
        seeded.add_checkpoint(name, "sft", tmp_path)
    jobs = JobManager(seeded, runner=lambda stage: _finish, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match=r"invalid run name"):
        jobs.submit("sft", {"epochs": 1}, run_id=name)
    assert cli.main(["sft", "--name", name, "--output", str(tmp_path / "out"), "--set", "epochs=1"]) == 2
    assert "invalid run name" in capsys.readouterr().err
    assert snapshot(seeded) == before
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "evil").exists()


# -- configs -------------------------------------------------------------------------------------

CONFIG_CASES = {
    "int-given-text": ("sft", "epochs=three", r"epochs must be of type int, got str 'three'"),
    "int-given-float": ("sft", "batch_size=2.5", r"batch_size must be of type int, got float"),
    "float-given-bool": ("ppo", "kl_coef=true", r"kl_coef must be of type float, got bool"),
    "below-range": ("sft", "n_demonstrations=0", r"n_demonstrations must be >= 1, got 0"),
    "above-range": ("ppo", "gamma=1.5", r"gamma must be <= 1, got 1.5"),
    "zero-temperature": ("ppo", "temperature=0", r"temperature must be > 0"),
    "unknown-key": ("rm", "learning_rat=0.1", r"unknown config key\(s\) for RewardConfig: learning_rat"),
    "empty-value": ("sft", "epochs=", r"epochs must not be empty"),
    # NaN compares False with every bound, so a range check alone let these through.
    "nan": ("ppo", "kl_coef=.nan", r"kl_coef must be a finite number, got nan"),
    "infinity": ("sft", "learning_rate=.inf", r"learning_rate must be a finite number, got inf"),
    "minus-infinity": ("rm", "warmup_ratio=-.inf", r"warmup_ratio must be a finite number, got -inf"),
    "removed-k3": ("ppo", "kl_estimator=k3", r"kl_estimator: PPO's KL penalty is k1"),
}


@pytest.mark.parametrize("stage, assignment, message", CONFIG_CASES.values(), ids=CONFIG_CASES.keys())
def test_bad_config_values_from_cli_and_job_manager(seeded, tmp_path, capsys, stage, assignment, message):
    before = snapshot(seeded)
    assert cli.main([stage, "--set", assignment, "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    key, _, value = assignment.partition("=")
    jobs = JobManager(seeded, runner=lambda s: _finish, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match=message):
        jobs.submit(stage, {key: yaml.safe_load(value)})
    assert snapshot(seeded) == before and not (tmp_path / "out").exists()


def test_nan_in_a_yaml_config_file(seeded, tmp_path, capsys):
    config = tmp_path / "ppo.yaml"
    config.write_text("kl_coef: .nan\nlearning_rate: 1e-4\n")
    before = snapshot(seeded)
    assert cli.main(["ppo", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "kl_coef must be a finite number, got nan" in capsys.readouterr().err
    assert snapshot(seeded) == before


def test_unknown_keys_in_a_yaml_config_file(seeded, tmp_path, capsys):
    config = tmp_path / "ppo.yaml"
    config.write_text("kl_coef: 0.1\nklcoef: 0.2\nptx: 1\n")
    before = snapshot(seeded)
    assert cli.main(["ppo", "--config", str(config), "--output", str(tmp_path / "out")]) == 2
    assert "unknown config key(s) for PPOConfig: klcoef, ptx" in capsys.readouterr().err
    assert snapshot(seeded) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_request_on_a_machine_without_cuda(seeded, tmp_path, capsys):
    before = snapshot(seeded)
    assert cli.main(["sft", "--set", "device=cuda", "--set", "epochs=1", "--output", str(tmp_path / "out")]) == 2
    assert "device 'cuda' was requested but this machine has no CUDA GPU" in capsys.readouterr().err
    jobs = JobManager(seeded, runner=lambda s: _finish, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        jobs.submit("sft", {"device": "cuda"})
    assert snapshot(seeded) == before


# -- model directories ---------------------------------------------------------------------------


def _copy_config(d: Path) -> Path:
    from core.paths import BUNDLED_MODEL_DIR

    d.mkdir()
    for f in BUNDLED_MODEL_DIR.iterdir():
        if f.suffix != ".safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    return d


@pytest.mark.parametrize("weights, message", [
    (None, r"has no weights \(\*\.safetensors\)"),
    ("pytorch_model.bin", r"holds only pickle weights \(\.bin/\.pt\); for safety we load safetensors only"),
])
def test_model_directory_without_safe_weights(seeded, tmp_path, capsys, weights, message):
    model = _copy_config(tmp_path / "model")
    if weights:
        torch.save(load_policy("bundled").state_dict(), model / weights)
    before = snapshot(seeded)
    assert cli.main(["sft", "--set", f"model={model}", "--set", "epochs=1", "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    jobs = JobManager(seeded, runner=lambda s: _finish, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match=message):
        jobs.submit("rm", {"sft_model": str(model)})
    with pytest.raises(ValueError, match=message):
        load_policy(model)
    assert snapshot(seeded) == before and not (tmp_path / "out").exists()


def test_reward_model_with_another_tokenizer(seeded, tmp_path, capsys):
    from core.models.tiny import make_models, make_tokenizer

    other = save_checkpoint(make_models(1, 32, 2, 64)[3], make_tokenizer(64), tmp_path / "other-rm")
    before = snapshot(seeded)
    args = ["ppo", "--set", "sft_model=bundled", "--set", f"reward_model={other}", "--output", str(tmp_path / "out")]
    assert cli.main(args) == 2
    assert "the tokenizers differ" in capsys.readouterr().err
    jobs = JobManager(seeded, runner=lambda s: _finish, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match=r"reward_model .* does not match sft_model .*tokenizers differ"):
        jobs.submit("ppo", {"sft_model": "bundled", "reward_model": str(other)})
    assert snapshot(seeded) == before and not (tmp_path / "out").exists()


# -- jobs ----------------------------------------------------------------------------------------


def _finish(config, store, events, output_dir: Path) -> Path:
    events.metrics(1, {"sft_loss": 1.0})
    atomic_write_text(checkpoints_dir(output_dir) / "step-1" / "weights.txt", "1")
    atomic_write_text(Path(output_dir) / "weights.txt", "final")
    return Path(output_dir)


def test_stop_request_for_a_finished_job(store, tmp_path):
    jobs = JobManager(store, runner=lambda stage: _finish, runs_dir=tmp_path / "runs")
    run_id = jobs.submit("sft", {"epochs": 1})
    assert jobs.wait(run_id, timeout=30).status == "done"
    before = snapshot(store)
    with pytest.raises(ValueError, match=rf"run '{run_id}' is done, not running or queued: there is nothing to stop"):
        jobs.stop(run_id)
    with pytest.raises(ValueError, match="no run named 'nope'"):
        jobs.stop("nope")
    assert snapshot(store) == before and jobs.get(run_id).status == "done"


def test_resume_of_an_interrupted_run_whose_checkpoints_were_deleted(store, tmp_path):
    """A run cut off by a crash (status 'running' in the store), then someone deleted its files."""
    out = tmp_path / "runs" / "lost" / "model"
    store.create_run("lost", "ppo", {"sft_model": "bundled", "reward_model": "bundled"}, str(out))
    store.set_run_status("lost", "running")
    orphan(store, "lost")
    store.log_metrics("lost", 1, {"reward": 0.1})
    jobs = JobManager(store, runner=lambda stage: _finish, runs_dir=tmp_path / "runs")
    assert jobs.get("lost").status == "interrupted"
    before = snapshot(store)
    with pytest.raises(ValueError, match=r"run 'lost' cannot resume: its checkpoint directory .* no longer exists"):
        jobs.resume("lost")
    assert snapshot(store) == before and not out.exists()


# -- checkpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_in", ["save_pretrained", "torch.save"])
def test_disk_full_while_writing_a_checkpoint(store, tmp_path, monkeypatch, fail_in):
    """ENOSPC mid-write: the previous checkpoint stays complete and listed, no partial one appears."""
    model, tok = load_policy("bundled"), load_tokenizer("bundled")
    ckpts = tmp_path / "run-checkpoints"
    store.create_run("full", "ppo", {})
    first = save_checkpoint(model, tok, ckpts / "step-1", extra={"optimizer.pt": {"step": torch.tensor(1)}})
    store.add_checkpoint("full-step-1", "ppo", first, run_id="full", step=1)
    files = {p.name: p.read_bytes() for p in first.iterdir()}
    before = snapshot(store)

    def disk_full(*args, **kwargs):
        target = Path(args[1] if fail_in == "torch.save" else args[0])
        target = target if fail_in == "torch.save" else target / "model.safetensors"
        target.write_bytes(b"\0" * 1024)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    if fail_in == "torch.save":
        monkeypatch.setattr(torch, "save", disk_full)
    else:
        monkeypatch.setattr(type(model), "save_pretrained", lambda self, *a, **k: disk_full(*a, **k))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # the would-be new weights differ
    for target in (ckpts / "step-2", ckpts / "step-1"):  # a new checkpoint, and overwriting the old one
        with pytest.raises(OSError, match="No space left on device"):
            save_checkpoint(model, tok, target, extra={"optimizer.pt": {"step": torch.tensor(2)}})
    monkeypatch.undo()

    assert sorted(p.name for p in ckpts.iterdir()) == ["step-1"]  # no partial or temp directory
    assert {p.name: p.read_bytes() for p in first.iterdir()} == files
    assert [c["name"] for c in store.list_checkpoints()] == ["full-step-1"]
    assert snapshot(store) == before
    reloaded = load_policy(first)
    assert not torch.equal(next(reloaded.parameters()), next(model.parameters()))
