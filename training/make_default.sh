#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# A LoRA adapter (rank 32, alpha 64, every linear layer) on Gemma 3 270M, trained in one run
# of 3 epochs (cosine, lr 4e-4) on 1024-token blocks, 8 blocks a step, with the softmax over
# the corpus's own tokens (--corpus-vocab); finetune keeps the step with the best val BPB
# (the whole val split, every 25 steps): step 250, the end of epoch 2, for the shipped one.
# On one GPU (bf16) that is ~2 minutes; on 2 CPU cores (fp32) ~10 hours, safe to re-run
# after an interruption (it resumes from OUT.work). The r16 two-stage CPU recipe it replaced
# is in git history.
# Then two rounds of DPO on blind readers' choices between two of the writer's own scenes
# (training/prefer.py; the labels are kept in training/preferences/): round 1 from the
# fine-tuned adapter on the 2026-12-02-train1401* batches (scenes of the fine-tuned writer),
# round 2 from round 1 on 2026-12-02-dpo1-train1601 (scenes of round 1's writer). ~17 and
# ~9 minutes on 2 CPU cores with AVX-512 BF16; seconds on a GPU. A rebuilt stage 1 is not
# bit-identical, so its labels are then a little off-policy.
# Then a soup of three third rounds, each from round 2 on its own labels of round 2's scenes
# (the tournament's best over worst of 2026-12-03-tournament-train2301, the two decoders of
# 2026-12-03-decoders-train2401, and 2026-12-02-dpo2-train1901): the two judged alone tied
# round 2 for readers, their average beat it (training/EXPERIMENTS.md, twenty-third
# session). `training blend` averages their changes two at a time (1/2, then 1/3 toward the
# third), refitted to rank 32. ~10-22 minutes a round and ~1 minute a blend on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
RUN=checkpoints/gemma-r32

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$RUN/checkpoint.json" ]; then
  python -m training finetune --data corpus --base gemma3 --out "$RUN" --lora --lora-r 32 \
    --lr 4e-4 --epochs 3 --warmup-steps 15 --block-size 1024 --batch-size 8 --grad-accum 1 \
    --eval-steps 25 --save-steps 25 --save-limit 40 --eval-tokens 0 --seed 5 \
    --corpus-vocab --keep-work --resume --gguf none
fi
# The best step's Trainer checkpoint (trainer_state.json names it).
BEST=$(python -c "import json,glob,os; s=[json.load(open(p)) for p in glob.glob('$RUN.work/checkpoint-*/trainer_state.json')]; print(max(s, key=lambda x: x['global_step'])['best_model_checkpoint'])")
# peft's config + the LoRA factors in bf16 (15.2 MB) + a card with every file's sha256 and
# the step's facts; the hand-written MODEL_CARD.md and NOTICE beside them are kept (update
# the card's numbers). Then its whole-val metrics at 2048 as served, written onto the card
# by shipping it once more with them.
STAGE1=runs/stage1
python -m training ship "$RUN.work/$(basename "$BEST")" --base gemma3 --card "$RUN/checkpoint.json" \
  --served-vocab corpus --out "$STAGE1" --overwrite
DPO=(--min-margin 1 --lr 5e-5 --beta 0.1 --epochs 2 --max-length 320 --sft-weight 0.2 --resume)
P=training/preferences
[ -f runs/dpo1/prefer.json ] || python -m training prefer --adapter "$STAGE1" --out runs/dpo1 \
  "${DPO[@]}" $(for d in $P/2026-12-02-train1401/pack* $P/2026-12-02-train1401-2/pack*; do echo --pack "$d"; done)
[ -f runs/dpo2/prefer.json ] || python -m training prefer --adapter runs/dpo1 --out runs/dpo2 \
  "${DPO[@]}" $(for d in $P/2026-12-02-dpo1-train1601/pack*; do echo --pack "$d"; done)
DPO3=("${DPO[@]:2}")  # the rounds' recipe; best over worst pairs have no margin
[ -f runs/dpo3-tournament/prefer.json ] || python -m training prefer --adapter runs/dpo2 \
  --out runs/dpo3-tournament "${DPO3[@]}" --chosen $P/2026-12-03-tournament-train2301/best.jsonl \
  --rejected $P/2026-12-03-tournament-train2301/worst.jsonl
[ -f runs/dpo3-decoders/prefer.json ] || python -m training prefer --adapter runs/dpo2 \
  --out runs/dpo3-decoders "${DPO[@]}" $(for d in $P/2026-12-03-decoders-train2401/pack*; do echo --pack "$d"; done)
[ -f runs/dpo3-1901/prefer.json ] || python -m training prefer --adapter runs/dpo2 \
  --out runs/dpo3-1901 "${DPO[@]}" $(for d in $P/2026-12-02-dpo2-train1901/pack*; do echo --pack "$d"; done)
[ -f runs/soup2/blend.json ] || python -m training blend runs/dpo3-tournament \
  runs/dpo3-decoders --weight 0.5 --base gemma3 --out runs/soup2 --overwrite
[ -f runs/soup3/blend.json ] || python -m training blend runs/soup2 runs/dpo3-1901 \
  --weight 0.3333333 --base gemma3 --out runs/soup3 --overwrite
# The card: stage 1's facts, every round's prefer.json (preference_stages), the blends, the
# val metrics.
python - <<'PY'
import json
old = json.load(open("runs/stage1/checkpoint.json"))
runs = ("dpo1", "dpo2", "dpo3-tournament", "dpo3-decoders", "dpo3-1901")
stages = [json.load(open(f"runs/{r}/prefer.json")) for r in runs]
keep = ("corpus", "corpus_manifest_sha256", "steps", "best_step", "tokens_seen", "val_loss",
        "val_bpb", "val_ppl", "precision")
card = {k: old[k] for k in keep if k in old} | {
    "settings": old.get("finetune_settings"),
    "train_seconds_this_run": sum(s["train_seconds"] or 0 for s in stages),
    "preference_stages": stages,
    "blends": [json.load(open(f"runs/{b}/blend.json")) for b in ("soup2", "soup3")],
    "train_eval_note": "val_loss/val_bpb/val_ppl are stage 1's own eval (before DPO); "
    "adapter_val is this adapter's exact whole-val evaluation as served",
}
json.dump(card, open("runs/soup3/card.json", "w"), indent=2)
PY
SHIP=(python -m training ship runs/soup3 --base gemma3 --card runs/soup3/card.json
  --served-vocab corpus --out sitcom/seinfeld_lora --overwrite)
"${SHIP[@]}"
python -m training evaluate seinfeld --data corpus --block-size 2048 --batch-size 1 \
  --json runs/eval-seinfeld.json
"${SHIP[@]}" --val runs/eval-seinfeld.json
