"""Reward-model ensembles against over-optimisation (Coste et al. 2023, "Reward model ensembles help mitigate
overoptimization"; Eisenstein et al. 2023).

N reward models trained on the same rankings, each with its own seed (head initialisation, data order), agree
where the rankings taught them and drift apart where a policy wanders off what they saw. A conservative reward
then gives the policy less to win out there: the members' minimum, or their mean minus lambda times their
standard deviation (`reward_aggregate`, `uncertainty_coef`). The plain mean is the ensemble without the penalty.

On disk an ensemble is one directory (`save_ensemble`): its first member at the top, a plain HF reward-model
directory, so every loader of a single RM (the value model's start, Chat, TRL) reads it unchanged, and the
other members in `member-<i>/`, listed in `ensemble.json` (`core.models.loading.ensemble_members`, which
refuses a directory missing a member). `load_reward_model` loads any RM directory as a `RewardEnsemble`: one
plain RM is an ensemble of one, whose every aggregate is its own score, so every stage scores one way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from core.config import MAX_ENSEMBLE, REWARD_AGGREGATES
from core.models.loading import (
    ENSEMBLE_FILE,
    Device,
    check_same_tokenizer,
    ensemble_members,
    hidden_and_scores,
    load_scalar_model,
    load_tokenizer,
    resolve_model,
    token_scores,
)
from core.paths import atomic_dir

MEMBER_DIR = "member-{}"
ALIGNMENT_FILE = "alignment.json"
# An ensemble of heads (`rlhf rm --set ensemble_heads=true`): the members after the first are score heads on the
# first member's backbone, their weights and (centring) biases in this file, their count in `ensemble.json`.
HEADS_FILE = "heads.safetensors"


class ScoreHeads(torch.nn.Module):
    """N - 1 extra score heads read off the first member's final hidden states: (batch, seq, hidden) ->
    (heads, batch, seq). Each head's bias is its centring offset (`reward_bias`), so its scores sit on the
    demonstrations' scale like a whole member's."""

    def __init__(self, hidden: int, count: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden, count)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).permute(2, 0, 1)


def aggregate(member_scores: torch.Tensor, how: str = "mean", uncertainty_coef: float = 1.0) -> torch.Tensor:
    """One reward from the members' scores (members along dim 0): their mean, their min, or
    mean - uncertainty_coef * std. The std is the population one (divided by N): one member has std 0, so
    every aggregate of a single RM is its score."""
    if how == "mean":
        return member_scores.mean(0)
    if how == "min":
        return member_scores.min(0).values
    if how == "mean_minus_std":
        return member_scores.mean(0) - uncertainty_coef * disagreement(member_scores)
    raise ValueError(f"reward_aggregate must be one of {', '.join(REWARD_AGGREGATES)}, got {how!r}")


def disagreement(member_scores: torch.Tensor) -> torch.Tensor:
    """The members' standard deviation (population, members along dim 0): the ensemble's uncertainty."""
    return member_scores.std(0, correction=0)


class RewardEnsemble(torch.nn.Module):
    """N frozen reward models scored together; `forward` is the aggregate reward at every position."""

    def __init__(self, members: list[torch.nn.Module], how: str = "mean", uncertainty_coef: float = 1.0,
                 heads: ScoreHeads | None = None):
        super().__init__()
        if how not in REWARD_AGGREGATES:
            raise ValueError(f"reward_aggregate must be one of {', '.join(REWARD_AGGREGATES)}, got {how!r}")
        self.members = torch.nn.ModuleList(members)
        self.heads = heads  # more members as heads on the first member's backbone (an ensemble of heads)
        self.how, self.uncertainty_coef = how, uncertainty_coef

    def __len__(self) -> int:
        return len(self.members) + (0 if self.heads is None else self.heads.linear.out_features)

    def member_scores(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """(members, batch, seq): each member's `token_scores`; an ensemble of heads runs its backbone once."""
        if self.heads is None:
            return torch.stack([token_scores(m, input_ids, attention_mask, position_ids) for m in self.members])
        hidden, first = hidden_and_scores(self.members[0], input_ids, attention_mask, position_ids)
        return torch.cat([first.float()[None], self.heads(hidden)])

    def aggregate(self, member_scores: torch.Tensor) -> torch.Tensor:
        return aggregate(member_scores, self.how, self.uncertainty_coef)

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        return self.aggregate(self.member_scores(input_ids, attention_mask, position_ids))


