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
SHIP=(python -m training ship "$RUN.work/$(basename "$BEST")" --base gemma3
  --card "$RUN/checkpoint.json" --out sitcom/seinfeld_lora --overwrite)
"${SHIP[@]}"
python -m training evaluate seinfeld --data corpus --block-size 2048 --batch-size 1 \
  --json runs/eval-seinfeld.json
"${SHIP[@]}" --val runs/eval-seinfeld.json
