"""Stage 3, alternative: GRPO (Shao et al. 2024, DeepSeekMath), through TRL's GRPOTrainer.

For each prompt, `num_generations` answers are sampled from the policy and scored by the reward
model; an answer's advantage is its reward minus the group's mean, divided by the group's std
(`scale_rewards`), the same for all its tokens. No value model: the group is the baseline. The
update is PPO's clipped surrogate (`epsilon`) plus beta * KL(pi || pi_SFT) as a *loss* term, k3 per
token differentiated pathwise (docs/NOTES.md, "KL estimators": k3 is a proper penalty there,
unlike in a reward).

Everything but these options is shared with RLOO in `trl_bridge.run_group`.
"""

from __future__ import annotations

from pathlib import Path

from core.config import GRPOConfig
from core.data.store import Store
from core.stages.events import Events
from core.stages import trl_bridge


def run(config: GRPOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    return trl_bridge.run_group("grpo", config, store, events, output_dir, loss_type=config.loss_type,
                                scale_rewards=config.scale_rewards)
