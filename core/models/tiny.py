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


def make_models(layers: int, embd: int, heads: int, vocab: int, seed: int = 0):
    """(policy, reference_policy, value_model, reward_model), randomly initialised, dropout off."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=embd, n_layer=layers, n_head=heads,
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
