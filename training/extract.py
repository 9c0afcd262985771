"""Compress a fine-tune into a small LoRA adapter: the best rank-r approximation (SVD) of
each weight change, saved in peft's adapter format with a card.

    python -m training extract checkpoints/seinfeld-full --rank 32 --out sitcom/seinfeld_lora

Linear layers and the input embedding (tied to the LM head in SmolLM2) become LoRA factors;
small modules that changed (the RMSNorms) are saved whole (peft's modules_to_save). Any other
change is refused rather than silently lost. peft can load, merge and train LoRA adapters but
has no "adapter from a weight delta" function, so the SVD step is written here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from data.outputs import (
    check_output_dir,
    corpus_paths,
    local_dir,
    published_paths,
    refuse_overlap,
)
from sitcom.files import publish_dir
from sitcom.model.adapters import ADAPTER_CARD, DTYPES, merge_adapter, peft_model_for, save_adapter
from sitcom.model.catalog import BASE_MODEL, adapter_file_hashes, file_sha256, load_model
from training.card import (
    base_lineage,
    card_block_size,
    prior_stage_summary,
    read_card,
    train_minutes,
)

if TYPE_CHECKING:
    import torch

# Bigger than this and the shipped default no longer fits comfortably in the repository.
MAX_ADAPTER_MB = 25.0
# A changed module with at most this many parameters is saved whole (norms: 576 each).
MAX_WHOLE_PARAMS = 65_536


class ExtractError(ValueError):
    """A checkpoint that cannot be compressed this way; the message is user-facing."""


@dataclass
class Deltas:
    """What a fine-tune changed, by module name."""

    linear: dict[str, torch.Tensor] = field(default_factory=dict)  # W_tuned - W_base
    embedding: tuple[str, torch.Tensor] | None = None  # (name, E_tuned - E_base)
    whole: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # tuned params


def weight_deltas(base, tuned) -> Deltas:
    """Sort every changed parameter into linear / embedding / saved-whole; ExtractError for a
    change the adapter cannot carry (a big non-linear module, an untied LM head, a bias)."""
    import torch

    base_params = dict(base.named_parameters())
    head, embed = tuned.get_output_embeddings(), tuned.get_input_embeddings()
    modules = dict(tuned.named_modules())
    deltas = Deltas()
    for name, param in tuned.named_parameters():  # a tied LM head is listed once, as embed
        module_name, kind = name.rsplit(".", 1)
        module = modules[module_name]
        delta = param.detach().float() - base_params[name].detach().float()
        if not torch.any(delta != 0):
            continue
        if kind == "weight" and isinstance(module, torch.nn.Linear) and module is not head:
            deltas.linear[module_name] = delta
        elif kind == "weight" and module is embed:
            deltas.embedding = (module_name, delta)
        elif sum(p.numel() for p in module.parameters()) <= MAX_WHOLE_PARAMS:
            deltas.whole[module_name] = {
                k: v.detach().clone() for k, v in module.named_parameters()
            }
        else:
            raise ExtractError(
                f"{name} differs from the base and cannot go into a LoRA adapter "
                "(fine-tune with --linear-only, or keep the LM head tied)"
            )
    if not (deltas.linear or deltas.embedding or deltas.whole):
        raise ExtractError("the checkpoint does not differ from the base model")
    return deltas


def low_rank(
    delta: torch.Tensor, rank: int, cov: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B [out, r], A [r, in], relative error) with B @ A closest to delta.

    Without `cov`, closest in the Frobenius norm (plain SVD). With the layer's input
    second-moment matrix cov = sum x x^T, closest in what the layer outputs on those inputs,
    ||(delta - B A) X||: with cov = L L^T (Cholesky), the best rank-r approximation of
    delta @ L, mapped back by L^-1 (as in ASVD / SVD-LLM). Directions the inputs never take
    cost no rank. The error is then relative to the output change on those inputs.
    """
    import torch

    if cov is None:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, s.numel())
        b, a = u[:, :r] * s[:r], vh[:r]
    else:
        cov = cov.to(torch.float64)
        eye = torch.eye(cov.shape[0], dtype=torch.float64)
        # Damping keeps L invertible when some input directions (nearly) never occur.
        chol = torch.linalg.cholesky(cov + 1e-2 * cov.diagonal().mean() * eye)
        u, s, vh = torch.linalg.svd(delta.to(torch.float64) @ chol, full_matrices=False)
        r = min(rank, s.numel())
        b = (u[:, :r] * s[:r]).float()
        # A = Vh_r L^-1, i.e. L^T A^T = Vh_r^T
        a = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T.float()
    kept = float((s[:r] ** 2).sum())
    total = float((s**2).sum())
    return b, a, (max(total - kept, 0.0) / total) ** 0.5 if total else 0.0


