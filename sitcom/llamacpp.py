"""Write scenes with llama.cpp: the same decoding as sitcom.generation, on a faster forward pass.

On a 2-core CPU the transformers forward pass dominates a scene (~17 tok/s fp32); llama.cpp
runs the same model from a GGUF file (sitcom/gguf_export.py writes CHECKPOINT/model.gguf)
several times faster, and decodes several sequences in one llama_decode call, so a batch
of queued scenes costs little more than one.

Only the forward pass moves to llama.cpp. The decoding loop stays in torch so the guards of
sitcom.generation (ScriptRepetitionPenalty, LoopGuard, PerRowSampling, SceneStop, streamers,
stopping criteria) run unchanged on llama.cpp's logits. The loop is hand-written because
transformers' generate() needs a torch model, and llama-cpp-python's high-level Llama class
holds one sequence per context.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sitcom import generation
from sitcom.generation import (
    GeneratedScene,
)
from sitcom.llamacpp_check import check_llamacpp, use_extra_bufts
from sitcom.models import (
    ModelLoadError,
    cache_root,
    default_model_dir,
    is_base_model,
    is_tuned_default,
    load_model,
    load_tokenizer,
    packaged_gguf,
    resolve_model,
)
from sitcom.script import KNOWN_SPEAKERS
from sitcom.settings import SceneSettings

GGUF_NAME = "model.gguf"
log = logging.getLogger(__name__)


def find_gguf(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file that serves `model`, or None when it has none (serve it with torch).

    The packaged default is itself a GGUF (the source of the cached HF copy, so both
    give the same tokens); a checkpoint directory is served this way once it holds
    model.gguf, or `model` may name a .gguf file beside a tokenizer.
    """
    if is_base_model(model):
        return packaged_gguf()
    if is_tuned_default(model):
        model = resolve_model(model)  # the merged cache dir, or the base if that failed
        if Path(model) == default_model_dir():
            return packaged_gguf()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if (path / GGUF_NAME).is_file():
        return path / GGUF_NAME
    return None


class LlamaCppModel:
    """A GGUF model in one llama.cpp context with a KV cache for up to `max_batch` sequences.

    Not thread-safe by itself; calls are serialised with a lock (the engine has one worker).
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        *,
        max_batch: int = 8,
        n_ctx_per_seq: int = 1024,
        n_threads: int | None = None,
        flash_attn: bool = True,  # measured: +10% single, +25% at 8 sequences (Q8_0)
        kv_unified: bool = False,
        verbose: bool = False,
    ):
        import llama_cpp

        # llama-cpp-python routes llama.cpp's own log through this logger.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        llama_cpp.llama_backend_init()
        self._lib = llama_cpp
        self.path = Path(gguf_path)
        self.max_batch = max_batch
        self.n_ctx_per_seq = n_ctx_per_seq
        self.lock = threading.Lock()

        mparams = llama_cpp.llama_model_default_params()
        mparams.use_mmap = False  # read it all at load time, not page by page mid-scene
        mparams.use_extra_bufts = use_extra_bufts()  # off where AMX kernels crash
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {self.path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)

        threads = n_threads or len(os.sched_getaffinity(0))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_seq_max = max_batch
        cparams.n_ctx = n_ctx_per_seq * max_batch
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attn
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not make a context for {self.path}")
        self._batch_size = cparams.n_batch
        self._batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def reset(self) -> None:
        """Forget every sequence's KV cache."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def decode(self, work: Sequence[tuple[int, Sequence[int], int]]) -> np.ndarray:
        """Run [(seq_id, tokens, first position), ...] through the model, chunked to fit
        the batch; return the next-token logits after each item's last token, [len, vocab]."""
        capacity = self._batch_size
        out = np.zeros((len(work), self.n_vocab), dtype=np.float32)
        pending: list[tuple[int, int]] = []  # (work item, batch index) whose logits we want
        batch = self._batch
        n = 0

        def flush() -> None:
            nonlocal n
            if n == 0:
                return
            batch.n_tokens = n
            rc = self._lib.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}): KV cache full?")
            for item, index in pending:
                ptr = self._lib.llama_get_logits_ith(self._ctx, index)
                out[item] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            pending.clear()
            n = 0

        for item, (seq_id, tokens, pos) in enumerate(work):
            for offset, token in enumerate(tokens):
                if n == capacity:
                    flush()
                batch.token[n] = token
                batch.pos[n] = pos + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq_id
                last = offset == len(tokens) - 1
                batch.logits[n] = last
                if last:
                    pending.append((item, n))
                n += 1
        flush()
        return out


def load_llamacpp(
    model: str | os.PathLike | None,
    *,
    gguf: str | os.PathLike | None = None,
    max_batch: int = 8,
    n_threads: int | None = None,
) -> tuple[LlamaCppModel, object]:
    """(LlamaCppModel, HF tokenizer) for `model` served from `gguf` (default: find_gguf);
    ModelLoadError when there is no GGUF."""
    path = Path(gguf) if gguf else find_gguf(model)
    if path is None:
        raise ModelLoadError(f"{model} has no {GGUF_NAME} (python -m training.gguf_export {model})")
    # The tokenizer comes from the HF side: the guards decode text with it.
    tokenizer = load_tokenizer(hf_source_for(model))
    return LlamaCppModel(path, max_batch=max_batch, n_threads=n_threads), tokenizer


