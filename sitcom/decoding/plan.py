"""The batch plan: prompts tokenized and padded, with each row's guards, sampling and stops,
shared by both backends (transformers' generate() in sitcom.decoding.generation, llama.cpp in
sitcom.decoding.batcher), and the generated ids turned back into clean scenes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, StoppingCriteria

from sitcom.decoding.contrast import Contrast
from sitcom.decoding.guards import (
    CastTurns,
    LongerLines,
    LoopGuard,
    PremiseBias,
    SceneStop,
    ScriptRepetitionPenalty,
    _RecordingStop,
    _RowText,
)
from sitcom.decoding.sampling import PerRowSampling
from sitcom.decoding.vocab import speaker_token_ids, stop_token_ids, vocab_info
from sitcom.scenes.lines import clean_lines, finished_lines, has_heading
from sitcom.scenes.script import END_OF_TEXT, KNOWN_SPEAKERS, normalize_prompt, speaker_of
from sitcom.settings import SceneSettings


@dataclass
class GeneratedScene:
    lines: list[str]  # clean script lines, prompt lines first
    new_tokens: int  # tokens the model produced for this row (before EOS / stop)
    finished: bool  # ended by end-of-text or a scene break, not by a token budget
    raw: str = ""  # the generated text before cleaning (tests, debugging)


@dataclass
class DecodePlan:
    """Everything one batch needs besides the forward pass; shared by both backends
    (transformers' generate() here, llama.cpp in sitcom.model.llamacpp)."""

    prompt_texts: list[str]
    row_ids: list[list[int]]  # each prompt's token ids, unpadded
    input_ids: torch.Tensor  # left-padded [batch, prompt_len]
    attention_mask: torch.Tensor
    stop_ids: list[int]
    pad_id: int
    budget: int  # the largest max_new_tokens of the batch
    processors: LogitsProcessorList
    stops: _RecordingStop
    lead_ids: list[int]  # what every prompt starts with: a scene without its opening
    guidance: list[float]  # per row (sitcom.decoding.guidance; 1: off)
    max_lines: list[int]  # per row: a scene that wrote this many new lines is finished
    contrast: Contrast | None = None  # in `processors` when a row contrasts with the base
    voice: list[float] = field(default_factory=list)  # per row (sitcom.decoding.voice; 0: off)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1]

    def scenes(self, tokenizer, ids: torch.Tensor) -> list[GeneratedScene]:
        """Token ids [batch, prompt_len + new] -> clean scenes."""
        results = []
        ends = set(self.stop_ids) | {self.pad_id}  # rows cut off by a stop are padded
        for row, new in enumerate(ids[:, self.prompt_len :].tolist()):
            end = next((i for i, t in enumerate(new) if t in ends), len(new))
            text = tokenizer.decode(new[:end])
            at_eos = row not in self.stops.cut and end < len(new) and new[end] in self.stop_ids
            results.append(
                GeneratedScene(
                    lines=clean_lines(self.prompt_texts[row], text, complete=at_eos),
                    new_tokens=end + (1 if at_eos else 0),
                    finished=at_eos
                    or has_heading(text)
                    or finished_lines(text) >= self.max_lines[row],
                    raw=text,
                )
            )
        return results


def scene_prefix(tokenizer, stop_ids: Sequence[int]) -> tuple[str, bool]:
    """(text every scene starts with, whether it is END_OF_TEXT): episodes in the corpus
    follow END_OF_TEXT, so a prompt after it reads as a scene start; a tokenizer without it
    (Gemma) starts with its own special tokens (BOS) instead, added by the tokenizer."""
    has_eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT) in stop_ids
    return (END_OF_TEXT + "\n" if has_eot else ""), has_eot


def scene_prompt_ids(tokenizer, prompt_text: str, stop_ids: Sequence[int]) -> list[int]:
    """A normalized prompt's token ids as a scene starts (after scene_prefix)."""
    prefix, has_eot = scene_prefix(tokenizer, stop_ids)
    return tokenizer(prefix + prompt_text, add_special_tokens=not has_eot)["input_ids"]


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
    prefix, has_eot = scene_prefix(tokenizer, stop_ids)
    row_ids = [scene_prompt_ids(tokenizer, p, stop_ids) for p in prompt_texts]
    lead_ids = tokenizer(prefix, add_special_tokens=not has_eot)["input_ids"] or stop_ids[:1]
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
        input_ids[row, prompt_len - len(ids) :] = torch.tensor(ids)
        attention_mask[row, prompt_len - len(ids) :] = 1
    pad_lengths = (attention_mask == 0).sum(dim=1)

    info = vocab_info(tokenizer)
    rows = _RowText(tokenizer, prompt_len, stop_ids)
    prompt_speakers = {speaker_of(x) for p in prompt_texts for x in p.splitlines()} - {None}
    exempt = set(info.format_ids.tolist())
    exempt |= speaker_token_ids(tokenizer, [*speakers, *prompt_speakers])
    ban = torch.cat([info.newline_ids, torch.tensor(stop_ids, dtype=torch.long)])
    processors = LogitsProcessorList(
        [
            ScriptRepetitionPenalty(
                [s.repetition_penalty for s in settings], exempt, pad_lengths, tokenizer, rows
            ),
            LoopGuard(prompt_texts, rows, ban),
            LongerLines(rows, ban, [s.longer_lines for s in settings]),
            PremiseBias(tokenizer, prompt_texts, [s.premise for s in settings]),
            CastTurns(tokenizer, prompt_texts, [s.cast_turns for s in settings], rows, stop_ids),
        ]
    )
    contrast = None
    if any(s.contrast > 0 for s in settings):  # after the guards, just before sampling
        contrast = Contrast([s.contrast for s in settings])
        processors.append(contrast)
    if do_sample:
        processors.append(PerRowSampling(settings))
    scene_stop = SceneStop(
        rows, [s.max_new_tokens for s in settings], [s.max_lines for s in settings]
    )
    return DecodePlan(
        prompt_texts,
        row_ids,
        input_ids,
        attention_mask,
        stop_ids,
        pad_id,
        budget,
        processors,
        _RecordingStop(rows, [scene_stop, *stopping_criteria]),
        list(lead_ids),
        [s.guidance for s in settings],
        [s.max_lines for s in settings],
        contrast,
        [s.voice for s in settings],
    )
