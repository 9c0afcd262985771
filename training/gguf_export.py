"""Export a fine-tuned checkpoint to GGUF so llama.cpp can serve it.

    python -m training.gguf_export checkpoints/NAME [--qtype q8_0|f16|f32|q4_1] [--out FILE]

Writes CHECKPOINT/model.gguf by default; the bot serves a checkpoint through llama.cpp
when that file is there (see sitcom/model/llamacpp.py). The writer is sitcom.model.gguf_export.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from data.outputs import OutputPathError, check_output_file, dir_files, refuse_overlap
from sitcom.model import gguf_export
from sitcom.model.gguf_export import QTYPES, ExportError

__all__ = ["ExportError", "QTYPES", "export_gguf", "main"]


def export_gguf(
    checkpoint_dir: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    qtype: str = "q8_0",
) -> Path:
    """Load the checkpoint (a directory, or a built-in name) and write it as GGUF with
    sitcom.model.gguf_export.export_gguf: to out_path, by default CHECKPOINT/model.gguf."""
    from sitcom.model.catalog import load_model

    if qtype not in QTYPES:
        raise ExportError(f"unknown qtype {qtype!r}; choose one of {', '.join(QTYPES)}")
    model, tokenizer = load_model(checkpoint_dir)
    out = Path(out_path) if out_path else Path(checkpoint_dir) / "model.gguf"
    return gguf_export.export_gguf(model, tokenizer, out, qtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.gguf_export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="checkpoint directory (HF model) or 'smollm2'")
    parser.add_argument("--qtype", choices=QTYPES, default="q8_0")
    parser.add_argument("--out", help="output file (default: CHECKPOINT/model.gguf)")
    args = parser.parse_args(argv)
    from sitcom.model.catalog import ModelLoadError

    if args.out is None and not Path(args.checkpoint).is_dir():
        print(f"error: {args.checkpoint} is not a directory; pass --out FILE", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / "model.gguf"
    try:
        # A regular file or a new name, and no file of the checkpoint but its own model.gguf.
        refuse_overlap(
            [out],
            {
                f"a file of the checkpoint {args.checkpoint}": dir_files(
                    args.checkpoint, keep=lambda p: p.name != "model.gguf"
                )
            },
            "--out",
            out,
        )
        check_output_file(out, "--out")
    except OutputPathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        path = export_gguf(args.checkpoint, args.out, args.qtype)
    except (ExportError, ModelLoadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.qtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
