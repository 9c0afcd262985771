"""A peft LoRA adapter as a llama.cpp adapter GGUF, applied at run time over a GGUF base.

This is how a writer on a base that only exists as a quantized GGUF (Gemma 3 270M, Q4_K_M from
PyPI) is served: llama.cpp loads the base file as it is and adds the adapter's low-rank
change to its linear layers while decoding (`LlamaCppModel(..., lora=PATH)`), so there is no
dequantize → merge → export → quantize round trip and the adapter file stays small.

The file follows llama.cpp's adapter format: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for each adapted weight `NAME.lora_a` (rank x in) and `NAME.lora_b`
(out x rank) under the base's own tensor name (gguf-py's name map); llama.cpp scales the
product by alpha / rank, as peft does. Llama-architecture q/k rows are stored permuted in
GGUF (sitcom.model.gguf_export), so lora_b's rows get the same permutation there.

A checkpoint also keeps peft's own adapter (adapter_config.json and the weights in bf16 under
peft's file name, half a Trainer checkpoint's fp32), which the transformers fallback merges
into the base's HF model where llama.cpp is off (sitcom.model.serving). Its card names the
copy under `peft_adapter`; a checkpoint written before it has none and needs llama.cpp.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sitcom.files import atomic_path, publish_dir, read_json, write_atomic
from sitcom.model.adapters import ADAPTER_FILE, load_adapter_state, save_adapter
from sitcom.model.errors import ModelLoadError
from sitcom.model.gguf_export import permute_rotary
from sitcom.model.gguf_merge import MERGED_GGUF, merge_lora_gguf
from sitcom.model.gguf_vocab import SERVED_VOCAB

ADAPTER_GGUF = "adapter.gguf"
CARD = "checkpoint.json"
FORMAT = "sitcom-gguf-adapter"
PEFT_CONFIG = "adapter_config.json"
PEFT_DTYPE = "bfloat16"
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def base_gguf_facts(path: str | os.PathLike) -> dict:
    """Architecture, block count and head counts of a GGUF model file.

    Read with transformers' metadata reader, which skips over the vocabulary's arrays:
    gguf.GGUFReader parses each of their entries (~55 s for Gemma's 262,144 tokens on 2
    cores, at every first start)."""
    from transformers.integrations.gguf import read_gguf_metadata

    try:
        meta, tensors = read_gguf_metadata(str(path))
    except (ValueError, struct.error) as e:
        raise ModelLoadError(f"{path} is not a GGUF model: {e}") from e
    arch = meta["general.architecture"]

    def first(key: str):  # a per-layer array counts by its first layer, as llama.cpp's would
        value = meta.get(f"{arch}.{key}")
        return value[0] if isinstance(value, list) and value else value

    heads, blocks = first("attention.head_count"), first("block_count")
    if heads is None or blocks is None:
        raise ModelLoadError(f"{path} names no block or head count for {arch}")
    return {
        "arch": arch,
        "blocks": int(blocks),
        "heads": int(heads),
        "kv_heads": int(first("attention.head_count_kv") or heads),
        "tensors": set(tensors),
    }


def export_lora_gguf(
    adapter_dir: str | os.PathLike, base_gguf: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """Write the peft adapter in `adapter_dir` (adapter_config.json + adapter_model.safetensors)
    as a llama.cpp adapter GGUF for `base_gguf` at `out`; returns `out`. ModelLoadError (one
    line) when the adapter does not fit the base."""
    import gguf
    from safetensors import SafetensorError

    adapter_dir, out = Path(adapter_dir), Path(out)
    try:
        config = json.loads((adapter_dir / PEFT_CONFIG).read_text())
        tensors = load_adapter_state(adapter_dir / ADAPTER_FILE)  # float32, from bf16 too
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read the adapter in {adapter_dir}: {e}") from None
    facts = base_gguf_facts(base_gguf)
    arch_name = facts["arch"]
    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ModelLoadError(f"gguf-py does not know the architecture {arch_name!r}")
    names = gguf.get_tensor_name_map(arch, facts["blocks"])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.weight"
            if key.endswith(marker):
                hf = key[: -len(marker)].removeprefix("base_model.model.") + ".weight"
                pairs.setdefault(hf, {})[part] = value.numpy()
    if not pairs:
        raise ModelLoadError(f"{adapter_dir} holds no LoRA weights")
    alpha = float(config.get("lora_alpha", config.get("r", 1)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for hf, ab in sorted(pairs.items()):
            if set(ab) != {"lora_A", "lora_B"}:
                raise ModelLoadError(f"{adapter_dir}: {hf} lacks one of lora_A / lora_B")
            name = names.get_name(hf, try_suffixes=(".weight",))
            if name is None or name not in facts["tensors"]:
                raise ModelLoadError(f"{adapter_dir}: {hf} has no tensor in the base {base_gguf}")
            a, b = ab["lora_A"], ab["lora_B"]
            if arch_name == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
                heads = facts["heads"] if hf.endswith("q_proj.weight") else facts["kv_heads"]
                b = permute_rotary(b, heads)
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def write_adapter_checkpoint(
    adapter_dir: str | os.PathLike,
    base: str,
    base_gguf: Path,
    out: str | os.PathLike,
    extra: dict | None = None,
) -> Path:
    """A checkpoint directory `out` that serves the peft adapter in `adapter_dir` over the
    GGUF base named `base` (`gemma3`, `smollm2`, or a model directory holding model.gguf,
    resolved by the caller to `base_gguf`): fill_adapter_checkpoint's files, published in one
    rename (sitcom.files.publish_dir), so `/checkpoint use` lists and serves it like any other."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        fill_adapter_checkpoint(adapter_dir, base, base_gguf, tmp, extra)
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def fill_adapter_checkpoint(
    adapter_dir: str | os.PathLike,
    base: str,
    base_gguf: Path,
    out: Path,
    extra: dict | None = None,
) -> dict:
    """Write a checkpoint's files into the existing directory `out`: adapter.gguf, the base
    with it merged in (merged.gguf, what llama.cpp serves: sitcom.model.gguf_merge), peft's
    adapter in bf16 for the transformers fallback (write_peft_copy) and its card (returned),
    which also holds `extra` (facts about the adapter, e.g. the shipped default's card).
    Where `adapter_dir` names the tokens its writer writes (SERVED_VOCAB), the merge keeps
    only those (sitcom.model.gguf_vocab)."""
    # The GGUF is made from the bf16 copy, so both backends serve the same adapter.
    peft = write_peft_copy(adapter_dir, out)
    export_lora_gguf(out, base_gguf, out / ADAPTER_GGUF)
    vocab = Path(adapter_dir) / SERVED_VOCAB
    vocab = vocab if vocab.is_file() else None  # the merge keeps those tokens' rows only
    merge_lora_gguf(base_gguf, out / ADAPTER_GGUF, out / MERGED_GGUF, served_vocab=vocab)
    card = {
        **(extra or {}),
        "format": FORMAT,
        "base_model": base,
        "adapter": ADAPTER_GGUF,
        "merged": MERGED_GGUF,
        "served_vocab": vocab is not None,
        "peft_adapter": peft,
        "source": str(Path(adapter_dir).resolve()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(out / CARD, json.dumps(card, indent=2) + "\n")
    return card


def write_peft_copy(adapter_dir: str | os.PathLike, out: Path) -> dict[str, str]:
    """peft's adapter in `adapter_dir` copied into `out` for the transformers fallback: its
    adapter_config.json as it is, its LoRA factors (what adapter.gguf holds; a saved copy of a
    frozen embedding would be a base-sized file) cast to bf16 under peft's file name. Returns
    what the card records of it (`peft_adapter`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    try:
        config = (adapter_dir / PEFT_CONFIG).read_bytes()
        state = load_file(adapter_dir / ADAPTER_FILE)
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"cannot read the adapter in {adapter_dir}: {e}") from None
    state = {k: v for k, v in state.items() if k.endswith(LORA_SUFFIXES)}
    weights = save_adapter(state, out, PEFT_DTYPE)
    (out / PEFT_CONFIG).write_bytes(config)
    return {"config": PEFT_CONFIG, "weights": weights.name, "dtype": PEFT_DTYPE}


def adapter_checkpoint_base(path: str | os.PathLike) -> str | None:
    """The base a GGUF-adapter checkpoint directory is served over, or None when `path` is
    not one. ModelLoadError (one line) for a damaged one."""
    card = adapter_checkpoint_card(path)
    return None if card is None else card["base_model"]


def peft_copy(path: str | os.PathLike, card: dict) -> Path | None:
    """The weights file of the peft copy (write_peft_copy) the card of the GGUF-adapter
    checkpoint `path` names, beside its adapter_config.json; None when the card names none
    (a checkpoint written before the copy: llama.cpp only)."""
    peft = card.get("peft_adapter")
    if not isinstance(peft, dict) or not isinstance(peft.get("weights"), str):
        return None
    return Path(path) / Path(peft["weights"]).name


def merged_model(path: str | os.PathLike, card: dict) -> Path | None:
    """The merged model file (base + adapter) the card of the GGUF-adapter checkpoint `path`
    names, or None for a checkpoint written before merges (llama.cpp applies adapter.gguf
    over the base at run time there)."""
    merged = card.get("merged")
    if not isinstance(merged, str) or not (Path(path) / Path(merged).name).is_file():
        return None
    return Path(path) / Path(merged).name


def adapter_checkpoint_card(path: str | os.PathLike) -> dict | None:
    """The card of a GGUF-adapter checkpoint directory, or None when `path` is not one.
    ModelLoadError (one line) for a damaged one."""
    path = Path(path)
    if not (path / ADAPTER_GGUF).is_file():
        return None
    try:
        card = read_json(path / CARD)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} has an adapter but no readable {CARD}: {e}") from None
    base = card.get("base_model") if isinstance(card, dict) else None
    if card.get("format") != FORMAT or not isinstance(base, str) or not base:
        raise ModelLoadError(f"{path / CARD} is not a {FORMAT} card with a base_model")
    return card
