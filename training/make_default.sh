#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# Safe to re-run after an interruption: finetune resumes from checkpoints/seinfeld-full.work.
# ~75 min on 2 idle cores with AVX-512 BF16 (bf16 autocast, ~230-280 tok/s), longer without.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
FULL=checkpoints/seinfeld-full

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$FULL/checkpoint.json" ]; then
  # Full fine-tune (every weight; the embedding is tied to the LM head), 1.24 epochs:
  # cosine schedule over 160 steps of 4 x 4 x 512 tokens, lr 1e-4, best step by val BPB.
  python -m training finetune --data corpus --out "$FULL" --max-steps 160 \
    --eval-steps 10 --save-steps 10 --save-limit 1 --keep-work --resume
fi
# Best rank-64 approximation (SVD) of each linear layer's change, rank 64 of the embedding's,
# the norms whole; int8 factors: ~23 MB. The card gets the adapter's val BPB (whole val split).
python -m training extract "$FULL" --rank 64 --embed-rank 64 --dtype int8 \
  --calibration-tokens 0 --data corpus --out sitcom/seinfeld_lora
python -m training evaluate seinfeld --data corpus --json runs/eval-seinfeld.json
