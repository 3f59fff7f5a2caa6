"""The memory planner (core/models/memory.py): exact parameter and optimizer counts against the
instantiated models (full and LoRA), the activation formula against the tensors autograd saves, what
LoRA and gradient checkpointing change, a plan that cannot fit (a warning with the fix), bad input."""

from __future__ import annotations

import json

import pytest
import torch

from core.config import PPOConfig, RewardConfig, SFTConfig
from core.models.loading import fuse_gelu, load_policy, load_scalar_model, load_tokenizer, pick_device
from core.models.lora import prepare_for_training
from core.models.memory import GIB, DeviceBudget, arch_of, layer_activation_bytes, plan
from core.models.tiny import save_tiny_chat_model

CPU = DeviceBudget("cpu", "test CPU", 64 * GIB)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return str(save_tiny_chat_model(tmp_path_factory.mktemp("llama"), "llama"))


def adam_moments(model) -> int:
    """Elements of AdamW's moments after one real step on `model`'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in optimizer.state.values())


@pytest.mark.parametrize("lora_r", [0, 4])
@pytest.mark.parametrize("model", ["bundled", "llama"])
def test_parameter_and_optimizer_counts_are_exact(model, lora_r, llama_dir):
    path = llama_dir if model == "llama" else model
    device = pick_device("cpu")
    for stage, config, name in (("sft", SFTConfig(model=path, lora_r=lora_r), "policy"),
                                ("rm", RewardConfig(sft_model=path, lora_r=lora_r), "reward_model")):
        result = plan(stage, config, CPU)
        if stage == "sft":
            network = load_policy(path, device)
        else:
            network = load_scalar_model(path, load_tokenizer(path).pad_token_id, device)
        base = sum(p.numel() for p in network.parameters())
        network = prepare_for_training(network, config, "causal" if stage == "sft" else "score")
        trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
        shape = result.networks[name]
        assert shape.base_params == base
        assert shape.params == sum(p.numel() for p in network.parameters())
        assert shape.trainable == trainable
        if lora_r:
            assert trainable < base / 10
        else:
            assert trainable == base
        moments = adam_moments(network)
        assert moments == 2 * trainable
        assert result.total("optimizer", name) == moments * 4  # fp32 moments
        assert result.total("gradients", name) == trainable * 4


def test_ppo_lora_shares_base_weights(llama_dir):
    full = plan("ppo", PPOConfig(sft_model=llama_dir, reward_model=llama_dir), CPU)
    lora = plan("ppo", PPOConfig(sft_model=llama_dir, reward_model=llama_dir, lora_r=8), CPU)
    assert full.total("weights", "reference_policy") == full.networks["policy"].base_params * 4
    assert lora.total("weights", "reference_policy") == 0 and lora.total("weights", "reward_model") == 0
    assert lora.networks["reference_policy"].shared_with == "policy"
    assert lora.networks["reward_model"].shared_with == "value_model"


@pytest.fixture(scope="module")
def qwen_half_b(tmp_path_factory):
    """A directory with a Qwen2-0.5B-shaped config (planning reads the config only; the loader's check
    wants a safetensors file, so a placeholder one is written)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("qwen05b")
    AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, max_position_embeddings=32768).save_pretrained(path)
    save_file({"placeholder": torch.zeros(1)}, str(path / "model.safetensors"))
    return str(path)


def test_lora_cuts_planned_ppo_peak_and_parameters_of_a_known_model(qwen_half_b):
    # Issue 10's GPU shape (batch 64, response 128), updated in minibatches of 8.
    config = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b, batch_size=64, response_length=128,
                       num_minibatches=8)
    gpu = DeviceBudget("cuda", "test GPU", 80 * GIB)
    full = plan("ppo", config, gpu, prompt_length=64)
    lora = plan("ppo", config.replace(lora_r=16), gpu, prompt_length=64)
    assert full.networks["policy"].base_params == 494_032_768  # Qwen2.5-0.5B's published count
    # LoRA's saving is the persistent memory (weights of four networks -> two, gradients, AdamW state);
    # at this batch the activations, logits and the scoring pass's logits are the same either way.
    assert lora.phases["persistent"] < 0.35 * full.phases["persistent"]
    assert lora.peak_bytes < 0.75 * full.peak_bytes
    assert lora.total("optimizer") < full.total("optimizer") / 50


