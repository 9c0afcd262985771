"""The served vocabulary: a writer is served with the head of the tokens it was trained to write.

Gemma 3's head has 262,144 rows; our transcripts use ~25,000 of those tokens, and a writer
trained with `finetune --corpus-vocab` learned its softmax over those alone. At every decode
step llama.cpp still computes (and reads the weights of) the whole head: 168 M of Gemma 3
270M's ~270 M multiply-adds a token, and the larger part of the bytes it reads. So a
checkpoint that names its tokens (SERVED_VOCAB beside its adapter: `training ship
--served-vocab`) is served from a GGUF whose embedding/head rows, and whose tokenizer
entries, are those tokens only (the merge writes it: sitcom.model.gguf_merge), which halves
a decode step on 2 cores. The file records the kept tokens' ids in the full vocabulary
(KEY_IDS, KEY_SIZE), and sitcom.model.llamacpp maps ids on the way in and out, so every
caller still works in the tokenizer's own ids: a token outside the kept set reads as the
unknown token, and its logit is -inf (never written).

The tokenizer inside that GGUF holds the kept tokens only, so llama.cpp's own tokenization of
arbitrary text differs from the full tokenizer's: the bot tokenizes with the HF tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from sitcom.files import write_atomic
from sitcom.model.errors import ModelLoadError

SERVED_VOCAB = "served_vocab.json"  # beside an adapter: {"vocab_size": N, "ids": [...]}
KEY_SIZE = "sitcom.vocab.full_size"  # in a cut GGUF: the full vocabulary's size
KEY_IDS = "sitcom.vocab.ids"  # in a cut GGUF: the full-vocabulary id of each row, ascending
_ROWS = ("token_embd.weight", "output.weight")  # tensors with one row per token
_TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def write_served_vocab(path: str | os.PathLike, ids, vocab_size: int) -> Path:
    """Write the token ids a writer may write (of a vocabulary of `vocab_size`) to `path`."""
    ids = sorted({int(i) for i in ids})
    if not ids or ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"served ids must be in [0, {vocab_size})")
    write_atomic(Path(path), json.dumps({"vocab_size": vocab_size, "ids": ids}) + "\n")
    return Path(path)


def read_served_vocab(path: str | os.PathLike, vocab_size: int) -> np.ndarray:
    """The ascending ids in `path` (SERVED_VOCAB), checked against a vocabulary of
    `vocab_size`; ModelLoadError, one line, when it is unreadable or does not fit."""
    try:
        data = json.loads(Path(path).read_text())
        size, ids = int(data["vocab_size"]), np.asarray(data["ids"], dtype=np.int64)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path} is unreadable ({type(e).__name__})") from e
    if size != vocab_size:
        raise ModelLoadError(f"{path} is for a vocabulary of {size:,}, the base has {vocab_size:,}")
    if ids.ndim != 1 or not len(ids) or ids[0] < 0 or ids[-1] >= size or (np.diff(ids) <= 0).any():
        raise ModelLoadError(f"{path}: ids must ascend within [0, {size:,})")
    return ids


def gguf_vocab_size(reader) -> int:
    """The number of tokens of a GGUF's tokenizer (a gguf.GGUFReader)."""
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def kept_rows(reader, ids: np.ndarray) -> np.ndarray:
    """`ids` plus the tokenizer's own special tokens (BOS, EOS, UNK, padding ...): the rows a
    cut GGUF keeps, ascending."""
    special = [
        int(field.contents())
        for name, field in reader.fields.items()
        if name.startswith("tokenizer.ggml.") and name.endswith("_token_id")
    ]
    return np.union1d(ids, np.asarray(special, dtype=np.int64))


def cut_field(name: str, value, keep: np.ndarray):
    """A GGUF metadata value as the cut file holds it: per-token arrays keep the kept rows,
    special-token ids are renumbered."""
    if name in _TOKEN_ARRAYS:
        return [value[i] for i in keep]
    if name.startswith("tokenizer.ggml.") and name.endswith("_token_id"):
        return int(np.searchsorted(keep, value))
    return value


def cut_tensor(name: str, data: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """A tensor's raw rows as the cut file holds them (the embedding and head: the kept rows)."""
    return np.ascontiguousarray(data[keep]) if name in _ROWS else data


def served_vocab_of(gguf_path: str | os.PathLike) -> tuple[int, np.ndarray, int] | None:
    """(full vocabulary size, full ids of the rows, the unknown token's row or 0) of a cut
    GGUF; None for a whole one."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    size, ids = reader.fields.get(KEY_SIZE), reader.fields.get(KEY_IDS)
    if size is None or ids is None:
        return None
    unk = reader.fields.get("tokenizer.ggml.unknown_token_id")
    unknown = int(unk.contents()) if unk is not None else 0
    return int(size.contents()), np.asarray(ids.contents(), dtype=np.int64), unknown
