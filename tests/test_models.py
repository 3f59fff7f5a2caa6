"""Model loading is safe and clear; checkpoints are plain HF directories written atomically."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, resolve_model, save_checkpoint
from core.paths import BUNDLED_MODEL_DIR, atomic_dir, validate_name


def test_bundled_model_is_a_small_gpt2_base_with_its_own_tokenizer():
    model = load_policy("bundled")
    tok = load_tokenizer("bundled")
    assert model.config.model_type == "gpt2" and hasattr(model.config, "resid_pdrop")
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert sum(f.stat().st_size for f in BUNDLED_MODEL_DIR.iterdir()) < 30e6
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.tokenize("12")[-2:] == ["1", "2"]  # digits split one by one


def test_dropout_is_configurable():
    assert load_policy("bundled", dropout=0.2).config.resid_pdrop == 0.2


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "no weights"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text("{}"), (d / "pytorch_model.bin").write_bytes(b"x")), "pickle"),
])
def test_bad_model_directories_get_clear_errors(tmp_path, setup, message):
    target = tmp_path / "model"
    setup(target)
    with pytest.raises(ValueError, match=message):
        resolve_model(str(target))


def test_hub_ids_need_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="offline"):
        resolve_model("gpt2")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("openai-community/gpt2") == "openai-community/gpt2"


def test_cuda_request_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="no CUDA"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"


def test_precision_sets_autocast_and_the_frozen_networks_dtype(monkeypatch):
    x = torch.randn(4, 8)
    fp32, bf16 = pick_device("cpu"), pick_device("cpu", "bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")  # 'auto' on a CPU is fp32
    with fp32.autocast():
        assert (x @ x.T).dtype == torch.float32
    with bf16.autocast():
        assert (x @ x.T).dtype == torch.bfloat16
    assert bf16.frozen_dtype == torch.float32  # on a CPU the frozen networks compute as the policy does
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        pick_device("cpu", "fp16")
    # A GPU: bf16 where it has bf16 ('auto' picks it, frozen networks stored in it), refused where it has not.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_device("auto").precision == "bf16" and pick_device("auto").frozen_dtype == torch.bfloat16
    assert pick_device("cuda", "fp32").frozen_dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pick_device("cuda").precision == "fp32"
    with pytest.raises(ValueError, match="this GPU has no bf16"):
        pick_device("cuda", "bf16")


@pytest.mark.parametrize("name", ["../evil", "a/b", "/abs", "..", "", "x" * 101, ".hidden"])
def test_names_that_could_traverse_paths_are_rejected(name):
    with pytest.raises(ValueError, match="invalid"):
        validate_name(name)


def test_checkpoint_reloads_with_plain_transformers(tmp_path):
    model, tok = load_policy("bundled"), load_tokenizer("bundled")
    out = save_checkpoint(model, tok, tmp_path / "ckpt")
    assert (out / "model.safetensors").is_file()
    plain = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(plain(ids).logits, model(ids).logits, atol=1e-5)
    rm = load_scalar_model(out, tok.pad_token_id)
    assert rm.score.out_features == 1


def test_loaded_models_run_gpt2s_gelu_fused_with_the_same_outputs_and_save_it_unchanged(tmp_path):
    from transformers.activations import NewGELUActivation

    tok = load_tokenizer("bundled")
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    plain = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR).eval()
    assert any(isinstance(m, NewGELUActivation) for m in plain.modules())  # what fusing replaces
    for model in (load_policy("bundled"), load_scalar_model("bundled", tok.pad_token_id)):
        assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    fused = load_policy("bundled").eval()
    assert torch.allclose(plain(ids).logits, fused(ids).logits, atol=1e-5)
    saved = save_checkpoint(fused, tok, tmp_path / "ckpt")
    assert AutoModelForCausalLM.from_pretrained(saved).config.activation_function == "gelu_new"


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path):
    model, tok = load_policy("bundled"), load_tokenizer("bundled")
    target = save_checkpoint(model, tok, tmp_path / "ckpt")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"partial")
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in target.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp directory left behind
    load_policy(target)


def test_packed_pretraining_text_is_cached_and_packed_again_when_anything_changes(tmp_path):
    """PPO-ptx packs its corpus through `pack_cached`: the second run reads the blocks back; another
    corpus, block size or tokenizer gets its own entry; an unreadable entry is packed again, not trusted."""
    import copy

    from core.data import demo
    from core.models.pretrain import pack, pack_cached

    tokenizer, docs = load_tokenizer("bundled"), demo.pretraining_corpus(40, seed=3)
    blocks = pack_cached(tokenizer, docs, 64, cache_dir=tmp_path)
    assert torch.equal(blocks, pack(tokenizer, docs, 64)) and blocks.dtype == torch.long
    (entry,) = tmp_path.glob("*.pt")
    # Read back, not packed again: a planted entry under the same key comes back as it is.
    torch.save(torch.zeros_like(blocks, dtype=torch.int32), entry)
    assert int(pack_cached(tokenizer, docs, 64, cache_dir=tmp_path).abs().sum()) == 0

    other_docs = docs[:-1] + ["a document the corpus never had"]
    assert torch.equal(pack_cached(tokenizer, other_docs, 64, cache_dir=tmp_path), pack(tokenizer, other_docs, 64))
    assert pack_cached(tokenizer, docs, 32, cache_dir=tmp_path).shape[1] == 32
    grown = copy.deepcopy(tokenizer)
    grown.add_tokens(["zebra"])
    assert torch.equal(pack_cached(grown, docs, 64, cache_dir=tmp_path), pack(grown, docs, 64))
    assert len(list(tmp_path.glob("*.pt"))) == 4  # one entry per (tokenizer, corpus, block size)

    entry.write_bytes(b"not a tensor")  # a damaged entry: packed again and rewritten
    assert torch.equal(pack_cached(tokenizer, docs, 64, cache_dir=tmp_path), blocks)
    assert torch.equal(torch.load(entry, weights_only=True).long(), blocks)
