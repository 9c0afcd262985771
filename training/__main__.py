"""python -m training finetune|evaluate|judge ... (see --help). Errors are one line on stderr."""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
import shutil
import sys
from pathlib import Path

from sitcom.model.adapters import DTYPES
from sitcom.settings import SceneSettings
from training.judge import MAX_CHARS, MAX_LINES
from training.outputs import check_json_path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def finite_float(text: str) -> float:
    """argparse type: a float that is a number (nan would switch a limit off silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def write_failure(error: BaseException, where: Path | None = None) -> str | None:
    """The one-line reason when a library failed writing a file (a full disk, a size limit),
    else None. safetensors and torch.save report these as their own errors, not OSError;
    torch's zip writer, closing after a failed write, raises "unexpected pos" with the
    first failure as its context. `where`: the folder written to, for its free space."""
    chain: list[BaseException] = []
    while error is not None and len(chain) < 8 and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    texts = [str(e) for e in chain]
    if not any(
        type(e).__name__ == "SafetensorError"
        or "PytorchStreamWriter" in text
        or "file write failed" in text
        or ("inline_container.cc" in text and "unexpected pos" in text)
        for e, text in zip(chain, texts, strict=True)
    ):
        return None
    found = re.search(r"os error (\d+)", " ".join(texts))
    code = int(found.group(1)) if found else None
    if code == errno.ENOSPC:
        return "disk full while writing the checkpoint"
    if code:
        return f"could not write the checkpoint: {os.strerror(code)}"
    free = free_space(where)
    return "could not write the checkpoint: a file write failed" + (
        f" ({free / 1e6:.0f} MB free on that disk)" if free is not None else ""
    )


def free_space(where: Path | None) -> int | None:
    """Bytes free on the disk of `where` (its nearest existing folder), None if unknown."""
    if where is None:
        return None
    path = Path(os.path.abspath(where))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ft = sub.add_parser("finetune", help="fine-tune a base model on a corpus directory")
    ft.add_argument("--data", type=Path, required=True, help="corpus dir (train.txt, val.txt)")
    ft.add_argument("--out", type=Path, required=True, help="checkpoint dir to write")
    ft.add_argument(
        "--base",
        default="smollm2",
        help="smollm2 (packaged base), gemma3 (Gemma 3 270M: the gemma extra), a hub id, or a dir",
    )
    ft.add_argument("--block-size", type=int, default=512)
    ft.add_argument("--batch-size", type=int, default=4)
    ft.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation steps")
    ft.add_argument("--lr", type=finite_float, default=None, help="default 1e-4 full, 5e-4 LoRA")
    ft.add_argument("--warmup-steps", type=int, default=10)
    ft.add_argument("--epochs", type=finite_float, default=1.0)
    ft.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when > 0")
    ft.add_argument(
        "--time-budget",
        type=finite_float,
        default=None,
        metavar="MINUTES",
        help="stop, evaluate, save and export after this many minutes",
    )
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--eval-steps", type=int, default=10)
    ft.add_argument("--save-steps", type=int, default=10, help="a multiple of --eval-steps")
    ft.add_argument("--save-limit", type=int, default=2, help="Trainer checkpoints kept")
    ft.add_argument(
        "--eval-tokens",
        type=int,
        default=4096,
        help="val text used for evals during training (whole episodes); 0 = all",
    )
    ft.add_argument("--log-steps", type=int, default=5)
    ft.add_argument("--lora", action="store_true", help="train a LoRA adapter, merged on export")
    ft.add_argument("--lora-r", type=int, default=16)
    ft.add_argument(
        "--linear-only",
        action="store_true",
        help="train only the linear layers (embeddings, norms frozen), for extract",
    )
    ft.add_argument(
        "--init-adapter",
        type=Path,
        default=None,
        metavar="DIR",
        help="go on training this LoRA adapter of --base (e.g. from extract); "
        "its rank and targets are kept, --lora-r does not apply",
    )
    ft.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument(
        "--corpus-vocab",
        action="store_true",
        help="train with the softmax over the corpus's tokens only (fast for big "
        "vocabularies such as Gemma 3's; evals stay full-vocabulary)",
    )
    ft.add_argument("--resume", action="store_true", help="continue from the last save in OUT.work")
    ft.add_argument("--overwrite", action="store_true", help="replace OUT and discard OUT.work")
    ft.add_argument("--keep-work", action="store_true", help="keep OUT.work after export")
    ft.add_argument(
        "--gguf",
        choices=("q8_0", "f16", "f32", "q4_1", "none"),
        default="q8_0",
        help="also write OUT/model.gguf, which the bot serves with llama.cpp",
    )

    ga = sub.add_parser(
        "gguf-adapter",
        help="a checkpoint that serves a LoRA adapter with llama.cpp over a GGUF base, unmerged "
        "(and keeps it in bf16, merged into the base by transformers where llama.cpp is off)",
    )
    ga.add_argument(
        "adapter", type=Path, help="a peft adapter dir, e.g. OUT.work/checkpoint-N of --lora"
    )
    ga.add_argument("--base", default="smollm2", help="gemma3, smollm2 or a dir with model.gguf")
    ga.add_argument("--out", type=Path, required=True, help="checkpoint dir to write")
    ga.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ga.set_defaults(data=None)

    ex = sub.add_parser("extract", help="compress a fine-tune into a small LoRA adapter")
    ex.add_argument("checkpoint", help="the fine-tuned checkpoint dir")
    ex.add_argument("--out", type=Path, required=True, help="adapter dir to write")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    ex.add_argument("--rank", type=int, default=32, help="rank of the linear layers' change")
    ex.add_argument(
        "--embed-rank",
        type=int,
        default=None,
        help="rank of the (tied) embedding's change; default: --rank",
    )
    ex.add_argument("--base", default="smollm2", help="the model it was fine-tuned from")
    ex.add_argument(
        "--data",
        type=Path,
        default=None,
        help="corpus dir: measure the adapter's val BPB (whole val split)",
    )
    ex.add_argument(
        "--dtype",
        choices=DTYPES,
        default="bfloat16",
        help="storage of the factors; int8 (blocks of 64, fp16 scales) halves "
        "bf16, int4 (blocks of 32) quarters it",
    )
    ex.add_argument(
        "--calibration-tokens",
        type=int,
        default=0,
        help="with --data: weight each linear layer's change by the inputs it sees "
        "on this many train tokens (activation-weighted SVD); 0 = plain SVD",
    )

    pf = sub.add_parser(
        "prefer", help="DPO: the show's next lines over the writer's own scenes (trl)"
    )
    pf.add_argument("--openings", type=Path, help="`judge openings --split train`")
    pf.add_argument("--scenes", type=Path, help="`judge write` for those openings")
    pf.add_argument(
        "--pack",
        type=Path,
        action="append",
        help="a judged pack (key.json + verdicts.jsonl), the reader's choice chosen; "
        "alone or mixed with --openings/--scenes",
    )
    pf.add_argument("--min-margin", type=int, default=0, help="with --pack: score lead, at least")
    pf.add_argument(
        "--chosen", type=Path, help="a scenes file of the writer's better scenes (`judge pick`)"
    )
    pf.add_argument("--rejected", type=Path, help="... and of its worse ones, same openings")
    pf.add_argument("--out", type=Path, required=True, help="dir for the trained adapter")
    pf.add_argument("--adapter", type=Path, default=Path("sitcom/seinfeld_lora"))
    pf.add_argument("--base", default="gemma3", help="the adapter's base: gemma3, smollm2, a dir")
    pf.add_argument("--beta", type=float, default=0.1, help="DPO's pull back to the start")
    pf.add_argument("--lr", type=float, default=5e-6)
    pf.add_argument("--epochs", type=float, default=1.0)
    pf.add_argument("--batch-size", type=int, default=2)
    pf.add_argument("--grad-accum", type=int, default=4)
    pf.add_argument("--max-length", type=int, default=512, help="tokens of prompt + completion")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--save-steps", type=int, default=25)
    pf.add_argument(
        "--full-vocab",
        action="store_true",
        help="train the whole head even when the adapter has served_vocab.json",
    )
    pf.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    pf.add_argument(
        "--sft-weight", type=float, default=0.0, help="add trl's sft loss on the chosen side"
    )
    pf.add_argument("--time-budget", type=float, default=0.0, help="hours; 0 = none")
    pf.add_argument("--resume", action="store_true", help="go on from OUT.work's last save")
    pf.set_defaults(data=None)

    bl = sub.add_parser(
        "blend", help="an adapter part of the way between two LoRA adapters (training/blend.py)"
    )
    bl.add_argument("start", type=Path, help="the adapter at weight 0, e.g. sitcom/seinfeld_lora")
    bl.add_argument("end", type=Path, help="the adapter at weight 1, e.g. a `prefer` run")
    bl.add_argument(
        "--weight", type=float, required=True, help="how far toward END (0..1; > 1 goes past it)"
    )
    bl.add_argument("--base", default="gemma3", help="the adapters' base: gemma3, smollm2, a dir")
    bl.add_argument("--out", type=Path, required=True, help="dir for the blended adapter")
    bl.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    bl.set_defaults(data=None)

    sh = sub.add_parser("ship", help="write a LoRA run's adapter as the bot's shipped default")
    sh.add_argument("adapter", type=Path, help="a peft adapter dir, e.g. RUN.work/checkpoint-N")
    sh.add_argument("--base", default="gemma3", help="gemma3, smollm2 or a dir with model.gguf")
    sh.add_argument("--card", type=Path, default=None, help="the run's export checkpoint.json")
    sh.add_argument("--val", type=Path, default=None, help="`training evaluate --json` output")
    sh.add_argument("--out", type=Path, default=Path("sitcom/seinfeld_lora"))
    sh.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    sh.add_argument(
        "--served-vocab",
        type=Path,
        default=None,
        metavar="DATA",
        help="a --corpus-vocab run's corpus: serve a head of the tokens it uses only",
    )
    sh.set_defaults(data=None)

    ev = sub.add_parser("evaluate", help="val loss/ppl/BPB and sampled-scene quality")
    ev.add_argument(
        "checkpoint", help="checkpoint dir, seinfeld (shipped), smollm2 (base), or a hub id"
    )
    ev.add_argument("--data", type=Path, required=True, help="corpus dir (val.txt)")
    ev.add_argument("--json", type=Path, default=None, help="also write the results here")
    ev.add_argument("--samples", type=int, default=8, help="scenes to sample (0 = none)")
    ev.add_argument("--max-new-tokens", type=int, default=120)
    ev.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="default: the block size the checkpoint was trained with, else 512",
    )
    ev.add_argument("--batch-size", type=int, default=4)
    ev.add_argument("--eval-tokens", type=int, default=0, help="val text used; 0 = all")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument(
        "--repetition-penalty",
        type=finite_float,
        default=None,
        help=f"for sampled scenes (default: the bot's, {SceneSettings().repetition_penalty:g})",
    )

    hu = sub.add_parser(
        "humour",
        help="train the humour model on the laugh corpus, or update one with the bot's votes",
    )
    hu.add_argument("--out", type=Path, required=True, help="model dir to write")
    hu.add_argument("--seed", type=int, default=0, help="the episode split's seed")
    hu.add_argument(
        "--votes",
        type=Path,
        default=None,
        metavar="BOT_DB",
        help="the bot's SQLite database: update --init with its votes",
    )
    hu.add_argument(
        "--guild",
        default=None,
        metavar="ID",
        help="with --votes: only scenes of this server / workspace",
    )
    hu.add_argument(
        "--init",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="with --votes: the model to update (default: the shipped one)",
    )
    hu.add_argument(
        "--corpus",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of .merged laugh-corpus files (default: the installed "
        "seinfeld-laugh-corpus package's)",
    )
    hu.add_argument("--overwrite", action="store_true", help="replace OUT")

    jd = sub.add_parser("judge", help="blind pairwise quality harness (training/JUDGING.md)")
    js = jd.add_subparsers(dest="judge_command", required=True)
    op = js.add_parser("openings", help="openings + real continuations from the val split")
    op.add_argument("--data", type=Path, required=True, help="corpus dir (val.txt)")
    op.add_argument("--n", type=int, default=40, help="how many openings")
    op.add_argument(
        "--seed",
        type=int,
        required=True,
        help="chooses the set: take a fresh one now and then, never tune to one",
    )
    op.add_argument("--out", type=Path, required=True, help="openings JSONL to write")
    op.add_argument(
        "--max-lines", type=int, default=MAX_LINES, help="lines of the real continuation"
    )
    op.add_argument(
        "--max-chars",
        type=int,
        default=MAX_CHARS,
        help="characters of the real continuation (whole lines)",
    )
    op.add_argument(
        "--split",
        choices=("val", "train"),
        default="val",
        help="val (judging) or train (pairs for `training prefer`)",
    )

    wr = js.add_parser("write", help="one scene per opening with the bot's engine")
    wr.add_argument("--openings", type=Path, required=True, help="from `judge openings`")
    wr.add_argument(
        "--model",
        required=True,
        help="seinfeld, smollm2, a checkpoint name or dir, a hub id; `show` for "
        "the real continuations",
    )
    wr.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a SceneSettings field, e.g. --set temperature=0.7 (repeatable)",
    )
    wr.add_argument("--label", default=None, help="the system's name in the scores")
    wr.add_argument(
        "--out", type=Path, required=True, help="scenes JSONL; an existing one is resumed"
    )
    wr.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="scenes in flight at once (the engine batches them); 1 for single-scene timings",
    )
    wr.add_argument(
        "--humour",
        default="humour",
        help="humour model ranking best_of candidates: humour (shipped), off, "
        "a name in CHECKPOINTS_DIR or a dir",
    )
    wr.add_argument(
        "--timeout", type=finite_float, default=600.0, help="seconds one scene may take"
    )

    pk = js.add_parser("pack", help="blinded pairs of two scenes files for a judge")
    pk.add_argument("files", type=Path, nargs=2, metavar="SCENES.jsonl")
    pk.add_argument(
        "--out", type=Path, required=True, help="folder for pairs.md, instructions.md, key.json"
    )
    pk.add_argument("--seed", type=int, default=0, help="order of the pairs and scenes")
    pk.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="show K pairs again (other order, new numbers): the judge's self-agreement",
    )
    pk.add_argument(
        "--max-chars",
        type=int,
        default=MAX_CHARS,
        help="cut both scenes to this many characters (whole lines); 0 = no cut",
    )
    pk.add_argument(
        "--max-lines", type=int, default=MAX_LINES, help="... and to this many lines; 0 = no cut"
    )
    pk.add_argument("--force", action="store_true", help="replace an existing pack")

    pi = js.add_parser(
        "pick", help="the reader's better (or worse) scene of each judged pair: a scenes file"
    )
    pi.add_argument("packs", type=Path, nargs="+", metavar="PACK", help="judged packs")
    pi.add_argument("--side", choices=["better", "worse"], default="better")
    pi.add_argument("--out", type=Path, required=True, help="the scenes file to write")

    sn = js.add_parser(
        "screen", help="before readers: each writer's BPB on the show's real continuations"
    )
    sn.add_argument("--openings", type=Path, required=True, help="from `judge openings`")
    sn.add_argument(
        "--model", action="append", required=True, help="a writer (repeat; the first is the base)"
    )

    sc = js.add_parser("score", help="check a judge's verdicts and score the systems")
    sc.add_argument("pack", type=Path, help="the folder `judge pack` wrote")
    sc.add_argument("--verdicts", type=Path, required=True, help="the judge's JSON lines")
    sc.add_argument("--json", type=Path, default=None, help="also write the results here")

    po = js.add_parser("pool", help="several sets' `score --json` results of the same two systems")
    po.add_argument("results", type=Path, nargs="+", metavar="RESULT.json")
    po.add_argument("--json", type=Path, default=None, help="also write the pooled result here")
    return parser


def run(args: argparse.Namespace) -> int:
    # Cheap checks first; torch and transformers take seconds to import.
    if args.command == "judge" and args.judge_command == "screen":
        from training.screen import screen_cli

        return screen_cli(args)
    if args.command == "judge" and args.judge_command in ("score", "pool", "pick"):
        from training.verdicts import verdicts_cli

        return verdicts_cli(args)
    if args.command == "judge":
        from training.judge import judge_cli

        return judge_cli(args)
    from training.corpus import load_corpus

    if args.data is not None:
        load_corpus(args.data, splits=("train", "val") if args.command == "finetune" else ("val",))
    if args.command == "evaluate" and args.json is not None:
        check_json_path(args.json, args.checkpoint, args.data)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.command == "finetune":
        from training.finetune import FinetuneConfig, finetune, is_rank_zero

        if int(os.environ.get("RANK", "0")) != 0:  # torchrun / accelerate launch: rank 0 shows
            hf_logging.disable_progress_bar()
        options = {k: v for k, v in vars(args).items() if k != "command"}
        if options["lr"] is None:
            options["lr"] = 5e-4 if args.lora else 1e-4
        card = finetune(FinetuneConfig(**options))
        if is_rank_zero():
            print(
                f"saved {args.out}: {card['steps']} steps, {card['tokens_seen']} tokens, best "
                f"val loss {card['val_loss']:.4f} bpb {card['val_bpb']:.4f} "
                f"(step {card['best_step']})"
            )
    elif args.command == "gguf-adapter":
        from sitcom.model.catalog import base_gguf_for
        from sitcom.model.lora_gguf import write_adapter_checkpoint

        if args.out.exists() and not args.overwrite:
            raise ValueError(f"{args.out} exists; pass --overwrite to replace it")
        out = write_adapter_checkpoint(args.adapter, args.base, base_gguf_for(args.base), args.out)
        print(f"wrote {out}: serve it with /checkpoint use {out.name} (CHECKPOINTS_DIR)")
    elif args.command == "extract":
        from training.extract import extract

        card = extract(
            args.checkpoint,
            args.out,
            args.rank,
            base=args.base,
            data=args.data,
            embed_rank=args.embed_rank,
            calibration_tokens=args.calibration_tokens,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
        val = card.get("adapter_val") or {}
        print(
            f"wrote {args.out}: rank {card['rank']}, {card['adapter_mb']} MB, mean relative "
            f"error {card['extract_rel_error_mean']}"
            + (f", val bpb {val['bpb']:.4f}" if val else "")
        )
    elif args.command == "prefer":
        from training.prefer import PreferConfig, prefer, summary

        fields = PreferConfig.__dataclass_fields__
        cfg = PreferConfig(**{k: v for k, v in vars(args).items() if k in fields})
        card = prefer(cfg)
        print(f"wrote {cfg.out}: {summary(card)}")
    elif args.command == "blend":
        from training.blend import blend

        card = blend(args.start, args.end, args.weight, args.out, args.base, args.overwrite)
        print(
            f"wrote {args.out}: {card['weight']} of the way from {args.start} to {args.end}, "
            f"rank {card['rank']}, refit error {card['refit_rel_error_mean']:.2g}"
        )
    elif args.command == "ship":
        from training.ship import ship

        card = ship(
            args.adapter,
            args.out,
            args.base,
            args.card,
            args.val,
            args.overwrite,
            args.served_vocab,
        )
        print(f"wrote {args.out}: {card['adapter_mb']} MB on {card['base_model']}")
    else:
        from training.evaluate import evaluate_cli

        evaluate_cli(args)
    return 0


def close_progress_bars() -> None:
    """Close bars left open by an interrupt now; tqdm would redraw them after our message."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def humour_main(args: argparse.Namespace) -> int:
    """`humour` needs numpy only: no torch or transformers imports on its way."""
    from training.humour import humour_cli

    try:
        return humour_cli(args)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "humour":
        return humour_main(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sitcom.model.catalog import ModelLoadError
    from training.corpus import CorpusError
    from training.extract import ExtractError

    try:
        return run(args)
    except KeyboardInterrupt:
        close_progress_bars()
        print("interrupted; resume with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ModelLoadError, CorpusError, ExtractError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        close_progress_bars()
        if e.errno == errno.ENOSPC:
            print(
                f"error: disk full while writing {e.filename or 'output'}; {again(args)}",
                file=sys.stderr,
            )
        else:
            print(
                f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}",
                file=sys.stderr,
            )
        return 1
    except Exception as e:
        reason = write_failure(e, getattr(args, "out", None))
        if reason is None:
            raise
        close_progress_bars()
        print(f"error: {reason}; {again(args)}", file=sys.stderr)
        return 1


def again(args: argparse.Namespace) -> str:
    """What to do after a full disk: a fine-tune goes on from its last complete checkpoint."""
    if args.command == "finetune":
        return "free some space, then run again with --resume"
    return "free some space, then run again"


if __name__ == "__main__":
    sys.exit(main())
