"""Write scenes with a transformers model: one batched generate() with the script guards.

The original experiment (GPT-2 + HF run_generation.py) failed two ways: at repetition
penalty 1.0 it looped (`JERRY: (to Elaine) I'm sorry.` / `ELAINE: (to Jerry) I'm sorry.` ...),
at 5.0 it dissolved into prose because the penalty also hit speaker names, colons and
newlines. The guards that fix that live in sitcom.decoding.guards, the per-row sampling
in sitcom.decoding.sampling, the batch plan in sitcom.decoding.plan, line cleaning in
sitcom.scenes.lines; this module is the transformers entry point (llama.cpp's is
sitcom.model.llamacpp / sitcom.decoding.batcher).

Everything is synchronous; the asyncio side lives in sitcom.engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sitcom.config import sitcom_config
from sitcom.decoding.contrast import ModelSource

# Re-exported: the names callers imported from here before the split.
from sitcom.decoding.guards import (  # noqa: F401
    DeadlineStop,
    LoopGuard,
    SceneStop,
    ScriptRepetitionPenalty,
)
from sitcom.decoding.guidance import RowGuidance
from sitcom.decoding.plan import DecodePlan, GeneratedScene, plan_batch  # noqa: F401
from sitcom.decoding.sampling import PerRowSampling  # noqa: F401
from sitcom.decoding.streaming import LineStreamer  # noqa: F401
from sitcom.decoding.threads import use_torch_threads
from sitcom.decoding.vocab import speaker_token_ids, stop_token_ids  # noqa: F401
from sitcom.decoding.voice import Raw, RowVoice
from sitcom.scenes.lines import clean_lines, line_key  # noqa: F401
from sitcom.scenes.script import KNOWN_SPEAKERS
from sitcom.settings import SceneSettings


def autocast_dtype(model, precision: str | None = None) -> torch.dtype | None:
    """bf16 autocast on CUDA, fp32 (None) on CPU.

    `precision` or env SITCOM_PRECISION: 'fp32' forces float32, 'bf16' forces bf16.
    """
    choice = (precision or sitcom_config().precision).lower()
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
    amateur=None,
) -> list[GeneratedScene]:
    """One batched generate() for all prompts; settings may differ per prompt. `amateur`:
    the untuned base as a transformers model, for rows with contrast (ValueError without)."""
    if not prompts:
        return []
    plan = plan_batch(
        tokenizer,
        prompts,
        settings,
        do_sample=do_sample,
        stopping_criteria=stopping_criteria,
        speakers=speakers,
        context_limit=getattr(model.config, "max_position_embeddings", None),
    )
    processors = plan.processors
    if plan.contrast is not None:
        if amateur is None:
            raise ValueError("contrast needs the untuned base model; this model has none")
        plan.contrast.source = ModelSource(amateur, plan.attention_mask)
    # First guidance, then voice (its gain from the model's own logits, kept by Raw), then
    # the guards and sampling, as on llama.cpp (sitcom.decoding.batcher).
    raw = Raw()
    voiced = [RowVoice(plan.voice, model, tokenizer, plan, raw)] if any(plan.voice) else []
    guided = [RowGuidance(plan.guidance, model, plan.lead_ids)] if max(plan.guidance) > 1 else []
    if voiced or guided:
        processors = [raw, *guided, *voiced, *processors]
    if seed is not None:
        torch.manual_seed(seed)
    use_torch_threads()  # fewer threads while other processes keep the cores busy
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
            logits_processor=LogitsProcessorList(processors),
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
        model,
        tokenizer,
        prompts,
        settings,
        seed=seed,
        streamer=streamer,
        do_sample=do_sample,
        precision=precision,
    )
    return [s.lines for s in scenes]
