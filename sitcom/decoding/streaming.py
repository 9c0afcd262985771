"""Streaming finished lines out of a running batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from sitcom.decoding.vocab import stop_token_ids, vocab_info
from sitcom.scenes.lines import clean_lines
from sitcom.scenes.script import normalize_prompt


class LineStreamer(BaseStreamer):
    """Calls `on_lines(row, lines)` whenever a row completes a line. Hand-written because
    transformers' TextIteratorStreamer handles batch size 1 only."""

    def __init__(
        self, tokenizer, prompts: Sequence[str], on_lines: Callable[[int, list[str]], None]
    ):
        self.tokenizer = tokenizer
        self.prompt_texts = [normalize_prompt(p) for p in prompts]
        self.on_lines = on_lines
        self.stop_ids = set(stop_token_ids(tokenizer))
        self.newline_ids = set(vocab_info(tokenizer).newline_ids.tolist())
        self._ids: list[list[int]] = [[] for _ in prompts]
        self._done = [False] * len(prompts)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first sends the prompt itself
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self._ids), -1)[:, -1].tolist()):
            if self._done[row]:
                continue
            if token in self.stop_ids:
                self._done[row] = True
                continue
            self._ids[row].append(token)
            if token in self.newline_ids:
                text = self.tokenizer.decode(self._ids[row])
                self.on_lines(row, clean_lines(self.prompt_texts[row], text, complete=False))

    def end(self) -> None:
        pass
