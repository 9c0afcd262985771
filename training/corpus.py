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


def block_lead(tokenizer) -> tuple[int, ...]:
    """The token a block must start with: the BOS a tokenizer adds by default, else none.

    Gemma puts its attention sink on BOS: without it the Gemma 3 270M base scores 1.29 BPB on
    the first val episode instead of 1.13, and a fine-tune starts from that broken state.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return ()
    ids = tokenizer("a")["input_ids"]
    return (bos,) if ids and ids[0] == bos else ()


def utf8_bytes(episodes: list[str]) -> int:
    """Bytes of text the stream encodes (EOS separators are markup, not text)."""
    return sum(len(e.encode("utf-8")) for e in episodes)


class BlockDataset:
    """Fixed blocks of a token stream as {input_ids, attention_mask, labels}.

    A plain sequence (DataLoader takes any) keeps this module free of torch, so the CLI can
    reject a bad corpus before paying for the torch import.
    """

    def __init__(self, blocks: list[list[int]], unscored: int = 0):
        self.blocks = blocks
        self.unscored = unscored  # leading labels masked with -100 (not predicted here)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.blocks[i]
        labels = [-100] * self.unscored + ids[self.unscored :]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def pack_train(stream: list[int], block_size: int, lead: tuple[int, ...] = ()) -> BlockDataset:
    """Non-overlapping full blocks, each `lead` + text; the short tail is dropped (never padded)."""
    size = block_size - len(lead)
    n = len(stream) // size
    if n == 0:
        raise CorpusError(
            f"the training text is only {len(stream)} tokens, less than one block of {block_size}"
        )
    return BlockDataset([[*lead, *stream[i * size : (i + 1) * size]] for i in range(n)])


def pack_eval(stream: list[int], block_size: int, lead: tuple[int, ...] = ()) -> BlockDataset:
    """Blocks overlapping by one token so every token after the first is predicted exactly once.

    Each block is `lead` + text; the lead and the overlapping first text token are not scored
    (that token was the previous block's last prediction). The last block may be short; the
    collator pads it with labels -100 (ignored).
    """
    size = block_size - len(lead)
    blocks, start = [], 0
    while start < len(stream) - 1:
        blocks.append([*lead, *stream[start : start + size]])
        start += size - 1
    return BlockDataset(blocks, unscored=len(lead) + 1)
