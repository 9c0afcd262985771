"""Decoding settings for one scene, with the ranges every frontend validates against."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

# (low, high) inclusive; the Discord frontend turns these into app_commands.Range.
RANGES: dict[str, tuple[float, float]] = {
    "max_new_tokens": (16, 400),
    "max_lines": (1, 40),  # the scene stops after this many new lines (or max_new_tokens)
    "repetition_penalty": (1.0, 5.0),  # 5.0: where the original experiment lost the format
    "temperature": (0.1, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 200),
    "min_p": (0.0, 0.5),  # drop tokens below min_p x the likeliest token's probability
    "best_of": (1, 8),  # candidates written together; the best-ranked one is posted
    "premise": (0.0, 3.0),  # nats added to the opening's own words (decoding.guards.PremiseBias)
    "pick_lines": (0, 1),  # 1: best_of candidates compared at every line, not as whole scenes
    "cast_turns": (0, 1),  # 1: each line's speaker from the scene's cast, taking turns (CastTurns)
    # classifier-free guidance on the opening: 1 off; g > 1 writes from
    # log p(x | opening) + (g - 1) * [log p(x | opening) - log p(x | no opening)]
    "guidance": (1.0, 3.0),
    # contrast with the untuned base (sitcom.decoding.contrast): 0 off; beta > 0 writes from
    # logits + beta * [log p_tuned - log p_base] over the tuned model's plausible tokens;
    # off by default: 0.5 tied with it (55/108 blind pairs) at 2.4x the time
    "contrast": (0.0, 2.0),
    # each line contrasted with an anonymous MAN's in its place (sitcom.decoding.voice): 0 off
    "voice": (0.0, 3.0),
    # nats taken off every token that would end a line once its tag is written
    # (sitcom.decoding.guards.LongerLines): 0 off. The writer's lines run shorter than the
    # show's; 1 won 60/108 blind pairs against voice read against the other speaker, but
    # lost 47/108 on top of voice read against MAN, so it is off by default (21st session)
    "longer_lines": (0.0, 3.0),
}


@dataclass(frozen=True)
class SceneSettings:
    # The default preset (chosen by measurement, see sitcom/seinfeld_lora/MODEL_CARD.md):
    # a milder repetition penalty and temperature than before (1.15 / 0.8) keep a scene on
    # its topic. Six new lines: readers preferred them to whole 200-token scenes (61/108
    # blind pairs), and they take under half the time (training/EXPERIMENTS.md, eighth
    # session). Guidance 1.5 on them won 75/108 pairs against none over three sets; 2 and
    # 2.5 tied with 1.5, and repetition penalties 1.0 and 1.15 lost to 1.05 with it (ninth
    # session). A guided candidate is two llama.cpp sequences. With guidance, ranking two
    # candidates (sitcom.scenes.ranking) no longer wins readers over one (41/72 pairs for
    # one), so one scene is written, in half the time (tenth session); channels that set
    # best_of keep the ranker. Voice 1 (each line contrasted with the scene's other speaker,
    # sitcom.decoding.voice) won 124/216 pairs over six sets against it (twentieth session);
    # a candidate is then three llama.cpp sequences. Contrasting with an anonymous MAN
    # instead of the other speaker won 128/216 more (twenty-first session).
    max_new_tokens: int = 200
    max_lines: int = 6
    repetition_penalty: float = 1.05
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    min_p: float = 0.0
    best_of: int = 1
    premise: float = 0.0
    cast_turns: int = 0
    pick_lines: int = 0
    guidance: float = 1.5
    contrast: float = 0.0
    voice: float = 1.0
    longer_lines: float = 0.0

    def validated(self) -> SceneSettings:
        """Raise ValueError naming the first field outside its range."""
        for f in fields(self):
            lo, hi = RANGES[f.name]
            value = getattr(self, f.name)
            if not lo <= value <= hi:
                raise ValueError(f"{f.name} must be between {lo:g} and {hi:g} (got {value:g})")
        return self

    def with_changes(self, **changes: float) -> SceneSettings:
        types = {f.name: type(getattr(self, f.name)) for f in fields(self)}
        unknown = set(changes) - set(types)
        if unknown:
            raise ValueError(f"unknown setting: {', '.join(sorted(unknown))}")
        cast = {}
        for k, v in changes.items():
            if not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number (got {v})")
            if types[k] is int and v != int(v):  # 400.9 must not quietly become 400
                raise ValueError(f"{k} must be a whole number (got {v:g})")
            cast[k] = types[k](v)
        return replace(self, **cast).validated()

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
