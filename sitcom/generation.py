"""Write scenes with a causal LM: batched sampling plus the guards that keep the script format.

The original experiment (GPT-2 + HF run_generation.py) failed two ways: at repetition
penalty 1.0 it looped (`JERRY: (to Elaine) I'm sorry.` / `ELAINE: (to Jerry) I'm sorry.` ...),
at 5.0 it dissolved into prose because the penalty also hit speaker names, colons and
newlines. So decoding here adds:

- ScriptRepetitionPenalty: the usual penalty, per row, that leaves format tokens alone;
- LoopGuard: a line may not end (newline/EOS banned) while it repeats an earlier line;
- SceneStop: per-row stop at a new `[Scene: ...]` heading or the row's own token budget;
- clean_lines: post-processing into well-formed script lines, dropping any duplicate left.

Everything is synchronous; the asyncio side lives in sitcom.engine.
"""

from __future__ import annotations

import os
import re
import string
import weakref
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tokenizers import decoders
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.streamers import BaseStreamer

from sitcom.script import (
    END_OF_TEXT,
    KNOWN_SPEAKERS,
    is_well_formed,
    normalize_prompt,
    speaker_of,
)
from sitcom.settings import SceneSettings


@dataclass
class GeneratedScene:
    lines: list[str]  # clean script lines, prompt lines first
    new_tokens: int  # tokens the model produced for this row (before EOS / stop)
    finished: bool  # ended by end-of-text or a scene break, not by a token budget
    raw: str = ""  # the generated text before cleaning (tests, debugging)


# --------------------------------------------------------------------------- line text


_SPEAKER_PREFIX_RE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9.'#&\- ]{0,40}?:\s*")
_PARENS_RE = re.compile(r"\([^)]*\)?")
_NON_WORD_RE = re.compile(r"[\W_]+")


def line_key(line: str) -> str:
    """What makes two lines 'the same': the speech without speaker or parentheticals,
    lowercased, punctuation-free. A pure stage direction is compared by its own text."""
    rest = _SPEAKER_PREFIX_RE.sub("", line, count=1)
    speech = _NON_WORD_RE.sub(" ", _PARENS_RE.sub(" ", rest)).strip().lower()
    return speech or _NON_WORD_RE.sub(" ", rest).strip().lower()


_JUNK_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


def _is_garbage(line: str) -> bool:
    """Byte soup from a confused model: few letters among the visible characters."""
    visible = line.replace(" ", "")
    letters = sum(c.isalpha() for c in visible)
    return letters < 2 or letters < 0.6 * len(visible)


def _repair(line: str) -> str:
    """`Jerry: hi` -> `JERRY: hi`; other lines unchanged."""
    return normalize_prompt(line).strip() if ":" in line else line


def clean_lines(prompt_text: str, generated: str, complete: bool) -> list[str]:
    """Prompt lines + the generated ones as clean script lines.

    `complete` says the generated text ended at end-of-text, so its last line is whole;
    otherwise the trailing partial line is dropped. Generation past a new scene heading,
    empty/garbage lines and repeats of earlier lines are dropped; when any generated line
    is well-formed, only well-formed lines are kept.
    """
    out = [line for line in prompt_text.splitlines() if line.strip()]
    keys = {line_key(line) for line in out}
    if not complete:
        generated = generated.rsplit("\n", 1)[0] if "\n" in generated else ""
    candidates = []
    for raw in generated.split("\n"):
        line = " ".join(_JUNK_RE.sub("", " ".join(raw.split())).split())
        if not line:
            continue
        if line.startswith("["):  # a new scene heading: this scene is over
            break
        line = _repair(line)
        if _is_garbage(line):
            continue
        key = line_key(line)
        if key in keys:
            continue
        keys.add(key)
        candidates.append(line)
    well_formed = [line for line in candidates if is_well_formed(line)]
    return out + (well_formed or candidates)


# --------------------------------------------------------------------------- vocabulary facts


@dataclass
class _VocabInfo:
    newline_ids: torch.Tensor  # every token whose text contains a newline
    format_ids: torch.Tensor  # punctuation/whitespace-only tokens holding a newline or ':'
    line_end_ids: frozenset[int]  # tokens whose text ends in a newline


_VOCAB_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FORMAT_CHARS = set(string.whitespace + string.punctuation)


