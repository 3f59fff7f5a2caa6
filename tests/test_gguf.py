"""GGUF models (issue 29): `model=file.gguf` (or a directory holding one) loads through transformers'
GGUF support, dequantised to fp32, as a plain Hugging Face directory that every stage reads and writes."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("gguf")

from core.models.loading import load_policy, load_tokenizer, pick_device, resolve_model  # noqa: E402
from core.models.tiny import save_tiny_gguf  # noqa: E402

CPU = pick_device("cpu")


def test_a_gguf_file_loads_equal_to_the_model_it_was_written_from(workbench_home, tmp_path):
    path, original = save_tiny_gguf(tmp_path / "tiny.gguf")
    converted = resolve_model(str(path))
    # A plain HF directory under the data home: safetensors, no quantization config left.
    assert converted.startswith(str(workbench_home)) and (tmp_path / "tiny.gguf").is_file()
    config = json.loads(open(f"{converted}/config.json").read())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert json.loads(open(f"{converted}/gguf_source.json").read())["dtype"] == "float32"
    model = load_policy(str(path), CPU)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.tensor([[5, 17, 99, 3, 200, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)
    tokenizer = load_tokenizer(str(tmp_path))  # the directory holding the one .gguf
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>" in tokenizer.chat_template
    # Converted once: the same file resolves to the same directory without loading it again.
    assert resolve_model(str(path)) == converted


def test_an_unsupported_gguf_architecture_is_refused_with_transformers_reason(workbench_home, tmp_path):
    path, _ = save_tiny_gguf(tmp_path / "odd.gguf", architecture="rwkv6")
    with pytest.raises(ValueError, match="cannot load the GGUF model .*odd.gguf.*rwkv6"):
        resolve_model(str(path))
    assert not (workbench_home / "gguf").exists() or not any((workbench_home / "gguf").iterdir())


def test_a_directory_with_several_gguf_files_asks_for_one(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"")
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match="several GGUF files \\(a.gguf, b.gguf\\): name one"):
        resolve_model(str(tmp_path))
