"""Memory planner: the estimated peak memory of a stage, by part, before anything is loaded.

    plan("ppo", PPOConfig(...)) -> Plan   # parts (network, what, bytes), peak, fits?, suggestions

What it counts, and where each number comes from:

- **Parameters, exactly.** Each network is instantiated from its config on the *meta* device
  (`AutoModelForCausalLM.from_config` / `AutoModelForSequenceClassification.from_config(num_labels=1)`):
  no weight is read or allocated, and the parameter count is the model's own. LoRA adapters are
  counted from the adapted layers' in/out features (`r * (in + out)` per layer), matching the layers
  as PEFT does (`'all-linear'`: every Linear/Conv1D but the LM head or the classifier head; a list:
  modules whose name ends with one of the names). A reward/value model under LoRA also trains a copy
  of its `score` head (PEFT's `modules_to_save` for sequence classification).
- **Weights, gradients, AdamW state.** Weights in fp32, as our loaders load every network whatever
  the checkpoint's dtype (PPO's frozen networks in bf16 on CUDA under bf16 precision); a gradient per
  trainable parameter; two fp32 AdamW moments per trainable parameter.
- **Activations** of the trained networks over batch x length, per token per layer, from the
  tensors autograd saves. The constant is Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 1: `sbh(34 + 5as/h)` bytes per layer for GPT-3
  in 16-bit with dropout) recounted for Hugging Face's implementations with SDPA attention: per
  token per layer, the norms' saved inputs and outputs, q, k, v (k and v at the key/value-head
  width), the attention output and its log-sum-exp, and the MLP's intermediates (2 x intermediate
  for a GELU MLP, GPT-2's `gelu_new` included as the loaders fuse it, 4 x for a gated SiLU MLP). Counted with
  `torch.autograd.graph.saved_tensors_hooks` on GPT-2, Llama, Qwen2 and GPT-NeoX (tests/test_memory.py
  checks the formula against the hooks). With attention dropout on CPU, SDPA falls back to the math
  path, which stores the attention probabilities (the `5as/h` term). Gradient checkpointing keeps
  one hidden state per layer and recomputes one layer at a time in the backward pass. Under bf16
  autocast (`precision`, on a GPU by default) the matmul-side tensors count 2 bytes.
- **Logits**, in fp32 (our code upcasts: `core/stages/rl.chunked_logprobs`; HF's causal-LM loss upcasts
  too): the tensors alive at the start of the backward pass (log-softmax output, its gradient and
  the logits' gradient). PPO's log-probs and entropies (update and scoring) run the LM head in chunks
  of at most `MAX_CHUNK_LOGITS` logits, recomputed in the backward pass: one chunk's copies, not the
  batch's; the ptx term's logits are freed before the chunks recompute theirs, so the larger counts.
  SFT's loss (`core/models/lm_head.linear_cross_entropy`) computes each chunk's gradient in the forward
  pass: one chunk's logits, plus the hidden states' and the head's gradients kept for the backward pass.
- **The rollout** (PPO): the KV cache, batch x (prompt + response) x layers x 2 x kv_heads x head_dim
  in the weights' dtype (bf16 under bf16 autocast, which also keeps bf16 copies of the policy's matmul
  weights while sampling), plus the prefill's logits; or the scoring pass's logits of one chunk,
  whichever is larger.
- **Peak** = what persists through a step (weights, optimizer, EMA) + the largest phase: the update
  (activations + logits (+ bf16 autocast's weight copies)), the optimizer step (gradients,
  which are freed before each backward pass, + AdamW's foreach temporaries), or PPO's rollout.

Validated against measurement (peak RSS on CPU, `torch.cuda.max_memory_allocated` on a GPU) by
`benchmarks/memory_check.py`; the figures are in benchmarks/RESULTS.md ("Memory planner").
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from core.config import resolved_precision

GIB = 2**30
PLANNED_STAGES = ("sft", "rm", "ppo")
# Mirrors of constants in the stages (not imported: that would import the whole stage).
PTX_BLOCK_SIZE = 128  # core/stages/ppo.PTX_BLOCK_SIZE: tokens per pretraining block
MAX_CHUNK_LOGITS = 2**26  # core/models/lm_head.MAX_CHUNK_LOGITS: the most logits a chunk of the LM head holds
# core/stages/ppo.load_models: without LoRA, the frozen reference and reward model load in bf16 on CUDA
# under bf16 precision (`Device.frozen_dtype`; on CPU in fp32). `plan(..., frozen_bf16=...)` overrides it
# to see what either choice costs.
LORA_SUGGESTED_R = 16
CPU_ALLOCATOR_SLACK = 0.3  # see _finish
TIGHT = 0.9  # a plan above this share of the available memory fits, but only just

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceBudget:
    """Where the plan is checked: the device kind, a readable name, and the memory available there
    (None when it cannot be read)."""

    kind: str  # 'cpu' or 'cuda'
    name: str
    available_bytes: int | None


@dataclass
class Part:
    network: str  # policy, reference_policy, value_model, reward_model, reward model, rollout...
    what: str  # weights, gradients, optimizer, activations, logits, kv_cache, ...
    bytes: int
    phase: str  # 'persistent' (held through a step), 'update', 'step' or 'rollout' (held in that phase only)
    note: str = ""


@dataclass
class NetworkShape:
    """One network as the planner sees it (parameter counts exact, from the meta-device model)."""

    name: str
    params: int  # all parameters the network holds (base + adapter + trainable head copy)
    trainable: int
    base_params: int  # the plain model's parameters
    weight_bytes: int  # bytes per parameter
    shared_with: str | None = None  # LoRA in PPO: a view of another network's weights


@dataclass
class Plan:
    stage: str
    device: DeviceBudget
    parts: list[Part]
    networks: dict[str, NetworkShape]
    assumptions: dict
    peak_bytes: int = 0
    phases: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool | None:
        if self.device.available_bytes is None:
            return None
        return self.peak_bytes <= self.device.available_bytes

    def total(self, what: str | None = None, network: str | None = None) -> int:
        return sum(p.bytes for p in self.parts
                   if (what is None or p.what == what) and (network is None or p.network == network))

    @property
    def verdict(self) -> str:
        peak = gib(self.peak_bytes)
        if self.fits is None:
            return f"estimated peak {peak} on {self.device.name}; available memory unknown"
        available = gib(self.device.available_bytes)
        if not self.fits:
            return f"does NOT fit: estimated peak {peak} > {available} available on {self.device.name}"
        if self.peak_bytes > TIGHT * self.device.available_bytes:
            return f"fits, tightly: estimated peak {peak} of {available} available on {self.device.name}"
        return f"fits: estimated peak {peak} of {available} available on {self.device.name}"

    def rows(self) -> list[dict]:
        """The table by part, in GiB, for a page or a terminal."""
        return [{"network": p.network, "part": p.what, "phase": p.phase, "GiB": round(p.bytes / GIB, 3),
                 "note": p.note} for p in self.parts if p.bytes]

    def to_dict(self) -> dict:
        return {
            "stage": self.stage, "device": dataclasses.asdict(self.device), "peak_bytes": self.peak_bytes,
            "peak_gib": round(self.peak_bytes / GIB, 3), "fits": self.fits, "verdict": self.verdict,
            "phases": self.phases, "parts": [dataclasses.asdict(p) for p in self.parts],
            "networks": {k: dataclasses.asdict(v) for k, v in self.networks.items()},
            "assumptions": self.assumptions, "warnings": self.warnings, "suggestions": self.suggestions,
        }

    def format(self) -> str:
        """A plain-text table and the verdict (the CLI's output)."""
        lines = [f"memory plan: {self.stage} on {self.device.name}, {self.assumptions.get('precision', 'fp32')}",
                 f"{'network':18s} {'part':16s} {'phase':10s} {'GiB':>9s}  note"]
        for p in self.parts:
            if p.bytes:
                lines.append(f"{p.network:18s} {p.what:16s} {p.phase:10s} {p.bytes / GIB:9.3f}  {p.note}")
        phases = ", ".join(f"{k} {v / GIB:.3f}" for k, v in self.phases.items())
        lines += [f"{'peak':18s} {'':16s} {'':10s} {self.peak_bytes / GIB:9.3f}  = {phases} GiB", self.verdict]
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"suggestion: {s}" for s in self.suggestions]
        return "\n".join(lines)


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------
# The device
# ---------------------------------------------------------------------------------------------


