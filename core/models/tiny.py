"""Tiny randomly initialised models built from a config: nothing to download, so tests and
benchmarks run offline. Policy, reference, value and reward model share one shape, as in TRL's
PPO examples; the word-level tokenizer's ids are exactly 0..vocab-1.
"""

from __future__ import annotations

import copy

import torch
from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

EOS_ID, PAD_ID = 0, 1


def make_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose ids are 0..vocab-1 (id 0 = EOS, id 1 = pad); only decoding is used."""
    words = {"<eos>": EOS_ID, "<pad>": PAD_ID, **{f"t{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(tok_models.WordLevel(words, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")


def make_models(layers: int, embd: int, heads: int, vocab: int, seed: int = 0, positions: int = 256):
    """(policy, reference_policy, value_model, reward_model), randomly initialised, dropout off; `positions`:
    the longest prompt + answer they take."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=embd, n_layer=layers, n_head=heads,
                        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, num_labels=1,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    policy = GPT2LMHeadModel(config)
    reference_policy = copy.deepcopy(policy)
    value_model = GPT2ForSequenceClassification(config)
    reward_model = GPT2ForSequenceClassification(config)
    return policy, reference_policy, value_model, reward_model


# Chat templates of the shape real instruct models carry (ChatML for Qwen2, header blocks for Llama 3,
# plain turns for GPT-NeoX), written here so tests exercise a template other than the bundled one.
CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
HEADER_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
    " + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
NEOX_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + eos_token + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# architecture -> (chat template, special tokens it needs, end-of-turn token used as EOS)
CHAT_FAMILIES = {
    "qwen2": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama": (HEADER_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gpt_neox": (NEOX_TEMPLATE, ["<|user|>", "<|assistant|>", "<|system|>"], None),
}


def save_tiny_chat_model(path, architecture: str, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A random-init causal LM of `architecture` (llama, qwen2, gpt_neox) with the bundled byte-level
    tokenizer plus that family's special tokens and chat template, saved as a plain HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from core.paths import BUNDLED_MODEL_DIR

    template, specials, eos = CHAT_FAMILIES[architecture]
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if eos is not None:
        tokenizer.eos_token = eos
    tokenizer.chat_template = template
    torch.manual_seed(seed)
    kwargs = dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=hidden * 2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
    if architecture != "gpt_neox":
        kwargs["num_key_value_heads"] = heads // 2  # grouped-query attention, as the real families use
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(architecture, **kwargs))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _llama_permute(weights, heads: int):
    """llama.cpp's row order for the query/key projections (its rotary layout); transformers' GGUF
    reader undoes it, so a model written this way loads back equal."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def save_tiny_gguf(path, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                   architecture: str = "llama"):
    """A random-init Llama with the bundled tokenizer and a ChatML template, written as a GGUF file (fp32
    tensors) with the `gguf` package, as llama.cpp's converter lays it out. Returns (the .gguf path, the
    same model as transformers builds it), so a test can compare the GGUF loader's model with it.
    `architecture` is the file's declared architecture: any other than llama makes a file transformers
    refuses (for the refusal's test)."""
    import json

    import gguf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from core.paths import BUNDLED_MODEL_DIR

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False,
                         eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), bos_token_id=tokenizer.bos_token_id)
    model = LlamaForCausalLM(config).eval()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(hidden * 2)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    ids = {**backend["model"]["vocab"], **{t["content"]: t["id"] for t in backend["added_tokens"]}}
    tokens = sorted(ids, key=ids.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in tokenizer.all_special_tokens else gguf.TokenType.NORMAL
                            for t in tokens])
    writer.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHATML_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(layers):
        for hf, ours in parts.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{ours}.weight"
    for hf_name, gguf_name in names.items():
        tensor = state[hf_name]
        if gguf_name.endswith("attn_q.weight"):
            tensor = _llama_permute(tensor, heads)
        elif gguf_name.endswith("attn_k.weight"):
            tensor = _llama_permute(tensor, kv_heads)
        writer.add_tensor(gguf_name, tensor.astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, model
