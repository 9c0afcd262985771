"""Ship a trained LoRA adapter as the bot's default (sitcom/seinfeld_lora).

    python -m training ship RUN.work/checkpoint-N --base gemma3 --card RUN/checkpoint.json \
        --val val.json --out sitcom/seinfeld_lora --overwrite

A LoRA run (--lora, or --init-adapter) leaves peft's adapter in its Trainer checkpoints. This
writes the adapter as the bot loads it: peft's config (its base path replaced by the base's
name) and the LoRA factors in bf16 (sitcom.model.lora_gguf.write_peft_copy: what llama.cpp
and the transformers fallback both serve), and a card with the run's facts (from the export's
checkpoint.json), the whole-val metrics (`training evaluate --json`), and the sha256 of
every file the bot checks before serving it (sitcom.model.catalog.verified_adapter). The
bot builds adapter.gguf from it in its cache on first use. Files in OUT that are not the
adapter's (MODEL_CARD.md, NOTICE) are kept.

On SmolLM2 a full fine-tune ships through `training extract` instead (SVD into a LoRA).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from sitcom.files import publish_dir, read_json
from sitcom.model.adapters import ADAPTER_CARD, ADAPTER_FILE
from sitcom.model.catalog import adapter_file_hashes, base_gguf_for, base_hf_dir, file_sha256
from sitcom.model.gguf_vocab import SERVED_VOCAB, write_served_vocab
from sitcom.model.lora_gguf import PEFT_CONFIG, PEFT_DTYPE, export_lora_gguf, write_peft_copy

MAX_ADAPTER_MB = 25.0  # the repository's budget for the shipped default
# Replaced (or dropped: a served vocabulary belongs to the adapter it came with); anything
# else is kept.
ADAPTER_OWN = {ADAPTER_CARD, PEFT_CONFIG, ADAPTER_FILE, SERVED_VOCAB}


def _trainer_facts(adapter: Path) -> dict:
    """Step, tokens and val metrics of a Trainer checkpoint-N (its trainer_state.json): the
    run's export card describes its last or best step, which need not be the one shipped."""
    path = adapter / "trainer_state.json"
    if not path.is_file():
        return {}
    state = read_json(path)
    step = state.get("global_step")
    facts = {"steps": step, "best_step": step, "tokens_seen": state.get("num_input_tokens_seen")}
    evals = [h for h in state.get("log_history", []) if h.get("step") == step and "eval_bpb" in h]
    if evals:
        loss = evals[-1].get("eval_nll", evals[-1].get("eval_loss"))
        facts.update(val_loss=loss, val_bpb=evals[-1]["eval_bpb"], val_ppl=math.exp(loss))
    return {k: v for k, v in facts.items() if v is not None}


def corpus_vocab_of(data: Path, base: str) -> tuple[list[int], int]:
    """(ids, vocabulary size): the tokens of the corpus in `data` (train and val, the blocks'
    lead, the tokenizer's special tokens) under `base`'s tokenizer, as `finetune
    --corpus-vocab` computes them."""
    from transformers import AutoTokenizer

    from training.corpus import block_lead, load_corpus, token_stream
    from training.corpus_vocab import corpus_token_ids

    tokenizer = AutoTokenizer.from_pretrained(base_hf_dir(base))
    corpus = load_corpus(data)
    streams = [token_stream(corpus.train + corpus.val, tokenizer), list(block_lead(tokenizer))]
    return corpus_token_ids(streams, tokenizer).tolist(), len(tokenizer)


class ShipError(ValueError):
    """An adapter that cannot ship; the message is user-facing."""


def ship(
    adapter: Path,
    out: Path,
    base: str,
    card: Path | None = None,
    val: Path | None = None,
    overwrite: bool = False,
    served_vocab: Path | None = None,
) -> dict:
    """Write the shipped default into `out` (atomically) and return its card. With
    `served_vocab` (a corpus directory: what a `--corpus-vocab` run trained its softmax
    over), the tokens that corpus uses are written beside it (SERVED_VOCAB), and the bot
    serves a head of those tokens only (sitcom.model.gguf_vocab)."""
    adapter, out = Path(adapter), Path(out)
    if out.exists() and not overwrite:
        raise ShipError(f"{out} exists; pass --overwrite to replace it")
    source = {**(read_json(card) if card else {}), **_trainer_facts(adapter)}
    metrics = read_json(val)["val"] if val else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        peft = write_peft_copy(adapter, tmp)
        config = json.loads((tmp / PEFT_CONFIG).read_text())
        config["base_model_name_or_path"] = base  # not the trainer's local path
        if isinstance(config.get("target_modules"), list):  # a set in peft: a stable order
            config["target_modules"] = sorted(config["target_modules"])
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Fails here, not in the bot, when the adapter does not fit the base's GGUF.
        export_lora_gguf(tmp, base_gguf_for(base), tmp / "check.gguf").unlink()
        if served_vocab is not None:
            ids, size = corpus_vocab_of(served_vocab, base)
            write_served_vocab(tmp / SERVED_VOCAB, ids, size)
        weights = tmp / peft["weights"]
        size_mb = weights.stat().st_size / 1e6
        if size_mb > MAX_ADAPTER_MB:
            raise ShipError(f"the adapter is {size_mb:.1f} MB, over the {MAX_ADAPTER_MB:.0f} MB")
        shipped = {
            **{k: v for k, v in source.items() if k != "settings"},
            "base_model": base,
            "form": f"LoRA r={config.get('r')} alpha={config.get('lora_alpha')} on "
            f"{', '.join(sorted(config.get('target_modules') or []))}, trained as an adapter",
            "lora": True,
            "rank": config.get("r"),
            "adapter_dtype": PEFT_DTYPE,
            "adapter_mb": round(size_mb, 2),
            "adapter_file": weights.name,
            "adapter_sha256": file_sha256(weights),
            "trained_from": str(adapter),
            "train_wall_minutes": round(source.get("train_seconds_this_run", 0) / 60, 1),
            "finetune_settings": source.get("settings"),
        }
        if served_vocab is not None:
            shipped["served_vocab"] = {"corpus": str(served_vocab), "tokens": len(ids)}
        if metrics is not None:
            shipped["adapter_val"] = metrics
        shipped["adapter_files"] = adapter_file_hashes(tmp)
        (tmp / ADAPTER_CARD).write_text(json.dumps(shipped, indent=2) + "\n")
        if out.is_dir():  # the docs beside the adapter stay
            for path in out.iterdir():
                if (
                    path.is_file()
                    and path.name not in ADAPTER_OWN
                    and not path.name.startswith("adapter_model")
                ):
                    shutil.copy2(path, tmp / path.name)
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return shipped
