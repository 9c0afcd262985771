"""Serve GGUF models with llama.cpp: the model and its KV cache slots, and the
batch entry point. The decoding loop (continuous batching, the same guards as the
transformers path) is sitcom.decoding.batcher.

On a 2-core CPU the transformers forward pass dominates a scene (~17 tok/s fp32); llama.cpp
runs the same model from a GGUF file (sitcom/model/gguf_export.py writes CHECKPOINT/model.gguf)
several times faster, and decodes several sequences in one llama_decode call, so scenes
written together cost little more than one. sitcom.model.llamacpp_check decides whether llama.cpp
is safe on this CPU; sitcom.model.serving decides which models it serves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from sitcom.decoding.batcher import ContinuousBatcher
from sitcom.decoding.plan import GeneratedScene
from sitcom.decoding.threads import ThreadPolicy
from sitcom.model.catalog import ModelLoadError
from sitcom.model.gguf_vocab import KEY_IDS, KEY_SIZE, served_vocab_of
from sitcom.model.llamacpp_check import use_extra_bufts
from sitcom.scenes.script import KNOWN_SPEAKERS
from sitcom.settings import SceneSettings

log = logging.getLogger(__name__)
_LLAMA_LOG = logging.getLogger("llama-cpp-python")
# ggml's log levels as this llama.cpp build numbers them (ggml.h: NONE, DEBUG, INFO, WARN,
# ERROR, CONT). llama-cpp-python's own callback maps an older numbering (WARN read as ERROR),
# so every warning reached stderr, e.g. one line per adapted layer of a LoRA; ours maps these.
_GGML_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR}
_log_callback = None  # kept referenced: llama.cpp holds a pointer to it


def _route_llama_log(llama_cpp) -> None:
    """Send llama.cpp's log to the `llama-cpp-python` logger at its real levels (once)."""
    global _log_callback
    if _log_callback is not None:
        return
    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data) -> None:
        if level != 5:  # GGML_LOG_LEVEL_CONT goes on at the level of the line it continues
            last[0] = _GGML_LEVELS.get(level, logging.DEBUG)
        if _LLAMA_LOG.isEnabledFor(last[0]):
            _LLAMA_LOG.log(last[0], "%s", text.decode("utf-8", "replace").rstrip("\n"))

    _log_callback = callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


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
        n_threads: int | None = None,  # None: SITCOM_THREADS (sitcom.decoding.threads), auto
        flash_attn: bool = True,  # measured: +10% single, +25% at 8 sequences (Q8_0)
        kv_unified: bool = False,
        lora: str | os.PathLike | None = None,  # an adapter GGUF (sitcom.model.lora_gguf)
        verbose: bool = False,
    ):
        import llama_cpp

        # llama.cpp's own log goes through this logger (_route_llama_log): errors only.
        _LLAMA_LOG.setLevel(logging.DEBUG if verbose else logging.ERROR)
        _route_llama_log(llama_cpp)
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
        # A GGUF that keeps some tokens' rows only (sitcom.model.gguf_vocab): callers still
        # see the full vocabulary's ids; decode() maps them in and the logits back out.
        self._rows: np.ndarray | None = None  # full id of each of the model's rows
        self._row_of: np.ndarray | None = None  # row of each full id (UNK's where it has none)
        cut = served_vocab_of(self.path) if _has_key(llama_cpp, self._model, KEY_SIZE) else None
        if cut is not None:
            full, rows, unknown = cut
            if len(rows) != self.n_vocab or rows[-1] >= full or not 0 <= unknown < len(rows):
                llama_cpp.llama_model_free(self._model)
                raise ModelLoadError(f"{self.path}: its {KEY_IDS} do not match its vocabulary")
            self._rows = rows
            self._row_of = np.full(full, unknown, dtype=np.int64)
            self._row_of[rows] = np.arange(len(rows))
            self.n_vocab = full
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self._model)

        self.policy = ThreadPolicy(str(n_threads) if n_threads else None)
        threads = self.threads = self.policy.threads()
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
        self.lora = Path(lora) if lora else None
        if self.lora:  # freed with the model
            adapter = llama_cpp.llama_adapter_lora_init(self._model, str(self.lora).encode())
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
            if not adapter or llama_cpp.llama_set_adapters_lora(
                self._ctx, adapters, 1, (ctypes.c_float * 1)(1.0)
            ):
                self.close()
                raise ModelLoadError(f"llama.cpp could not apply the adapter {self.lora}")

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._lib.llama_model_free(self._model)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed, no BOS added); from
        a GGUF of some tokens only, with those tokens (full-vocabulary ids), which need not
        be how the full tokenizer splits the text."""
        vocab = self._lib.llama_model_get_vocab(self._model)
        data = text.encode()
        buf = (self._lib.llama_token * (len(data) + 8))()
        n = self._lib.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            raise ValueError(f"llama_tokenize needs {-n} tokens")
        ids = list(buf[:n])
        return ids if self._rows is None else [int(self._rows[i]) for i in ids]

    def logits_of(self, ids: Sequence[int]) -> np.ndarray:
        """[len(ids), vocab] next-token logits after each token of one fresh sequence."""
        self.reset()
        # One item per token: decode() batches them, asking llama.cpp for every row's logits.
        return self.decode([(0, [tok], pos) for pos, tok in enumerate(ids)])

    def reset(self) -> None:
        """Forget every sequence's KV cache."""
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def forget(self, seq_id: int, start: int = -1) -> bool:
        """Forget one sequence's KV cache from position `start` on (-1: all of it, so its
        slot can take a new scene); False where the cache cannot drop only a tail."""
        memory = self._lib.llama_get_memory(self._ctx)
        return bool(self._lib.llama_memory_seq_rm(memory, seq_id, start, -1))

    def _follow_policy(self) -> None:
        threads = self.policy.threads()  # re-measured at most once a second
        if threads != self.threads:
            self._lib.llama_set_n_threads(self._ctx, threads, threads)
            self.threads = threads

    def decode(self, work: Sequence[tuple[int, Sequence[int], int]]) -> np.ndarray:
        """Run [(seq_id, tokens, first position), ...] through the model, chunked to fit
        the batch; return the next-token logits after each item's last token, [len, vocab]."""
        self._follow_policy()
        capacity = self._batch_size
        rows, row_of = self._rows, self._row_of
        out = np.full((len(work), self.n_vocab), -np.inf if rows is not None else 0, np.float32)
        n_rows = self.n_vocab if rows is None else len(rows)
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
                logits = np.ctypeslib.as_array(ptr, shape=(n_rows,))
                if rows is None:
                    out[item] = logits
                else:
                    out[item, rows] = logits
            pending.clear()
            n = 0

        for item, (seq_id, tokens, pos) in enumerate(work):
            for offset, token in enumerate(tokens):
                if n == capacity:
                    flush()
                batch.token[n] = token if row_of is None else int(row_of[token])
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


