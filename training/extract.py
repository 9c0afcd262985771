"""Compress a fine-tune into a small LoRA adapter: the best rank-r approximation (SVD) of
each linear layer's weight change, saved in peft's adapter format with a card.

    python -m training extract checkpoints/seinfeld-full --rank 32 --out sitcom/seinfeld_lora

The fine-tune must have changed only linear layers (`finetune --linear-only`): embeddings
and norms are not in the adapter, so a change there is refused rather than silently lost.
peft can load, merge and train LoRA adapters but has no "adapter from a weight delta"
function, so the SVD step is written here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sitcom.files import publish_dir
from sitcom.models import ADAPTER_CARD, ADAPTER_FILE, BASE_MODEL, file_sha256, load_model

if TYPE_CHECKING:
    import torch

# Bigger than this and the shipped default no longer fits comfortably in the repository.
MAX_ADAPTER_MB = 25.0


class ExtractError(ValueError):
    """A checkpoint that cannot be compressed this way; the message is user-facing."""


def linear_deltas(base, tuned) -> dict[str, torch.Tensor]:
    """{module name: W_tuned - W_base} for every changed nn.Linear but the LM head;
    ExtractError when any other parameter changed."""
    import torch

    base_params = dict(base.named_parameters())
    head = tuned.get_output_embeddings()
    linear = {
        name for name, m in tuned.named_modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    }
    deltas = {}
    for name, param in tuned.named_parameters():
        module = name.rsplit(".", 1)[0]
        delta = param.detach().float() - base_params[name].detach().float()
        if module in linear and name.endswith(".weight"):
            if torch.any(delta != 0):
                deltas[module] = delta
        elif torch.any(delta != 0):
            raise ExtractError(
                f"{name} differs from the base: only linear layers can go into the adapter "
                "(fine-tune with --linear-only)"
            )
    if not deltas:
        raise ExtractError("the checkpoint does not differ from the base model")
    return deltas


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, r], A [r, in], relative Frobenius error) with B @ A closest to delta."""
    import torch

    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    b, a = u[:, :r] * s[:r], vh[:r]
    kept = float((s[:r] ** 2).sum())
    total = float((s**2).sum())
    return b, a, (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0


def extract(checkpoint: str | Path, out: Path, rank: int, base: str = BASE_MODEL,
            dtype: str = "bfloat16", data: Path | None = None) -> dict:
    """Write OUT (adapter_config.json, adapter_model.safetensors, checkpoint.json); returns
    the card. OUT is replaced atomically. With `data`, the card also gets the adapter's
    val metrics on the whole val split of that corpus."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file

    if rank < 1:
        raise ExtractError("--rank must be at least 1")
    tuned, tokenizer = load_model(checkpoint)
    base_model, _ = load_model(base)
    deltas = linear_deltas(base_model, tuned)
    targets = sorted({name.rsplit(".", 1)[-1] for name in deltas})
    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets,
                        task_type="CAUSAL_LM")  # alpha == r: scale 1, B @ A is the delta
    peft_model = get_peft_model(base_model, config)
    errors = {}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name not in deltas:
                continue
            b, a, errors[name] = low_rank(deltas[name], rank)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    adapter = get_peft_model_state_dict(peft_model)
    state = {k: v.to(getattr(torch, dtype)).contiguous() for k, v in adapter.items()}

    source_card = _read_card(Path(str(checkpoint)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        save_file(state, tmp / ADAPTER_FILE, metadata={"format": "pt"})
        size_mb = (tmp / ADAPTER_FILE).stat().st_size / 1e6
        card = {
            **{k: v for k, v in source_card.items() if k != "settings"},
            "form": f"LoRA r={rank} extracted by SVD from a linear-only full fine-tune",
            "rank": rank,
            "adapter_dtype": dtype,
            "adapter_mb": round(size_mb, 2),
            "adapter_sha256": file_sha256(tmp / ADAPTER_FILE),
            "extracted_from": str(checkpoint),
            "extract_rel_error_mean": round(sum(errors.values()) / len(errors), 4),
            "extract_rel_error_max": round(max(errors.values()), 4),
            "base_model": base,
            "gguf_qtype": "q8_0",
            "train_wall_minutes": _train_minutes(Path(str(checkpoint))),
            "finetune_settings": source_card.get("settings"),
        }
        if data is not None:
            block = int((source_card.get("settings") or {}).get("block_size", 512))
            card["adapter_val"] = adapter_val_metrics(tmp, base, Path(data), block)
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if size_mb > MAX_ADAPTER_MB:
        print(f"warning: the adapter is {size_mb:.1f} MB, more than {MAX_ADAPTER_MB:.0f} MB")
    return card


def _read_card(checkpoint: Path) -> dict:
    try:
        return json.loads((checkpoint / ADAPTER_CARD).read_text())
    except (OSError, ValueError):
        return {}


def _train_minutes(checkpoint: Path) -> float | None:
    """Wall minutes from the first to the last training log line (resumed runs included)."""
    try:
        text = (checkpoint / "metrics.jsonl").read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        times = [r["time"] for r in rows if "time" in r]
        return round((max(times) - min(times)) / 60, 1) if times else None
    except (OSError, ValueError, KeyError):
        return None


def adapter_val_metrics(adapter_dir: Path, base: str, data: Path, block_size: int) -> dict:
    """Val loss/ppl/BPB on the whole val split of base + adapter, merged as the bot does."""
    from peft import PeftModel

    from training.corpus import load_corpus
    from training.evaluate import val_metrics

    corpus = load_corpus(data, splits=("val",))
    base_model, tokenizer = load_model(base)
    merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload().eval()
    return val_metrics(merged, tokenizer, corpus.val, block_size, batch_size=4)
