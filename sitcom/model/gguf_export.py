"""Write a Llama-architecture HF checkpoint as GGUF so llama.cpp can serve it.

The command line is `python -m training.gguf_export`; the writer lives here because the
bot also exports (the shipped tuned default is merged and exported on first start) and the
bot never imports training code.

Writes CHECKPOINT/model.gguf by default; the bot serves a checkpoint through llama.cpp
when that file is there (see sitcom/model/llamacpp.py).

Hand-written because llama.cpp's convert_hf_to_gguf.py ships in no installed package; the
`gguf` package still does the heavy lifting: the file writer, the HF->GGUF tensor name map
and the Q8_0/Q4_1 quantizers. What is left here is what that script adds on top for Llama:
the model/tokenizer metadata and the rotary row permutation of the q/k projections.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from sitcom.files import atomic_path

QTYPES = ("q8_0", "f16", "f32", "q4_1")


class ExportError(ValueError):
    """A checkpoint this exporter cannot write; the message is user-facing."""


def export_gguf(
    model,
    tokenizer,
    out_path: str | os.PathLike,
    qtype: str = "q8_0",
) -> Path:
    """Write a loaded model and its tokenizer as GGUF (atomically) and return the path
    written. The objects are exported as they are in memory: a model just merged or trained
    is not saved and loaded again first (training.gguf_export.export_gguf takes a
    checkpoint directory, for the command line)."""
    import gguf

    if qtype not in QTYPES:
        raise ExportError(f"unknown qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    config = model.config
    if config.model_type != "llama":
        raise ExportError(
            f"only Llama-architecture models export to GGUF (got {config.model_type})"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(
            f"rope scaling {rope.get('rope_type')!r} is not supported by this exporter"
        )
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, "llama")
        _add_model_metadata(writer, config, rope_theta, qtype)
        _add_tokenizer(writer, tokenizer, config)
        _add_tensors(writer, model, config, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _add_model_metadata(writer, config, rope_theta: float, qtype: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(Path(str(getattr(config, "_name_or_path", "") or "sitcom")).name or "sitcom")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
    }[qtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _pre_tokenizer_name(spec: dict | None) -> str:
    """llama.cpp's name for the HF pre-tokenizer: it decides how text is split before BPE."""
    if spec is None:
        raise ExportError("tokenizer has no pre-tokenizer; llama.cpp would split text differently")
    parts = spec.get("pretokenizers", [spec]) if spec["type"] == "Sequence" else [spec]
    kinds = [p["type"] for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp spells the GPT-2 regex split this way
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM's own tokenizer.json: digits one by one, then GPT-2 regex
    raise ExportError(f"unsupported pre-tokenizer {kinds}; llama.cpp would tokenize differently")


def _add_tokenizer(writer, tokenizer, config) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(
            f"only byte-level BPE tokenizers are supported (got {spec['model']['type']})"
        )
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    # llama.cpp wants exactly vocab_size entries; ids the tokenizer lacks are padding rows.
    for i in range(config.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED
            )
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        # sitcom.model.catalog.load_tokenizer pads with EOS when a tokenizer names no pad token
        (writer.add_pad_token_id, _pad_token_id(tokenizer)),
        (writer.add_unk_token_id, tokenizer.unk_token_id),
    ):
        if token_id is not None:
            setter(token_id)
    writer.add_add_bos_token(False)  # the corpus format never starts with a BOS token


def _pad_token_id(tokenizer) -> int | None:
    return tokenizer.pad_token_id if tokenizer.pad_token is not None else tokenizer.eos_token_id


