"""Real model families, not only the bundled GPT-2: tiny random Llama, Qwen2 and GPT-NeoX models,
each with its own chat template and end-of-turn token, go through SFT -> RM -> PPO, and every
output reloads with plain transformers. The chat-template path puts SFT's loss on exactly the
assistant turn."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from core.config import PPOConfig, RewardConfig, SFTConfig
from core.data import demo
from core.stages.events import Events
from core.models.chat import encode_answer, render_prompt
from core.models.loading import load_tokenizer
from core.models.tiny import save_tiny_chat_model
from core.stages import ppo, reward, sft

FAMILIES = ("llama", "qwen2", "gpt_neox")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_loss_falls_on_exactly_the_assistant_turn(tmp_path, family):
    base = save_tiny_chat_model(tmp_path / "base", family)
    tok = load_tokenizer(base)
    ids, labels = sft.encode(tok, "What is 2 plus 2?", "The answer is 4.", 128)
    prompt = render_prompt(tok, "What is 2 plus 2?")
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    # The labelled tokens are the answer and the template's end-of-turn token, nothing else.
    assert tok.decode(labels[n_prompt:]) == "The answer is 4." + tok.eos_token
    assert tok.decode(ids) == prompt + "The answer is 4." + tok.eos_token
    assert encode_answer(tok, "What is 2 plus 2?", "The answer is 4.") == (ids[:n_prompt], ids[n_prompt:])


@pytest.mark.parametrize("lora_r", [0, 8], ids=["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_rm_ppo_on_a_model_family(tmp_path, family, lora_r):
    base = save_tiny_chat_model(tmp_path / "base", family)
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(40, 4)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Describe the {w} in {n} words."}) + "\n"
                               for w in demo.WORDS[:12] for n in (2, 3)))
    ptx = tmp_path / "ptx.txt"
    ptx.write_text("\n".join(demo.pretraining_corpus(200, seed=5)))

    sft_events = Events()
    sft_out = sft.run(SFTConfig(model=str(base), data="demo", epochs=2, n_demonstrations=64, batch_size=16,
                                learning_rate=3e-3, dropout=0.1, eval_prompts=0, max_length=64, device="cpu",
                                lora_r=lora_r),
                      None, sft_events, tmp_path / "sft")
    rm_out = reward.run(RewardConfig(sft_model=str(sft_out), data=str(rankings), epochs=1, batch_size=8,
                                     learning_rate=1e-3, max_length=64, device="cpu", lora_r=lora_r),
                      None, Events(), tmp_path / "rm")
    ppo_events = Events()
    ppo_out = ppo.run(PPOConfig(sft_model=str(sft_out), reward_model=str(rm_out), total_episodes=16, batch_size=8,
                                ppo_epochs=1, response_length=8, learning_rate=1e-4, ptx_coef=0.5, ptx_data=str(ptx),
                                ptx_batch_size=2, save_every=1, prompts=str(prompts), device="cpu",
                                lora_r=lora_r), None, ppo_events, tmp_path / "ppo")

    # SFT learned something: the held-out loss after 2 epochs is below the random init's.
    summary = json.loads((sft_out / sft.SUMMARY_FILE).read_text())
    assert summary["val_loss"] < torch.log(torch.tensor(float(len(load_tokenizer(base))))).item()
    # Each output reloads with plain transformers, with the family's own chat template.
    for path, cls in ((sft_out, AutoModelForCausalLM), (rm_out, AutoModelForSequenceClassification),
                      (ppo_out, AutoModelForCausalLM)):
        model = cls.from_pretrained(path)
        assert model.config.model_type == family
        assert AutoTokenizer.from_pretrained(path).chat_template == load_tokenizer(base).chat_template
    assert AutoModelForSequenceClassification.from_pretrained(rm_out).config.reward_bias != 0
    ppo_summary = json.loads((ppo_out / ppo.SUMMARY_FILE).read_text())
    assert ppo_summary["step"] == 2 and ppo_summary["ptx_loss"] > 0
    # The user's own prompts: the demo labeler's gold and the demo corpus' pretraining loss mean
    # nothing there, so they are not reported.
    assert not {"gold", "gold_greedy", "pretrain_loss"} & set(ppo_summary)
    # What does apply there: the RM's reward on held-out prompts and the LM loss on held-out ptx text.
    assert ppo_summary["evaluation"] == "user data"
    assert isinstance(ppo_summary["heldout_reward"], float)
    assert abs(ppo_summary["ptx_heldout_loss"] - ppo_summary["ptx_loss"]) < 1.0  # same text, held out


def test_template_mismatch_and_broken_templates_are_refused(tmp_path):
    from core.models.loading import check_same_tokenizer

    qwen, neox = (load_tokenizer(save_tiny_chat_model(tmp_path / f, f)) for f in ("qwen2", "gpt_neox"))
    bundled = load_tokenizer("bundled")
    twin = load_tokenizer("bundled")
    twin.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="the chat templates differ"):
        check_same_tokenizer(bundled, twin, "reward_model")
    with pytest.raises(ValueError, match="the tokenizers differ"):
        check_same_tokenizer(qwen, neox, "reward_model")
    twin.chat_template = "{{ raise_exception('only user and assistant turns') }}"
    with pytest.raises(ValueError, match="chat template failed to render.*only user and assistant"):
        render_prompt(twin, "hello")
    with pytest.raises(ValueError, match="turn 1 of the conversation"):
        render_prompt(bundled, [{"role": "narrator", "content": "x"}])


def test_a_bf16_checkpoint_trains_in_fp32(tmp_path):
    """Hub models ship bf16 weights and transformers keeps a checkpoint's precision: the trained
    networks must still load in fp32 (AdamW on bf16 weights loses small updates)."""
    from core.models.loading import load_policy, load_scalar_model, pick_device

    path = save_tiny_chat_model(tmp_path / "m", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(path)
    model.to(torch.bfloat16).save_pretrained(path)
    assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.bfloat16
    cpu = pick_device("cpu")
    assert load_policy(path, cpu).dtype == torch.float32
    assert load_scalar_model(path, 1, cpu).dtype == torch.float32
    assert load_policy(path, cpu, dtype=torch.bfloat16).dtype == torch.bfloat16
