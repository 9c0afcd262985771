"""Preference training: teach the writer to prefer the show over its own scenes (DPO, trl).

    python -m training judge openings --data corpus --split train --n 400 --seed 1 \
        --out spin/openings.jsonl
    python -m training judge write --openings spin/openings.jsonl --model seinfeld \
        --out spin/own.jsonl
    python -m training prefer --openings spin/openings.jsonl --scenes spin/own.jsonl \
        --out runs/prefer --base gemma3 --adapter sitcom/seinfeld_lora --time-budget 1
    python -m training ship runs/prefer --base gemma3 --served-vocab corpus --out ...

Fine-tuning on the transcripts has stopped paying: lower val BPB no longer wins readers
(training/EXPERIMENTS.md). What readers punish in our scenes (drift, loops, interchangeable
speakers) is in the writer's own samples, so they are what to push down. Each pair here is
one opening from the train split as the prompt, the show's real next lines chosen, and the
writer's own scene for that opening (as the bot serves it) rejected: self-play fine-tuning
(SPIN, Chen et al. 2024), one round of it. trl's DPOTrainer does the rest: it starts from the
shipped adapter, trains that same adapter, and keeps a frozen copy of it as the reference
(so beta measures the distance from today's writer, not from the base).

Or the pairs come from blind readers (`--pack`, repeatable; RLAIF): two scenes of the
writer's own for each opening, packed and judged as in training/JUDGING.md, the reader's
preferred scene chosen and the other rejected. Those are the differences readers actually
reward between samples of one writer, rather than the gap to the show. `--min-margin`
keeps only pairs where the chosen scene's summed scores beat the other's by that much.

    python -m training judge pack a.jsonl b.jsonl --out rl/pack1 --seed 1   # then judged
    python -m training prefer --pack rl/pack1 --pack rl/pack2 --out runs/rlaif ...

Both kinds can go into one run (`--pack` with `--openings`/`--scenes`): the readers' pairs
teach what they reward, the show's pairs (with `--sft-weight`, likelihood on the show's own
lines) hold the writer to the show, which is what val BPB measures. Tried on the shipped
writer, neither mix beat it (training/EXPERIMENTS.md, seventeenth session).

Two rounds of that (the second on scenes of the first round's writer) made the shipped
default (training/make_default.sh; training/EXPERIMENTS.md, fifteenth session).

Two speedups, the same model: when the adapter has a `served_vocab.json` (`training ship
--served-vocab`), the model trains with only those rows of its embedding and head, which is
the distribution the bot serves (llama.cpp gives every other token -inf). trl computes a
log-probability at every position through the head; with Gemma's 262,144 rows that head was
most of a CPU step, and the corpus uses ~25k of them. The token ids are mapped into the
kept rows after trl tokenizes; the adapter touches no embedding or head, so what is saved
fits the whole model. And bf16 autocast where the hardware has it (as in `finetune`).
`--sft-weight` adds trl's "sft" loss on the chosen side (RPO) to keep its likelihood up.

Two choices of ours: a completion is a run of script lines ending in a newline, and nothing
more, so the DPO tokenizer's EOS is the newline (trl appends an EOS to every completion that
does not end in one; scenes here are cut windows, not ends of text). And like `finetune`,
the run has a time budget, saves every --save-steps and resumes (--resume), since on 2 cores
it spans hours.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback

from sitcom.files import write_atomic
from sitcom.model.gguf_vocab import SERVED_VOCAB
from training.judge import SCORES, JudgeError, load_openings, load_scenes, read_jsonl
from training.verdicts import load_key, read_verdicts

WORK = ".work"  # OUT.work: the Trainer's checkpoints


class PreferError(ValueError):
    """Bad input to `training prefer`; the message is one user-facing line."""


@dataclass
class PreferConfig:
    out: Path  # the trained adapter (peft) and prefer.json
    openings: Path | None = None  # `judge openings` (prompt + the show's continuation)
    scenes: Path | None = None  # `judge write` for those openings (the writer's own scenes)
    pack: list[Path] | None = None  # judged packs (PACK/verdicts.jsonl) instead of the two
    chosen: Path | None = None  # scenes files of one writer, same openings: chosen[i] over
    rejected: Path | None = None  # rejected[i] (`judge pick` better / worse of a tournament)
    min_margin: int = 0  # with pack: chosen's summed scores minus the other's, at least
    adapter: Path = Path("sitcom/seinfeld_lora")  # where training starts (and the reference)
    base: str = "gemma3"
    beta: float = 0.1
    lr: float = 5e-6
    epochs: float = 1.0
    batch_size: int = 2
    grad_accum: int = 4
    max_length: int = 512
    seed: int = 0
    save_steps: int = 25
    full_vocab: bool = False  # train the whole head even when the adapter has served_vocab.json
    precision: str = "auto"  # auto: bf16 autocast on CUDA / AVX-512 BF16 CPUs, else fp32
    sft_weight: float = 0.0  # weight of trl's "sft" loss on the chosen side (0: plain DPO)
    time_budget: float = 0.0  # hours; 0: none
    resume: bool = False


def preference_pairs(openings: Path, scenes: Path) -> list[dict]:
    """{prompt, chosen, rejected} per opening that has a scene: the opening's lines, the
    show's continuation, the writer's lines; each a newline-terminated block of lines."""
    try:
        records = load_openings(openings)
        written = {r.get("id"): r for r in read_jsonl(scenes, "scenes file")}
    except JudgeError as e:
        raise PreferError(str(e)) from e
    pairs = []
    for r in records:
        scene = written.get(r["id"])
        lines = scene.get("lines") if isinstance(scene, dict) else None
        if not lines or not all(isinstance(x, str) for x in lines):
            continue
        pairs.append(
            {
                "prompt": "\n".join(r["opening"]) + "\n",
                "chosen": "\n".join(r["continuation"]) + "\n",
                "rejected": "\n".join(lines) + "\n",
            }
        )
    if not pairs:
        raise PreferError(f"no opening of {openings} has a scene in {scenes}")
    return pairs


def scene_pairs(chosen: Path, rejected: Path) -> list[dict]:
    """{prompt, chosen, rejected} per opening in both scenes files: e.g. the best and the
    worst of four scenes by a two-round tournament of blind pairs (`judge pick`). An opening
    whose two scenes are the same or empty is left out."""
    try:
        (_, better), (_, worse) = load_scenes(chosen), load_scenes(rejected)
    except JudgeError as e:
        raise PreferError(str(e)) from e
    pairs = []
    for i in sorted(set(better) & set(worse)):
        a, b = better[i], worse[i]
        if a["opening"] != b["opening"]:
            raise PreferError(f"opening {i} differs between {chosen} and {rejected}")
        if not a["lines"] or not b["lines"] or a["lines"] == b["lines"]:
            continue
        pairs.append(
            {
                "prompt": "\n".join(a["opening"]) + "\n",
                "chosen": "\n".join(a["lines"]) + "\n",
                "rejected": "\n".join(b["lines"]) + "\n",
            }
        )
    if not pairs:
        raise PreferError(f"{chosen} and {rejected} share no opening with two different scenes")
    return pairs


def judged_pairs(packs: list[Path], min_margin: int = 0) -> list[dict]:
    """{prompt, chosen, rejected} per judged pair of each pack (repeats left out): the
    scene the reader preferred chosen, the other rejected. A pair whose chosen scene's
    summed scores (coherence + humour + voice) beat the other's by less than `min_margin`
    is left out; so is one where a side has no lines or both sides are the same. Verdicts:
    PACK/verdicts.jsonl."""
    pairs = []
    try:
        for pack_dir in packs:
            key = load_key(pack_dir)
            verdicts = read_verdicts(pack_dir / "verdicts.jsonl", key["pairs"])
            scenes = {
                s: {r.get("id"): r for r in read_jsonl(Path(meta["file"]), "scenes file")}
                for s, meta in key["systems"].items()
            }
            for pid, p in key["pairs"].items():
                if p.get("repeat_of") is not None:
                    continue
                v = verdicts[pid]
                win, lose = v["better"], 3 - v["better"]
                margin = sum(v[f"scene{win}"][k] - v[f"scene{lose}"][k] for k in SCORES)
                chosen = scenes[p[f"scene{win}"]].get(p["opening"], {})
                rejected = scenes[p[f"scene{lose}"]].get(p["opening"], {})
                if (
                    margin < min_margin
                    or not chosen.get("lines")
                    or not rejected.get("lines")
                    or chosen["lines"] == rejected["lines"]  # two identical samples: no signal
                ):
                    continue
                pairs.append(
                    {
                        "prompt": "\n".join(chosen["opening"]) + "\n",
                        "chosen": "\n".join(chosen["lines"]) + "\n",
                        "rejected": "\n".join(rejected["lines"]) + "\n",
                    }
                )
    except JudgeError as e:
        raise PreferError(str(e)) from e
    except (KeyError, TypeError) as e:
        raise PreferError(f"{pack_dir}: its key and scene files do not match ({e})") from None
    if not pairs:
        raise PreferError(f"no judged pair in {', '.join(map(str, packs))} passes --min-margin")
    return pairs


def prefer(cfg: PreferConfig) -> dict:
    """Train, save the adapter to cfg.out, return the run's card (also OUT/prefer.json)."""
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from sitcom.model.catalog import base_hf_dir
    from training.finetune import choose_precision

    if cfg.out.exists() and not cfg.resume:
        raise PreferError(f"{cfg.out} exists; pass --resume to go on, or another --out")
    if not (cfg.pack or cfg.openings or cfg.scenes or cfg.chosen or cfg.rejected):
        raise PreferError(
            "give --openings and --scenes, --pack (judged pairs), or --chosen and --rejected"
        )
    if bool(cfg.openings) != bool(cfg.scenes):
        raise PreferError("--openings and --scenes go together")
    if bool(cfg.chosen) != bool(cfg.rejected):
        raise PreferError("--chosen and --rejected go together")
    judged = judged_pairs(cfg.pack, cfg.min_margin) if cfg.pack else []
    picked = scene_pairs(cfg.chosen, cfg.rejected) if cfg.chosen and cfg.rejected else []
    show = preference_pairs(cfg.openings, cfg.scenes) if cfg.openings and cfg.scenes else []
    pairs = judged + picked + show  # both kinds given: mixed (shuffled by the Trainer's sampler)
    work = cfg.out.with_name(cfg.out.name + WORK)
    last = _last_checkpoint(work) if cfg.resume else None

    hf = base_hf_dir(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(hf)
    tokenizer.eos_token = "\n"  # a completion ends with its last line (module docstring)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    full_size = model.get_output_embeddings().weight.shape[0]
    keep = None if cfg.full_vocab else served_ids(cfg.adapter, full_size)
    outside = 0  # pairs left out: a token outside the served vocabulary
    if keep is not None:
        cut_vocab(model, keep)
    model = PeftModel.from_pretrained(model, str(cfg.adapter), is_trainable=True)
    precision = choose_precision(cfg.precision)
    losses = ["sigmoid"] + (["sft"] if cfg.sft_weight > 0 else [])

    args = DPOConfig(
        output_dir=str(work),
        beta=cfg.beta,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        max_length=cfg.max_length,
        lr_scheduler_type="cosine",
        warmup_steps=2,
        logging_steps=1,
        save_steps=cfg.save_steps,
        save_total_limit=2,
        seed=cfg.seed,
        report_to=[],
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        loss_type=losses,
        loss_weights=[1.0, cfg.sft_weight][: len(losses)],
        activation_checkpointing=False,  # 270M and 4 sequences fit; recomputing costs time
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning is for a GPU's copies
        disable_tqdm=True,
    )
    budget = TimeBudget(cfg.time_budget * 3600)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[budget],
    )
    if keep is not None:  # trl tokenized with the whole vocabulary: ids into the kept rows
        trainer.train_dataset, outside = to_kept_ids(trainer.train_dataset, keep, full_size)
        kept = keep.tolist()  # padding is masked out; any kept row will do when pad is cut
        pad = kept.index(tokenizer.pad_token_id) if tokenizer.pad_token_id in kept else 0
        trainer.data_collator = DataCollatorForPreference(pad_token_id=pad)
    trainer.train(resume_from_checkpoint=last)
    trainer.model.save_pretrained(
        str(cfg.out), selected_adapters=["default"], save_embedding_layers=False
    )
    if keep is not None:  # the head it was trained for goes with it (gguf-adapter serves it)
        shutil.copyfile(cfg.adapter / SERVED_VOCAB, cfg.out / SERVED_VOCAB)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    runtime = [h["train_runtime"] for h in trainer.state.log_history if "train_runtime" in h]
    card = {
        "method": "DPO (trl), "
        + "; ".join(
            (
                ["chosen: the blind reader's preferred scene of two of the writer's own"]
                * bool(judged)
            )
            + (["chosen / rejected: the writer's scenes of --chosen / --rejected"] * bool(picked))
            + (["chosen: the show's continuation, rejected: the writer's own scene"] * bool(show))
        ),
        "pairs": len(pairs) - outside,
        "pairs_judged": len(judged),  # before the served-vocabulary cut
        "pairs_picked": len(picked),
        "pairs_show": len(show),
        "pairs_outside_served_vocab": outside,
        "head_rows": int(trainer.model.get_output_embeddings().weight.shape[0]),
        "precision": precision,
        "steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "stopped_by_time_budget": budget.budget_hit,
        "train_seconds": round(runtime[-1], 1) if runtime else None,  # this call's, not resumed
        "last_log": logs[-1] if logs else None,
        "settings": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    write_atomic(cfg.out / "prefer.json", json.dumps(card, indent=2) + "\n")
    return card


def served_ids(adapter: Path, full_size: int):
    """The ascending full-vocabulary ids in ADAPTER/served_vocab.json as a LongTensor, or
    None when the adapter has none (then the whole head trains)."""
    import torch

    from sitcom.model.errors import ModelLoadError
    from sitcom.model.gguf_vocab import read_served_vocab

    path = Path(adapter) / SERVED_VOCAB
    if not path.is_file():
        return None
    try:
        ids = read_served_vocab(path, full_size)
    except ModelLoadError as e:
        raise PreferError(str(e)) from None
    return torch.from_numpy(ids)


def cut_vocab(model, keep) -> None:
    """Keep only rows `keep` of the input embedding and of the output head (tied or not):
    the model's vocabulary becomes len(keep) tokens, row i being full-vocabulary id keep[i]."""
    import torch

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head.weight is emb.weight
    emb.weight = torch.nn.Parameter(emb.weight.detach()[keep].clone(), requires_grad=False)
    emb.num_embeddings = len(keep)
    if tied:
        head.weight = emb.weight
    else:
        head.weight = torch.nn.Parameter(head.weight.detach()[keep].clone(), requires_grad=False)
    if head.bias is not None:
        head.bias = torch.nn.Parameter(head.bias.detach()[keep].clone(), requires_grad=False)
    head.out_features = len(keep)
    model.config.get_text_config().vocab_size = len(keep)


def to_kept_ids(dataset, keep, full_size: int):
    """(trl's tokenized pairs with each full-vocabulary id replaced by its row in `keep`, how
    many pairs were left out for a token outside it). Text retokenized across line breaks
    can merge into a token the writer never emits (2 of 275 pairs in round 1); PreferError
    when no pair is left."""
    index = [-1] * full_size
    for row, token in enumerate(keep.tolist()):
        index[token] = row
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")

    def remap(example: dict) -> dict:
        return {c: [index[t] if 0 <= t < full_size else -1 for t in example[c]] for c in columns}

    mapped = dataset.map(remap)
    kept = mapped.filter(lambda example: all(-1 not in example[c] for c in columns))
    if not len(kept):
        raise PreferError(
            "every pair has a token the adapter's served vocabulary lacks; pass --full-vocab"
        )
    return kept, len(mapped) - len(kept)


class TimeBudget(TrainerCallback):
    """Stop (and save) after `seconds` of training; 0: never."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.budget_hit = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds > 0 and time.monotonic() - self.start >= self.seconds:
            self.budget_hit = True
            control.should_training_stop = control.should_save = True
        return control


def _last_checkpoint(work: Path) -> str | None:
    steps = [(int(p.name.split("-")[1]), p) for p in work.glob("checkpoint-*") if p.is_dir()]
    return str(max(steps)[1]) if steps else None


def summary(card: dict) -> str:
    log = card.get("last_log") or {}
    acc = log.get("rewards/accuracies")
    margin = log.get("rewards/margins")
    parts = [f"{card['steps']}/{card['max_steps']} steps on {card['pairs']} pairs"]
    if isinstance(log.get("loss"), float) and math.isfinite(log["loss"]):
        parts.append(f"loss {log['loss']:.3f}")
    if acc is not None:
        parts.append(f"reward accuracy {acc:.2f}")
    if margin is not None:
        parts.append(f"margin {margin:.3f}")
    return ", ".join(parts)
