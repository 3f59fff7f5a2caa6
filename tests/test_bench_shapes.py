"""`rlhf bench`'s model shapes: a config directory or an architecture with sizes, random weights."""

import argparse
import json

import pytest
import torch

from benchmarks.compare_ppo import shape_argv
from benchmarks.options import add_args
from benchmarks.shapes import describe, model_config, ppo_parts, save_random_model


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_args(parser)
    return parser.parse_args(list(argv))


def test_an_architecture_with_sizes_gives_that_shape_and_its_parameter_count():
    shape = describe(model_config(_args("--arch", "llama", "--layers", "2", "--embd", "64", "--heads", "4",
                                        "--kv-heads", "2", "--intermediate", "96", "--vocab", "700")))
    # embeddings and an untied head 2 x 700 x 64; per layer q,o 64x64, k,v 64x32, MLP 3 x 64x96, two norms;
    # the final norm.
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 96 + 2 * 64
    assert shape["parameters"] == 2 * 700 * 64 + 2 * per_layer + 64
    assert (shape["arch"], shape["layers"], shape["kv_heads"], shape["intermediate"]) == ("llama", 2, 2, 96)


def test_a_config_directory_gives_its_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 48, "vocab_size": 900, "tie_word_embeddings": True}))
    shape = describe(model_config(_args("--config", str(tmp_path))))
    assert (shape["arch"], shape["layers"], shape["hidden"], shape["vocab"], shape["tied_embeddings"]) == \
        ("qwen2", 3, 32, 900, True)


def test_a_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        model_config(_args("--config", str(tmp_path)))


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_saving(tmp_path):
    config = model_config(_args("--arch", "llama", "--layers", "1", "--embd", "32", "--heads", "2", "--vocab", "100"))
    with pytest.raises(ValueError, match="--vocab"):
        save_random_model(config, None, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_ppo_networks_of_a_shape_share_the_policys_weights_and_score_one_column():
    args = _args("--arch", "qwen2", "--layers", "1", "--embd", "32", "--heads", "2", "--vocab", "64")
    (policy, reference, value, reward), vocab, shape = ppo_parts(args)
    assert vocab == 64 and shape["arch"] == "qwen2"
    assert all((a == b).all() for a, b in zip(policy.parameters(), reference.parameters()))
    assert value.score.out_features == reward.score.out_features == 1
    assert policy.config.eos_token_id == 0 and policy.config.pad_token_id == 1  # the tiny tokenizer's ids


def test_the_two_sides_processes_get_the_same_options_back():
    args = _args("--arch", "llama", "--layers", "3", "--kv-heads", "2", "--response-length", "96", "--threads", "1",
                 "--pairs", "3", "--json")
    again = _args(*shape_argv(args))
    assert {k: v for k, v in vars(again).items() if k not in ("pairs", "json")} == \
        {k: v for k, v in vars(args).items() if k not in ("pairs", "json")}


def test_the_ceiling_times_every_linear_layer_of_the_shape_and_the_head_apart():
    from benchmarks.update_ceiling import layer_shapes

    llama = model_config(_args("--arch", "llama", "--layers", "2", "--embd", "64", "--heads", "4", "--kv-heads", "2",
                               "--intermediate", "96", "--vocab", "700"))
    shapes, head = layer_shapes(llama)
    # per layer: q and o 64 -> 64, k and v 64 -> 32 (two kv heads of 16), gate and up 64 -> 96, down 96 -> 64
    assert shapes == {(64, 64): 4, (64, 32): 4, (64, 96): 4, (96, 64): 2} and head == (64, 700)
    gpt2 = model_config(_args("--arch", "gpt2", "--layers", "3", "--embd", "32", "--heads", "2", "--vocab", "50"))
    shapes, head = layer_shapes(gpt2)  # Conv1D layers: fused QKV, attention output, MLP in and out
    assert shapes == {(32, 96): 3, (32, 32): 3, (32, 128): 3, (128, 32): 3} and head == (32, 50)


def test_the_reference_shape_has_room_for_long_answers():
    """`rlhf bench ppo --response-length 256`: the reference GPT-2 shape takes the prompt and the whole answer
    (its 256 positions alone would index past the table), and stays as it was for shorter answers."""
    args = argparse.Namespace(layers=1, embd=16, heads=2, vocab=64, seed=0, config=None, arch=None)
    (policy, *_), _, _ = ppo_parts(argparse.Namespace(**vars(args), prompt_length=16, response_length=256))
    assert policy.config.n_positions == 272
    policy(torch.zeros(1, 272, dtype=torch.long))  # every position has an embedding
    (short, *_), _, _ = ppo_parts(argparse.Namespace(**vars(args), prompt_length=16, response_length=24))
    assert short.config.n_positions == 256