def member_token_scores(reward_model, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
    """(members, batch, seq): each member's score at every position, of a `RewardEnsemble` or of one plain
    reward model (then one member)."""
    if isinstance(reward_model, RewardEnsemble):
        return reward_model.member_scores(input_ids, attention_mask, position_ids)
    return token_scores(reward_model, input_ids, attention_mask, position_ids)[None]


def answer_scores(reward_model, input_ids, attention_mask, position_ids, prompt_len: int, last: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reward (batch,), each member's score (members, batch)) of answers after a prompt of `prompt_len`
    columns, read at each answer's last token `last` (batch,), as PPO reads the RM. A plain reward model is
    one member whose score is the reward."""
    members = member_token_scores(reward_model, input_ids, attention_mask, position_ids)[:, :, prompt_len:].float()
    members = members.gather(2, last.expand(len(members), -1).unsqueeze(2)).squeeze(2)
    if isinstance(reward_model, RewardEnsemble):
        return reward_model.aggregate(members), members
    return members[0], members


def ensemble_size(path: str | os.PathLike) -> int:
    """How many reward models the directory holds, heads included (1 for a plain one)."""
    path = Path(resolve_model(path))
    return len(ensemble_members(path)) + head_count(path)


def head_count(path: Path) -> int:
    """The extra score heads of an ensemble of heads (0 for any other RM directory)."""
    listing = path / ENSEMBLE_FILE
    return int(json.loads(listing.read_text()).get("heads", 0)) if listing.is_file() else 0


def load_heads(path: Path, device: Device | None = None) -> ScoreHeads | None:
    """An ensemble of heads' extra heads, frozen; None for any other RM directory. A listed head count with no
    heads file (or another shape) is refused, as a missing member is."""
    from safetensors.torch import load_file

    count = head_count(path)
    if not count:
        return None
    if not (path / HEADS_FILE).is_file():
        raise ValueError(f"reward-model ensemble {path} lists {count} heads but has no {HEADS_FILE}; train it again")
    weights = load_file(path / HEADS_FILE)
    heads = ScoreHeads(weights["linear.weight"].shape[1], count)
    try:
        heads.load_state_dict(weights)
    except RuntimeError as exc:
        raise ValueError(f"reward-model ensemble {path}: {HEADS_FILE} does not hold {count} heads ({exc})") from None
    heads.requires_grad_(False)
    return heads.to(device.torch) if device is not None else heads


def load_reward_model(path: str | os.PathLike, pad_token_id: int, device: Device | None = None,
                      dtype: torch.dtype = torch.float32, how: str = "mean", uncertainty_coef: float = 1.0,
                      first: torch.nn.Module | None = None) -> RewardEnsemble:
    """Every member of the RM directory `path`, frozen, as a `RewardEnsemble` aggregating by `how`. `first`:
    the first member already loaded (PPO under LoRA: the value model with its adapter off). Members whose
    tokenizers differ are refused: they would read the same answer as different token ids."""
    path = Path(resolve_model(path))
    members = ensemble_members(path)
    tokenizer = load_tokenizer(members[0])
    for member in members[1:]:
        check_same_tokenizer(tokenizer, load_tokenizer(member),
                             f"reward-model ensemble {path}: member {member.name} does not match the first member")
    models = [first] if first is not None else []
    models += [load_scalar_model(m, pad_token_id, device, dtype) for m in members[len(models):]]
    for m in models:
        m.eval()
        m.requires_grad_(False)
    return RewardEnsemble(models, how, uncertainty_coef, load_heads(path, device))


def join_ensemble(target: str | os.PathLike, member_dirs: list[str | os.PathLike],
                  align: Callable[[list[Path]], list[float]] | None = None) -> Path:
    """One ensemble directory from reward models trained apart (`rlhf ensemble`): members from different base
    models can disagree where members of one base share its blind spots (Eisenstein et al. 2023). The first is
    member 0, the one PPO's value model starts from. Refused before anything is written: fewer than 2 or more
    than MAX_ENSEMBLE members, a member that is not a plain reward-model directory (a causal LM, an ensemble,
    a missing directory) or is given twice, members whose tokenizers or chat templates differ, and a target
    that exists.

    `align`: the members' mean scores on one policy's answers (`core.stages.evaluate.member_means`). Each
    member, centred on its own demonstrations, may sit at its own offset on a policy's answers (members from
    other bases measured 7 points apart on one SFT model's), so their std would be that offset on every answer,
    not their disagreement; aligned, each member after the first has its `reward_bias` moved to member 0's
    mean there. The means and shifts go to `alignment.json`."""
    target = Path(target)
    if not 2 <= len(member_dirs) <= MAX_ENSEMBLE:
        raise ValueError(f"an ensemble joins 2 to {MAX_ENSEMBLE} reward models, got {len(member_dirs)}")
    if target.exists():
        raise ValueError(f"{target} exists: choose a new directory for the ensemble")
    members = []
    for given in member_dirs:
        path = Path(resolve_model(given))
        if ensemble_size(path) > 1:
            raise ValueError(f"{given} is already an ensemble: join its members' directories instead")
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
        if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
            raise ValueError(f"{given} is not a reward model (no sequence-classification head in its config.json)")
        if path.resolve() in {m.resolve() for m in members}:
            raise ValueError(f"{given} is given twice: the same reward model twice adds no disagreement")
        members.append(path)
    first = load_tokenizer(members[0])
    for member in members[1:]:
        check_same_tokenizer(first, load_tokenizer(member), f"ensemble member {member}")
    if align is None:
        return save_ensemble(target, members)
    means = align(members)
    shifts = [means[0] - m for m in means]
    return save_ensemble(target, members, extra_json={ALIGNMENT_FILE: {"means": means, "bias_shifts": shifts}},
                         bias_shifts=shifts)


def save_ensemble(target: str | os.PathLike, member_dirs: list[Path], extra_json: dict[str, dict] | None = None,
                  bias_shifts: list[float] | None = None, heads: ScoreHeads | None = None) -> Path:
    """One ensemble directory from trained member directories, written atomically: the first member's files at
    the top, each other member copied whole into `member-<i>/`, `ensemble.json` listing them. `heads`: an
    ensemble of heads' extra members (beside one member directory), in `heads.safetensors`, counted there."""
    from safetensors.torch import save_file

    target = Path(target)
    names = ["."] + [MEMBER_DIR.format(i) for i in range(1, len(member_dirs))]
    listing = {"members": names}
    with atomic_dir(target) as tmp:
        shutil.copytree(member_dirs[0], tmp, dirs_exist_ok=True)
        for name, member in zip(names[1:], member_dirs[1:]):
            shutil.copytree(member, tmp / name)
        if heads is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, tmp / HEADS_FILE)
            listing["heads"] = heads.linear.out_features
        (tmp / ENSEMBLE_FILE).write_text(json.dumps(listing, indent=2))
        for name, shift in zip(names, bias_shifts or []):
            if shift:  # `bias_shifts`: added to each member's reward_bias (`join_ensemble`'s alignment)
                config = json.loads((tmp / name / "config.json").read_text())
                config["reward_bias"] = config.get("reward_bias", 0.0) + shift
                (tmp / name / "config.json").write_text(json.dumps(config, indent=2))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
    return target
