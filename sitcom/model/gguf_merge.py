"""A LoRA adapter GGUF merged into its GGUF base: one model file that llama.cpp serves at the
base's speed.

llama.cpp can add an adapter's low-rank change at run time (sitcom.model.lora_gguf), but that
costs every decode step two extra small matmuls per adapted layer (Gemma 3 270M, rank 32,
2 cores: one sequence decodes 13 % slower than from the merge, a scene as served 4 %). A
GGUF-adapter checkpoint therefore also holds the merge, made once when the checkpoint is
written: each adapted weight is dequantized, gets alpha / r · B·A added (the adapter GGUF's
factors, already in the base's row order, so no re-permutation here) and is stored as Q8_0
(gguf-py quantizes no k-quants; Q8_0's rounding is far below the base's own Q4_K/Q5_0
error); every other tensor and all metadata are copied as they are, except where the
checkpoint names its served tokens (sitcom.model.gguf_vocab: the embedding/head rows and the
tokenizer keep those alone). llama.cpp has this tool
(llama-export-lora) but llama-cpp-python does not expose it, so the merge is written here
on gguf-py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from sitcom.files import atomic_path
from sitcom.model.errors import ModelLoadError
from sitcom.model.gguf_vocab import (
    KEY_IDS,
    KEY_SIZE,
    cut_field,
    cut_tensor,
    gguf_vocab_size,
    kept_rows,
    read_served_vocab,
)

MERGED_GGUF = "merged.gguf"
_INTERNAL = ("GGUF.", "general.architecture")  # written by GGUFWriter itself


def merge_lora_gguf(
    base_gguf: str | os.PathLike,
    adapter_gguf: str | os.PathLike,
    out: str | os.PathLike,
    served_vocab: str | os.PathLike | None = None,
) -> Path:
    """Write `base_gguf` with the llama.cpp adapter `adapter_gguf` merged in to `out`
    (atomically); returns `out`. With `served_vocab` (a SERVED_VOCAB file), only those
    tokens' rows are kept (sitcom.model.gguf_vocab). ModelLoadError (one line) when the
    adapter or the vocabulary does not fit."""
    import gguf

    base = gguf.GGUFReader(str(base_gguf))
    keep = None
    if served_vocab is not None:
        ids = read_served_vocab(served_vocab, gguf_vocab_size(base))
        keep = kept_rows(base, ids)
    adapter = gguf.GGUFReader(str(adapter_gguf))
    alpha_field = adapter.fields.get(gguf.Keys.Adapter.LORA_ALPHA)
    if alpha_field is None:
        raise ModelLoadError(f"{adapter_gguf} is not a LoRA adapter GGUF (no alpha)")
    alpha = float(alpha_field.contents())
    factors = {t.name: np.asarray(t.data, dtype=np.float32) for t in adapter.tensors}
    names = {t.name for t in base.tensors}
    unknown = {n.rsplit(".", 1)[0] for n in factors} - names
    if unknown:
        raise ModelLoadError(f"{adapter_gguf}: {sorted(unknown)[0]} is not in {base_gguf}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, str(base.fields["general.architecture"].contents()))
        writer.data_alignment = base.alignment
        for field in base.fields.values():
            if field.name.startswith(_INTERNAL):
                continue
            array = field.types[0] == gguf.GGUFValueType.ARRAY and len(field.types) > 1
            sub = field.types[-1] if array else None
            value = field.contents()
            if keep is not None:
                value = cut_field(field.name, value, keep)
            writer.add_key_value(field.name, value, field.types[0], sub)
        if keep is not None:
            writer.add_uint32(KEY_SIZE, gguf_vocab_size(base))
            writer.add_array(KEY_IDS, [int(i) for i in keep])
        for tensor in base.tensors:
            data, qtype = np.asarray(tensor.data), tensor.tensor_type
            a = factors.get(f"{tensor.name}.lora_a")
            if a is not None:
                b = factors[f"{tensor.name}.lora_b"]
                weight = gguf.quants.dequantize(data, qtype).reshape(b.shape[0], a.shape[1])
                weight = weight + (alpha / a.shape[0]) * (b @ a)
                qtype = _merged_type(qtype, weight.shape[1])
                data = gguf.quants.quantize(weight.astype(np.float32), qtype)
            if keep is not None:
                data = cut_tensor(tensor.name, data, keep)
            writer.add_tensor(tensor.name, data, raw_shape=data.shape, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _merged_type(original, columns: int):
    """Q8_0 for a quantized weight (F16 where its rows are not whole Q8_0 blocks); a float
    weight keeps its float type."""
    from gguf import GGMLQuantizationType as Q

    if original in (Q.F32, Q.F16, Q.BF16):
        return original
    return Q.Q8_0 if columns % 32 == 0 else Q.F16
