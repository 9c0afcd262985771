"""LoRA adapter files: peft's own format, or the same tensors stored as int8 / int4, and
merging either into a base model.

peft saves and loads adapters in float only. To fit a higher rank into the repository's
25 MB, `save_adapter(..., "int8")` stores each LoRA factor as int8 with one fp16 scale per
block of 64 values (per row when a row is not a multiple of 64), as ggml's Q8_0 does;
"int4" packs two values in [-7, 7] per byte with one fp16 scale per block of 32 (ggml's
Q4_0 layout idea; a factor whose rows are not a multiple of 32 falls back to int8).
1-D tensors (norms) stay bf16. The file has its own name, so peft never reads integers
as floats by mistake. Loading dequantizes and hands the state dict to peft.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ADAPTER_FILE = "adapter_model.safetensors"  # peft's name and format (float)
ADAPTER_INT8_FILE = "adapter_model.int8.safetensors"  # ours: int8 + scales
ADAPTER_INT4_FILE = "adapter_model.int4.safetensors"  # ours: packed int4 + scales
ADAPTER_CARD = "checkpoint.json"
DTYPES = ("bfloat16", "float16", "float32", "int8", "int4")
_SCALE = "@scale"  # suffix of a quantized tensor's scales
_BLOCK = 64
_BLOCK4 = 32


def adapter_file_name(dtype: str) -> str:
    return {"int8": ADAPTER_INT8_FILE, "int4": ADAPTER_INT4_FILE}.get(dtype, ADAPTER_FILE)


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp16 scales [rows, blocks]) with values * scale ~ t, symmetric absmax."""
    import torch

    rows = t.float().reshape(t.shape[0], -1)
    block = _BLOCK if rows.shape[1] % _BLOCK == 0 else rows.shape[1]
    blocks = rows.reshape(rows.shape[0], -1, block)
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(1e-12).half()
    q = torch.round(blocks / scale.float()).clamp(-127, 127).to(torch.int8)
    return q.reshape(t.shape).contiguous(), scale.squeeze(-1).contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    blocks = q.float().reshape(q.shape[0], scale.shape[1], -1)
    return (blocks * scale.float().unsqueeze(-1)).reshape(q.shape)


def quantize_int4(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [rows, cols / 2]: two 4-bit values, the even column in the low nibble; fp16
    scales [rows, cols / 32]) with values * scale ~ t, symmetric absmax over [-7, 7]."""
    import torch

    rows = t.float().reshape(t.shape[0], -1)
    blocks = rows.reshape(rows.shape[0], -1, _BLOCK4)
    scale = (blocks.abs().amax(dim=-1, keepdim=True) / 7).clamp_min(1e-12).half()
    q = (torch.round(blocks / scale.float()).clamp(-7, 7) + 8).to(torch.uint8)
    q = q.reshape(rows.shape[0], -1, 2)
    return (q[..., 0] | (q[..., 1] << 4)).contiguous(), scale.squeeze(-1).contiguous()


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    import torch

    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
    blocks = (q.float() - 8).reshape(q.shape[0], scale.shape[1], -1)
    return (blocks * scale.float().unsqueeze(-1)).reshape(q.shape)


def save_adapter(state: dict[str, torch.Tensor], directory: Path, dtype: str) -> Path:
    """Write a peft adapter state dict into directory in `dtype`; returns the file."""
    import torch
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"adapter dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if dtype == "int4" and value.dim() == 2 and value.shape[1] % _BLOCK4 == 0:
            out[key], out[key + _SCALE] = quantize_int4(value)
        elif dtype in ("int8", "int4") and value.dim() == 2:
            out[key], out[key + _SCALE] = quantize_int8(value)
        elif dtype in ("int8", "int4"):
            out[key] = value.to(torch.bfloat16).contiguous()
        else:
            out[key] = value.to(getattr(torch, dtype)).contiguous()
    path = Path(directory) / adapter_file_name(dtype)
    save_file(out, path, metadata={"format": "pt", "sitcom_dtype": dtype})
    return path


def load_adapter_state(path: Path) -> dict[str, torch.Tensor]:
    """The float state dict of an adapter file written by save_adapter (or by peft)."""
    import torch
    from safetensors.torch import load_file

    raw = load_file(path)
    state = {}
    for key, value in raw.items():
        if key.endswith(_SCALE):
            continue
        scale = raw.get(key + _SCALE)
        if scale is None:
            state[key] = value.float()
        elif value.dtype == torch.uint8:
            state[key] = dequantize_int4(value, scale)
        else:
            state[key] = dequantize_int8(value, scale)
    return state


def adapter_weights(adapter_dir: Path, card: dict) -> Path:
    """The adapter's tensor file, as its card names it (peft's name when it does not)."""
    return Path(adapter_dir) / Path(card.get("adapter_file", ADAPTER_FILE)).name


def peft_model_for(base, config):
    """get_peft_model without the warning about the tied embedding: the adapter's change
    of it merges into the one matrix shared with the LM head, exactly as the fine-tune
    changed it (tests/test_shipped_model.py). Merging a model built with ensure_weight_tying
    would add the change twice, so only training (load_adapter(trainable=True)) uses it."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated API
        return get_peft_model(base, config)