def test_ppo_with_only_function_rewards_plans_no_reward_model(qwen_half_b):
    """No `rm` term: PPO loads no reward model (the value model starts at SFT), so the plan needs no
    reward_model path and counts one frozen network fewer than with the RM."""
    with_rm = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b, batch_size=64, response_length=128,
                        num_minibatches=8)
    functions_only = PPOConfig(sft_model=qwen_half_b, reward="eos,length:target=24:weight=-0.05",
                               batch_size=64, response_length=128, num_minibatches=8)
    gpu = DeviceBudget("cuda", "test GPU", 80 * GIB)
    planned_rm = plan("ppo", with_rm, gpu, prompt_length=64)
    planned = plan("ppo", functions_only, gpu, prompt_length=64)
    assert "reward_model" in planned_rm.networks and "reward_model" not in planned.networks
    frozen_rm = sum(p.bytes for p in planned_rm.parts if p.network == "reward_model")
    assert frozen_rm > 0
    assert planned.phases["persistent"] == pytest.approx(planned_rm.phases["persistent"] - frozen_rm)


def test_ppo_logits_are_planned_one_chunk_at_a_time(qwen_half_b):
    """PPO's log-probs run the LM head in chunks (`core/stages/rl.chunked_logprobs`): the planner counts one
    chunk's logits, not the batch's. At issue 10's shape (batch 64 in one minibatch, prompt 64, response 128,
    ptx on) with gradient checkpointing, LoRA's saving of persistent memory is then at least 40 % of the
    peak (23 % when the whole batch's logits were counted; without checkpointing the activations dominate)."""
    from core.models import memory
    from core.stages import rl

    assert memory.MAX_CHUNK_LOGITS == rl.MAX_CHUNK_LOGITS  # the planner mirrors the stage's constant
    config = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b, batch_size=64, response_length=128,
                       ptx_coef=1.0, ptx_batch_size=4, gradient_checkpointing=True)
    gpu = DeviceBudget("cuda", "test GPU", 139 * GIB)
    full = plan("ppo", config, gpu, prompt_length=64)
    lora = plan("ppo", config.replace(lora_r=16), gpu, prompt_length=64)
    chunk = 2**26 // 151936  # 441 of the 64 x 128 response tokens
    assert full.total("logits", "policy") == lora.total("logits", "policy") == 4 * chunk * 151936 * 4
    assert full.total("scoring_logits") == 0  # one chunk while scoring: the KV cache is the rollout's peak
    assert lora.peak_bytes <= 0.6 * full.peak_bytes


def test_the_exact_kl_term_is_planned(qwen_half_b):
    """`kl_loss_coef` > 0 keeps the reference's hidden states over the rollout's answers and holds more
    copies of a logits chunk (the reference's beside the policy's); without it neither is planned."""
    from core.models import memory

    config = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b, batch_size=64, response_length=128,
                       ptx_coef=0.0, gradient_checkpointing=True)  # no ptx: its logits would outweigh the chunk's
    gpu = DeviceBudget("cuda", "test GPU", 139 * GIB)
    plain, exact = plan("ppo", config, gpu, prompt_length=64), plan("ppo", config.replace(kl_loss_coef=1.0), gpu,
                                                                     prompt_length=64)
    assert plain.total("kept_hidden") == 0
    assert exact.total("kept_hidden") == 64 * 128 * 896 * 2  # bf16 hidden states of the frozen reference
    assert exact.total("logits", "policy") == plain.total("logits", "policy") * memory.PPO_EXACT_KL_LOGIT_COPIES // 4
    assert exact.peak_bytes > plain.peak_bytes


