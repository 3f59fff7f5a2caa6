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