def load_adapter(
    base, adapter_dir: Path, file_name: str = ADAPTER_FILE, *, trainable: bool = False
):
    """A peft model: base with the adapter in adapter_dir applied (not merged). Raises
    ValueError when the adapter's tensors do not fit the base.

    trainable: peft's ensure_weight_tying gives the tied LM head the embedding's LoRA too, so
    that training sees the change in both places, as the merged model has it. Save such a
    model with `tied_adapter_state`, which drops the head's copy again."""
    from peft import LoraConfig, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(adapter_dir)
    config.inference_mode = not trainable
    config.ensure_weight_tying = trainable
    state = load_adapter_state(Path(adapter_dir) / file_name)
    model = peft_model_for(base, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            result = set_peft_model_state_dict(model, state)
        except RuntimeError as e:  # torch's size mismatch: an adapter of another model
            raise ValueError(str(e).strip().splitlines()[-1].strip()) from e
    if result.unexpected_keys:
        raise ValueError(f"tensors the base has no place for: {result.unexpected_keys[:3]}")
    if trainable:
        fold_tied_gradients(model)
    return model


def fold_tied_gradients(model) -> list[torch.nn.Parameter]:
    """Make each tied LoRA factor of the LM head pass its gradient to the embedding's factor it
    is a transposed view of, so the optimizer takes one step for the pair. peft ties them by
    wrapping the views in parameters of their own; an optimizer would otherwise keep two Adam
    states for one weight and move it twice a step. Returns the aliases (their grads stay
    None, so optimizers skip them)."""
    head = _head_prefix(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owners = {p.untyped_storage().data_ptr(): p for n, p in named if not n.startswith(head)}
    aliases = []
    for name, p in named:
        owner = owners.get(p.untyped_storage().data_ptr())
        if not name.startswith(head) or owner is None or owner.shape != p.t().shape:
            continue

        def fold(alias: torch.nn.Parameter, owner: torch.nn.Parameter = owner) -> None:
            grad = alias.grad.t()
            if owner.grad is None:
                owner.grad = grad.clone()
            else:
                owner.grad.add_(grad)
            alias.grad = None

        p.register_post_accumulate_grad_hook(fold)
        aliases.append(p)
    return aliases


def _head_prefix(model) -> str:
    head = model.get_output_embeddings()
    return next(name for name, module in model.named_modules() if module is head) + "."


def tied_adapter_state(model) -> dict[str, torch.Tensor]:
    """The adapter tensors of a `load_adapter(..., trainable=True)` model, in the shipped
    form: a tied LM head's LoRA is the embedding's, so it is left out."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    if not getattr(model.get_base_model().config, "tie_word_embeddings", False):
        return {k: v.detach().clone() for k, v in state.items()}
    prefix = _head_prefix(model)
    return {k: v.detach().clone() for k, v in state.items() if not k.startswith(prefix)}


def merge_adapter(base, adapter_dir: Path, file_name: str = ADAPTER_FILE):
    """base with the adapter in adapter_dir merged into its weights. Raises ValueError when
    the adapter's tensors do not fit the base."""
    model = load_adapter(base, adapter_dir, file_name)
    with warnings.catch_warnings():  # peft warns of merging a tied embedding: see peft_model_for
        warnings.simplefilter("ignore", UserWarning)
        return model.merge_and_unload()
