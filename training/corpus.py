"""Read a corpus directory (train.txt, val.txt, manifest.json) and pack it into token blocks.

Episodes are joined with the tokenizer's EOS so the model learns where a scene ends, then
cut into fixed-size blocks with labels = inputs. Training blocks are all full-size, so no
padding exists and nothing masks the EOS (a pad-masking collator would, because many
tokenizers use EOS as pad).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from sitcom.scenes.script import END_OF_TEXT, KNOWN_SPEAKERS


class CorpusError(ValueError):
    """A corpus directory that cannot be used; the message is user-facing."""


@dataclass(frozen=True)
class Corpus:
    root: Path
    train: list[str]
    val: list[str]
    manifest_sha256: str | None
    speakers: tuple[str, ...]


def split_episodes(text: str) -> list[str]:
    """Text with END_OF_TEXT lines between episodes -> stripped, non-empty episodes."""
    episodes = []
    for chunk in text.replace("\r\n", "\n").split(END_OF_TEXT):
        chunk = chunk.strip()
        if chunk:
            episodes.append(chunk)
    return episodes


def load_corpus(root: str | Path, splits: tuple[str, ...] = ("train", "val")) -> Corpus:
    """Episodes of the named splits (others come back empty); CorpusError when unusable."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"corpus directory {root} does not exist")
    parts: dict[str, list[str]] = {"train": [], "val": []}
    for split in splits:
        path = root / f"{split}.txt"
        if not path.is_file():
            raise CorpusError(f"corpus directory {root} has no {split}.txt")
        try:
            parts[split] = split_episodes(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CorpusError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not parts[split]:
            raise CorpusError(f"{path} holds no episodes")
    manifest = root / "manifest.json"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
    return Corpus(root, parts["train"], parts["val"], sha, _manifest_speakers(manifest))


def _manifest_speakers(manifest: Path) -> tuple[str, ...]:
    """main_cast + top_speakers (data/prepare.py's manifest), else the default cast."""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return KNOWN_SPEAKERS
    if not isinstance(data, dict):
        return KNOWN_SPEAKERS
    names: list[str] = []
    for key in ("main_cast", "top_speakers", "speakers"):
        value = data.get(key)
        if isinstance(value, dict | list):
            names.extend(s.upper() for s in value if isinstance(s, str))
    return tuple(dict.fromkeys(names)) or KNOWN_SPEAKERS


def token_stream(episodes: list[str], tokenizer) -> list[int]:
    """EOS + ep1 + EOS + ep2 + ... + EOS: the leading EOS lets the first token be predicted too."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CorpusError("the tokenizer has no EOS token to separate episodes")
    ids = [eos]
    encoded = tokenizer(episodes, add_special_tokens=False)["input_ids"]
    for episode in encoded:
        ids.extend(episode)
        ids.append(eos)
    return ids


def utf8_bytes(episodes: list[str]) -> int:
    """Bytes of text the stream encodes (EOS separators are markup, not text)."""
    return sum(len(e.encode("utf-8")) for e in episodes)


class BlockDataset:
    """Fixed blocks of a token stream as {input_ids, attention_mask, labels}.

    A plain sequence (DataLoader takes any) keeps this module free of torch, so the CLI can
    reject a bad corpus before paying for the torch import.
    """

    def __init__(self, blocks: list[list[int]]):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.blocks[i]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}


def pack_train(stream: list[int], block_size: int) -> BlockDataset:
    """Non-overlapping full blocks; the tail shorter than a block is dropped (never padded)."""
    n = len(stream) // block_size
    if n == 0:
        raise CorpusError(
            f"the training text is only {len(stream)} tokens, less than one block of {block_size}"
        )
    return BlockDataset([stream[i * block_size : (i + 1) * block_size] for i in range(n)])


def pack_eval(stream: list[int], block_size: int) -> BlockDataset:
    """Blocks overlapping by one token so every token after the first is predicted exactly once.

    The last block may be short; the collator pads it with labels -100 (ignored).
    """
    blocks, start = [], 0
    while start < len(stream) - 1:
        blocks.append(stream[start : start + block_size])
        start += block_size - 1
    return BlockDataset(blocks)
