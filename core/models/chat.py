"""The one prompt-formatting path: every stage, the Rank page and the Chat page turn a prompt (or a
conversation) into tokens here.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`; a plain
string is one user turn. It is rendered by the tokenizer's chat template when it has one (an
instruct model is trained and sampled in the format it was tuned on), else by `PLAIN_CHAT_TEMPLATE`,
which is also the bundled model's template:

    User: {prompt}
    Assistant: {answer}<eos>

The answer's tokens are what the template adds after the generation prompt, end-of-turn marker
included, so SFT's loss falls on exactly the assistant turn and the RM and PPO score a response in
the same format it was sampled in.
"""

from __future__ import annotations

# Jinja. The generation prompt ("Assistant:") closes every user turn, so `add_generation_prompt`
# changes nothing here; the answer follows after one space and ends with EOS. Newlines that follow a
# block tag are written as {{ '\n' }}: transformers renders templates with trim_blocks, which drops them.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}{% if not loop.first %}{{ '\\n' }}{% endif %}User: {{ m['content'] }}\nAssistant:"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
ROLES = ("system", "user", "assistant")


def as_messages(prompt: str | list[dict]) -> list[dict]:
    """A prompt as a conversation; a conversation is checked (roles, text content)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("a conversation must be a non-empty list of {role, content} turns")
    for i, turn in enumerate(prompt):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f"turn {i + 1} of the conversation must be {{'role': one of {', '.join(ROLES)}, "
                             "'content': text}")
    return [{"role": t["role"], "content": t["content"]} for t in prompt]


def template_of(tokenizer) -> str:
    return getattr(tokenizer, "chat_template", None) or PLAIN_CHAT_TEMPLATE


def holds_conversations(tokenizer) -> bool:
    """Does the model carry a chat template of its own? Then it reads earlier turns as a conversation
    (the Chat page sends them all); under the plain template (the demo's models, trained on single
    questions) each message is answered on its own."""
    return template_of(tokenizer) != PLAIN_CHAT_TEMPLATE


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template_of(tokenizer), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # a template's own error (raise_exception, a missing variable): say which
        raise ValueError(f"the tokenizer's chat template failed to render a conversation: {exc}") from exc


def render_prompt(tokenizer, prompt: str | list[dict]) -> str:
    """The exact text fed to the model before it answers (`rlhf chat --show-prompt` prints it)."""
    return _render(tokenizer, as_messages(prompt), add_generation_prompt=True)


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def _exchange(tokenizer, prompt: str | list[dict], answer: str) -> tuple[str, str]:
    """(the prompt's text up to the generation prompt, the text the template adds for the answer)."""
    messages = as_messages(prompt)
    before = _render(tokenizer, messages, add_generation_prompt=True)
    full = _render(tokenizer, [*messages, {"role": "assistant", "content": answer.strip()}], add_generation_prompt=False)
    if not full.startswith(before):
        raise ValueError("the chat template renders the conversation differently once an answer is added, "
                         "so the answer's tokens cannot be told apart from the prompt's")
    return before, full[len(before):]


def encode_answer(tokenizer, prompt: str | list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one exchange: the answer ids are the tokens the template adds for
    the assistant turn after the generation prompt, ending with EOS so the model learns to stop."""
    before, added = _exchange(tokenizer, prompt, answer)
    prompt_ids = tokenizer(before, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(added, add_special_tokens=False)["input_ids"]
    # Up to and including the first EOS: sampling stops there, so what a template puts after it
    # (a newline) is never generated, and the RM reads its score at the EOS as in PPO's rollouts.
    eos = tokenizer.eos_token_id
    answer_ids = answer_ids[: answer_ids.index(eos) + 1] if eos in answer_ids else [*answer_ids, eos]
    return prompt_ids, answer_ids


def encode_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a whole conversation ending with an assistant turn: labels are the ids on every
    assistant turn (its end-of-turn EOS included) and -100 elsewhere, so SFT learns each answer in its
    context. Each turn's text is what the template adds to the conversation so far."""
    messages = as_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise ValueError("a conversation to learn from must end with an assistant turn")
    ids: list[int] = []
    labels: list[int] = []
    rendered = ""
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        if not before.startswith(rendered):
            raise ValueError("the chat template renders earlier turns differently as the conversation grows, "
                             "so its assistant turns cannot be located")
        context = tokenizer(before[len(rendered):], add_special_tokens=False)["input_ids"]
        _, answer = encode_answer(tokenizer, messages[:i], turn["content"])
        ids += context + answer
        labels += [-100] * len(context) + answer
        # The text covered so far ends with the answer's EOS; what the template adds after it (a
        # newline) opens the next context piece.
        full = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        answer_text = full[len(before):]
        eos = tokenizer.eos_token
        rendered = before + (answer_text[: answer_text.index(eos) + len(eos)] if eos in answer_text else answer_text)
    return ids, labels


def answer_text(tokenizer, prompt: str | list[dict], answer: str) -> str:
    """The text the template adds for an assistant turn after the generation prompt, up to (not
    including) its end-of-turn EOS: what TRL's string columns hold as `chosen`/`rejected`/`completion`
    (TRL appends the EOS itself). Under the plain template, " " + answer."""
    added = _exchange(tokenizer, prompt, answer)[1]
    eos = tokenizer.eos_token
    return added[: added.index(eos)] if eos and eos in added else added


def recent_turns(messages: list[dict]) -> list[list[dict]]:
    """The conversation and its tails that keep the most recent whole turns, longest first: the oldest
    exchanges go first, a user turn always opening what is kept; system turns stay while anything else
    can go, and go last. The last user turn and what follows it are in every tail. The one rule of
    what a too-long conversation keeps: prompts (`fit_prompt`) and SFT's demonstrations both cut by it."""
    system = [t for t in messages if t["role"] == "system"]
    rest = [t for t in messages if t["role"] != "system"]
    starts = [i for i, t in enumerate(rest) if t["role"] == "user"]
    return [messages, *(system + rest[i:] for i in starts[1:]), *([rest[starts[-1]:]] if system and starts else [])]


def fit_prompt(tokenizer, prompt: str | list[dict], max_tokens: int) -> tuple[str | list[dict], int]:
    """(the prompt cut to its most recent whole turns (`recent_turns`) so that its rendering fits
    `max_tokens`, how many turns were left out). The last user turn is never dropped nor cut, and a
    prompt whose last user turn alone does not fit is refused (no answer could follow it)."""
    messages = as_messages(prompt)
    for kept in recent_turns(messages):
        if len(encode_prompt(tokenizer, kept)) <= max_tokens:
            return (prompt, 0) if kept is messages else (kept, len(messages) - len(kept))
    users = [i for i, t in enumerate(messages) if t["role"] == "user"]
    last = messages[users[-1]:] if users else messages[-1:]
    raise ValueError(f"a prompt's last user turn alone takes {len(encode_prompt(tokenizer, last))} tokens, more "
                     f"than the {max_tokens} a prompt may have here: shorten it (it begins {last[0]['content'][:60]!r})")


def fit_report(tokenizer, prompts: list, max_tokens: int) -> str | None:
    """A run-log line saying how many prompts lose their oldest turns to fit `max_tokens` (None if none);
    raises, before any work, if one cannot fit at all."""
    dropped = [fit_prompt(tokenizer, p, max_tokens)[1] for p in prompts]
    cut = [d for d in dropped if d]
    if not cut:
        return None
    return (f"{len(cut)} of {len(prompts)} prompts are longer than {max_tokens} tokens: their oldest "
            f"{min(cut)}-{max(cut)} turns are left out, the most recent whole turns kept")
