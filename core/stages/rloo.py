"""Stage 3, alternative: RLOO (Ahmadian et al. 2024, "Back to Basics"), through TRL's RLOOTrainer.

For each prompt, `num_generations` answers are sampled and scored by the reward model minus
beta * KL (k1 = log pi - log pi_SFT summed over the answer, in the reward as PPO puts it); an
answer's advantage is its reward minus the mean reward of the *other* answers to the same prompt
(the leave-one-out baseline, unbiased). No value model, no GAE: one advantage per answer, the
REINFORCE estimator with PPO's clipped ratio (`epsilon`) when a batch is reused (`num_iterations`).

Everything but these options is shared with GRPO in `trl_bridge.run_group`.
"""

from __future__ import annotations

from pathlib import Path

from core.config import RLOOConfig
from core.data.store import Store
from core.stages.events import Events
from core.stages import trl_bridge


def run(config: RLOOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    return trl_bridge.run_group("rloo", config, store, events, output_dir,
                                normalize_advantages=config.normalize_advantages)
