"""Model output shown as text, never as markup: nothing a model writes can make the browser fetch a
remote resource (a markdown image `![](http://...)`, an HTML `<img>`), run script or restyle the page.

Streamlit renders `st.markdown` / `st.write_stream` strings as Markdown (images, links, HTML-like
tags, LaTeX between `$`). `escape_markdown` backslash-escapes every ASCII punctuation character
(CommonMark lets any of them be escaped), so the text shows literally. `escape_html` is for the
HTML the workbench builds itself (coloured tokens in the rollout browser).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Iterator

EOS_TEXT = "⟨eos⟩"  # the end-of-turn token drawn visibly: it is a token the KL counts
_PUNCT = re.compile(r"([!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~])")


def escape_markdown(text: str) -> str:
    """Text that renders as itself in Markdown: every ASCII punctuation character escaped, line breaks kept."""
    return _PUNCT.sub(r"\\\1", text).replace("\n", "  \n")


def escape_html(text: str) -> str:
    return html.escape(text, quote=True)


class ShownStream:
    """Wrap a stream of text pieces: iterate it to get the escaped pieces (for st.write_stream), read
    `.text` afterwards for what the model actually wrote (for storing a vote or the chat history)."""

    def __init__(self, pieces: Iterable[str]):
        self._pieces = pieces
        self._raw: list[str] = []

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._raw.append(piece)
            yield escape_markdown(piece)

    @property
    def text(self) -> str:
        return "".join(self._raw)


def token_text(tokenizer, token_id: int) -> str:
    """One token as the rollout browser and the token view show it, the end-of-turn token visibly."""
    if token_id == tokenizer.eos_token_id:
        return EOS_TEXT
    return tokenizer.decode([token_id])
