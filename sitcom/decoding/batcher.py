"""Continuous batching on llama.cpp: scenes join and leave the running batch one by one.

Each scene is a row with its own llama.cpp sequence (a KV cache slot), its own plan (guards,
sampling settings, stops; see sitcom.decoding.plan) and its own streamer. Every `step()` is one
llama_decode call for all rows: a row that just joined feeds its whole prompt (prefill),
the others their last token; then each row's guards run on its logits, one token is drawn
per row, and rows that are done leave at once, their KV slot cleared for the next scene.
So a short scene is delivered while a long one is still being written, and a queued scene
takes a freed slot on the next step instead of waiting for the whole batch.

Line by line (`pick_lines`): the rows of one scene added with the same `group` write their
next line side by side; each waits at its line's end until all have one, then `choose_line`
picks the best and the others take it over (their own line is dropped from their KV cache
and the winner's fed instead) before all write the next. So the best of n is chosen at every
line instead of once for whole scenes.

Guidance on the opening (`guidance` > 1, sitcom.decoding.guidance): a row has a twin
sequence holding the same scene without its opening, fed the same tokens; both come out of
the same llama_decode call, and the row's logits are guided by the twin's before its guards.

Contrast with the untuned base (`contrast` > 0, sitcom.decoding.contrast): a second
LlamaCppModel, the base, holds the row's scene in the same slot number and is fed the same
tokens; its logits reach the row's Contrast processor, just before sampling.

Voice (`voice` > 0, sitcom.decoding.voice): a row has a third sequence that, inside each
line, holds the scene with the contrast speaker's tag (voice.contrast_speaker: MAN) in
place of the line's own; the row's logits are shifted by its own speaker's gain over it.

Hand-written because llama-cpp-python's Llama class holds one sequence per context and
transformers' generate() needs a torch model; the guards are the same objects both use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from sitcom.decoding.guidance import guide
from sitcom.decoding.plan import DecodePlan, GeneratedScene, plan_batch
from sitcom.decoding.sampling import sample
from sitcom.decoding.vocab import vocab_info
from sitcom.decoding.voice import contrast_speaker, name_ids, tag_ids, tag_of, voice
from sitcom.scenes.script import KNOWN_SPEAKERS
from sitcom.settings import SceneSettings


def _given(logits: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A Contrast source that returns this step's base logits, already decoded."""
    return lambda _ids: logits


@dataclass(eq=False)
class Row:
    """One scene being written."""

    tag: object  # the caller's handle for this scene (the engine's Job)
    seq: int  # llama.cpp sequence id, i.e. its KV cache slot
    plan: DecodePlan  # a plan of one row: this scene's own guards, sampling and stops
    input_ids: torch.Tensor  # [1, prompt + generated so far]
    streamer: BaseStreamer | None = None
    pending: list[int] = field(default_factory=list)  # tokens the next step feeds
    pos: int = 0  # position of pending[0] in the sequence
    group: object = None  # rows of one scene choosing line by line share it (None: alone)
    waiting: bool = False  # at its line's end, until the group chooses
    remake: Callable[[], DecodePlan] | None = None  # a fresh plan, when it takes over a line
    synced: int = 0  # tokens its group agreed on at the last choice (the prompt, at first)
    twin: int | None = None  # the sequence of the scene without its opening (guidance)
    twin_pending: list[int] = field(default_factory=list)
    twin_pos: int = 0
    base_pending: list[int] | None = None  # what the base model reads next (contrast)
    base_pos: int = 0
    line_start: int = 0  # index in input_ids where the line being written starts
    voice_seq: int | None = None  # the line read as the other speaker's (voice)
    voice_pending: list[int] = field(default_factory=list)
    voice_pos: int = 0
    voice_live: bool = False  # the voice sequence holds the current line (its tag is written)
    voice_synced: int = 0  # tokens of input_ids the voice sequence holds as they are
    voice_names: torch.Tensor | None = None  # the two speakers' name tokens: no gain

    @property
    def new_tokens(self) -> int:
        return self.input_ids.shape[1] - self.plan.prompt_len