def _vocab_info(tokenizer) -> _VocabInfo:
    """Scan the vocabulary once per tokenizer (~0.2 s for 49k tokens)."""
    info = _VOCAB_CACHE.get(tokenizer)
    if info is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        newline = [i for i, t in enumerate(texts) if "\n" in t]
        fmt = [
            i for i, t in enumerate(texts)
            if ("\n" in t or ":" in t) and set(t) <= _FORMAT_CHARS
        ]
        info = _VocabInfo(torch.tensor(newline, dtype=torch.long),
                          torch.tensor(fmt, dtype=torch.long),
                          frozenset(i for i in newline if texts[i].endswith("\n")))
        _VOCAB_CACHE[tokenizer] = info
    return info


def speaker_token_ids(tokenizer, speakers: Sequence[str]) -> set[int]:
    """Token ids that spell the speaker names as they appear at the start of a line.

    Sub-word pieces like `J` get exempted too; a milder penalty on them is the price of
    keeping names intact.
    """
    ids: set[int] = set()
    for name in speakers:
        for text in (f"{name}:", f"\n{name}:", f" {name}"):
            ids.update(tokenizer.encode(text, add_special_tokens=False))
    return ids


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-text and the tokenizer's own EOS (e.g. `<|im_end|>` for instruct models)."""
    ids = {tokenizer.eos_token_id}
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    if isinstance(eot, int) and eot != tokenizer.unk_token_id:
        ids.add(eot)
    return sorted(i for i in ids if i is not None)


# --------------------------------------------------------------------------- decoding guards


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
        self._line_ends = _vocab_info(tokenizer).line_end_ids if byte_level else frozenset()
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
        new = input_ids[:, max(self._length, self.prompt_len):].tolist()
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
        if self._seen is not None and self._seen.shape == (batch, vocab + 1) \
                and length == self._seen_length + 1:
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
        p = self.penalties.to(device=device, dtype=scores.dtype)
        penalized = torch.where(scores < 0, scores * p, scores / p)
        return torch.where(seen, penalized, scores)


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
            for line in done[self._counted[row]:]:
                self._keys[row].add(line_key(line))
            self._counted[row] = len(done)
            key = line_key(current)
            if key and key in self._keys[row]:
                scores[row, self.ban_ids.to(scores.device)] = -float("inf")
        return scores


class _TopKThenTopP(LogitsProcessor):
    """TopKLogitsWarper followed by TopPLogitsWarper, with top-p run on the k survivors only.

    TopPLogitsWarper sorts the whole vocabulary (49k per row, ~3 ms a step at batch 8 on
    this CPU) although after top-k only k tokens are finite. Tokens outside the top k have
    probability 0, so softmax/cumsum over the k candidates gives the same nucleus; the
    library warper still does the top-p decision, just on a [batch, k] tensor.
    """

    def __init__(self, top_k: int, top_p: float):
        self.top_k = top_k
        self.top_k_warper = TopKLogitsWarper(top_k)
        self.top_p_warper = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.top_k, scores.shape[-1])
        values, indices = torch.topk(scores, k, dim=-1)
        # TopKLogitsWarper keeps every token tied with the k-th score; if a tie pushes a
        # row past k tokens, take the library's full-vocabulary route for exactness.
        if bool(((scores >= values[:, -1:]).sum(dim=-1) > k).any()):
            return self.top_p_warper(input_ids, self.top_k_warper(input_ids, scores))
        kept = self.top_p_warper(input_ids, values)
        return torch.full_like(scores, -float("inf")).scatter_(1, indices, kept)


class PerRowSampling(LogitsProcessor):
    """Temperature / top-k / top-p per row: rows are grouped by their settings and each
    group goes through transformers' own warpers (which take one value per batch)."""

    def __init__(self, settings: Sequence[SceneSettings]):
        groups: dict[tuple, list[int]] = {}
        for row, s in enumerate(settings):
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(row)
        self.groups = []
        for (temperature, top_k, top_p), rows in groups.items():
            warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
            if top_k > 0 and top_p < 1.0:
                warpers.append(_TopKThenTopP(top_k, top_p))
            elif top_k > 0:
                warpers.append(TopKLogitsWarper(top_k))
            elif top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            self.groups.append((torch.tensor(rows, dtype=torch.long), warpers))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.groups) == 1:
            return self.groups[0][1](input_ids, scores)
        out = torch.empty_like(scores)
        for rows, warpers in self.groups:
            rows = rows.to(scores.device)
            out[rows] = warpers(input_ids[rows], scores[rows])
        return out


