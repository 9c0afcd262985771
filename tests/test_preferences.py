"""The reader-labelled preference batches kept in training/preferences load the way
`python -m training prefer --pack` reads them, from the repository root."""

import json
from pathlib import Path

from training.prefer import judged_pairs

ROOT = Path(__file__).resolve().parent.parent
PACKS = sorted((ROOT / "training" / "preferences").glob("*/pack*"))


def test_every_kept_pack_gives_one_pair_per_judged_opening(monkeypatch):
    assert PACKS, "training/preferences holds no pack"
    monkeypatch.chdir(ROOT)  # the keys name their scene files from the repository root
    for pack in PACKS:
        key = json.loads((pack / "key.json").read_text())
        assert not Path(key["systems"]["A"]["file"]).is_absolute(), pack
        pairs = judged_pairs([pack])
        assert 0 < len(pairs) <= key["n_pairs"], pack
        for p in pairs:
            assert p["chosen"] != p["rejected"] and p["prompt"].endswith("\n")
