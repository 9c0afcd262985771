"""The decoding guards that keep the script format, as transformers logits processors and
stopping criteria (so generate() runs them, and the llama.cpp loop calls them directly):

- ScriptRepetitionPenalty: the usual penalty, per row, that leaves format tokens alone;
- LoopGuard: a line may not end (newline/EOS banned) while it repeats an earlier line;
- CastTurns: the next speaker drawn from the scene's cast, never the one who just spoke;
- SceneStop: per-row stop at a new `[Scene: ...]` heading, the row's own line budget or its
  token budget;
- DeadlineStop: per-row stop on a timeout or cancellation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from tokenizers import decoders
from transformers import LogitsProcessor, StoppingCriteria
from transformers.generation.logits_process import PrefixConstrainedLogitsProcessor

from sitcom.decoding.vocab import speaker_token_ids, tag_after_newline, vocab_info
from sitcom.scenes.lines import finished_lines, has_heading, line_key
from sitcom.scenes.ranking import premise_words
from sitcom.scenes.script import MAIN_CHARACTERS, speaker_of


class _RowText:
    """Each row's generated text, decoded once per step and shared by the guards.

    Decoding every row's whole text each step is O(n^2) in the scene length, so a row's
    finished lines are decoded once and only the current line is decoded again per step.
    That split is exact for byte-level BPE (SmolLM2, GPT-2): its decoder concatenates
    bytes, and a line ends in a complete '\n' byte. Other decoders (e.g. SentencePiece,
    which strips a leading space at the start of a decode) get the whole text each step.
    """

    def __init__(self, tokenizer, prompt_len: int, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        # Padding too: rows cut off by a stopping criterion are filled with it.
        ends = {*stop_ids, tokenizer.pad_token_id} - {None}
        self.stop_ids = torch.tensor(sorted(ends), dtype=torch.long)
        self._ends = ends
        backend = getattr(tokenizer, "backend_tokenizer", None)
        byte_level = isinstance(getattr(backend, "decoder", None), decoders.ByteLevel)
        self._line_ends = vocab_info(tokenizer).line_end_ids if byte_level else frozenset()
        self._length = -1
        self._texts: list[str | None] = []
        self._head: list[str] = []  # decoded finished lines per row
        self._line: list[list[int]] = []  # the current line's token ids per row (all, if
        self._done: list[bool] = []  # the tokenizer is not byte-level)

    def texts(self, input_ids: torch.Tensor) -> list[str | None]:
        """Generated text per row; None once the row produced a stop token."""
        length = input_ids.shape[1]
        if length == self._length and len(self._texts) == input_ids.shape[0]:
            return self._texts
        if length < self._length or len(self._texts) != input_ids.shape[0]:
            self._length = self.prompt_len  # a new batch: start over
            self._head = [""] * input_ids.shape[0]
            self._line = [[] for _ in range(input_ids.shape[0])]
            self._done = [False] * input_ids.shape[0]
        new = input_ids[:, max(self._length, self.prompt_len) :].tolist()
        for row, tokens in enumerate(new):
            if self._done[row]:
                continue
            for token in tokens:
                if token in self._ends:
                    self._done[row] = True
                    break
                self._line[row].append(token)
                if token in self._line_ends:
                    self._head[row] += self.tokenizer.decode(self._line[row])
                    self._line[row] = []
        self._texts = [
            None if done else head + self.tokenizer.decode(line)
            for done, head, line in zip(self._done, self._head, self._line, strict=True)
        ]
        self._length = length
        return self._texts


class ScriptRepetitionPenalty(LogitsProcessor):
    """transformers' RepetitionPenaltyLogitsProcessor, but per row and with exempt tokens.

    Hand-written because the stock one has one penalty for the batch and punishes every
    seen token: newline, ':' and speaker names too, which turns a high penalty into prose.
    Left padding is ignored so a row scores the same batched or alone.
    """

    def __init__(
        self,
        penalties: Sequence[float],
        exempt_ids: set[int],
        pad_lengths: torch.Tensor,
        tokenizer=None,
        rows: _RowText | None = None,
    ):
        self.penalties = torch.tensor(list(penalties), dtype=torch.float32)[:, None]
        self.exempt_ids = set(exempt_ids)
        self.pad_lengths = pad_lengths.cpu()
        self.tokenizer = tokenizer
        self.rows = rows
        self._speakers: set[str] = set()
        self._mask: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None  # [batch, vocab + 1]: tokens seen per row
        self._seen_length = -1

    def _learn_speakers(self, input_ids: torch.Tensor) -> None:
        """Speakers the model invents mid-scene become exempt too."""
        if self.rows is None or self.tokenizer is None:
            return
        for text in self.rows.texts(input_ids):
            for line in (text or "").split("\n")[:-1]:
                name = speaker_of(line.strip())
                if name and name not in self._speakers:
                    self._speakers.add(name)
                    self.exempt_ids |= speaker_token_ids(self.tokenizer, [name])
                    self._mask = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool((self.penalties == 1.0).all()):
            return scores
        self._learn_speakers(input_ids)
        batch, vocab = scores.shape
        if self._mask is None or self._mask.shape[0] != vocab:
            self._mask = torch.zeros(vocab, dtype=torch.bool)
            self._mask[[i for i in self.exempt_ids if i < vocab]] = True
        device = scores.device
        length = input_ids.shape[1]
        if (
            self._seen is not None
            and self._seen.shape == (batch, vocab + 1)
            and length == self._seen_length + 1
        ):
            # One new token per row since the last step (never padding): mark it only,
            # instead of scattering the whole history again.
            self._seen.scatter_(1, input_ids[:, -1:].to(device), True)
        else:
            positions = torch.arange(length, device=device)
            padding = positions[None, :] < self.pad_lengths.to(device)[:, None]
            ids = input_ids.masked_fill(padding, vocab)  # padding scatters into a spare column
            self._seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            self._seen.scatter_(1, ids, True)
        self._seen_length = length
        seen = self._seen[:, :vocab] & ~self._mask.to(device)
        p = self.penalties.to(device=device, dtype=scores.dtype).reshape(-1)
        # Only the seen tokens change: penalise those (a few hundred) rather than computing
        # a penalised copy of the whole vocabulary (Gemma's 262k: 4x slower a step).
        rows, cols = seen.nonzero(as_tuple=True)
        values, row_p = scores[rows, cols], p[rows]
        out = scores.clone()
        out[rows, cols] = torch.where(values < 0, values * row_p, values / row_p)
        return out


class PremiseBias(LogitsProcessor):
    """Keep the scene on its opening: raise the logits of the words that make the opening's
    situation (sitcom.scenes.ranking.premise_words: "Peterman", "jacket", not "Jerry" or
    "listen") by each row's `premise` setting, in nats, at every step.

    Blind readers rewarded most the scenes that kept to the opening's idea and punished
    drift; this nudges the writer there instead of only ranking afterwards. Only a word's
    first token is raised, and only when it is 3+ characters of the word (a bare " P"
    would raise every word that starts with P)."""

    def __init__(self, tokenizer, prompt_texts: Sequence[str], strengths: Sequence[float]):
        self.rows: list[tuple[torch.Tensor, float]] = []
        for text, strength in zip(prompt_texts, strengths, strict=True):
            ids: set[int] = set()
            for word in premise_words(text.splitlines()) if strength else ():
                for form in {word, word.capitalize()}:
                    first = tokenizer.encode(" " + form, add_special_tokens=False)[:1]
                    if first and len(tokenizer.decode(first).strip()) >= 3:
                        ids.add(first[0])
            self.rows.append((torch.tensor(sorted(ids), dtype=torch.long), float(strength)))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not any(len(ids) and s for ids, s in self.rows):
            return scores
        scores = scores.clone()
        for row, (ids, strength) in enumerate(self.rows):
            if len(ids) and strength:
                scores[row, ids] += strength
        return scores


class LoopGuard(LogitsProcessor):
    """While the current line repeats an earlier line (see line_key), it may not end:
    newline and end-of-text tokens are banned, so the model has to say something new.
    Hand-written: NoRepeatNGramLogitsProcessor bans n-grams, not whole script lines."""

    def __init__(self, prompt_texts: Sequence[str], rows: _RowText, ban_ids: torch.Tensor):
        self.rows = rows
        self.ban_ids = ban_ids
        self._keys = [{line_key(x) for x in p.splitlines() if x.strip()} for p in prompt_texts]
        self._counted = [0] * len(prompt_texts)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, text in enumerate(self.rows.texts(input_ids)):
            if text is None:
                continue
            *done, current = text.split("\n")
            for line in done[self._counted[row] :]:
                self._keys[row].add(line_key(line))
            self._counted[row] = len(done)
            key = line_key(current)
            if key and key in self._keys[row]:
                scores[row, self.ban_ids.to(scores.device)] = -float("inf")
        return scores


class LongerLines(LogitsProcessor):
    """Inside a line (its `NAME:` tag written), take each row's `longer_lines` setting, in
    nats, off every token that would end it (newlines, end of text): the line goes on a
    little longer. The writer's lines run shorter than the show's (5-6 words on average
    against 10, 36-41 % of them three words or fewer against 24 %), and a two-word line
    ("What?", "Yeah.") rarely carries a joke. Stage directions and tags are left alone."""

    def __init__(self, rows: _RowText, end_ids: torch.Tensor, strengths: Sequence[float]):
        self.rows = rows
        self.end_ids = end_ids
        self.strengths = [float(s) for s in strengths]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not any(self.strengths):
            return scores
        ends = self.end_ids.to(scores.device)
        scores = scores.clone()
        for row, text in enumerate(self.rows.texts(input_ids)):
            strength = self.strengths[row]
            if text is None or not strength:
                continue
            if speaker_of(text.rpartition("\n")[2]) is not None:
                scores[row, ends] -= strength
        return scores


class CastTurns(PrefixConstrainedLogitsProcessor):
    """The next speaker drawn from the scene's cast: for rows whose `cast_turns` setting is on, a
    new line may only start with the tokens of `NAME:` for one of the opening's speakers or
    the main characters, never the one who spoke the line before, or end the scene. The
    model's own odds choose among them; inside a line nothing is constrained.

    Readers punished invented strangers (AUDIENCE:, BABY:), and the ranking could only trim
    a scene where one appeared. transformers' PrefixConstrainedLogitsProcessor applies the
    mask; this class only says which tokens each row may take (the name's tokens as the
    tokenizer spells them after a newline) and reads the rows' text for the last speaker.
    """

    _LOOKBACK = 16  # tokens searched back for the line's start; names are shorter

    def __init__(
        self,
        tokenizer,
        prompt_texts: Sequence[str],
        enabled: Sequence[bool],
        rows: _RowText,
        stop_ids: Sequence[int],
        main: Sequence[str] = MAIN_CHARACTERS,
    ):
        super().__init__(self._allowed, num_beams=1)
        self.rows = rows
        self.prompts = list(prompt_texts)
        self.enabled = [bool(e) for e in enabled]
        self.line_ends = vocab_info(tokenizer).line_end_ids
        self.every = torch.arange(len(tokenizer))
        self.stop_ids = list(stop_ids)
        ends = torch.tensor(sorted({*self.line_ends, *self.stop_ids}), dtype=torch.long)
        self.speech = self.every[~torch.isin(self.every, ends)]
        self.names: list[dict[str, tuple[int, ...]]] = []
        for text, on in zip(self.prompts, self.enabled, strict=True):
            spellings: dict[str, tuple[int, ...]] = {}
            cast = [speaker_of(x) for x in text.splitlines()] + list(main) if on else []
            for name in dict.fromkeys(n for n in cast if n):
                ids = tag_after_newline(tokenizer, name)
                if ids:
                    spellings[name] = tuple(ids)
            self.names.append(spellings)
        self._texts: list[str | None] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not any(self.enabled):
            return scores
        self._texts = self.rows.texts(input_ids)
        return super().__call__(input_ids, scores)

    def _allowed(self, row: int, ids: torch.Tensor):
        text = self._texts[row]
        if not self.enabled[row] or text is None:
            return self.every
        tail = ids[-self._LOOKBACK :].tolist()
        starts = [i for i, t in enumerate(tail) if t in self.line_ends]
        if not starts:
            return self.every  # well inside a line
        so_far = tuple(tail[starts[-1] + 1 :])
        lines = (self.prompts[row] + text).split("\n")[:-1]
        spoken = [x.partition(":")[0] for x in lines if ":" in x]  # "NAME:" with no speech too
        last = spoken[-1] if spoken else None
        allowed = {
            spelling[len(so_far)]
            for name, spelling in self.names[row].items()
            if name != last and len(spelling) > len(so_far) and spelling[: len(so_far)] == so_far
        }
        if not so_far:
            return sorted(allowed | set(self.stop_ids))
        if allowed:
            return sorted(allowed)
        if so_far in self.names[row].values():
            return self.speech  # "NAME:" said: something must follow before the line ends
        return self.every  # past the name: the line is free


class SceneStop(StoppingCriteria):
    """Per row: stop at a new scene heading, after the row's own number of new lines, or
    when its own token budget is spent."""

    def __init__(self, rows: _RowText, budgets: Sequence[int], line_budgets: Sequence[int]):
        self.rows = rows
        self.budgets = list(budgets)
        self.line_budgets = list(line_budgets)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.rows.prompt_len
        stop = [
            produced >= budget
            or (text is not None and (has_heading(text) or finished_lines(text) >= lines))
            for text, budget, lines in zip(
                self.rows.texts(input_ids), self.budgets, self.line_budgets, strict=True
            )
        ]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


class _RecordingStop(StoppingCriteria):
    """All our criteria in one, remembering which rows they cut off (so the caller knows
    those rows ended mid-line rather than at end-of-text)."""

    def __init__(self, rows: _RowText, criteria: Sequence[StoppingCriteria]):
        self.rows = rows
        self.criteria = list(criteria)
        self.cut: set[int] = set()

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for criterion in self.criteria:
            stop |= criterion(input_ids, scores, **kwargs)
        texts = self.rows.texts(input_ids)
        self.cut.update(r for r in stop.nonzero().flatten().tolist() if texts[r] is not None)
        return stop


class DeadlineStop(StoppingCriteria):
    """Stop rows whose `should_stop(row)` says so (a timeout or a cancelled request)."""

    def __init__(self, should_stop: Callable[[int], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(
            [self.should_stop(row) for row in range(input_ids.shape[0])],
            dtype=torch.bool,
            device=input_ids.device,
        )
