"""Making labeling batches: K answers per prompt sampled once from a checkpoint (the one generation
path, `core.models.generate.sample`), or read from a file of given answers.

torch is imported only when sampling, so the CLI parser and the app's pages stay light.
"""

from __future__ import annotations

from pathlib import Path

from core.data.store import MAX_K, MIN_K, Store
from core.labeling.store import BatchResult, LabelingStore

SAMPLE_ROWS = 64  # prompt copies per sampling call


def sample_answers(prompts: list, model: str = "bundled", k: int = 4, temperature: float = 1.0,
                   max_new_tokens: int = 48, seed: int | None = 0) -> list[tuple[str | list[dict], list[str]]]:
    """K sampled answers per prompt, each after the prompt's whole conversation when it has several
    turns (duplicates are merged later, by `create_batch`)."""
    if not MIN_K <= int(k) <= MAX_K:
        raise ValueError(f"K must be {MIN_K}..{MAX_K}, got {k}")
    if not temperature > 0 or temperature != temperature or temperature == float("inf"):
        raise ValueError(f"temperature must be above 0 so the K answers differ, got {temperature}")
    if not prompts:
        raise ValueError("no prompts to sample answers for")
    from core.models.generate import sample
    from core.models.loading import load_policy, load_tokenizer

    policy, tokenizer = load_policy(model).eval(), load_tokenizer(model)
    rows = [p for p in prompts for _ in range(int(k))]
    texts: list[str] = []
    for start in range(0, len(rows), SAMPLE_ROWS):
        chunk_seed = None if seed is None else seed + start
        texts += sample(policy, tokenizer, rows[start:start + SAMPLE_ROWS], max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=chunk_seed).texts
    return [(p, texts[i * int(k):(i + 1) * int(k)]) for i, p in enumerate(prompts)]


def sample_batch(store: Store, name: str, prompts: list, model: str = "bundled", k: int = 4,
                 temperature: float = 1.0, labelers: list[str] | None = None, overlap: float = 0.2,
                 per_overlap: int = 2, max_new_tokens: int = 48, seed: int = 0) -> BatchResult:
    """Sample K answers per prompt and store them as a batch assigned to `labelers` (default: every
    active account). The batch's name, labelers and overlap are checked before any sampling."""
    labeling = LabelingStore(store)
    labeling.check_batch_options(name, labelers, overlap, per_overlap, k)  # before the slow part
    items = sample_answers(prompts, model, k, temperature, max_new_tokens, seed)
    return labeling.create_batch(name, items, labelers, overlap, per_overlap, model=str(model), k=int(k),
                                 temperature=float(temperature), seed=seed)


def read_answers_file(path: str | Path) -> list[tuple[str, list[str]]]:
    """Given answers from a JSONL/CSV file with `prompt` and `responses` (a list) per row."""
    from core.data.formats import parse_rows, read_bytes

    path = Path(path).expanduser()
    items = []
    for number, row in parse_rows(read_bytes(path), path.name):
        prompt, responses = row.get("prompt"), row.get("responses")
        if not isinstance(prompt, (str, list)) or not isinstance(responses, list):
            raise ValueError(f'{path.name} line {number}: needs "prompt" (text, or a conversation ending with a '
                             'user turn) and "responses" (a list of answers)')
        items.append((prompt, responses))
    if not items:
        raise ValueError(f"{path} holds no rows")
    return items