def input_covariances(model, blocks: list[list[int]], names: set[str]) -> dict[str, torch.Tensor]:
    """{layer: sum of x x^T over every token position} for the inputs the named linear
    layers see while the model reads the blocks."""
    import torch

    modules = dict(model.named_modules())
    covs: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # q/k/v (and gate/up) read the same tensor: one product

    def hook_for(name: str):
        def hook(module, args) -> None:
            if args[0] is not last[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                last[:] = [args[0], (x.T @ x).double()]
            covs[name] = covs[name] + last[1] if name in covs else last[1].clone()

        return hook

    hooks = [modules[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            for block in blocks:
                model(torch.tensor([block]))
    finally:
        for h in hooks:
            h.remove()
        last.clear()
    return covs


def calibration_blocks(data: Path, tokenizer, tokens: int, block_size: int) -> list[list[int]]:
    """About `tokens` tokens of training text in blocks spread evenly over the train split."""
    from training.corpus import block_lead, load_corpus, pack_train, token_stream

    corpus = load_corpus(data, splits=("train",))
    blocks = pack_train(
        token_stream(corpus.train, tokenizer), block_size, block_lead(tokenizer)
    ).blocks
    n = max(1, min(len(blocks), tokens // block_size))
    return [blocks[i * len(blocks) // n] for i in range(n)]


def lora_config(deltas: Deltas, rank: int, embed_rank: int):
    """One LoRA config for everything that changed; alpha == r everywhere: B @ A is the delta."""
    from peft import LoraConfig

    targets = sorted({name.rsplit(".", 1)[-1] for name in deltas.linear})
    ranks, alphas = {}, {}
    if deltas.embedding:
        embed = deltas.embedding[0].rsplit(".", 1)[-1]
        targets.append(embed)
        ranks[embed] = alphas[embed] = embed_rank
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=targets,
        rank_pattern=ranks,
        alpha_pattern=alphas,
        task_type="CAUSAL_LM",
        modules_to_save=sorted(deltas.whole) or None,
    )


def fill_adapter(
    peft_model,
    deltas: Deltas,
    rank: int,
    embed_rank: int,
    covs: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Write the factors and whole modules into peft_model; {module: relative error}."""
    import torch

    errors = {}
    covs = covs or {}
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in deltas.linear:
                b, a, errors[name] = low_rank(deltas.linear[name], rank, covs.get(name))
                _put(module.lora_A["default"].weight, module.lora_B["default"].weight, a, b)
            elif deltas.embedding and name == deltas.embedding[0]:
                # peft's Embedding LoRA adds (B @ A).T: A [r, vocab], B [dim, r].
                b, a, errors[name] = low_rank(deltas.embedding[1].T, embed_rank)
                _put(module.lora_embedding_A["default"], module.lora_embedding_B["default"], a, b)
            elif name in deltas.whole:
                copy = module.modules_to_save["default"]
                for key, value in deltas.whole[name].items():
                    copy.get_parameter(key).copy_(value)
    return errors


def _put(lora_a, lora_b, a, b) -> None:
    """Factors into peft's parameters; a rank above the matrix's own (k_proj at r > 192)
    leaves the extra rows and columns zero."""
    lora_a.zero_()
    lora_b.zero_()
    lora_a[: a.shape[0]].copy_(a)
    lora_b[:, : b.shape[1]].copy_(b)


def describe(
    deltas: Deltas, rank: int, embed_rank: int, weighted: bool, source_card: dict | None = None
) -> str:
    parts = [f"linear layers r={rank}"] if deltas.linear else []
    if deltas.embedding:
        parts.append(f"tied embedding r={embed_rank}")
    if deltas.whole:
        parts.append(f"{len(deltas.whole)} norms whole")
    how = "activation-weighted SVD" if weighted else "SVD"
    if (source_card or {}).get("init_adapter"):  # finetune --init-adapter: an adapter already
        return "LoRA (" + ", ".join(parts) + f") by {how} of an adapter trained further"
    return "LoRA (" + ", ".join(parts) + f") extracted by {how} from a full fine-tune"


def check_base(checkpoint: str | Path, card: dict, base: str) -> None:
    """ExtractError unless `base` is a model the checkpoint descends from (its card's
    base_model, or that one's, ...): a delta against any other model is meaningless. A card
    without base_model (hand-made, older) leaves it to the shape check."""
    from training.finetune import same_model

    lineage = base_lineage(card)
    if lineage and not any(same_model(name, base) for name in lineage):
        before = f" (fine-tuned from {', '.join(lineage[1:])})" if lineage[1:] else ""
        raise ExtractError(
            f"{checkpoint} was fine-tuned from {lineage[0]}{before}, not from --base {base}: "
            f"pass --base {lineage[-1]}"
        )


def check_same_shape(base_model, tuned, base: str, checkpoint: str | Path) -> None:
    """ExtractError naming the first parameter whose name or shape differs."""
    shapes = {name: tuple(p.shape) for name, p in base_model.named_parameters()}
    for name, param in tuned.named_parameters():
        if shapes.get(name) != tuple(param.shape):
            theirs = shapes.get(name)
            raise ExtractError(
                f"--base {base} is not the model {checkpoint} was fine-tuned from: {name} is "
                f"{tuple(param.shape)} in the checkpoint and "
                f"{theirs if theirs is not None else 'missing'} in the base"
            )


def check_out(
    out: Path, checkpoint: str | Path, base: str, data: Path | None, overwrite: bool
) -> None:
    """OUT is new (or, with overwrite, a real directory) and replacing it deletes no input."""
    refuse_overlap(
        published_paths(out),
        {
            f"the checkpoint {checkpoint}": local_dir(checkpoint),
            f"the base model --base {base}": local_dir(base),
            f"the corpus --data {data}": corpus_paths(data),
        },
        "--out",
        out,
    )
    check_output_dir(out, "--out", overwrite)


def extract(
    checkpoint: str | Path,
    out: Path,
    rank: int,
    base: str = BASE_MODEL,
    dtype: str = "bfloat16",
    data: Path | None = None,
    embed_rank: int | None = None,
    calibration_tokens: int = 0,
    overwrite: bool = False,
) -> dict:
    """Write OUT (adapter_config.json, the tensors, checkpoint.json naming them); returns
    the card. An existing OUT is replaced (atomically) only with `overwrite`. With `data`,
    the card gets the adapter's val metrics on the whole val split, and with
    calibration_tokens > 0 the linear layers' changes are weighted by the inputs they see on
    that many train tokens. Measured on the Seinfeld fine-tune (README), the weighting did
    not lower val BPB, so it is off by default."""
    from peft import get_peft_model_state_dict

    embed_rank = rank if embed_rank is None else embed_rank
    if rank < 1 or embed_rank < 1:
        raise ExtractError("--rank and --embed-rank must be at least 1")
    if dtype not in DTYPES:
        raise ExtractError(f"--dtype must be one of {', '.join(DTYPES)}")
    if calibration_tokens < 0:
        raise ExtractError("--calibration-tokens must be 0 (plain SVD) or more")
    out = Path(out)
    check_out(out, checkpoint, base, data, overwrite)
    source_card = read_card(str(checkpoint))
    check_base(checkpoint, source_card, base)
    tuned, tokenizer = load_model(checkpoint)
    base_model, _ = load_model(base)
    check_same_shape(base_model, tuned, base, checkpoint)
    deltas = weight_deltas(base_model, tuned)
    block = card_block_size(source_card)
    covs, calibrated = None, 0
    if data is not None and calibration_tokens > 0 and deltas.linear:
        blocks = calibration_blocks(Path(data), tokenizer, calibration_tokens, block)
        covs = input_covariances(tuned, blocks, set(deltas.linear))
        calibrated = sum(len(b) for b in blocks)
    config = lora_config(deltas, rank, embed_rank)
    peft_model = peft_model_for(base_model, config)
    errors = fill_adapter(peft_model, deltas, rank, embed_rank, covs)
    # The base's embedding is not part of the adapter: only its low-rank change is.
    adapter = get_peft_model_state_dict(peft_model, save_embedding_layers=False)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        weights = save_adapter(adapter, tmp, dtype)
        size_mb = weights.stat().st_size / 1e6
        linear_errors = [errors[n] for n in deltas.linear]
        minutes = train_minutes(Path(str(checkpoint)))
        card = {
            **{k: v for k, v in source_card.items() if k != "settings"},
            "form": describe(deltas, rank, embed_rank, covs is not None, source_card),
            "calibration_tokens": calibrated,
            "rank": rank,
            "embed_rank": embed_rank if deltas.embedding else None,
            "adapter_dtype": dtype,
            "adapter_mb": round(size_mb, 2),
            "adapter_file": weights.name,
            "adapter_sha256": file_sha256(weights),
            "extracted_from": str(checkpoint),
            "extract_rel_error_mean": _mean(errors.values()),
            "extract_rel_error_max": round(max(errors.values(), default=0.0), 4),
            "extract_rel_error_linear_mean": _mean(linear_errors),
            "extract_rel_error_embedding": (
                round(errors[deltas.embedding[0]], 4) if deltas.embedding else None
            ),
            "base_model": base,
            "gguf_qtype": "q8_0",
            "train_wall_minutes": minutes,
            **_totals(source_card, minutes),
            "finetune_settings": source_card.get("settings"),
        }
        if data is not None:
            card["adapter_val"] = adapter_val_metrics(tmp, base, Path(data), block, weights.name)
        card["adapter_files"] = adapter_file_hashes(tmp)  # the config too: the bot checks each
        (tmp / ADAPTER_CARD).write_text(json.dumps(card, indent=2) + "\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if size_mb > MAX_ADAPTER_MB:
        print(f"warning: the adapter is {size_mb:.1f} MB, more than {MAX_ADAPTER_MB:.0f} MB")
    return card


def _mean(values) -> float | None:
    values = list(values)
    return round(sum(values) / len(values), 4) if values else None


def _totals(card: dict, minutes: float | None) -> dict:
    """Tokens and wall minutes over every stage: a fine-tune that went on from an adapter
    (--init-adapter) or from our checkpoint (--base DIR) names it, and that card has the stages
    before; an older card only has the dir as its base_model."""
    prior = (
        card.get("init_adapter")
        or card.get("init_checkpoint")
        or prior_stage_summary(card.get("base_model"))
        or {}
    )
    if not prior:
        return {}
    prior_tokens = prior.get("tokens_seen_total", prior.get("tokens_seen")) or 0
    prior_minutes = prior.get("train_wall_minutes_total", prior.get("train_wall_minutes")) or 0
    return {
        "tokens_seen_total": (card.get("tokens_seen") or 0) + prior_tokens,
        "train_wall_minutes_total": round((minutes or 0) + prior_minutes, 1),
    }


def adapter_val_metrics(
    adapter_dir: Path, base: str, data: Path, block_size: int, file_name: str
) -> dict:
    """Val loss/ppl/BPB on the whole val split of base + adapter, merged as the bot does."""
    from training.corpus import load_corpus
    from training.evaluate import val_metrics

    corpus = load_corpus(data, splits=("val",))
    base_model, tokenizer = load_model(base)
    merged = merge_adapter(base_model, adapter_dir, file_name).eval()
    return val_metrics(merged, tokenizer, corpus.val, block_size, batch_size=4)