class SceneStop(StoppingCriteria):
    """Per row: stop at a new scene heading or when the row's own token budget is spent."""

    def __init__(self, rows: _RowText, budgets: Sequence[int]):
        self.rows = rows
        self.budgets = torch.tensor(list(budgets), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        produced = input_ids.shape[1] - self.rows.prompt_len
        stop = [
            produced >= budget or (text is not None and _has_heading(text))
            for text, budget in zip(self.rows.texts(input_ids), self.budgets.tolist(), strict=True)
        ]
        return torch.tensor(stop, dtype=torch.bool, device=input_ids.device)


def _has_heading(generated: str) -> bool:
    return any(line.lstrip().startswith("[") for line in generated.split("\n"))


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
            dtype=torch.bool, device=input_ids.device,
        )


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
        self.newline_ids = set(_vocab_info(tokenizer).newline_ids.tolist())
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


# --------------------------------------------------------------------------- precision


def autocast_dtype(model, precision: str | None = None) -> torch.dtype | None:
    """bf16 autocast on CUDA, fp32 (None) on CPU.

    `precision` or env SITCOM_PRECISION: 'fp32' forces float32, 'bf16' forces bf16.
    """
    choice = (precision or os.environ.get("SITCOM_PRECISION", "auto")).lower()
    if choice == "fp32" or next(model.parameters()).dtype != torch.float32:
        return None
    if choice == "bf16":
        return torch.bfloat16
    if model.device.type == "cuda":
        return torch.bfloat16
    # Measured on the 2-core AVX-512 BF16 machine: bf16 autocast decodes one scene at about
    # half the fp32 speed (per-token casts outweigh the cheaper matmuls at batch 1), so
    # decoding on CPU stays fp32 unless asked; training (big matmuls) does gain from bf16.
    return None


# --------------------------------------------------------------------------- entry points


@dataclass
class DecodePlan:
    """Everything one batch needs besides the forward pass; shared by both backends
    (transformers' generate() here, llama.cpp in sitcom.llamacpp)."""

    prompt_texts: list[str]
    row_ids: list[list[int]]  # each prompt's token ids, unpadded
    input_ids: torch.Tensor  # left-padded [batch, prompt_len]
    attention_mask: torch.Tensor
    stop_ids: list[int]
    pad_id: int
    budget: int  # the largest max_new_tokens of the batch
    processors: LogitsProcessorList
    stops: _RecordingStop

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def scenes(self, tokenizer, ids: torch.Tensor) -> list[GeneratedScene]:
        """Token ids [batch, prompt_len + new] -> clean scenes."""
        results = []
        ends = set(self.stop_ids) | {self.pad_id}  # rows cut off by a stop are padded
        for row, new in enumerate(ids[:, self.prompt_len:].tolist()):
            end = next((i for i, t in enumerate(new) if t in ends), len(new))
            text = tokenizer.decode(new[:end])
            at_eos = row not in self.stops.cut and end < len(new) and new[end] in self.stop_ids
            results.append(GeneratedScene(
                lines=clean_lines(self.prompt_texts[row], text, complete=at_eos),
                new_tokens=end + (1 if at_eos else 0),
                finished=at_eos or _has_heading(text),
                raw=text,
            ))
        return results


