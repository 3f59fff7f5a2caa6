"""LoRA through PEFT as a config switch: SFT, RM and PPO train an adapter, checkpoints hold the
adapter, final outputs are plain merged directories, and PPO's frozen networks are the trained
ones with their adapters off (one copy of each base)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from core.config import PPOConfig, RewardConfig, SFTConfig
from core.data import demo
from core.stages.events import Events
from core.models.generate import encode_prompts
from core.models.loading import load_policy, load_scalar_model, load_tokenizer, pick_device, resolve_model
from core.models.lora import ADAPTER_DIR, AdapterOff, is_adapter_dir
from core.paths import checkpoints_dir
from core.stages import ppo, reward, rl, sft

CPU = pick_device("cpu")
LORA = dict(lora_r=8, lora_alpha=16, lora_dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lora_sft(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sft")
    config = SFTConfig(model="bundled", data="demo", epochs=2, n_demonstrations=96, batch_size=16,
                       learning_rate=3e-3, dropout=0.0, eval_prompts=0, device="cpu", **LORA)
    return config, sft.run(config, None, Events(), root / "sft")


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_sft_saves_a_merged_model_and_its_adapter(lora_sft):
    config, out = lora_sft
    merged = AutoModelForCausalLM.from_pretrained(out)  # a plain HF directory
    assert is_adapter_dir(out / ADAPTER_DIR) and is_adapter_dir(checkpoints_dir(out) / "epoch-2")
    # The merged output equals base + adapter, and differs from the base: the adapter learned.
    via_adapter = load_policy(out / ADAPTER_DIR, CPU).state_dict()
    base = load_policy("bundled", CPU).state_dict()
    assert max((merged.state_dict()[k] - via_adapter[k]).abs().max().item() for k in base) < 1e-5
    assert max((merged.state_dict()[k] - base[k]).abs().max().item() for k in base) > 1e-3
    # Only the adapter trained: far fewer parameters than the model, and the loss fell below the base's.
    summary = json.loads((out / sft.SUMMARY_FILE).read_text())
    tok = load_tokenizer("bundled")
    rows = demo.demonstrations(demo.train_tasks(32), 0.5)
    examples = [sft.encode(tok, r["prompt"], r["completion"], 128) for r in rows]
    base_loss = sft.mean_loss(load_policy("bundled", CPU), examples, tok.pad_token_id, CPU, 16)
    assert summary["val_loss"] < base_loss - 0.5


def test_lora_ppo_keeps_the_base_and_the_reference(lora_sft, tmp_path):
    """The policy's base weights stay bit-identical, and the reference log-probs (policy with its
    adapter off) equal the SFT model's own, while the policy moves; so do those of the reference's
    hidden states and head kept for the exact KL term (`kl_loss_coef`), read outside the adapter-off block."""
    _, sft_out = lora_sft
    tok = load_tokenizer(sft_out)
    rm_dir = tmp_path / "rm"
    rm = load_scalar_model(sft_out, tok.pad_token_id, CPU)
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    config = PPOConfig(sft_model=str(sft_out), reward_model=str(rm_dir), batch_size=8, ppo_epochs=2,
                       learning_rate=1e-2, response_length=8, ptx_coef=0.0, kl_loss_coef=1.0, device="cpu", **LORA)
    models = ppo.load_models(config, tok, CPU)
    assert isinstance(models.reference_policy, AdapterOff) and isinstance(models.reward_model.members[0], AdapterOff)
    base_before = {k: v for k, v in _weights(models.policy).items() if "lora_" not in k}
    sft_model = load_policy(sft_out, CPU).eval()
    prompts = [t.prompt for t in demo.train_tasks(8)]
    ids, mask = encode_prompts(tok, prompts)
    for _ in range(2):
        result = ppo.ppo_step(models, ids, mask, config, config.kl_coef)
    after = _weights(models.policy)
    assert all(torch.equal(after[k], v) for k, v in base_before.items())
    batch = result.rollout
    with torch.no_grad():
        ref, ours, policy_now = (
            rl.response_logprobs(m, batch.ids, batch.mask, batch.positions, batch.prompt_len, config.temperature)[0]
            for m in (sft_model, models.reference_policy, models.policy))
    m = batch.response_mask.bool()
    torch.testing.assert_close(ours[m], ref[m], atol=1e-5, rtol=1e-5)
    kept = rl.chunked_logprobs(batch.reference.hidden, batch.reference, batch.response_ids, config.temperature).logprobs
    torch.testing.assert_close(kept[m], ref[m], atol=1e-5, rtol=1e-5)
    assert result.metrics["exact_kl"] > 1e-4  # the term saw the policy move
    assert (policy_now[m] - ref[m]).abs().max() > 1e-3  # the policy itself moved
    # The trainable parameters are the adapters and the value head only.
    n_trainable = sum(p.numel() for p in models.trainable_parameters())
    n_all = sum(p.numel() for p in models.policy.parameters()) + sum(p.numel() for p in models.value_model.parameters())
    assert n_trainable < 0.1 * n_all


def test_lora_reward_model_checkpoints_load_centred(lora_sft, tmp_path):
    _, sft_out = lora_sft
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(64, 4)))
    config = RewardConfig(sft_model=str(sft_out), data=str(path), epochs=1, batch_size=8, learning_rate=3e-3,
                          device="cpu", **LORA)
    out = reward.run(config, None, Events(), tmp_path / "rm")
    epoch_dir = checkpoints_dir(out) / "epoch-1"
    assert is_adapter_dir(epoch_dir)
    tok = load_tokenizer(out)
    # The stage centres on its training split's top answers (10 % of a rankings file is held out).
    train, _ = reward.split_heldout([reward.Ranking(**r) for r in demo.synthetic_rankings(64, 4)], config.seed)
    pairs = reward.demonstrations_for_bias(config, None, train)
    seqs = [reward.encode_answers(tok, p, [c], 128)[0] for p, c in pairs]
    for model in (AutoModelForSequenceClassification.from_pretrained(out), load_scalar_model(epoch_dir, tok.pad_token_id, CPU)):
        assert model.config.reward_bias != 0
        assert abs(reward.score_sequences(model, seqs, tok.pad_token_id, CPU).mean().item()) < 0.05


def test_bad_lora_input_is_refused_before_training(tmp_path):
    config = SFTConfig(model="bundled", data="demo", epochs=1, n_demonstrations=16, eval_prompts=0, device="cpu",
                       lora_r=4, lora_target_modules="q_proj,v_proj")
    with pytest.raises(ValueError, match=r"lora_target_modules 'q_proj,v_proj' matches no layer .* c_attn"):
        sft.run(config, None, Events(), tmp_path / "sft")
    assert not (tmp_path / "sft").exists()
    with pytest.raises(ValueError, match="ema_decay is not supported with LoRA"):
        PPOConfig(sft_model="bundled", reward_model="bundled", lora_r=8, ema_decay=0.99).validate()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="its base model is not usable"):
        resolve_model(adapter)


class StopInEpoch2(Events):
    """Stops a 2-epoch SFT run of 96 demonstrations (6 steps an epoch) two steps into its second epoch."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def metrics(self, step, values):
        if "sft_loss" in values:
            self.steps += 1
            if self.steps == 8:
                self.stop_flag.set()


