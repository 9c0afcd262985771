"""Fine-tune a causal LM on the corpus with transformers' Trainer and export a checkpoint.

Layout: the finished checkpoint goes to OUT (written to a temp dir, then renamed into
place); Trainer's intermediate checkpoints, metrics.jsonl and loss.png live in the sibling
work dir `OUT.work`, which `--resume` reads and which is removed after a successful export
(unless --keep-work).

Launched by torchrun or `accelerate launch`, every process runs this same code and Trainer
trains data-parallel (DDP: gloo on CPU, nccl on GPUs); only global rank 0 prepares and
deletes in OUT.work, prints, plots and exports, while the other ranks wait at a barrier.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from data.outputs import (
    check_output_dir,
    check_output_file,
    corpus_paths,
    local_dir,
    published_paths,
    refuse_overlap,
)
from sitcom.model.adapters import (
    adapter_weights,
    load_adapter,
    merge_adapter,
    save_adapter,
    tied_adapter_state,
)
from sitcom.model.catalog import BASE_MODEL, is_base_model, load_model
from training.callbacks import CompactProgressCallback, FinalEvalCallback, MetricsLogCallback
from training.card import (
    export_checkpoint,
    make_card,
    prior_stage_summary,
    read_card,
    remove_stale_exports,
)
from training.corpus import (
    BlockDataset,
    block_lead,
    load_corpus,
    pack_eval,
    pack_train,
    token_stream,
    utf8_bytes,
)
from training.corpus_vocab import causal_lm_loss, corpus_token_ids, restrict_head
from training.metrics import compute_metrics_for, preprocess_logits_for_metrics
from training.plot import plot_loss_curve


class FinetuneError(ValueError):
    """A bad option or state; the message is user-facing."""


T = TypeVar("T")


def is_rank_zero() -> bool:
    """True in a single process and in global rank 0 of a torchrun / accelerate launch."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_rank_zero(fn: Callable[[], T]) -> T:
    """fn() in rank 0 only; its result, or its FinetuneError, reaches every rank (the others
    wait meanwhile). Any other error ends rank 0, and the launcher then stops the rest."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    box: list = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except FinetuneError as e:
            box[0] = ("error", str(e))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise FinetuneError(value)
    return value


@dataclass
class FinetuneConfig:
    data: Path
    out: Path
    base: str = BASE_MODEL
    block_size: int = 512
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 1e-4
    warmup_steps: int = 10
    epochs: float = 1.0
    max_steps: int = -1
    time_budget: float | None = None  # minutes
    seed: int = 0
    eval_steps: int = 10  # a 30-minute CPU run is only ~40-70 optimizer steps
    save_steps: int = 10
    save_limit: int = 2
    eval_tokens: int = 4096  # whole val episodes up to this many tokens; 0 = all
    log_steps: int = 5
    lora: bool = False
    lora_r: int = 16
    linear_only: bool = False
    init_adapter: Path | None = None  # go on training this LoRA adapter (e.g. an extracted one)
    precision: str = "auto"
    gradient_checkpointing: bool = False
    corpus_vocab: bool = False  # softmax over the corpus's tokens while training (corpus_vocab.py)
    resume: bool = False
    overwrite: bool = False
    keep_work: bool = False
    gguf: str = "q8_0"


def cpu_has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def choose_precision(requested: str) -> str:
    """bf16 autocast where the hardware does it natively (CUDA, AVX-512 BF16 CPUs), else fp32."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def work_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".work")


def first_episodes(episodes: list[str], tokenizer, max_tokens: int) -> list[str]:
    """Whole episodes from the start until about max_tokens (BPB needs whole texts' bytes)."""
    if max_tokens <= 0:
        return episodes
    kept, total = [], 0
    for episode in episodes:
        kept.append(episode)
        total += len(tokenizer(episode, add_special_tokens=False)["input_ids"])
        if total >= max_tokens:
            break
    return kept


