"""A reward function of your own, for the demo task: 1 for exactly "The answer is X." with X the prompt's
expected answer (the `answer` column the demo's prompts carry), else 0: no rambling, no other wording.

    rlhf grpo --preset quick --set sft_model=out/sft --set reward=python:configs/rewards/demo_strict.py:strict \
        --output out/grpo-strict

Called once per batch with the prompts, the sampled answers, and each column of the prompt rows as a list
(TRL's `reward_funcs` shape); returns one number per answer.
"""


def strict(prompts: list[str], completions: list[str], answer: list[str], **columns) -> list[float]:
    return [float(completion.strip() == f"The answer is {expected}.")
            for completion, expected in zip(completions, answer)]