def test_the_plan_follows_the_configs_precision(qwen_half_b):
    """`precision` decides what the planner counts in bf16, as the stage runs it: on a GPU 'auto' is bf16
    (frozen networks stored in bf16, matmul activations 2 bytes, autocast's weight copies), 'fp32' none of it;
    on a CPU 'bf16' halves the matmul activations but keeps the frozen networks' fp32 weights."""
    config = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b, batch_size=16, response_length=64,
                       ptx_coef=0.0)
    gpu = DeviceBudget("cuda", "test GPU", 139 * GIB)
    auto, fp32 = plan("ppo", config, gpu, prompt_length=64), plan("ppo", config.replace(precision="fp32"), gpu,
                                                                   prompt_length=64)
    assert auto.format().startswith("memory plan: ppo on test GPU, bf16 autocast")
    assert fp32.to_dict()["assumptions"]["precision"] == "fp32"
    assert auto.total("weights", "reference_policy") * 2 == fp32.total("weights", "reference_policy")
    assert auto.total("autocast_copies") > 0 == fp32.total("autocast_copies")
    assert auto.total("activations", "policy") < 0.7 * fp32.total("activations", "policy")
    cpu_fp32, cpu_bf16 = (plan("ppo", config.replace(precision=p), CPU, prompt_length=64) for p in ("auto", "bf16"))
    assert cpu_bf16.total("weights", "reference_policy") == cpu_fp32.total("weights", "reference_policy")
    assert cpu_bf16.total("activations", "policy") < 0.7 * cpu_fp32.total("activations", "policy")
    assert cpu_bf16.total("autocast_copies") > 0 == cpu_fp32.total("autocast_copies")


def test_gradient_checkpointing_cuts_planned_activations(llama_dir, qwen_half_b):
    for path, layers in ((llama_dir, 2), (qwen_half_b, 24)):
        plain = plan("sft", SFTConfig(model=path, batch_size=8, max_length=256), CPU)
        checkpointed = plan("sft", SFTConfig(model=path, batch_size=8, max_length=256, gradient_checkpointing=True), CPU)
        # One hidden state per layer is kept and one layer recomputed at a time: the deeper, the larger the cut.
        assert checkpointed.total("activations") < plain.total("activations") * (0.9 if layers == 2 else 0.2)
        assert checkpointed.peak_bytes < plain.peak_bytes
    ppo = PPOConfig(sft_model=llama_dir, reward_model=llama_dir)
    assert plan("ppo", ppo.replace(gradient_checkpointing=True), CPU).total("activations") < plan("ppo", ppo, CPU).total("activations")