def right_padding_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Pads only short eval blocks: inputs with pad, labels with -100; training blocks are full.

    Right padding keeps position ids of real tokens unchanged (a copy, so the saved tokenizer
    keeps whatever padding side the generation code wants).
    """
    tok = copy.copy(tokenizer)
    tok.padding_side = "right"
    return DataCollatorForSeq2Seq(tok, label_pad_token_id=-100, padding="longest")


def last_complete_checkpoint(work: Path) -> str | None:
    """The newest Trainer checkpoint that finished saving; half-saved newer ones are deleted.

    Trainer writes a checkpoint dir in place, trainer_state.json last, so a run killed
    mid-save leaves a dir without a readable state (get_last_checkpoint would pick it).
    """
    if not work.is_dir():
        return None
    found = sorted(
        (p for p in work.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
            return str(path)
        except (OSError, ValueError):
            shutil.rmtree(path, ignore_errors=True)
    return None


def prepare_work_dir(cfg: FinetuneConfig) -> tuple[Path, str | None]:
    """OUT.work and the checkpoint to resume from. Only --overwrite may replace a finished
    OUT; --overwrite alone starts over, with --resume it continues OUT.work's run."""
    work = work_dir_for(cfg.out)
    if cfg.out.exists() and not cfg.overwrite:
        if cfg.resume:
            raise FinetuneError(
                f"{cfg.out} is a finished checkpoint and --resume never replaces one: pass "
                "--overwrite to train it again, or choose another --out"
            )
        raise FinetuneError(f"{cfg.out} already exists: pass --overwrite to replace it")
    removed = remove_stale_exports(cfg.out)  # left by a kill during an earlier export
    if removed:
        print(f"removed {len(removed)} half-written export(s) of an interrupted run")
    last = last_complete_checkpoint(work)
    if cfg.overwrite and not cfg.resume and work.exists():
        shutil.rmtree(work)
        last = None
    elif last and not cfg.resume:
        raise FinetuneError(
            f"{work} holds checkpoints of an unfinished run: pass --resume to continue it "
            "or --overwrite to start over"
        )
    if cfg.resume and last is None:
        print(f"no checkpoint in {work} to resume from; starting from the base model")
    work.mkdir(parents=True, exist_ok=True)
    if last is None:
        (work / "metrics.jsonl").unlink(missing_ok=True)
    return work, last


def training_done(checkpoint: str, max_steps: int) -> bool:
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return max_steps > 0 and state.get("global_step", 0) >= max_steps


def check_outputs(cfg: FinetuneConfig) -> None:
    """OUT and OUT.work are real directories or new names, and neither they nor what
    replacing OUT deletes is, or holds, the corpus, the base model or the init adapter.
    (Whether an existing OUT may be replaced is prepare_work_dir's.)"""
    work = work_dir_for(cfg.out)
    refuse_overlap(
        [*published_paths(cfg.out), work],
        {
            f"the corpus --data {cfg.data}": corpus_paths(cfg.data),
            f"the base model --base {cfg.base}": local_dir(cfg.base),
            f"the adapter --init-adapter {cfg.init_adapter}": local_dir(cfg.init_adapter),
        },
        "--out",
        cfg.out,
    )
    check_output_dir(cfg.out, "--out", overwrite=True)
    check_output_dir(work, "--out", overwrite=True)
    for name in ("metrics.jsonl", "loss.png"):  # appended to / replaced in a resumed OUT.work
        check_output_file(work / name, "--out")


def validate(cfg: FinetuneConfig) -> None:
    check_outputs(cfg)
    if cfg.block_size < 16:
        raise FinetuneError("--block-size must be at least 16")
    for name in ("batch_size", "grad_accum", "eval_steps", "save_steps", "save_limit", "log_steps"):
        if getattr(cfg, name) < 1:
            raise FinetuneError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.save_steps % cfg.eval_steps:
        raise FinetuneError("--save-steps must be a multiple of --eval-steps (best-model tracking)")
    if not 0 < cfg.lr < 1:
        raise FinetuneError("--lr must be between 0 and 1")
    if cfg.time_budget is not None and cfg.time_budget <= 0:
        raise FinetuneError("--time-budget must be a positive number of minutes")
    if cfg.max_steps == 0 or cfg.epochs <= 0:
        raise FinetuneError("nothing to train: --max-steps and --epochs must be positive")
    if cfg.init_adapter is not None:
        if cfg.lora or cfg.linear_only:
            raise FinetuneError("--init-adapter trains that adapter: drop --lora/--linear-only")
        card = init_adapter_card(cfg.init_adapter)
        if not same_model(card.get("base_model", cfg.base), cfg.base):
            raise FinetuneError(
                f"{cfg.init_adapter} is an adapter of {card['base_model']}, not of {cfg.base}"
            )


def same_model(a: str, b: str) -> bool:
    """Two spellings of one model: the packaged base's names, or paths to one directory."""
    if a == b or (is_base_model(a) and is_base_model(b)):
        return True
    return Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve()


