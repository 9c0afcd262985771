#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# Safe to re-run after an interruption: each finetune resumes from its OUT.work, and a
# finished stage is skipped. About 3.2 hours on 2 idle cores with AVX-512 BF16 (bf16
# autocast): stage 1 ~75-110 min, stage 2 ~75 min, extract + evaluate ~15 min; longer
# without bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
STAGE1=checkpoints/seinfeld-full
STAGE2=checkpoints/seinfeld-full2k

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$STAGE1/checkpoint.json" ]; then
  # Stage 1, full fine-tune (every weight; the embedding is tied to the LM head), 1.24 epochs:
  # cosine schedule over 160 steps of 4 x 4 x 512 tokens, lr 1e-4, best step by val BPB.
  python -m training finetune --data corpus --out "$STAGE1" --max-steps 160 \
    --eval-steps 10 --save-steps 10 --save-limit 1 --keep-work --resume
fi
if [ ! -f "$STAGE2/checkpoint.json" ]; then
  # Stage 2, full fine-tune of stage 1 on 2048-token blocks (longer context), 0.75 epoch:
  # 100 steps of 2 x 2 x 2048 tokens, lr 1e-4 warmup 5 cosine. Its card names stage 1.
  python -m training finetune --data corpus --base "$STAGE1" --out "$STAGE2" \
    --block-size 2048 --batch-size 2 --grad-accum 2 --lr 1e-4 --warmup-steps 5 \
    --max-steps 100 --eval-steps 10 --save-steps 10 --save-limit 1 --keep-work --resume \
    --gguf none
fi
# Best rank-128 approximation (SVD) of each linear layer's change against the packaged base,
# rank 64 of the embedding's, the norms whole; int4 factors (blocks of 32): ~23.8 MB.
# The card gets the adapter's val BPB (whole val split, 2048-token blocks).
# extract replaces the whole folder; the hand-written model card is kept (update its numbers).
CARD=$(mktemp)
cp sitcom/seinfeld_lora/MODEL_CARD.md "$CARD"
python -m training extract "$STAGE2" --base smollm2 --rank 128 --embed-rank 64 --dtype int4 \
  --calibration-tokens 0 --data corpus --out sitcom/seinfeld_lora --overwrite
cp "$CARD" sitcom/seinfeld_lora/MODEL_CARD.md && rm -f "$CARD"
python -m training evaluate seinfeld --data corpus --json runs/eval-seinfeld.json
