#!/usr/bin/env bash
# Rebuild the shipped default (sitcom/seinfeld_lora/) from the raw transcripts:
#   bash training/make_default.sh [RAW_DIR]
# Safe to re-run after an interruption: each finetune resumes from its OUT.work, and a
# finished stage is skipped. About 3.5 hours on 2 idle cores with AVX-512 BF16 (bf16
# autocast): stage 1 ~75-110 min, stage 2 ~100 min; longer without bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
RAW=${1:-../shared/data/seinfeld-raw}
FULL=checkpoints/seinfeld-full
STAGE1=checkpoints/seinfeld-full-r64
STAGE2=checkpoints/seinfeld-ctx2k

[ -f corpus/manifest.json ] || python -m data prepare "$RAW" corpus
if [ ! -f "$FULL/checkpoint.json" ]; then
  # Stage 1, full fine-tune (every weight; the embedding is tied to the LM head), 1.24 epochs:
  # cosine schedule over 160 steps of 4 x 4 x 512 tokens, lr 1e-4, best step by val BPB.
  python -m training finetune --data corpus --out "$FULL" --max-steps 160 \
    --eval-steps 10 --save-steps 10 --save-limit 1 --keep-work --resume
fi
# Best rank-64 approximation (SVD) of each linear layer's change, rank 64 of the embedding's,
# the norms whole; int8 factors: ~23 MB.
[ -f "$STAGE1/checkpoint.json" ] || python -m training extract "$FULL" --rank 64 \
  --embed-rank 64 --dtype int8 --out "$STAGE1"
if [ ! -f "$STAGE2/checkpoint.json" ]; then
  # Stage 2: train that adapter itself (so nothing is lost to extraction any more) on
  # 2048-token blocks, 90 steps of 2 x 2 x 2048 tokens, lr 2e-4 cosine.
  python -m training finetune --data corpus --out "$STAGE2" --init-adapter "$STAGE1" \
    --block-size 2048 --batch-size 2 --grad-accum 2 --lr 2e-4 --warmup-steps 5 \
    --max-steps 90 --eval-steps 20 --save-steps 20 --save-limit 1 --keep-work --resume \
    --gguf none
fi
# Stage 2's change of each matrix has rank <= 64 by construction, so this SVD loses nothing
# but int8 rounding. The card gets the adapter's val BPB (whole val split, 2048-token blocks).
python -m training extract "$STAGE2" --rank 64 --embed-rank 64 --dtype int8 \
  --calibration-tokens 0 --data corpus --out sitcom/seinfeld_lora
python -m training evaluate seinfeld --data corpus --json runs/eval-seinfeld.json