def init_adapter_card(adapter_dir: Path) -> dict:
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FinetuneError(f"{adapter_dir} is not a LoRA adapter dir (no adapter_config.json)")
    return read_card(adapter_dir)


def build_model(cfg: FinetuneConfig):
    model, tokenizer = load_model(cfg.base)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and cfg.block_size > limit:
        raise FinetuneError(f"--block-size {cfg.block_size} exceeds the model's context of {limit}")
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings would cut the graph
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=2 * cfg.lora_r,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    elif cfg.linear_only:
        freeze_all_but_linear(model)
    elif cfg.init_adapter is not None:
        card = init_adapter_card(cfg.init_adapter)
        try:
            weights = adapter_weights(cfg.init_adapter, card).name
            model = load_adapter(model, cfg.init_adapter, weights, trainable=True)
        except (OSError, ValueError) as e:
            raise FinetuneError(f"cannot load {cfg.init_adapter}: {e}") from e
        # Trainer's checkpoints: peft would also save the frozen embedding (and the tied head)
        # whole, 226 MB each for SmolLM2, because the embedding is a LoRA target.
        model.save_pretrained = functools.partial(
            model.save_pretrained, save_embedding_layers=False
        )
    return model, tokenizer


def merged_copy(cfg: FinetuneConfig, model):
    """The trained adapter merged into a fresh base, as the bot merges a shipped one: peft's
    own merge_and_unload would add the tied embedding's change twice (adapters.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        config = copy.deepcopy(model.peft_config["default"])
        config.ensure_weight_tying = False
        config.save_pretrained(tmp)
        save_adapter(tied_adapter_state(model), Path(tmp), "float32")
        base, _ = load_model(cfg.base)
        return merge_adapter(base, Path(tmp))


def freeze_all_but_linear(model) -> None:
    """Train the decoder's nn.Linear weights only; embeddings (tied to the LM head) and norms
    stay as in the base, so the whole change is a set of matrix deltas that `training extract`
    can compress into a small LoRA adapter."""
    import torch.nn as nn

    head = model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad = False
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            module.weight.requires_grad = True


def training_arguments(cfg: FinetuneConfig, work: Path, precision: str) -> TrainingArguments:
    """Trainer's settings. Under torchrun / accelerate launch, building them starts the
    process group (accelerate's PartialState): gloo on CPU, nccl on GPUs."""
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        lr_scheduler_type="cosine",
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        logging_steps=cfg.log_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_limit,
        load_best_model_at_end=True,
        metric_for_best_model="bpb",
        greater_is_better=False,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=cfg.gradient_checkpointing,
        include_num_input_tokens_seen=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=False,  # else it follows the transformers log level, which the CLI quiets
        # Every trainable weight gets a gradient each step (full, LoRA, linear-only), so DDP
        # need not search the graph for unused ones; --init-adapter's tied head factors are
        # aliases whose gradients are moved to the embedding's, so there it must.
        ddp_find_unused_parameters=cfg.init_adapter is not None,
    )