def _has_key(llama_cpp, model, key: str) -> bool:
    """Whether a loaded model's GGUF metadata has `key` (cheap: no file is read)."""
    buf = ctypes.create_string_buffer(32)
    return llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, len(buf)) >= 0


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
    amateur: LlamaCppModel | None = None,
) -> list[GeneratedScene]:
    """sitcom.decoding.generation.generate_scenes on llama.cpp: up to model.max_batch
    prompts written together (each row leaves the batch when it is done), settings per
    prompt, the same guards, stops and post-processing; `amateur`: the untuned base, for
    rows with contrast. `streamer` and `stopping_criteria`
    see one row at a time: the row's index is 0 (use sitcom.decoding.batcher directly for
    per-row streamers)."""
    if not prompts:
        return []
    if len(prompts) > model.max_batch:
        raise ValueError(
            f"{len(prompts)} prompts but the llama.cpp context holds {model.max_batch}"
        )
    if isinstance(settings, SceneSettings):
        settings = [settings] * len(prompts)
    if len(settings) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(settings)} settings")
    if streamer is not None and len(prompts) > 1:
        raise ValueError("a streamer follows one prompt here; use sitcom.decoding.batcher per row")
    with model.lock:
        batcher = ContinuousBatcher(
            model, tokenizer, seed=seed, do_sample=do_sample, speakers=speakers, amateur=amateur
        )
        for i, (prompt, s) in enumerate(zip(prompts, settings, strict=True)):
            batcher.add(prompt, s, tag=i, streamer=streamer, stopping_criteria=stopping_criteria)
        done = dict((row.tag, scene) for row, scene in batcher.drain())
    return [done[i] for i in range(len(prompts))]
