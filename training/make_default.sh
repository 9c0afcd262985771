#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# Safe to re-run after an interruption: finetune resumes from checkpoints/seinfeld-full.work.
# ~65 min on 2 idle cores with AVX-512 BF16 (bf16 autocast, ~280 tok/s), longer without.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
FULL=checkpoints/seinfeld-full

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$FULL/checkpoint.json" ]; then
  # Full fine-tune of the linear layers (embeddings and norms frozen) so the change is a set
  # of matrix deltas; one epoch: cosine schedule over 134 steps of 4 x 4 x 512 tokens.
  python -m training finetune --data corpus --out "$FULL" --linear-only --max-steps 134 \
    --eval-steps 20 --save-steps 20 --save-limit 1 --keep-work --resume
fi
# Best rank-32 approximation of each layer's change: ~19.5 MB in bf16; the card gets the
# adapter's val BPB on the whole val split.
python -m training extract "$FULL" --rank 32 --data corpus --out sitcom/seinfeld_lora
python -m training evaluate seinfeld --data corpus --json runs/eval-seinfeld.json