def detect_device(requested: str = "auto") -> DeviceBudget:
    """The device a stage with `device: requested` would use, and its free memory: free GPU memory
    (`torch.cuda.mem_get_info`) on CUDA, else the RAM the kernel says is available (MemAvailable)."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but this machine has no CUDA GPU; use 'cpu' or 'auto'")
    if requested != "cpu" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return DeviceBudget("cuda", f"cuda ({torch.cuda.get_device_name()})", int(free))
    return DeviceBudget("cpu", "cpu (RAM)", available_ram())


def available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _budget(device, config) -> DeviceBudget:
    if isinstance(device, DeviceBudget):
        return device
    return detect_device(device or getattr(config, "device", "auto"))


# ---------------------------------------------------------------------------------------------
# Model shapes, from the config on the meta device
# ---------------------------------------------------------------------------------------------


@dataclass
class Arch:
    """What the activation formula needs to know of an architecture."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    mlp: str  # 'gelu' (2 saved intermediates) or 'gated' (4)
    norm: str  # 'layer' (LayerNorm: input + output saved) or 'rms' (HF RMSNorm: input, normalised, output)
    tied: bool
    weight_bytes: int
    attention_dropout: float
    extra_h: int  # saved hidden-sized tensors per layer beyond the formula, counted with saved-tensor hooks


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def arch_of(config) -> Arch:
    hidden = _cfg(config, "hidden_size", "n_embd", "d_model")
    layers = _cfg(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _cfg(config, "num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        raise ValueError(f"cannot plan memory for a {config.model_type} model: its config names no hidden size, "
                         "layer count or head count the planner knows")
    kv_heads = _cfg(config, "num_key_value_heads", default=heads)
    head_dim = _cfg(config, "head_dim", default=hidden // heads)
    intermediate = _cfg(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * hidden
    act = str(_cfg(config, "hidden_act", "activation_function", default="gelu"))
    # Llama, Qwen2, Mistral: a gated SiLU MLP (gate, up, down); GPT-2, GPT-NeoX: a plain GELU MLP.
    mlp = "gated" if act in ("silu", "swish") else "gelu"
    norm = "rms" if hasattr(config, "rms_norm_eps") else "layer"
    # core/models/loading loads every network in fp32 (`dtype=torch.float32`) whatever the checkpoint's
    # dtype (hub checkpoints are mostly bf16); only PPO's frozen networks load in bf16 (on CUDA, `_plan_ppo`).
    weight_bytes = _DTYPE_BYTES["float32"]
    dropout = float(_cfg(config, "attn_pdrop", "attention_dropout", default=0.0) or 0.0)
    # Measured with saved-tensor hooks, beyond the formula: GPT-2's split/merge of heads keeps two
    # more hidden-sized tensors per layer, GPT-NeoX's partial rotary one.
    extra_h = {"gpt2": 2, "gpt_neox": 1}.get(config.model_type, 0)
    return Arch(config.model_type, int(layers), int(hidden), int(heads), int(kv_heads), int(head_dim),
                int(intermediate), int(config.vocab_size), mlp, norm, bool(getattr(config, "tie_word_embeddings", False)),
                weight_bytes, dropout, extra_h)


def _model_config(path: str, scalar: bool):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, **({"num_labels": 1} if scalar else {}))
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read the model config in {path}: {exc}") from exc
    return config


def meta_model(path: str, scalar: bool):
    """The model `path` describes, on the meta device: exact shapes, no memory, no weights read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _model_config(path, scalar)
    auto = AutoModelForSequenceClassification if scalar else AutoModelForCausalLM
    with torch.device("meta"):
        try:
            model = auto.from_config(config, trust_remote_code=False)
        except ValueError as exc:
            raise ValueError(f"cannot build the model of {path} to plan its memory: {exc}") from exc
    return model, config


def model_path(ref: str, field_name: str) -> str:
    """A model reference ('bundled', a directory, an adapter directory, a hub id) -> a directory or
    hub id holding the config of the network the stage trains (an adapter's base)."""
    from core.models.loading import resolve_model
    from core.models.lora import adapter_base, is_adapter_dir

    if not ref:
        raise ValueError(f"{field_name} is empty: name the checkpoint this stage starts from")
    try:
        path = resolve_model(ref)
        while is_adapter_dir(path):  # loaders merge an adapter into its base: the base's shape
            path = resolve_model(adapter_base(path))
    except ValueError as exc:
        raise ValueError(f"{field_name}: {exc}") from None
    return path


def _targets(spec: str):
    names = [name.strip() for name in spec.split(",") if name.strip()]
    return None if names in ([], ["all-linear"]) else names


def _linear_dims(module) -> tuple[int, int] | None:
    """(in, out) of a layer LoRA can adapt: Linear, GPT-2's Conv1D, Embedding (as PEFT's LoRA layers)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight (in, out)
        return tuple(module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def lora_layers(model, targets: str, scalar: bool) -> list[tuple[str, int, int]]:
    """(name, in, out) of the layers a LoRA adapter with `lora_target_modules=targets` adapts, as PEFT
    matches them (peft.tuners.tuners_utils: 'all-linear' = every Linear/Conv1D except the output layer,
    the LM head or, for sequence classification, the classifier head; a list = modules whose name is, or
    ends with '.' + , one of the names)."""
    import torch

    names = _targets(targets)
    if names is None:
        head = model.get_output_embeddings() if not scalar else getattr(model, "score", None)
        return [(name, *_linear_dims(m)) for name, m in model.named_modules()
                if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head]
    out = []
    for name, module in model.named_modules():
        if any(name == t or name.endswith("." + t) for t in names):
            dims = _linear_dims(module)
            if dims is None:
                raise ValueError(f"lora_target_modules: {name} is a {type(module).__name__}, which the planner "
                                 "cannot adapt; name Linear layers")
            out.append((name, *dims))
    if not out:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"})
        raise ValueError(f"lora_target_modules {targets!r} matches no layer of this {model.config.model_type} "
                         f"model; its linear layers are: {', '.join(linear)}")
    return out


@dataclass
class _Net:
    """A network, measured: its Arch, parameter counts and LoRA layers."""

    arch: Arch
    base_params: int
    head_params: int  # the scalar head (value/reward models), 0 for a causal LM
    embedding_params: int  # input embeddings (not a matmul under autocast unless tied to the LM head)
    lora: list[tuple[str, int, int]]
    r: int

    @property
    def lora_params(self) -> int:
        return sum(self.r * (i + o) for _, i, o in self.lora)

    @property
    def trainable(self) -> int:
        return self.lora_params + self.head_params if self.r else self.base_params

    @property
    def params(self) -> int:  # LoRA: base + adapter + PEFT's trainable copy of the scalar head
        return self.base_params + (self.lora_params + self.head_params if self.r else 0)

    @property
    def matmul_params(self) -> int:
        return self.base_params - (0 if self.arch.tied else self.embedding_params)


def inspect_network(path: str, scalar: bool, config) -> _Net:
    r = int(getattr(config, "lora_r", 0) or 0)
    targets = getattr(config, "lora_target_modules", "all-linear") if r else ""
    config_file = Path(path) / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.is_file() else 0  # a rewritten checkpoint is re-read
    return _inspect(path, stamp, scalar, r, targets)


@functools.lru_cache(maxsize=32)
def _inspect(path: str, stamp: int, scalar: bool, r: int, targets: str) -> _Net:
    model, model_config = meta_model(path, scalar)
    params = sum(p.numel() for p in model.parameters())
    head = getattr(model, "score", None) if scalar else None
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    emb = model.get_input_embeddings()
    lora = lora_layers(model, targets, scalar) if r else []
    return _Net(arch_of(model_config), params, head_params, emb.weight.numel() if emb is not None else 0, lora, r)


# ---------------------------------------------------------------------------------------------
# Activations: per token per layer (see the module docstring for where the constants come from)
# ---------------------------------------------------------------------------------------------


def layer_activation_bytes(arch: Arch, seq: int, device: str, dropout: float = 0.0, bf16: bool = False) -> float:
    """Bytes autograd keeps per token for one decoder layer in training (SDPA attention).

    Elements per token: norms 2 x (2h LayerNorm | 3h RMSNorm); attention q (h) + k, v (2 x kv width)
    + output (h) + log-sum-exp (heads); MLP 2 or 4 x intermediate. With attention dropout on CPU,
    SDPA takes its math path and also keeps the attention probabilities before and after dropout
    (2 x heads x seq) plus the dropout mask (1 byte) and a scaled copy of q, k, v (the `5as/h` term
    of Korthikanti et al.). Residual dropout adds a 1-byte mask per site. Under bf16 autocast (`bf16`)
    the matmul-side tensors are bf16 and the norms' fp32."""
    h, kv = arch.hidden, arch.kv_heads * arch.head_dim
    wb = arch.weight_bytes
    mm_bytes = 2 if bf16 else wb  # autocast: matmul outputs in bf16
    norm_elems = 2 * (3 * h if arch.norm == "rms" else 2 * h)
    mlp = {"gated": 4, "gelu": 2}[arch.mlp]
    mm_elems = h + 2 * kv + h + mlp * arch.intermediate + arch.extra_h * h
    total = norm_elems * wb + mm_elems * mm_bytes + arch.heads * 4  # log-sum-exp in fp32
    if dropout > 0:
        if device != "cuda":  # math attention: probabilities, dropped probabilities, mask; q k v copies
            total += arch.heads * seq * (2 * wb + 1) + 4 * h * wb
        total += 2 * h  # residual dropout masks (bool)
    return total


def activation_bytes(net: _Net, tokens: int, seq: int, device: str, checkpointing: bool,
                     dropout: float = 0.0, lora_dropout: float = 0.0,
                     bf16: bool = False) -> int:
    """Saved activations of one training forward over `tokens` tokens (sequences of `seq`), logits aside."""
    arch = net.arch
    per_layer = layer_activation_bytes(arch, seq, device, dropout, bf16)
    if net.r:
        # LoRA: lora_A keeps its input (a dropped copy with a 1-byte mask when lora_dropout > 0) and
        # lora_B keeps lora_A's output (r wide).
        mm_bytes = 2 if bf16 else arch.weight_bytes
        per_layer_lora = sum((i * (mm_bytes + 1) if lora_dropout > 0 else 0) + net.r * mm_bytes
                             for _, i, _ in net.lora) / arch.layers
        per_layer += per_layer_lora
    # Outside the layers: the embeddings' output and the final norm (input, output).
    fixed = (1 + (3 if arch.norm == "rms" else 2)) * arch.hidden * arch.weight_bytes
    if checkpointing:
        # HF gradient checkpointing keeps each layer's input and recomputes one layer in the backward pass.
        stored = arch.layers * arch.hidden * arch.weight_bytes + per_layer
    else:
        stored = arch.layers * per_layer
    return int(tokens * (stored + fixed))


# Logits alive at the start of the backward pass, in fp32 copies of tokens x vocab: the log-softmax
# output (saved), its gradient and the logits' gradient. PPO's policy holds, for one chunk at a time,
# the recomputed logits, their log-softmax and the two gradients (`core/stages/rl.chunked_logprobs`;
# in the forward pass, the entropy's softmax and products instead of the gradients).
LOSS_LOGIT_COPIES = 3
PPO_LOGIT_COPIES = 4
# SFT's head and loss (`core/models/lm_head.linear_cross_entropy`) hold one chunk's logits and the
# logsumexp's temporary, and keep to the backward pass only the hidden states' gradient (answer tokens x
# width) and, when the head trains, its weight's fp32 gradient (vocab x width).
SFT_LOGIT_COPIES = 2
# With the exact KL term (`kl_loss_coef` > 0) a chunk also holds the reference's logits and log-softmax,
# the policy's probabilities and the log-ratio, and the backward the product's and the ratio's gradients:
# counted from `core/stages/rl._chunk_logprobs`, not measured.
PPO_EXACT_KL_LOGIT_COPIES = 8


def chunk_tokens(tokens: int, vocab: int) -> int:
    """Tokens whose logits are held at once: a chunk of `core/models/lm_head`, or all of them."""
    return min(tokens, max(1, MAX_CHUNK_LOGITS // vocab))


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


def known_prompt_length(config, store=None) -> int:
    """The longest prompt PPO's rollouts will hold, in tokens as they encode it (chat format, at most
    `config.max_prompt_length`), read from `config.prompts` (the demo's, the store's or a file's): a rollout batch
    pads to its longest prompt, so this bounds it without assuming the most a prompt may keep."""
    from core.data.sources import load_prompts
    from core.models.chat import encode_prompt
    from core.models.loading import load_tokenizer

    prompts = load_prompts(config.prompts, store)
    if not prompts:
        raise ValueError(f"no prompts in {config.prompts}")
    tokenizer = load_tokenizer(config.sft_model)
    return min(config.max_prompt_length, max(len(encode_prompt(tokenizer, prompt)) for prompt in prompts))


def plan(stage: str, config, device: str | DeviceBudget | None = None, prompt_length: int | None = None,
         frozen_bf16: bool | None = None, suggest: bool = True) -> Plan:
    """Estimated peak memory of `stage` ('sft', 'rm', 'ppo') with `config`, by part, checked against
    `device` ('auto', 'cpu', 'cuda', or a DeviceBudget; default: the config's device). PPO's prompts
    are taken at `prompt_length` tokens (default: the most a prompt keeps, `max_prompt_length`, an upper bound). Never
    raises for a plan that does not fit: `Plan.fits` is False and `warnings`/`suggestions` say what to change."""
    if stage not in PLANNED_STAGES:
        raise ValueError(f"memory planning covers the stages {', '.join(PLANNED_STAGES)}; not {stage!r}")
    expected = {"sft": "SFTConfig", "rm": "RewardConfig", "ppo": "PPOConfig"}[stage]
    if type(config).__name__ != expected:
        raise ValueError(f"stage {stage!r} takes a {expected}, got {type(config).__name__}")
    if prompt_length is None:
        prompt_length = getattr(config, "max_prompt_length", 1)  # only PPO's plan reads it
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
    budget = _budget(device, config)
    builder = {"sft": _plan_sft, "rm": _plan_rm, "ppo": _plan_ppo}[stage]
    kwargs = {"prompt_length": prompt_length, "frozen_bf16": frozen_bf16} if stage == "ppo" else {}
    bf16 = _bf16(config, budget)
    result = builder(config, budget, bf16, **kwargs)
    result.assumptions["precision"] = "bf16 autocast" if bf16 else "fp32"
    _finish(result)
    if suggest:
        _advise(result, config, kwargs)
    return result


def _bf16(config, budget: DeviceBudget) -> bool:
    """Whether the stage's matmuls run under bf16 autocast (its `precision` on this device, as the stage
    resolves it; a GPU planned for without being there is taken to have bf16)."""
    import torch

    gpu_bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
    return resolved_precision(config.precision, budget.kind, gpu_bf16) == "bf16"


def _trained_parts(name: str, net: _Net, parts: list[Part], note: str = "") -> None:
    wb = net.arch.weight_bytes
    lora = f"LoRA r={net.r}: {net.lora_params:,} adapter + {net.head_params:,} head" if net.r else "full"
    parts.append(Part(name, "weights", net.params * wb, "persistent",
                      f"{net.params:,} params x {wb} B" + (f"; {note}" if note else "")))
    # Gradients are freed before each backward pass (`zero_grad(set_to_none=True)`) and grow while the
    # activations are freed, so they peak with the optimizer step, not with the forward's activations.
    parts.append(Part(name, "gradients", net.trainable * wb, "step", f"{net.trainable:,} trainable ({lora})"))
    parts.append(Part(name, "optimizer", 2 * net.trainable * wb, "persistent", "AdamW: 2 moments per trainable param"))


def _autocast_copies(name: str, net: _Net, bf16: bool, forwards: int, parts: list[Part]) -> None:
    """bf16 autocast keeps a bf16 copy of each fp32 matmul weight for the backward pass, per forward with
    gradients (trainable weights are cached per autocast region; frozen ones are re-cast, and the copy is
    saved for the input gradient)."""
    if bf16 and net.arch.weight_bytes == 4:
        parts.append(Part(name, "autocast_copies", 2 * net.matmul_params * forwards, "update",
                          f"bf16 copies of the matmul weights, {forwards} forward(s)"))


def _plan_sft(config, budget: DeviceBudget, bf16: bool) -> Plan:
    net = inspect_network(model_path(config.model, "model"), False, config)
    parts: list[Part] = []
    _trained_parts("policy", net, parts)
    tokens, seq = config.batch_size * config.max_length, config.max_length
    parts.append(Part("policy", "activations", activation_bytes(
        net, tokens, seq, budget.kind, config.gradient_checkpointing, dropout=config.dropout,
        lora_dropout=config.lora_dropout, bf16=bf16), "update",
        f"{config.batch_size} x {seq} tokens" + (", gradient checkpointing" if config.gradient_checkpointing else "")))
    # Every token counted as an answer token: an upper bound, as `max_length` is.
    chunk = chunk_tokens(tokens, net.arch.vocab)
    head_gradient = 0 if config.lora else net.arch.vocab * net.arch.hidden * 4
    parts.append(Part("policy", "logits", SFT_LOGIT_COPIES * chunk * net.arch.vocab * 4
                      + tokens * net.arch.hidden * 4 + head_gradient, "update",
                      f"fp32, {SFT_LOGIT_COPIES} copies of a chunk of {chunk} tokens x vocab {net.arch.vocab:,}, "
                      "the hidden states' gradient" + ("" if config.lora else ", the head's weight gradient")))
    _autocast_copies("policy", net, bf16, 1, parts)
    return Plan("sft", budget, parts, {"policy": _shape("policy", net)},
                {"tokens_per_step": tokens, "sequence": "max_length (an upper bound: batches pad to their longest)"})


def _plan_rm(config, budget: DeviceBudget, bf16: bool) -> Plan:
    net = inspect_network(model_path(config.sft_model, "sft_model"), True, config)
    parts: list[Part] = []
    _trained_parts("reward_model", net, parts)
    sequences, seq = config.batch_size * config.k, config.max_length
    parts.append(Part("reward_model", "activations", activation_bytes(
        net, sequences * seq, seq, budget.kind, config.gradient_checkpointing,
        dropout=net.arch.attention_dropout,  # the SFT checkpoint's own dropout (saved in its config)
        lora_dropout=config.lora_dropout, bf16=bf16),
        "update", f"{config.batch_size} rankings x K={config.k} answers x {seq} tokens"
                  + (", gradient checkpointing" if config.gradient_checkpointing else "")))
    _autocast_copies("reward_model", net, bf16, 1, parts)
    return Plan("rm", budget, parts, {"reward_model": _shape("reward_model", net)},
                {"sequences_per_step": sequences, "sequence": "max_length (an upper bound)"})


def _plan_ppo(config, budget: DeviceBudget, bf16: bool, prompt_length: int, frozen_bf16: bool | None) -> Plan:
    policy = inspect_network(model_path(config.sft_model, "sft_model"), False, config)
    from core.config import uses_reward_model
    from core.models.ensemble import head_count
    from core.models.loading import ensemble_members, resolve_model

    # With no `rm` term in the reward (core/stages/reward_terms.py) no reward model loads: the value model
    # starts at the SFT model with a new scalar head, and no frozen reward model sits beside it.
    rm = uses_reward_model(config.reward)
    value = inspect_network(model_path(config.reward_model, "reward_model") if rm
                            else model_path(config.sft_model, "sft_model"), True, config)
    if frozen_bf16 is None:
        frozen_bf16 = bf16 and budget.kind == "cuda"
    parts: list[Part] = []
    networks: dict[str, NetworkShape] = {}
    lora = config.lora
    for name, net in (("policy", policy), ("value_model", value)):
        _trained_parts(name, net, parts)
        networks[name] = _shape(name, net)
    frozen = [("reference_policy", policy, "policy")] + ([("reward_model", value, "value_model")] if rm else [])
    for name, net, twin in frozen:
        if lora:  # core/models/lora.AdapterOff: the trained network with its adapter switched off
            parts.append(Part(name, "weights", 0, "persistent", f"shares {twin}'s base weights (adapter off)"))
            networks[name] = NetworkShape(name, net.base_params, 0, net.base_params, net.arch.weight_bytes, twin)
        else:
            wb = 2 if frozen_bf16 else net.arch.weight_bytes
            parts.append(Part(name, "weights", net.base_params * wb, "persistent",
                              f"frozen, {net.base_params:,} params x {wb} B" + (" (bf16)" if frozen_bf16 else "")))
            networks[name] = NetworkShape(name, net.base_params, 0, net.base_params, wb)
    # Whole networks only: an ensemble of heads adds its heads (hidden x heads weights) beside one backbone.
    rm_dir = resolve_model(config.reward_model) if rm else None
    members = len(ensemble_members(rm_dir)) if rm else 1
    heads = head_count(Path(rm_dir)) if rm else 0
    if members > 1:
        # An ensemble RM (core/models/ensemble.py): its other members load frozen beside the first (under LoRA,
        # the value model with its adapter off), in the frozen dtype, or fp32 under LoRA.
        wb = 2 if frozen_bf16 and not lora else value.arch.weight_bytes
        parts.append(Part("reward_model", "weights", (members - 1) * value.base_params * wb, "persistent",
                          f"{members - 1} more ensemble members, frozen, {value.base_params:,} params x {wb} B each"))
    if heads:
        parts.append(Part("reward_model", "weights", heads * (value.arch.hidden + 1) * 4, "persistent",
                          f"{heads} more ensemble members as score heads on the first's backbone, fp32"))
    if config.ema_decay is not None:
        parts.append(Part("policy", "ema", policy.params * policy.arch.weight_bytes, "persistent",
                          "EMA copy of the policy"))

    # The update: policy and value over a minibatch of prompt + response, plus the ptx blocks.
    seq = prompt_length + config.response_length
    minibatch = config.batch_size // config.num_minibatches
    gc = config.gradient_checkpointing
    kw = dict(device=budget.kind, checkpointing=gc, lora_dropout=0.0,  # PPO zeroes every dropout
              bf16=bf16)
    ptx = config.ptx_coef > 0
    parts.append(Part("policy", "activations", activation_bytes(policy, minibatch * seq, seq, **kw), "update",
                      f"minibatch {minibatch} x (prompt {prompt_length} + response {config.response_length})"
                      + (", gradient checkpointing" if gc else "")))
    chunk = chunk_tokens(minibatch * config.response_length, policy.arch.vocab)
    exact_kl = config.kl_loss_coef > 0
    copies = PPO_EXACT_KL_LOGIT_COPIES if exact_kl else PPO_LOGIT_COPIES
    logits = copies * chunk * policy.arch.vocab * 4
    logits_note = (f"fp32, {copies} copies of a chunk of {chunk} of the {minibatch} x "
                   f"{config.response_length} response tokens x vocab {policy.arch.vocab:,}"
                   + (" (the exact KL term: the reference's too)" if exact_kl else ""))
    if exact_kl:
        # core/stages/rl.ReferenceHead: the reference's final hidden states over the rollout's answers.
        wb = 2 if frozen_bf16 and not lora else policy.arch.weight_bytes
        parts.append(Part("reference_policy", "kept_hidden", config.batch_size * config.response_length
                          * policy.arch.hidden * wb, "update",
                          f"{config.batch_size} x {config.response_length} x {policy.arch.hidden} hidden states "
                          "for the exact KL term"))
    if ptx:
        ptx_tokens = config.ptx_batch_size * PTX_BLOCK_SIZE
        parts.append(Part("policy", "ptx_activations", activation_bytes(policy, ptx_tokens, PTX_BLOCK_SIZE, **kw),
                          "update", f"{config.ptx_batch_size} blocks x {PTX_BLOCK_SIZE} tokens"))
        # The policy saves no logits for the backward pass (its chunks recompute theirs), and the ptx term,
        # computed last, is differentiated first: its logits are freed before any chunk's are recomputed.
        ptx_logits = LOSS_LOGIT_COPIES * ptx_tokens * policy.arch.vocab * 4
        if ptx_logits > logits:
            logits, logits_note = ptx_logits, (f"fp32, {LOSS_LOGIT_COPIES} copies of the ptx term's {ptx_tokens} tokens"
                                               f" x vocab (more than the response's chunk; never both at once)")
    parts.append(Part("policy", "logits", logits, "update", logits_note))
    parts.append(Part("value_model", "activations", activation_bytes(value, minibatch * seq, seq, **kw), "update",
                      f"minibatch {minibatch} x {seq} tokens" + (", gradient checkpointing" if gc else "")))
    _autocast_copies("policy", policy, bf16, 2 if ptx else 1, parts)
    _autocast_copies("value_model", value, bf16, 1, parts)

    # The rollout: sampling with the KV cache (in bf16 under bf16 autocast, else the weights' dtype), then
    # scoring the batch.
    arch = policy.arch
    sampled_bytes = 2 if bf16 else arch.weight_bytes
    kv = config.batch_size * seq * arch.layers * 2 * arch.kv_heads * arch.head_dim * sampled_bytes
    prefill = config.batch_size * prompt_length * arch.vocab * sampled_bytes
    if bf16 and arch.weight_bytes == 4 and not lora:  # autocast caches copies of trainable weights only
        parts.append(Part("policy", "autocast_copies", 2 * policy.matmul_params, "rollout",
                          "bf16 copies of the matmul weights while sampling"))
    scoring_chunk = chunk_tokens(config.batch_size * config.response_length, arch.vocab)
    scoring = 3 * scoring_chunk * arch.vocab * 4
    if kv + prefill >= scoring:
        parts.append(Part("rollout", "kv_cache", kv, "rollout",
                          f"{config.batch_size} x {seq} tokens x {arch.layers} layers x 2 x {arch.kv_heads} kv heads "
                          f"x {arch.head_dim}"))
        parts.append(Part("rollout", "prefill_logits", prefill, "rollout", "the prompt's logits at the first step"))
    else:
        parts.append(Part("rollout", "scoring_logits", scoring, "rollout",
                          f"fp32 logits of a chunk of {scoring_chunk} tokens while scoring"))
    return Plan("ppo", budget, parts, networks, {
        "prompt_length": prompt_length, "sequence": seq, "minibatch": minibatch,
        "frozen_bf16": bool(frozen_bf16), "lora_shares_base": lora})


def _shape(name: str, net: _Net) -> NetworkShape:
    return NetworkShape(name, net.params, net.trainable, net.base_params, net.arch.weight_bytes)


def _finish(result: Plan) -> None:
    """Peak = persistent + the largest phase: the update (activations, logits, autocast copies), the
    optimizer step (gradients + foreach AdamW's temporary of the trainable size), or PPO's rollout (the
    KV cache or the scoring logits, while the last update's gradients are still held: PPO frees them
    just before its next backward pass)."""
    total = lambda phase: sum(p.bytes for p in result.parts if p.phase == phase)  # noqa: E731
    grads = total("step")
    if result.device.kind == "cpu" and total("update"):
        # glibc's malloc keeps much of the memory freed between forward passes in its heap, so peak
        # RSS runs above the live tensors: measured 1.27x at 34M parameters and 1.44x at 5M
        # (benchmarks/memory_check.py with and without --live, SFT), mostly on the transient tensors.
        result.parts.append(Part("process", "allocator_slack", int(CPU_ALLOCATOR_SLACK * total("update")), "update",
                                 f"CPU: {CPU_ALLOCATOR_SLACK:.0%} of the update's transient tensors kept by malloc"))
    phases = {"persistent": total("persistent"), "update": total("update"), "step": grads + grads}
    if result.stage == "ppo":
        phases["rollout"] = total("rollout") + grads
    result.phases = phases
    result.peak_bytes = phases["persistent"] + max(v for k, v in phases.items() if k != "persistent")


def _advise(result: Plan, config, kwargs: dict) -> None:
    """When the plan does not fit (or only just), what would: each change planned again, with its peak."""
    available = result.device.available_bytes
    if available is None or result.peak_bytes <= TIGHT * available:
        return
    stage = result.stage
    options: list[tuple[str, dict, dict]] = []
    if not config.lora:
        options.append((f"enable LoRA (lora_r={LORA_SUGGESTED_R})", {"lora_r": LORA_SUGGESTED_R}, {}))
    if not config.gradient_checkpointing:
        options.append(("enable gradient checkpointing (gradient_checkpointing=true)",
                        {"gradient_checkpointing": True}, {}))
    if stage == "ppo":
        if config.batch_size // config.num_minibatches > 1 and config.batch_size % (config.num_minibatches * 2) == 0:
            options.append((f"smaller update minibatches (num_minibatches={config.num_minibatches * 2})",
                            {"num_minibatches": config.num_minibatches * 2}, {}))
        if config.batch_size > 1:
            half = max(1, config.batch_size // 2)
            while half % config.num_minibatches:
                half -= 1
            if half >= 1:
                options.append((f"smaller batch (batch_size={half})", {"batch_size": half}, {}))
        if not config.lora and not kwargs.get("frozen_bf16") and result.device.kind == "cuda":
            options.append(("bf16 frozen networks (reference and reward model in bf16)", {}, {"frozen_bf16": True}))
    elif config.batch_size > 1:
        options.append((f"smaller batch (batch_size={config.batch_size // 2})", {"batch_size": config.batch_size // 2}, {}))
    verdict = "does not fit" if not result.fits else "fits only just"
    result.warnings.append(f"{stage} {verdict} on {result.device.name}: estimated peak {gib(result.peak_bytes)}, "
                           f"{gib(available)} available")
    best_changes: dict = {}
    best_kwargs: dict = {}
    for text, changes, extra in options:
        try:
            alt = plan(stage, config.replace(**changes), result.device, **{**kwargs, **extra}, suggest=False)
        except ValueError:
            continue
        saved = result.peak_bytes - alt.peak_bytes
        if saved <= 0:
            continue
        best_changes.update(changes)
        best_kwargs.update(extra)
        result.suggestions.append(f"{text}: peak {gib(alt.peak_bytes)} (saves {gib(saved)})"
                                  + (", fits" if alt.fits else ""))
    if len(result.suggestions) > 1 and not any(s.endswith(", fits") for s in result.suggestions):
        try:
            alt = plan(stage, config.replace(**best_changes), result.device, **{**kwargs, **best_kwargs}, suggest=False)
            result.suggestions.append(f"all of the above: peak {gib(alt.peak_bytes)}" + (", fits" if alt.fits else
                                      ", still does not fit: a smaller model or a larger device"))
        except ValueError:
            pass


def plan_json(result: Plan) -> str:
    return json.dumps(result.to_dict())


__all__ = ["Plan", "Part", "DeviceBudget", "NetworkShape", "plan", "detect_device", "available_ram", "lora_layers",
           "layer_activation_bytes", "activation_bytes", "PLANNED_STAGES", "GIB"]