def permute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows as [first halves | second halves] per head; GGML interleaves pairs."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _add_tensors(writer, model, config, qtype: str) -> None:
    import gguf
    from gguf.quants import quantize

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wanted = {
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
        "f16": gguf.GGMLQuantizationType.F16,
        "f32": gguf.GGMLQuantizationType.F32,
    }[qtype]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            if "rotary_emb" in hf_name:
                continue  # recomputed from rope.freq_base
            raise ExportError(f"no GGUF name for tensor {hf_name}")
        data = tensor.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = permute_rotary(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = permute_rotary(data, config.num_key_value_heads)

        qt = wanted
        if data.ndim == 1:
            qt = gguf.GGMLQuantizationType.F32  # norms stay exact, as llama.cpp's converter does
        elif qt == gguf.GGMLQuantizationType.Q4_1 and name == "token_embd.weight":
            qt = (
                gguf.GGMLQuantizationType.Q8_0
            )  # as in the packaged Q4_1 file: embeddings are touchy
        block = gguf.GGML_QUANT_SIZES[qt][0]
        if data.shape[-1] % block:
            qt = gguf.GGMLQuantizationType.F16  # rows must be whole quant blocks
        if qt == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, data.astype(np.float32))
        elif qt == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(data, qt), raw_dtype=qt)


# GGUF value types: sizes of the fixed-width ones; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_problem(path: str | os.PathLike) -> str | None:
    """None when `path` is a whole GGUF file: its header, metadata and tensor table parse
    and every tensor's data lies inside the file; else what is wrong, in a few words.

    Reads only the header (not the tensor data), stepping over the metadata by hand:
    gguf.GGUFReader parses every field first, the 49k-entry vocabulary included (2-4 s).
    It catches truncation and a damaged header; damaged tensor data is the self-test's job
    (sitcom.model.llamacpp_check ties its verdict to the file's size and mtime). Remembered per
    process while the file's size and mtime stay the same."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _gguf_checked:
        _gguf_checked.clear()  # one entry per file served is plenty
        _gguf_checked[key] = _gguf_problem(path, st.st_size)
    return _gguf_checked[key]


_gguf_checked: dict[tuple, str | None] = {}


def _gguf_problem(path: Path, size: int) -> str | None:
    try:
        with open(path, "rb") as f:
            if size < 24:
                return "not a GGUF file" if f.read(4) != b"GGUF" else "truncated (header)"
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _gguf_layout_problem(buf, size)
    except OSError as e:
        return f"unreadable ({e.strerror or e})"


def _gguf_layout_problem(buf: mmap.mmap, size: int) -> str | None:
    import gguf

    pos = 0

    def read(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize("<" + fmt)
        return value

    def skip(n: int) -> None:
        nonlocal pos
        if n < 0 or pos + n > size:
            raise EOFError
        pos += n

    def string() -> bytes:
        nonlocal pos
        n = read("Q")
        skip(n)
        return bytes(buf[pos - n : pos])

    def value(vtype: int):
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = read("I"), read("Q")
            if etype in _GGUF_SIZES:
                skip(_GGUF_SIZES[etype] * count)
            elif etype == 8 and count <= size:
                for _ in range(count):
                    n = struct.unpack_from("<Q", buf, pos)[0]
                    pos += 8 + n
                if pos > size:
                    raise EOFError
            else:
                raise ValueError(f"unsupported array type {etype}")
        elif vtype in (4, 5):
            return read("I")
        elif vtype in _GGUF_SIZES:
            skip(_GGUF_SIZES[vtype])
        else:
            raise ValueError(f"unknown value type {vtype}")
        return None

    try:
        if bytes(buf[:4]) != b"GGUF":
            return "not a GGUF file"
        pos = 4
        if read("I") not in (2, 3):
            return "unsupported GGUF version"
        n_tensors, n_kv = read("Q"), read("Q")
        if n_tensors > size or n_kv > size:
            return "damaged header"
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = string()
            got = value(read("I"))
            if key == b"general.alignment" and isinstance(got, int) and got > 0:
                alignment = got
        tensors = []
        for _ in range(n_tensors):
            name = string()
            n_dims = read("I")
            if not 1 <= n_dims <= 4:
                return f"damaged tensor table ({name[:60]!r})"
            dims = [read("Q") for _ in range(n_dims)]
            qtype, offset = read("I"), read("Q")
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
            count = int(np.prod(dims, dtype=np.float64))
            tensors.append((offset, count // block * type_size))
        start = -(-pos // alignment) * alignment
    except (EOFError, struct.error):
        return "truncated (header)"
    except (ValueError, KeyError):
        return "damaged header"
    end = max((start + offset + nbytes for offset, nbytes in tensors), default=start)
    if end > size:
        return f"truncated ({size} bytes, its tensors need {end})"
    return None