def test_lora_sft_resumes_from_its_adapter_checkpoint(lora_sft, tmp_path):
    config, straight = lora_sft
    sft.run(config, None, StopInEpoch2(), tmp_path / "sft")
    assert is_adapter_dir(checkpoints_dir(tmp_path / "sft") / "epoch-1")
    assert not (checkpoints_dir(tmp_path / "sft") / "epoch-2").exists()
    sft.run(config, None, Events(), tmp_path / "sft")  # resumes after epoch 1, on the saved adapter
    a = AutoModelForCausalLM.from_pretrained(straight).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "sft").state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_an_adapter_trained_on_an_adapter_checkpoint_loads_on_the_right_base(lora_sft, tmp_path):
    """An RM with LoRA trained from an SFT *adapter* directory: its own adapter names that directory
    as its base, so loading it merges the SFT adapter first (not the bare bundled base)."""
    from core.models.lora import adapter_base

    _, sft_out = lora_sft
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in demo.synthetic_rankings(24, 4)))
    config = RewardConfig(sft_model=str(sft_out / ADAPTER_DIR), data=str(path), epochs=1, batch_size=8,
                          learning_rate=3e-3, device="cpu", **LORA)
    out = reward.run(config, None, Events(), tmp_path / "rm")
    assert adapter_base(out / ADAPTER_DIR) == str(sft_out / ADAPTER_DIR)
    tok = load_tokenizer(out)
    a = load_scalar_model(out / ADAPTER_DIR, tok.pad_token_id, CPU).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(out).state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in b) < 1e-5
