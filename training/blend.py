"""An adapter part of the way between two LoRA adapters of one base:

    python -m training blend START END --weight 0.8 --base gemma3 --out DIR

Each layer's change is  (1 - w) * dW_start + w * dW_end,  refitted to START's rank by SVD
(peft's `add_weighted_adapter(..., combination_type="svd")`; the sum of two rank-r changes
has rank up to 2r, and the adapter must keep its size). w = 1 is END, w = 0 is START, w > 1
goes past END along the same direction (ExPO). The use here: a DPO round from the shipped
adapter that costs too much likelihood, taken part of the way to bring val BPB back within
bounds (at w = 0.8 it did, and readers' lean for the round was lost: training/
EXPERIMENTS.md, nineteenth session). END's `served_vocab.json` is copied beside the result;
DIR/blend.json records the inputs and the refit's relative error.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path


class BlendError(ValueError):
    """A bad blend request; its message is one line for the user."""


def _lora_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise BlendError(f"{adapter} is not a LoRA adapter (no adapter_config.json)") from None
    except json.JSONDecodeError as e:
        raise BlendError(f"{path} is not JSON ({e.msg})") from None
    if config.get("peft_type") != "LORA" or not isinstance(config.get("r"), int):
        raise BlendError(f"{adapter} is not a LoRA adapter (peft_type {config.get('peft_type')})")
    return config


def _same(value):
    return sorted(value) if isinstance(value, list) else value


def blend(
    start: Path,
    end: Path,
    weight: float,
    out: Path,
    base: str = "gemma3",
    overwrite: bool = False,
) -> dict:
    """Write the blended adapter to `out`; returns its card (also OUT/blend.json)."""
    if not math.isfinite(weight):
        raise BlendError(f"--weight must be a number (got {weight})")
    if out.exists() and not overwrite:
        raise BlendError(f"{out} exists; pass --overwrite to replace it")
    a, b = _lora_config(start), _lora_config(end)
    for key in ("target_modules", "r"):
        # peft writes target_modules from a set, so two runs may list them in any order
        if _same(a.get(key)) != _same(b.get(key)):
            raise BlendError(f"{start} and {end} differ in {key}: not two runs of one adapter")

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sitcom.model.catalog import base_hf_dir

    model = AutoModelForCausalLM.from_pretrained(base_hf_dir(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(start), adapter_name="start")
    model.load_adapter(str(end), adapter_name="end")
    model.add_weighted_adapter(
        ["start", "end"],
        [1.0 - weight, weight],
        adapter_name="blend",
        combination_type="svd",
        svd_rank=a["r"],
    )
    errors = []
    for module in model.modules():
        if hasattr(module, "get_delta_weight") and "blend" in getattr(module, "lora_A", {}):
            want = (1 - weight) * module.get_delta_weight("start")
            want = want + weight * module.get_delta_weight("end")
            got = module.get_delta_weight("blend")
            errors.append(float((got - want).norm() / want.norm().clamp_min(1e-12)))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # a whole adapter or none
        model.save_pretrained(tmp, selected_adapters=["blend"])
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(Path(tmp) / "blend"), out)
    vocab = end / "served_vocab.json"
    if vocab.is_file():
        shutil.copy(vocab, out / "served_vocab.json")
    card = {
        "method": "blend",
        "start": str(start),
        "end": str(end),
        "weight": weight,
        "rank": a["r"],
        "refit_rel_error_mean": round(sum(errors) / max(len(errors), 1), 6),
        "refit_rel_error_max": round(max(errors, default=0.0), 6),
        "modules": len(errors),
    }
    (out / "blend.json").write_text(json.dumps(card, indent=2) + "\n")
    return card
