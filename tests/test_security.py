"""Loading is safe (issue 6, promise 4): weights come from safetensors only, remote code never runs,
pickles are never unpickled with code, names from users never become paths unchecked, and the app
listens on loopback without telemetry unless someone exposes it on purpose.

Source checks walk the AST of core/, workbench/ and pages/, so a new call site is covered without
editing this file; behavioural checks plant a booby-trapped pickle and make sure it never runs.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest
import torch

from core.models.loading import load_policy, load_scalar_model, load_tokenizer
from core.paths import BUNDLED_MODEL_DIR

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("core", "workbench", "pages") for p in (ROOT / d).rglob("*.py"))
# Loaders that read only JSON/text files; every other from_pretrained loads weights.
CONFIG_LOADERS = {"AutoConfig", "AutoTokenizer", "PreTrainedTokenizerFast", "GPT2Config", "PeftConfig"}


def _calls(attr: str):
    """(file, line, call node) for every call of `<something>.<attr>(...)` in the app's code."""
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
                yield path.relative_to(ROOT), node.lineno, node


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _load_kw_value(name: str):
    """The value `name` takes in core.models._LOAD_KW (what `**_LOAD_KW` passes)."""
    from core.models.loading import _LOAD_KW

    return _LOAD_KW.get(name)


def test_sources_were_found():
    assert len(SOURCES) > 20 and any(p.name == "loading.py" for p in SOURCES)


def test_trust_remote_code_is_never_true():
    offenders = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                if not (isinstance(node.value, ast.Constant) and node.value.value is False):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
            if isinstance(node, ast.Dict):  # dict(...)/{...} of keyword arguments, like _LOAD_KW
                for key, value in zip(node.keys, node.values):
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        if not (isinstance(value, ast.Constant) and value.value is False):
                            offenders.append(f"{path.relative_to(ROOT)}:{value.lineno}")
    assert offenders == []
    assert _load_kw_value("trust_remote_code") is False


def test_every_weight_load_asks_for_safetensors():
    checked, offenders = 0, []
    for path, line, call in _calls("from_pretrained"):
        receiver = call.func.value
        name = receiver.id if isinstance(receiver, ast.Name) else ast.unparse(receiver)
        if name in CONFIG_LOADERS:
            continue
        checked += 1
        if name == "PeftModel":
            # PEFT has no use_safetensors switch: adapter loads go through lora.safetensors_adapter,
            # which refuses a directory without adapter_model.safetensors (the file PEFT reads first).
            ok = ast.unparse(call.args[1]).startswith("safetensors_adapter(")
            if not ok:
                offenders.append(f"{path}:{line} PeftModel.from_pretrained")
            continue
        if _keyword(call, "gguf_file") is not None:
            # A GGUF file (core/models/loading.gguf_to_hf) holds tensors and metadata only, no pickled code,
            # and is converted once into a safetensors directory that every later load reads.
            continue
        explicit = _keyword(call, "use_safetensors")
        via_load_kw = any(kw.arg is None and ast.unparse(kw.value) == "_LOAD_KW" for kw in call.keywords)
        ok = (isinstance(explicit, ast.Constant) and explicit.value is True) or (
            via_load_kw and _load_kw_value("use_safetensors") is True)
        if not ok:
            offenders.append(f"{path}:{line} {name}.from_pretrained")
    assert checked >= 1 and offenders == []


def test_every_torch_load_refuses_code():
    checked, offenders = 0, []
    for path, line, call in _calls("load"):
        if ast.unparse(call.func.value) != "torch":
            continue
        checked += 1
        value = _keyword(call, "weights_only")
        if not (isinstance(value, ast.Constant) and value.value is True):
            offenders.append(f"{path}:{line}")
    assert checked >= 1 and offenders == []


def test_yaml_is_only_read_safely():
    offenders = [f"{p}:{n}" for p, n, call in _calls("load") if ast.unparse(call.func.value) == "yaml"]
    offenders += [f"{p}:{n}" for p, n, call in _calls("unsafe_load")]
    assert offenders == []


