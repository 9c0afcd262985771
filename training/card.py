"""Export a finished model: a plain HF directory plus checkpoint.json, written atomically."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from transformers import GenerationConfig

from sitcom.files import publish_dir
from sitcom.settings import SceneSettings

CARD_NAME = "checkpoint.json"


def scene_generation_config(model_config, tokenizer) -> GenerationConfig:
    """Sampling defaults that match the bot's SceneSettings, so plain `generate` behaves alike."""
    s = SceneSettings()
    return GenerationConfig(
        do_sample=True,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        repetition_penalty=s.repetition_penalty,
        max_new_tokens=s.max_new_tokens,
        bos_token_id=getattr(model_config, "bos_token_id", None),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    )


def card_block_size(card: dict | None, default: int = 512) -> int:
    """The context length a card's val numbers were measured with: its fine-tune's block size
    (`finetune_settings` on an extracted adapter's card)."""
    card = card or {}
    settings = card.get("settings") or card.get("finetune_settings") or {}
    return int(settings.get("block_size", default))


def read_card(directory: Path | str) -> dict:
    """A checkpoint's or adapter's checkpoint.json; {} when it has none or it is unreadable."""
    try:
        return json.loads((Path(directory) / CARD_NAME).read_text())
    except (OSError, ValueError):
        return {}


def base_lineage(card: dict | None) -> list[str]:
    """The models a checkpoint descends from, nearest first: its card's base_model, that
    model's card's base_model, ... (a stage's card also keeps the stage before's summary,
    used when that directory is gone). [] when the card names no base."""
    chain: list[str] = []
    while isinstance(card, dict) and len(chain) < 32:
        name = card.get("base_model")
        if not isinstance(name, str) or not name or name in chain:
            break
        chain.append(name)
        card = (read_card(name) if Path(name).is_dir() else {}) or card.get("init_checkpoint")
    return chain


def prior_stage_summary(directory: Path | str | None) -> dict | None:
    """What the model this run went on from (an --init-adapter, or a --base checkpoint dir of
    ours) had been trained on, for the card; None for the packaged base or a hub id."""
    card = read_card(directory) if directory is not None else {}
    if not card:
        return None
    keys = (
        "base_model",
        "steps",
        "tokens_seen",
        "train_wall_minutes",
        "tokens_seen_total",
        "train_wall_minutes_total",
        "val_bpb",
        "form",
        "adapter_val",
        "init_adapter",
        "init_checkpoint",
    )
    summary = {"path": str(directory), **{k: card.get(k) for k in keys if k in card}}
    if "train_wall_minutes" not in summary:  # a fine-tune's card: its own training log
        summary["train_wall_minutes"] = train_minutes(Path(directory))
    return {**summary, "block_size": card_block_size(card)}


def train_minutes(checkpoint: Path) -> float | None:
    """Wall minutes from the first to the last training log line (resumed runs included)."""
    try:
        text = (Path(checkpoint) / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        times = [r["time"] for r in rows if "time" in r]
        return round((max(times) - min(times)) / 60, 1) if times else None
    except (OSError, ValueError, KeyError):
        return None


def make_card(**fields) -> dict:
    return {**fields, "created": datetime.now(UTC).isoformat(timespec="seconds")}


def remove_stale_exports(out: Path) -> list[Path]:
    """Delete temp dirs that a killed export_checkpoint left beside `out` (`.OUT.xxxxxxxx.tmp`,
    mkdtemp's name); they hold a half-written model of hundreds of MB. Only this OUT's."""
    out = Path(out)
    pattern = re.compile(rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}\.tmp")
    stale = [
        p
        for p in out.parent.glob(f".{out.name}.*.tmp")
        if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def export_checkpoint(
    model,
    tokenizer,
    out: Path,
    card: dict,
    extra_files: dict[str, Path],
    gguf_qtype: str | None = None,
) -> Path:
    """Write everything to a temp dir beside `out`, then swap it into place.

    An existing `out` is moved aside first and removed only after the new one is in place,
    so a crash never leaves a half-written checkpoint under the final name.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        scene_generation_config(model.config, tokenizer).save_pretrained(tmp)
        for name, src in extra_files.items():
            if Path(src).exists():
                shutil.copyfile(src, tmp / name)
        (tmp / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
        if gguf_qtype and model.config.model_type == "llama":
            # The bot serves checkpoints holding model.gguf through llama.cpp (~5x faster
            # on CPU than transformers); other architectures are served by transformers.
            from training.gguf_export import export_gguf

            export_gguf(tmp, tmp / "model.gguf", gguf_qtype)
        # mkdtemp (and safetensors) make things private; a checkpoint is meant to be shared.
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
