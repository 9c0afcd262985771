#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# A LoRA adapter (rank 16, every linear layer) on Gemma 3 270M, trained in two stages on
# 1024-token blocks of 4,096 tokens a step, fp32, softmax over the corpus's own tokens
# (--corpus-vocab). Safe to re-run after an interruption: each finetune resumes from its
# OUT.work, and a finished stage is skipped. About 2.5–3 hours on 2 idle cores (AVX2 EPYC,
# 28–36 s a step); the SmolLM2 recipe it replaced is in git history (before the switch).
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
STAGE1=checkpoints/gemma-s1
STAGE2=checkpoints/gemma-s2
COMMON=(--data corpus --block-size 1024 --batch-size 2 --grad-accum 2 --warmup-steps 5
  --eval-steps 20 --save-steps 20 --save-limit 10 --corpus-vocab --keep-work --resume
  --gguf none)

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$STAGE1/checkpoint.json" ]; then
  # Stage 1: a fresh adapter on the packaged base, lr 5e-4, cosine over 120 steps.
  python -m training finetune "${COMMON[@]}" --base gemma3 --lora --lora-r 16 \
    --out "$STAGE1" --lr 5e-4 --max-steps 120
fi
if [ ! -f "$STAGE2/checkpoint.json" ]; then
  # Stage 2: the same adapter trained on, another data order, lr 3e-4 cosine over 160 steps.
  python -m training finetune "${COMMON[@]}" --base gemma3 \
    --init-adapter "$STAGE1.work/checkpoint-120" --seed 1 --out "$STAGE2" \
    --lr 3e-4 --max-steps 160
fi
# peft's config + the LoRA factors in bf16 (7.6 MB) + a card with every file's sha256 and
# the step's facts (its trainer_state.json); the hand-written MODEL_CARD.md and NOTICE beside
# them are kept (update the card's numbers). Then its whole-val metrics at 2048 as served,
# written onto the card by shipping it once more with them.
SHIP=(python -m training ship "$STAGE2.work/checkpoint-160" --base gemma3
  --card "$STAGE2/checkpoint.json" --out sitcom/seinfeld_lora --overwrite)
"${SHIP[@]}"
python -m training evaluate seinfeld --data corpus --block-size 2048 --batch-size 1 \
  --json runs/eval-seinfeld.json
"${SHIP[@]}" --val runs/eval-seinfeld.json