class _Trap:
    """Unpickling this object creates `marker`: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trapped_dir(tmp_path: Path, with_safetensors: bool) -> tuple[Path, Path]:
    model_dir, marker = tmp_path / "model", tmp_path / "PWNED"
    model_dir.mkdir()
    for f in BUNDLED_MODEL_DIR.iterdir():
        if with_safetensors or f.suffix != ".safetensors":
            (model_dir / f.name).write_bytes(f.read_bytes())
    torch.save({"transformer.wte.weight": _Trap(marker)}, model_dir / "pytorch_model.bin")
    return model_dir, marker


def test_the_trap_works(tmp_path):
    """The booby trap below is real: unpickling it with code allowed does create the marker."""
    model_dir, marker = _trapped_dir(tmp_path, with_safetensors=False)
    torch.load(model_dir / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_a_pickle_only_model_is_refused_without_unpickling(tmp_path):
    model_dir, marker = _trapped_dir(tmp_path, with_safetensors=False)
    with pytest.raises(ValueError, match="pickle weights"):
        load_policy(model_dir)
    with pytest.raises(ValueError, match="pickle weights"):
        load_scalar_model(model_dir, pad_token_id=0)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_beside_them(tmp_path):
    model_dir, marker = _trapped_dir(tmp_path, with_safetensors=True)
    model = load_policy(model_dir)
    load_scalar_model(model_dir, pad_token_id=load_tokenizer(model_dir).pad_token_id)
    assert not marker.exists()
    bundled = load_policy("bundled")
    assert torch.equal(model.transformer.wte.weight, bundled.transformer.wte.weight)


def test_loader_arguments_at_run_time(monkeypatch):
    """Behavioural twin of the source check: what from_pretrained actually receives."""
    import core.models.loading as models

    seen = []
    for cls in (models.AutoModelForCausalLM, models.AutoModelForSequenceClassification):
        original = cls.from_pretrained

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs)
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", spy)
    load_policy("bundled")
    load_scalar_model("bundled", pad_token_id=0)
    assert len(seen) == 2
    assert all(k["use_safetensors"] is True and k["trust_remote_code"] is False for k in seen)


# -- names from users ----------------------------------------------------------------------------


def _functions_calling(path: Path, callee: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(isinstance(c, ast.Call) and ast.unparse(c.func).endswith(callee) for c in ast.walk(node)):
                names.add(node.name)
    return names


def test_names_are_validated_where_they_enter():
    """Every door a run or checkpoint name comes in by checks it before it can become a path."""
    assert {"create_run", "add_checkpoint"} <= _functions_calling(ROOT / "core" / "data" / "store.py", "validate_name")
    assert "submit" in _functions_calling(ROOT / "core" / "runs" / "jobs.py", "validate_name")
    assert "cmd_stage" in _functions_calling(ROOT / "core" / "cli.py", "validate_name")


@pytest.mark.parametrize("name", ["../../outside", "a/b", "/tmp/abs", "..", ".hidden", "x\\..\\y", "a\0b"])
def test_a_bad_name_creates_nothing_on_disk(store, tmp_path, name):
    from core.runs.jobs import JobManager

    jobs = JobManager(store, runner=lambda stage: None, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="invalid run name"):
        jobs.submit("sft", {"epochs": 1}, run_id=name)
    with pytest.raises(ValueError, match="invalid checkpoint name"):
        store.add_checkpoint(name, "sft", tmp_path)
    assert store.list_runs() == [] and store.list_checkpoints() == []
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside").exists()


# -- serving -------------------------------------------------------------------------------------


def test_app_serves_on_loopback_without_telemetry():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert config["browser"]["gatherUsageStats"] is False
    # Nothing in the file weakens the defaults Streamlit ships with.
    assert config["server"].get("enableCORS", True) is True
    assert config["server"].get("enableXsrfProtection", True) is True


def test_readme_says_how_to_expose_the_app_deliberately():
    readme = (ROOT / "README.md").read_text()
    assert "## Exposing the app" in readme
    section = readme.split("## Exposing the app", 1)[1].split("\n## ", 1)[0]
    assert "--server.address" in section and "127.0.0.1" in section