def finetune(cfg: FinetuneConfig) -> dict:
    """Train, keep the best checkpoint by val BPB, export to cfg.out; returns the card.

    In a torchrun / accelerate launch every rank calls this; rank 0 alone writes."""
    validate(cfg)  # read-only: every rank checks, and all see the same files
    corpus = load_corpus(cfg.data)
    precision = choose_precision(cfg.precision)
    args = training_arguments(cfg, work_dir_for(cfg.out), precision)
    args.device  # noqa: B018 - starts the process group (if launched so) before the barrier
    barrier()  # nobody still checks while rank 0 prepares (deletes) below
    work, last = on_rank_zero(lambda: prepare_work_dir(cfg))
    with args.main_process_first(local=True, desc="load the base model"):
        model, tokenizer = build_model(cfg)  # one process per machine fills the model cache

    lead = block_lead(tokenizer)
    train_set = pack_train(token_stream(corpus.train, tokenizer), cfg.block_size, lead)
    val_episodes = first_episodes(corpus.val, tokenizer, cfg.eval_tokens)
    val_set: BlockDataset = pack_eval(token_stream(val_episodes, tokenizer), cfg.block_size, lead)
    loss_func, vocab_note = None, ""
    if cfg.corpus_vocab:
        keep = corpus_token_ids(train_set.blocks + val_set.blocks, tokenizer)
        vocab_size = model.get_output_embeddings().weight.shape[0]
        restrict_head(model, keep)
        loss_func = causal_lm_loss(keep, vocab_size)
        vocab_note = f" | softmax over the corpus's {len(keep):,} of {vocab_size:,} tokens"
    if is_rank_zero():
        processes = f" | {args.world_size} processes" if args.world_size > 1 else ""
        print(
            f"train: {len(corpus.train)} episodes, {len(train_set)} blocks of {cfg.block_size} | "
            f"val: {len(val_episodes)}/{len(corpus.val)} episodes, {len(val_set)} blocks | "
            f"precision {precision}{' | LoRA' if cfg.lora else ''}"
            f"{' | linear layers only' if cfg.linear_only else ''}"
            f"{f' | adapter {cfg.init_adapter}' if cfg.init_adapter else ''}{processes}{vocab_note}"
        )

    final_eval = FinalEvalCallback(cfg.time_budget)
    metrics_path = work / "metrics.jsonl"
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=val_set,
        data_collator=right_padding_collator(tokenizer),
        processing_class=tokenizer,
        compute_metrics=compute_metrics_for(utf8_bytes(val_episodes)),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        compute_loss_func=loss_func,
        callbacks=[final_eval, MetricsLogCallback(metrics_path)],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgressCallback())

    started = time.monotonic()
    if last and training_done(last, cfg.max_steps):
        # Killed after the last step (in the export, say): resuming would run one step past
        # --max-steps, because Trainer checks the limit only after a step. Take the state
        # and the best weights from the checkpoints, as train() would at its end.
        if is_rank_zero():
            print(f"{last} already reached --max-steps {cfg.max_steps}; exporting it")
        trainer.state = TrainerState.load_from_json(str(Path(last) / "trainer_state.json"))
        trainer.state.is_world_process_zero = trainer.is_world_process_zero()  # rank 0's file
        trainer.state.is_local_process_zero = trainer.is_local_process_zero()
        if trainer.state.best_model_checkpoint:
            trainer._load_best_model()  # Trainer's own loader: full weights or LoRA adapter
        else:
            trainer._load_from_checkpoint(last)
    else:
        trainer.train(resume_from_checkpoint=last)
    seconds = time.monotonic() - started
    # Rank 0 publishes OUT; the other ranks wait for its card.
    return on_rank_zero(
        lambda: export_run(
            cfg, trainer, tokenizer, corpus, val_episodes, final_eval, precision, seconds
        )
    )


def export_run(
    cfg: FinetuneConfig,
    trainer: Trainer,
    tokenizer,
    corpus,
    val_episodes: list[str],
    final_eval: FinalEvalCallback,
    precision: str,
    seconds: float,
) -> dict:
    """Rank 0's end of a run: loss.png, the card, the exported checkpoint, OUT.work removed."""
    work = Path(trainer.args.output_dir)
    metrics_path = work / "metrics.jsonl"
    plot_loss_curve(metrics_path, work / "loss.png")

    best = best_eval(trainer.state.log_history)
    model = trainer.model
    if cfg.lora:
        model = model.merge_and_unload()  # a plain checkpoint: the bot needs no peft
    elif cfg.init_adapter is not None:
        model = merged_copy(cfg, model)
    card = make_card(
        base_model=cfg.base,
        corpus=str(cfg.data),
        corpus_manifest_sha256=corpus.manifest_sha256,
        steps=trainer.state.global_step,
        best_step=best.get("step"),
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        val_episodes=len(val_episodes),
        val_loss=best.get("eval_nll"),
        val_ppl=best.get("eval_ppl"),
        val_bpb=best.get("eval_bpb"),
        precision=precision,
        lora=cfg.lora,
        linear_only=cfg.linear_only,
        init_adapter=prior_stage_summary(cfg.init_adapter),
        init_checkpoint=prior_stage_summary(cfg.base),
        time_budget_hit=final_eval.budget_hit,
        train_seconds_this_run=round(seconds, 1),
        processes=trainer.args.world_size,
        settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    )
    model.config.use_cache = True
    export_checkpoint(
        model,
        tokenizer,
        cfg.out,
        card,
        {"metrics.jsonl": metrics_path, "loss.png": work / "loss.png"},
        gguf_qtype=None if cfg.gguf == "none" else cfg.gguf,
    )
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return card


def best_eval(log_history: list[dict]) -> dict:
    evals = [r for r in log_history if "eval_bpb" in r]
    return min(evals, key=lambda r: r["eval_bpb"]) if evals else {}