def plan_batch(
    tokenizer,
    prompts: Sequence[str],
    settings: SceneSettings | Sequence[SceneSettings],
    *,
    do_sample: bool = True,
    stopping_criteria: Sequence[StoppingCriteria] = (),
    speakers: Sequence[str] = KNOWN_SPEAKERS,
    context_limit: int | None = None,
) -> DecodePlan:
    """Tokenize and left-pad the prompts and build the guards, sampling and stops."""
    if isinstance(settings, SceneSettings):
        settings = [settings] * len(prompts)
    if len(settings) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(settings)} settings")
    settings = [s.validated() for s in settings]

    prompt_texts = [normalize_prompt(p) for p in prompts]
    stop_ids = stop_token_ids(tokenizer)
    # Episodes in the corpus follow END_OF_TEXT, so a prompt after it reads as a scene start.
    has_eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT) in stop_ids
    prefix = END_OF_TEXT + "\n" if has_eot else ""
    row_ids = [
        tokenizer(prefix + p, add_special_tokens=not has_eot)["input_ids"] for p in prompt_texts
    ]
    prompt_len = max(len(ids) for ids in row_ids)
    budget = max(s.max_new_tokens for s in settings)
    if context_limit and prompt_len + budget > context_limit:
        raise ValueError(
            f"prompt too long: {prompt_len} tokens + {budget} new exceed the model's "
            f"{context_limit}"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    input_ids = torch.full((len(row_ids), prompt_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(row_ids):
        input_ids[row, prompt_len - len(ids):] = torch.tensor(ids)
        attention_mask[row, prompt_len - len(ids):] = 1
    pad_lengths = (attention_mask == 0).sum(dim=1)

    info = _vocab_info(tokenizer)
    rows = _RowText(tokenizer, prompt_len, stop_ids)
    prompt_speakers = {speaker_of(x) for p in prompt_texts for x in p.splitlines()} - {None}
    exempt = set(info.format_ids.tolist())
    exempt |= speaker_token_ids(tokenizer, [*speakers, *prompt_speakers])
    ban = torch.cat([info.newline_ids, torch.tensor(stop_ids, dtype=torch.long)])
    processors = LogitsProcessorList([
        ScriptRepetitionPenalty(
            [s.repetition_penalty for s in settings], exempt, pad_lengths, tokenizer, rows
        ),
        LoopGuard(prompt_texts, rows, ban),
    ])
    if do_sample:
        processors.append(PerRowSampling(settings))
    scene_stop = SceneStop(rows, [s.max_new_tokens for s in settings])
    return DecodePlan(
        prompt_texts, row_ids, input_ids, attention_mask, stop_ids, pad_id, budget,
        processors, _RecordingStop(rows, [scene_stop, *stopping_criteria]),
    )


def generate_scenes(
    model,
    tokenizer,
    prompts: Sequence[str],
    settings: SceneSettings | Sequence[SceneSettings],
    *,
    seed: int | None = None,
    streamer: BaseStreamer | None = None,
    do_sample: bool = True,
    precision: str | None = None,
    stopping_criteria: Sequence[StoppingCriteria] = (),
    speakers: Sequence[str] = KNOWN_SPEAKERS,
) -> list[GeneratedScene]:
    """One batched generate() for all prompts; settings may differ per prompt."""
    if not prompts:
        return []
    plan = plan_batch(
        tokenizer, prompts, settings, do_sample=do_sample, stopping_criteria=stopping_criteria,
        speakers=speakers, context_limit=getattr(model.config, "max_position_embeddings", None),
    )
    if seed is not None:
        torch.manual_seed(seed)
    dtype = autocast_dtype(model, precision)
    autocast = torch.autocast(model.device.type, dtype=dtype) if dtype else nullcontext()
    with torch.inference_mode(), autocast:
        out = model.generate(
            input_ids=plan.input_ids.to(model.device),
            attention_mask=plan.attention_mask.to(model.device),
            do_sample=do_sample,
            max_new_tokens=plan.budget,
            repetition_penalty=1.0,  # ours replaces it; a checkpoint's default must not stack
            # Sampling is done by PerRowSampling; switch generate()'s own warpers off.
            **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}),
            eos_token_id=plan.stop_ids,
            pad_token_id=plan.pad_id,
            logits_processor=plan.processors,
            stopping_criteria=StoppingCriteriaList([plan.stops]),
            streamer=streamer,
        )
    return plan.scenes(tokenizer, out.cpu())


def write_scenes(
    model,
    tokenizer,
    prompts: list[str],
    settings: SceneSettings | list[SceneSettings],
    *,
    seed: int | None = None,
    streamer: BaseStreamer | None = None,
    do_sample: bool = True,
    precision: str | None = None,
) -> list[list[str]]:
    """Clean script lines (prompt lines first) for each prompt, generated as one batch."""
    scenes = generate_scenes(
        model, tokenizer, prompts, settings, seed=seed, streamer=streamer,
        do_sample=do_sample, precision=precision,
    )
    return [s.lines for s in scenes]