def load_serving_model(name: str | os.PathLike | None, max_batch: int = 8) -> tuple[object, object]:
    """The engine's loader: llama.cpp when the model has a GGUF and llama.cpp passed its
    self-test on this machine (sitcom.llamacpp_check), else sitcom.models.load_model.

    SITCOM_BACKEND=torch forces transformers; SITCOM_BACKEND=llamacpp skips the self-test.
    """
    backend = os.environ.get("SITCOM_BACKEND", "auto").strip().lower()
    gguf = find_gguf(name) if backend != "torch" else None
    if gguf is None:
        return load_model(name)
    if backend != "llamacpp":
        verdict = check_llamacpp(gguf, hf_source_for(name))
        if not verdict.ok:
            log.warning(
                "%s; serving %s with transformers (slower). SITCOM_BACKEND=llamacpp forces "
                "llama.cpp; delete %s to test again.",
                verdict.reason, name or "the default model", cache_root() / "llamacpp-probe",
            )
            return load_model(name)
    return load_llamacpp(name, gguf=gguf, max_batch=max_batch)


def hf_source_for(model: str | os.PathLike | None) -> str:
    """The transformers model a GGUF was made from (its tokenizer, and the probe's reference)."""
    if is_base_model(model) or is_tuned_default(model):
        return resolve_model(model)
    source = Path(model)
    return str(source.parent if source.suffix == ".gguf" else source)


def generate_scenes_any(model, tokenizer, prompts, settings, **kwargs) -> list[GeneratedScene]:
    """generate_scenes for whichever backend loaded `model` (same arguments)."""
    if isinstance(model, LlamaCppModel):
        kwargs.pop("precision", None)  # llama.cpp's precision is the GGUF's
        return generate_scenes(model, tokenizer, prompts, settings, **kwargs)
    return generation.generate_scenes(model, tokenizer, prompts, settings, **kwargs)


def generate_scenes(
    model: LlamaCppModel,
    tokenizer,
    prompts: Sequence[str],
    settings: SceneSettings | Sequence[SceneSettings],
    *,
    seed: int | None = None,
    streamer: BaseStreamer | None = None,
    do_sample: bool = True,
    stopping_criteria: Sequence[StoppingCriteria] = (),
    speakers: Sequence[str] = KNOWN_SPEAKERS,
) -> list[GeneratedScene]:
    """sitcom.generation.generate_scenes on llama.cpp: up to model.max_batch prompts in one
    batch, settings per prompt, the same guards, stops and post-processing."""
    if not prompts:
        return []
    if len(prompts) > model.max_batch:
        raise ValueError(
            f"{len(prompts)} prompts but the llama.cpp context holds {model.max_batch}"
        )
    plan = generation.plan_batch(
        tokenizer, prompts, settings, do_sample=do_sample, stopping_criteria=stopping_criteria,
        speakers=speakers, context_limit=min(model.n_ctx_per_seq, model.n_ctx_train),
    )
    rows_ids, input_ids, pad_id = plan.row_ids, plan.input_ids, plan.pad_id
    processors, stops = plan.processors, StoppingCriteriaList([plan.stops])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    stop_tensor = torch.tensor(plan.stop_ids, dtype=torch.long)

    with model.lock:
        model.reset()
        logits = model.decode([(row, ids, 0) for row, ids in enumerate(rows_ids)])
        if streamer is not None:
            streamer.put(input_ids)
        unfinished = torch.ones(len(rows_ids), dtype=torch.bool)
        for step in range(plan.budget):
            scores = torch.from_numpy(logits)
            # Called one by one: LogitsProcessorList inspects every processor's signature on
            # each call (~0.3 ms a token, 4 % of a step here); ours take no extra kwargs.
            for processor in processors:
                scores = processor(input_ids, scores)
            if do_sample:
                tokens = _sample(scores, generator)
            else:
                tokens = scores.argmax(dim=-1)
            tokens = torch.where(unfinished, tokens, pad_id)
            input_ids = torch.cat([input_ids, tokens[:, None]], dim=1)
            if streamer is not None:
                streamer.put(tokens)
            unfinished &= ~torch.isin(tokens, stop_tensor)
            unfinished &= ~stops(input_ids, scores)
            active = unfinished.nonzero().flatten().tolist()
            if not active:
                break
            step_logits = model.decode(
                [(row, [int(tokens[row])], len(rows_ids[row]) + step) for row in active]
            )
            if len(active) == len(rows_ids):
                logits = step_logits
            else:  # finished rows are padded from now on; their logits are never used
                logits = np.zeros_like(logits)
                logits[active] = step_logits
        if streamer is not None:
            streamer.end()
    return plan.scenes(tokenizer, input_ids)


def _sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from softmax(scores).

    argmax(p / Exp(1) noise) draws from p like torch.multinomial, which takes ~1 ms a row
    over a 49k vocabulary on this CPU. The noise itself costs about as much (8 ms a step at
    batch 8), so after top-k/top-p, where a few dozen tokens are finite, only those
    candidates get noise: the others have probability 0 either way.
    """
    finite = int(torch.isfinite(scores).sum(dim=-1).max())
    if finite < scores.shape[-1] // 4:
        values, candidates = torch.topk(scores, finite, dim=-1)
    else:
        values, candidates = scores, None
    noise = torch.empty_like(values).exponential_(generator=generator)
    picks = (torch.softmax(values, dim=-1) / noise).argmax(dim=-1)
    return picks if candidates is None else candidates.gather(1, picks[:, None])[:, 0]
