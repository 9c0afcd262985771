"""The llama.cpp self-test's child process (sitcom.model.llamacpp_check runs it once per machine
and kind of GGUF): decode PROBE_TEXT with llama.cpp, then with transformers, and print one
JSON verdict line. Its own module so that the checker never imports the server it judges.

    python -m sitcom.model.llamacpp_probe GGUF HF_SOURCE
"""

from __future__ import annotations

import json
import sys


def probe_main(gguf_path: str, hf_source: str) -> int:
    """The child: decode PROBE_TEXT with llama.cpp, then with transformers; print one JSON."""
    import torch

    from sitcom.model.catalog import load_model
    from sitcom.model.llamacpp import LlamaCppModel
    from sitcom.model.llamacpp_check import PROBE_TEXT, compare_logits

    model, tokenizer = load_model(hf_source)
    # With the special tokens the tokenizer adds by default: Gemma's BOS carries its attention
    # sink, and without it both backends leave the model's normal regime and disagree.
    ids = tokenizer(PROBE_TEXT)["input_ids"][:48]
    llm = LlamaCppModel(gguf_path, max_batch=1, n_ctx_per_seq=128, n_threads=1)
    ll = llm.logits_of(ids)
    llm.close()
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float().numpy()
    ok, reason = compare_logits(hf, ll)
    print(json.dumps({"ok": ok, "reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(probe_main(sys.argv[1], sys.argv[2]))
