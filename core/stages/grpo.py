"""Stage 3, alternative: GRPO (Shao et al. 2024, DeepSeekMath), through TRL's GRPOTrainer.

For each prompt, `num_generations` answers are sampled from the policy and scored by the reward
model; an answer's advantage is its reward minus the group's mean, divided by the group's std
(`scale_rewards`), the same for all its tokens. No value model: the group is the baseline. The
update is PPO's clipped surrogate (`epsilon`) plus beta * KL(pi || pi_SFT) as a *loss* term, k3 per
token differentiated pathwise (docs/ARCHITECTURE.md, "KL estimators": k3 is a proper penalty there,
unlike in a reward).

TRL does all of the method; `trl_bridge.run_group` gives it our prompts in our chat format, our
reward model as the reward (or the demo's gold labeler, `reward: gold`, cheating on the proxy),
the SFT model as the reference, and connects it to the workbench (metrics, stop, checkpoints and
resume, the final model and evaluation). No loop of our own.
"""

from __future__ import annotations

from pathlib import Path

from core.config import GRPOConfig
from core.data.store import Store
from core.events import Events
from core.stages import trl_bridge


def run(config: GRPOConfig, store: Store | None, events: Events, output_dir: str | Path) -> Path:
    """Train the policy with GRPO. Returns `output_dir` (the final policy, an HF directory), or the stop
    step's checkpoint when stopped. Re-running with the same `output_dir` resumes."""
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    options = dict(loss_type=config.loss_type, scale_rewards=config.scale_rewards)
    return trl_bridge.run_group("grpo", GRPOTrainer, TRLGRPOConfig, options, config, store, events, output_dir)