def saved_bytes(model, ids) -> int:
    """Bytes of the (deduplicated, non-parameter) tensors autograd saves for one training forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


@pytest.mark.parametrize("architecture", ["gpt2", "llama", "qwen2", "gpt_neox"])
def test_layer_activation_formula_matches_saved_tensors(architecture):
    from transformers import AutoConfig, AutoModelForCausalLM

    def build(layers: int):
        if architecture == "gpt2":
            kw = dict(n_embd=128, n_layer=layers, n_head=4, n_positions=256)
        else:
            kw = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=layers, num_attention_heads=4)
            if architecture != "gpt_neox":
                kw["num_key_value_heads"] = 2
        config = AutoConfig.for_model(architecture, vocab_size=300, **kw)
        torch.manual_seed(0)
        model = fuse_gelu(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"))  # as loaded
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model.train(), config

    batch, seq = 2, 64
    ids = torch.randint(0, 300, (batch, seq))
    one, config = build(1)
    two, _ = build(2)
    measured = (saved_bytes(two, ids) - saved_bytes(one, ids)) / (batch * seq)  # one layer, per token
    planned = layer_activation_bytes(arch_of(config), seq, "cpu")
    assert abs(planned - measured) / measured < 0.1, (planned, measured)


def test_a_plan_that_cannot_fit_warns_with_the_fix(qwen_half_b):
    small = DeviceBudget("cuda", "small GPU", 4 * GIB)
    config = PPOConfig(sft_model=qwen_half_b, reward_model=qwen_half_b)
    result = plan("ppo", config, small)  # no exception
    assert result.fits is False
    assert "does not fit" in result.warnings[0] and "does NOT fit" in result.verdict
    text = " | ".join(result.suggestions)
    assert "enable LoRA (lora_r=16)" in text and "gradient checkpointing" in text and "smaller batch" in text
    # ppo.load_models already loads the frozen networks in bf16 on CUDA; planned in fp32, bf16 is suggested.
    assert result.total("weights", "reference_policy") == result.networks["policy"].base_params * 2
    fp32_frozen = plan("ppo", config, small, frozen_bf16=False)
    assert any(s.startswith("bf16 frozen networks") for s in fp32_frozen.suggestions)
    roomy = plan("sft", SFTConfig(), DeviceBudget("cpu", "big", 64 * GIB))
    assert roomy.fits and not roomy.warnings and not roomy.suggestions
    unknown = plan("sft", SFTConfig(), DeviceBudget("cpu", "unknown", None))
    assert unknown.fits is None and "unknown" in unknown.verdict


def test_bad_input_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="memory planning covers the stages sft, rm, ppo"):
        plan("dpo", SFTConfig(), CPU)
    with pytest.raises(ValueError, match="takes a PPOConfig"):
        plan("ppo", SFTConfig(), CPU)
    with pytest.raises(ValueError, match="sft_model is empty"):
        plan("rm", RewardConfig(), CPU)
    with pytest.raises(ValueError, match=r"reward_model: model directory .*missing.* does not exist"):
        plan("ppo", PPOConfig(sft_model="bundled", reward_model=str(tmp_path / "missing")), CPU)
    with pytest.raises(ValueError, match="lora_target_modules 'nope' matches no layer"):
        plan("sft", SFTConfig(lora_r=4, lora_target_modules="nope"), CPU)


def test_cli_plan_prints_a_table_or_json(capsys):
    from core.cli import main

    assert main(["plan", "ppo", "--preset", "quick", "--set", "sft_model=bundled", "--set", "reward_model=bundled",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "kv_cache" in out and "reference_policy" in out and "peak" in out and "fits" in out
    assert main(["plan", "sft", "--set", "lora_r=8", "--json", "--device", "cpu"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["stage"] == "sft" and data["networks"]["policy"]["trainable"] < data["networks"]["policy"]["params"]
    assert main(["plan", "rm", "--set", "sft_model=/does/not/exist"]) == 2
    assert "sft_model: model directory /does/not/exist does not exist" in capsys.readouterr().err


def test_train_page_shows_the_memory_plan(app):
    app.switch_page("../pages/train.py")
    app.run()
    assert not app.exception, app.exception
    expander = next(e for e in app.expander if e.label.startswith("Memory plan"))
    assert "fits" in expander.label
    parts = [row for df in app.dataframe for row in df.value["part"].tolist()]
    assert {"weights", "gradients", "optimizer", "activations"} <= set(parts)


def test_sft_logits_are_planned_one_chunk_at_a_time(qwen_half_b):
    """SFT's loss runs the LM head in chunks (`core/models/lm_head.linear_cross_entropy`): one chunk's two
    fp32 copies, the hidden states' gradient and, when the head trains, its weight's fp32 gradient; not
    three copies of the whole batch's logits (3.7 GiB at 8 x 256 tokens and a 151,936-word vocabulary)."""
    from core.models import memory

    full = plan("sft", SFTConfig(model=qwen_half_b, batch_size=8, max_length=256), CPU)
    lora = plan("sft", SFTConfig(model=qwen_half_b, batch_size=8, max_length=256, lora_r=8), CPU)
    chunk = 2**26 // 151936  # 441 of the 2,048 tokens
    hidden_gradient, head_gradient = 8 * 256 * 896 * 4, 151936 * 896 * 4
    assert full.total("logits", "policy") == memory.SFT_LOGIT_COPIES * chunk * 151936 * 4 + hidden_gradient \
        + head_gradient
    assert lora.total("logits", "policy") == memory.SFT_LOGIT_COPIES * chunk * 151936 * 4 + hidden_gradient


def test_ppo_is_planned_at_its_prompts_real_length_when_they_are_known(tmp_path, capsys):
    from core.cli import main
    from core.models.chat import encode_prompt
    from core.models.loading import load_tokenizer
    from core.models.memory import known_prompt_length

    tokenizer = load_tokenizer("bundled")
    short, longer = "What is 2 plus 2?", "What is the sum of 12 and 30, and why?"
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (short, longer)))
    expected = len(encode_prompt(tokenizer, longer))
    assert expected > len(encode_prompt(tokenizer, short))
    assert known_prompt_length(PPOConfig(sft_model="bundled", reward_model="bundled", prompts=str(path))) == expected
    assert main(["plan", "ppo", "--set", "sft_model=bundled", "--set", "reward_model=bundled", "--set",
                 f"prompts={path}", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["assumptions"]["prompt_length"] == expected
    # A prompt longer than the rollout keeps is planned at what it keeps.
    path.write_text(json.dumps({"prompt": "word " * 300}) + "\n")
    assert known_prompt_length(PPOConfig(sft_model="bundled", reward_model="bundled", prompts=str(path))) == 96