class ContinuousBatcher:
    """Rows in the KV cache slots of one LlamaCppModel (`model.max_batch` of them, or
    fewer: `slots`).

    Use one batcher per model at a time, from one thread.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        seed: int | None = None,
        do_sample: bool = True,
        speakers: Sequence[str] = KNOWN_SPEAKERS,
        slots: int | None = None,
        choose_line: Callable[[list[list[str]], object], int] | None = None,
        amateur=None,
    ):
        self.model = model
        self.amateur = amateur  # the untuned base, a LlamaCppModel with as many slots (contrast)
        # (rows' script lines, the opening first; their group) -> the index of the row whose
        # line to keep; by default the first (the engine passes sitcom.scenes.ranking's
        # best_next_line with its humour model).
        self.choose_line = choose_line or (lambda candidates, group: 0)
        self._line_ends = vocab_info(tokenizer).line_end_ids
        self.tokenizer = tokenizer
        self.do_sample = do_sample
        self.speakers = speakers
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.context_limit = min(model.n_ctx_per_seq, model.n_ctx_train)
        self.rows: list[Row] = []
        self.capacity = min(model.max_batch, slots or model.max_batch)
        self._free = list(range(self.capacity))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(
        self,
        prompt: str,
        settings: SceneSettings,
        *,
        tag: object = None,
        streamer: BaseStreamer | None = None,
        stopping_criteria: Sequence[StoppingCriteria] = (),
        group: object = None,
    ) -> Row:
        """Queue a scene into a free slot; its prompt is prefilled by the next step().
        Rows added with the same `group` (not None) are candidates of one scene chosen line
        by line. ValueError for a prompt too long for the context or when no slot is free."""
        guided = settings.guidance > 1
        voiced = settings.voice > 0
        if 1 + guided + voiced > self.capacity:
            raise ValueError(
                f"guidance and voice need {1 + guided + voiced} llama.cpp sequences; "
                f"this batcher has {self.capacity}"
            )
        if len(self._free) < 1 + guided + voiced:
            raise ValueError("every llama.cpp sequence of this batcher is busy")
        if settings.contrast > 0 and self.amateur is None:
            raise ValueError("contrast needs the untuned base model; this model has none")

        def remake() -> DecodePlan:
            return plan_batch(
                self.tokenizer,
                [prompt],
                settings,
                do_sample=self.do_sample,
                stopping_criteria=stopping_criteria,
                speakers=self.speakers,
                context_limit=self.context_limit,
            )

        plan = remake()
        row = Row(
            tag,
            self._free.pop(0),
            plan,
            plan.input_ids,
            streamer,
            pending=list(plan.row_ids[0]),
            group=group,
            remake=remake,
            synced=plan.prompt_len,
            line_start=plan.prompt_len,
        )
        self.model.forget(row.seq)  # whatever an earlier scene left in this slot
        if guided:
            row.twin, row.twin_pending = self._free.pop(0), list(plan.lead_ids)
            self.model.forget(row.twin)
        if voiced:
            row.voice_seq = self._free.pop(0)
            self.model.forget(row.voice_seq)
        if plan.contrast is not None:
            row.base_pending = list(plan.row_ids[0])
            self.amateur.forget(row.seq)
        if streamer is not None:
            streamer.put(plan.input_ids)
        self.rows.append(row)
        return row

    def step(self) -> list[tuple[Row, GeneratedScene]]:
        """One new token for every row; returns the rows that finished with their scenes
        (they have left the batch and their slots are free)."""
        if not self.rows:
            return []
        # The guards' torch ops are small ([rows, vocab]); torch's own OpenMP workers spin
        # between them and fight llama.cpp's for the cores. Measured on the busy 2-core
        # machine, packaged SmolLM2, one scene: 75 tok/s with 1 torch thread, 18 with 2.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        rows = [r for r in self.rows if not r.waiting]
        work = [(r.seq, r.pending, r.pos) for r in rows]
        work += [(r.twin, r.twin_pending, r.twin_pos) for r in rows if r.twin is not None]
        voiced = [r for r in rows if r.voice_live]
        work += [(r.voice_seq, r.voice_pending, r.voice_pos) for r in voiced]
        logits = torch.from_numpy(self.model.decode(work))
        contrasted = [r for r in rows if r.base_pending is not None]
        if contrasted:
            base = self.amateur.decode([(r.seq, r.base_pending, r.base_pos) for r in contrasted])
            bases = iter(torch.from_numpy(base))
        twins = iter(range(len(rows), len(work) - len(voiced)))
        voices = iter(range(len(work) - len(voiced), len(work)))
        scores = []
        for i, row in enumerate(rows):
            row_scores = logits[i : i + 1]
            if row.twin is not None:
                row_scores = guide(row_scores, logits[next(twins)][None], row.plan.guidance[0])
            if row.voice_live:
                other = logits[next(voices)][None]
                row_scores = voice(
                    row_scores, logits[i : i + 1], other, row.plan.voice[0], row.voice_names
                )
            if row.base_pending is not None:
                row.plan.contrast.source = _given(next(bases)[None])
            # Called one by one: LogitsProcessorList inspects every processor's signature on
            # each call; ours take no extra kwargs.
            for processor in row.plan.processors:
                row_scores = processor(row.input_ids, row_scores)
            scores.append(row_scores)
        stacked = torch.cat(scores)
        tokens = sample(stacked, self.generator) if self.do_sample else stacked.argmax(dim=-1)
        finished = []
        for i, row in enumerate(rows):
            token = int(tokens[i])
            row.pos += len(row.pending)
            if row.twin is not None:
                row.twin_pos += len(row.twin_pending)
                row.twin_pending = [token]
            if row.base_pending is not None:
                row.base_pos += len(row.base_pending)
                row.base_pending = [token]
            if row.voice_live:
                row.voice_pos += len(row.voice_pending)
                row.voice_pending = [token]
            row.input_ids = torch.cat([row.input_ids, tokens[i : i + 1, None]], dim=1)
            if row.voice_seq is not None:
                self._follow_speaker(row, token)
            if row.streamer is not None and row.group is None:
                row.streamer.put(tokens[i : i + 1])
            done = token in row.plan.stop_ids or bool(row.plan.stops(row.input_ids, scores[i])[0])
            if done:
                finished.append((row, self._remove(row)))
            else:
                row.pending = [token]
                row.waiting = row.group is not None and token in self._line_ends
        self._choose_lines()
        return finished

    def _follow_speaker(self, row: Row, token: int) -> None:
        """Voice: at a line's end the voice sequence drops what it read of that line; once a
        new line's tag is written, it is fed the row's tokens it has not read up to the
        line's start, then the contrast speaker's tag, then each token the row writes."""
        if token in self._line_ends:
            if row.voice_live:  # the contrast tag and the line after it go
                self.model.forget(row.voice_seq, row.voice_synced)
                row.voice_live = False
            row.line_start = row.input_ids.shape[1]
            return
        if row.voice_live or row.input_ids.shape[1] - row.line_start > 16:
            return
        speaker = tag_of(self.tokenizer.decode(row.input_ids[0, row.line_start :]))
        if speaker is None:
            return
        before = self.tokenizer.decode(row.input_ids[0, row.plan.prompt_len : row.line_start])
        lines = (row.plan.prompt_texts[0] + before).splitlines()
        if not self.model.forget(row.voice_seq, row.voice_synced):
            self.model.forget(row.voice_seq)
            row.voice_synced = 0
        # it catches up with the row's lines since it last read, then reads the contrast tag
        catch_up = row.input_ids[0, row.voice_synced : row.line_start].tolist()
        other = contrast_speaker(lines, speaker)
        row.voice_pending = catch_up + tag_ids(self.tokenizer, other)
        row.voice_names = name_ids(self.tokenizer, [speaker, other])
        row.voice_pos = row.voice_synced
        row.voice_synced = row.line_start
        row.voice_live = True

    def _choose_lines(self) -> None:
        """Every group whose rows all wait at a line's end: keep the best row's line."""
        groups: dict[int, list[Row]] = {}
        for row in self.rows:
            if row.group is not None:
                groups.setdefault(id(row.group), []).append(row)
        for members in groups.values():
            if not all(r.waiting for r in members):
                continue
            if len(members) > 1:
                candidates = [r.plan.scenes(self.tokenizer, r.input_ids)[0].lines for r in members]
                best = members[self.choose_line(candidates, members[0].group)]
            else:
                best = members[0]
            for row in members:
                if row.streamer is not None:  # the scene's streamer sees the kept line only
                    row.streamer.put(best.input_ids[0, row.synced :])
            for row in members:
                row.waiting = False
                if row is not best:
                    self._take_over(row, best)
                row.synced = best.input_ids.shape[1]

    def _take_over(self, row: Row, best: Row) -> None:
        """`row` drops its own line and continues from `best`'s."""
        ours, theirs = row.input_ids[0], best.input_ids[0]
        n = min(len(ours), len(theirs))
        differ = (ours[:n] != theirs[:n]).nonzero()
        start = int(differ[0]) if len(differ) else n  # where the two lines part
        start = min(start, row.pos)  # its KV cache holds the tokens before row.pos
        if not self.model.forget(row.seq, start):
            start = 0  # a cache that cannot drop a tail (llama.cpp's recurrent ones): refeed
            self.model.forget(row.seq)
        row.input_ids = best.input_ids.clone()
        row.pending = theirs[start:].tolist()
        row.pos = start
        if row.twin is not None:  # the twin re-reads the scene so far, without its opening
            self.model.forget(row.twin)
            row.twin_pending = row.plan.lead_ids + theirs[row.plan.prompt_len :].tolist()
            row.twin_pos = 0
        if row.base_pending is not None:  # the base re-reads the whole scene so far
            self.amateur.forget(row.seq)
            row.base_pending, row.base_pos = theirs.tolist(), 0
        if row.voice_seq is not None:  # rows wait at a line's end: the next line starts
            self.model.forget(row.voice_seq)
            row.voice_live, row.voice_synced, row.line_start = False, 0, len(theirs)
        row.plan = row.remake()  # the guards read the row's text afresh

    def drain(self) -> list[tuple[Row, GeneratedScene]]:
        """Step until every row has finished; all of them with their scenes, in the
        order they finished."""
        out = []
        while self.rows:
            out += self.step()
        return out

    def abort(self, tag: object = None) -> None:
        """Drop every row (after a failed step), or only the rows of `tag`; their slots are
        cleared and free."""
        for row in list(self.rows):
            if tag is None or row.tag is tag:
                self._release(row)

    def _remove(self, row: Row) -> GeneratedScene:
        if row.streamer is not None:
            row.streamer.end()
        self._release(row)
        return row.plan.scenes(self.tokenizer, row.input_ids)[0]

    def _release(self, row: Row) -> None:
        self.rows.remove(row)
        if row.base_pending is not None:
            self.amateur.forget(row.seq)
        for seq in (row.seq, row.twin, row.voice_seq):
            if seq is not None:
                self.model.forget(seq)
                self._free.append(seq)
        self._free.sort()
