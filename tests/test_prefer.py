"""`training prefer`: DPO on (the show's next lines, the writer's own scene) pairs with trl,
on a tiny model and adapter."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import build_tiny_model, save_tiny_model_dir, write_corpus

from training.__main__ import main
from training.judge import make_openings, pack, write_jsonl
from training.prefer import (
    PreferConfig,
    PreferError,
    judged_pairs,
    prefer,
    preference_pairs,
    scene_pairs,
)

pytest.importorskip("trl")

CAST = ["JERRY", "GEORGE", "ELAINE", "KRAMER"]


def episode(tag: str) -> str:
    lines = []
    for s in range(3):
        lines += [f"[Scene: Place {tag}-{s}]", f"(Jerry enters, {tag} scene {s})"]
        lines += [f"{CAST[t % 4]}: Serenity now, it's line {t} of {tag}." for t in range(16)]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("prefer")
    base = save_tiny_model_dir(root / "base")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    peft_model = get_peft_model(
        build_tiny_model(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    peft_model.save_pretrained(root / "adapter")
    corpus = write_corpus(
        root / "corpus", [episode(f"train{i}") for i in range(3)], [episode("val0")]
    )
    openings = make_openings(corpus, 6, seed=1, split="train")
    write_jsonl(root / "openings.jsonl", openings)
    own = [
        {"id": o["id"], "lines": ["NEWMAN: Okay. Okay. Okay.", "BABY: Hello hello hello."]}
        for o in openings
    ]
    write_jsonl(root / "own.jsonl", own)
    return root, base, tokenizer


def tiny_config(root, base, out, **changes) -> PreferConfig:
    """A short run from the setup's adapter: 3 epochs of batches of 2, one step each."""
    settings = {"lr": 2e-3, "epochs": 3, "batch_size": 2, "grad_accum": 1}
    return PreferConfig(
        out=out, adapter=root / "adapter", base=str(base), **{**settings, **changes}
    )


def prefer_cli(root, out, adapter, base) -> int:
    """`python -m training prefer` on the setup's openings and own scenes."""
    return main(
        ["prefer", "--openings", str(root / "openings.jsonl"), "--scenes", str(root / "own.jsonl"),
         "--out", str(out), "--adapter", str(adapter), "--base", str(base)]
    )  # fmt: skip


def opening_ids(root) -> list[str]:
    return [json.loads(x)["id"] for x in (root / "openings.jsonl").read_text().splitlines()]


def sequence_logp(model, tokenizer, prompt: str, completion: str) -> float:
    ids = tokenizer(prompt + completion)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    targets = torch.tensor(ids[1:])
    return float(logits[torch.arange(len(targets)), targets][start - 1 :].sum())


def pair_margins(base, tokenizer, adapter, pairs: list[dict]) -> list[float]:
    """log p(chosen) - log p(rejected) of each pair under the base with `adapter`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    return [
        sequence_logp(model, tokenizer, p["prompt"], p["chosen"])
        - sequence_logp(model, tokenizer, p["prompt"], p["rejected"])
        for p in pairs
    ]


def test_pairs_take_the_show_over_the_writers_own_scene(setup, tmp_path):
    root, *_ = setup
    pairs = preference_pairs(root / "openings.jsonl", root / "own.jsonl")
    assert len(pairs) == 6
    for p in pairs:
        assert p["prompt"].endswith("\n") and "line" in p["prompt"]
        assert p["chosen"].startswith(("JERRY", "GEORGE", "ELAINE", "KRAMER"))
        assert p["rejected"] == "NEWMAN: Okay. Okay. Okay.\nBABY: Hello hello hello.\n"
    write_jsonl(tmp_path / "none.jsonl", [{"id": "ep9:9", "lines": ["JERRY: Hi."]}])
    with pytest.raises(PreferError, match="has a scene in"):
        preference_pairs(root / "openings.jsonl", tmp_path / "none.jsonl")


def test_prefer_moves_the_adapter_toward_the_show_and_resumes(setup, tmp_path, capsys):

    root, base, tokenizer = setup
    out = tmp_path / "run"
    cfg = tiny_config(
        root, base, out, openings=root / "openings.jsonl", scenes=root / "own.jsonl", save_steps=4
    )
    card = prefer(cfg)
    assert card["pairs"] == 6 and card["steps"] == card["max_steps"] == 9
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "prefer.json",
    ]  # the reference copy trl trains beside it is not saved
    assert json.loads((out / "prefer.json").read_text())["steps"] == 9

    def margins(adapter) -> list[float]:
        pairs = preference_pairs(root / "openings.jsonl", root / "own.jsonl")
        return pair_margins(base, tokenizer, adapter, pairs)

    before, after = margins(root / "adapter"), margins(out)
    assert all(a > b for a, b in zip(after, before, strict=True))

    # An existing OUT needs --resume; with it the run goes on from OUT.work's last save.
    capsys.readouterr()
    rc = prefer_cli(root, out, root / "adapter", base)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pass --resume" in err[0]
    more = prefer(PreferConfig(**{**cfg.__dict__, "epochs": 4, "resume": True}))
    assert more["steps"] == 12  # 9 done, 3 more


def test_prefer_cli_errors_are_one_line(setup, tmp_path, capsys):
    root, base, _ = setup
    rc = main(
        [
            "prefer",
            "--openings",
            str(tmp_path / "missing.jsonl"),
            "--scenes",
            str(root / "own.jsonl"),
            "--out",
            str(tmp_path / "o"),
            "--base",
            str(base),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and err[0].startswith("error: ")
    assert not (tmp_path / "o").exists()


def judged_pack(root, tmp_path, better_a: dict[str, bool], margins: dict[str, int]):
    """A pack of two scene files over the setup's openings, judged: for each opening id,
    whether the reader preferred A's scene, and by how many summed score points."""
    openings = [json.loads(x) for x in (root / "openings.jsonl").read_text().splitlines()]
    for s, line in (("a", "JERRY: A's line about {id}."), ("b", "GEORGE: B's line about {id}.")):
        write_jsonl(
            tmp_path / f"{s}.jsonl",
            [
                {
                    "id": o["id"],
                    "label": s,
                    "model": "m",
                    "settings": {},
                    "opening": o["opening"],
                    "lines": [line.format(id=o["id"])],
                }
                for o in openings
            ],
        )
    key = pack([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tmp_path / "pack", seed=3, repeat=2)
    verdicts = []
    for pid, p in key["pairs"].items():
        a_slot = 1 if p["scene1"] == "A" else 2
        better = a_slot if better_a[p["opening"]] else 3 - a_slot
        if p["repeat_of"] is not None:  # the reader changed its mind on the repeats
            better = 3 - better
        low = {"coherence": 1, "humour": 1, "voice": 1}
        high = {"coherence": 1 + margins[p["opening"]], "humour": 1, "voice": 1}
        verdicts.append(
            {
                "pair": int(pid),
                "better": better,
                "real": "none",
                f"scene{better}": high,
                f"scene{3 - better}": low,
            }
        )
    write_jsonl(tmp_path / "pack" / "verdicts.jsonl", verdicts)
    return openings


def test_judged_pairs_choose_the_readers_scene_and_skip_repeats_and_close_calls(setup, tmp_path):
    root, _, _ = setup
    ids = opening_ids(root)
    better_a = {i: n % 2 == 0 for n, i in enumerate(ids)}
    margins = {i: 1 + n % 3 for n, i in enumerate(ids)}  # 1, 2, 3, 1, ...
    openings = judged_pack(root, tmp_path, better_a, margins)
    pairs = judged_pairs([tmp_path / "pack"])
    assert len(pairs) == len(openings)  # one pair per opening: repeats left out
    by_prompt = {p["prompt"]: p for p in pairs}
    for o in openings:
        p = by_prompt["\n".join(o["opening"]) + "\n"]
        winner, loser = ("A", "B") if better_a[o["id"]] else ("B", "A")
        assert p["chosen"].endswith(f"{winner}'s line about {o['id']}.\n")
        assert p["chosen"].split(":")[0] == {"A": "JERRY", "B": "GEORGE"}[winner]
        assert p["rejected"].split(":")[0] == {"A": "JERRY", "B": "GEORGE"}[loser]
    close = judged_pairs([tmp_path / "pack"], min_margin=2)
    assert len(close) == sum(m >= 2 for m in margins.values())
    with pytest.raises(PreferError, match="passes --min-margin"):
        judged_pairs([tmp_path / "pack"], min_margin=4)
    # two identical samples (it happens at temperature 0.7) teach nothing: left out
    rows = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    rows[0]["lines"] = [f"JERRY: A's line about {rows[0]['id']}."]
    write_jsonl(tmp_path / "b.jsonl", rows)
    assert len(judged_pairs([tmp_path / "pack"])) == len(openings) - 1


def test_judged_pairs_refuse_unjudged_packs_and_mixed_modes_in_one_line(setup, tmp_path, capsys):
    root, base, _ = setup
    ids = opening_ids(root)
    judged_pack(root, tmp_path, dict.fromkeys(ids, True), dict.fromkeys(ids, 1))
    lines = (tmp_path / "pack" / "verdicts.jsonl").read_text().splitlines()
    (tmp_path / "pack" / "verdicts.jsonl").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(PreferError, match="no verdict for pair"):
        judged_pairs([tmp_path / "pack"])
    for extra in (
        ["--pack", str(tmp_path / "pack"), "--openings", str(root / "openings.jsonl")],
        ["--pack", str(tmp_path / "pack")],
        ["--pack", str(tmp_path / "nothing")],
        ["--openings", str(root / "openings.jsonl")],
    ):
        rc = main(["prefer", *extra, "--out", str(tmp_path / "o"), "--base", str(base)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("error: "), (extra, err)
    assert not (tmp_path / "o").exists()


def test_prefer_on_judged_pairs_moves_the_adapter_toward_the_readers_choice(setup, tmp_path):
    root, base, tokenizer = setup

    ids = opening_ids(root)
    judged_pack(root, tmp_path, dict.fromkeys(ids, True), dict.fromkeys(ids, 2))
    pairs = judged_pairs([tmp_path / "pack"])

    def margin(adapter) -> float:
        return sum(pair_margins(base, tokenizer, adapter, pairs))

    cfg = tiny_config(root, base, tmp_path / "out", pack=[tmp_path / "pack"], lr=5e-3)
    card = prefer(cfg)
    assert card["pairs"] == len(ids) and "blind reader" in card["method"]
    assert margin(tmp_path / "out") > margin(root / "adapter") + 1.0


def test_prefer_mixes_judged_pairs_with_the_shows_and_moves_both(setup, tmp_path):
    """--pack with --openings/--scenes: the readers' pairs and the show-over-writer pairs in
    one run; the card counts each kind, and both kinds are learnt."""
    root, base, tokenizer = setup

    ids = opening_ids(root)
    judged_pack(root, tmp_path, dict.fromkeys(ids, True), dict.fromkeys(ids, 2))
    judged = judged_pairs([tmp_path / "pack"])
    show = preference_pairs(root / "openings.jsonl", root / "own.jsonl")

    def margin(adapter, pairs) -> float:
        return sum(pair_margins(base, tokenizer, adapter, pairs))

    cfg = tiny_config(
        root, base, tmp_path / "out", pack=[tmp_path / "pack"], lr=5e-3,
        openings=root / "openings.jsonl", scenes=root / "own.jsonl",
    )  # fmt: skip
    card = prefer(cfg)
    assert (card["pairs_judged"], card["pairs_show"]) == (len(judged), len(show)) == (6, 6)
    assert card["pairs"] == 12 and card["steps"] == 18  # 3 epochs of 6 batches of 2
    assert "blind reader" in card["method"] and "the show's continuation" in card["method"]
    # each kind was trained on: it gains more than in a run on the other kind alone
    prefer(tiny_config(root, base, tmp_path / "judged", pack=[tmp_path / "pack"], lr=5e-3))
    prefer(tiny_config(root, base, tmp_path / "show", lr=5e-3, openings=root / "openings.jsonl",
                       scenes=root / "own.jsonl"))  # fmt: skip
    # (the show's pairs, far apart, dominate the mixed batches' gradients: a smaller gain)
    assert margin(tmp_path / "out", judged) > margin(tmp_path / "show", judged) + 0.3
    assert margin(tmp_path / "out", show) > margin(tmp_path / "judged", show) + 1.0
    # --scenes without --openings is still one line, not a half-mixed run
    with pytest.raises(PreferError, match="go together"):
        prefer(tiny_config(root, base, tmp_path / "o2", pack=[tmp_path / "pack"],
                           scenes=root / "own.jsonl"))  # fmt: skip


def picked_files(root, tmp_path):
    """Scenes files of one writer over the setup's openings: the better and the worse scene
    of each (as `judge pick` writes them after a tournament); one opening has the same scene
    on both sides, one is only in the better file."""
    openings = [json.loads(x) for x in (root / "openings.jsonl").read_text().splitlines()]
    common = {"model": "seinfeld", "settings": {"temperature": 0.7}}
    better = [
        {"id": o["id"], "opening": o["opening"], "label": "better", **common,
         "lines": ["GEORGE: The marble rye!", "JERRY: You stole a rye?"]}
        for o in openings
    ]  # fmt: skip
    worse = [
        {**b, "label": "worse", "lines": ["NEWMAN: Okay. Okay.", "BABY: Hello hello."]}
        for b in better[:-1]
    ]
    worse[0]["lines"] = better[0]["lines"]
    write_jsonl(tmp_path / "better.jsonl", better)
    write_jsonl(tmp_path / "worse.jsonl", worse)
    return tmp_path / "better.jsonl", tmp_path / "worse.jsonl"


def test_prefer_on_picked_scenes_moves_the_adapter_toward_the_better_side(setup, tmp_path, capsys):
    root, base, tokenizer = setup

    better, worse = picked_files(root, tmp_path)
    pairs = scene_pairs(better, worse)
    assert len(pairs) == 4  # the same-scene opening and the one-sided one are left out
    assert {p["chosen"] for p in pairs} == {"GEORGE: The marble rye!\nJERRY: You stole a rye?\n"}
    assert all(p["rejected"].startswith("NEWMAN") and p["prompt"].endswith("\n") for p in pairs)

    def margin(adapter) -> float:
        return sum(pair_margins(base, tokenizer, adapter, pairs))

    rc = main(
        ["prefer", "--chosen", str(better), "--rejected", str(worse), "--out",
         str(tmp_path / "out"), "--adapter", str(root / "adapter"), "--base", str(base),
         "--lr", "5e-3", "--epochs", "3", "--batch-size", "2", "--grad-accum", "1"]
    )  # fmt: skip
    assert rc == 0
    card = json.loads((tmp_path / "out" / "prefer.json").read_text())
    assert (card["pairs"], card["pairs_picked"], card["pairs_judged"]) == (4, 4, 0)
    assert "--chosen" in card["method"]
    assert margin(tmp_path / "out") > margin(root / "adapter") + 1.0
    capsys.readouterr()  # the run's progress bars
    for extra in (
        ["--chosen", str(better)],
        ["--chosen", str(better), "--rejected", str(tmp_path / "missing.jsonl")],
        ["--chosen", str(better), "--rejected", str(better)],  # nothing differs
    ):
        rc = main(["prefer", *extra, "--out", str(tmp_path / "o"), "--base", str(base)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("error: "), (extra, err)
    assert not (tmp_path / "o").exists()


def served_adapter(root, tmp_path, tokenizer, texts: list[str], drop: str | None = None):
    """A copy of the setup's adapter with a served_vocab.json of the tokens `texts` use (and
    the special tokens), less the tokens of `drop`."""
    import shutil

    from sitcom.model.gguf_vocab import write_served_vocab

    ids = {i for t in texts for i in tokenizer(t)["input_ids"]} | set(tokenizer.all_special_ids)
    if drop is not None:
        ids -= set(tokenizer(drop, add_special_tokens=False)["input_ids"])
    adapter = tmp_path / "served_adapter"
    shutil.copytree(root / "adapter", adapter)
    write_served_vocab(adapter / "served_vocab.json", sorted(ids), len(tokenizer))
    return adapter, torch.tensor(sorted(ids))


def test_the_cut_vocabulary_computes_the_served_rows_of_the_same_model(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.prefer import cut_vocab

    root, base, tokenizer = setup
    text = "JERRY: Serenity now, it's line 3.\nGEORGE: Okay.\n"
    _, keep = served_adapter(root, tmp_path, tokenizer, [text])
    full = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cut = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    cut_vocab(cut, keep)
    assert cut.get_output_embeddings().weight.shape[0] == len(keep) < len(tokenizer)
    ids = tokenizer(text)["input_ids"]
    row = {t: r for r, t in enumerate(keep.tolist())}
    with torch.no_grad():
        want = full(torch.tensor([ids])).logits[..., keep]
        got = cut(torch.tensor([[row[t] for t in ids]])).logits
    torch.testing.assert_close(got, want)


def test_pairs_map_into_the_kept_rows_and_one_with_a_cut_token_is_left_out():
    from datasets import Dataset

    from training.prefer import to_kept_ids

    keep = torch.tensor([0, 2, 5, 7])
    rows = [
        {"prompt_ids": [0, 5], "chosen_ids": [7, 2], "rejected_ids": [5]},
        {"prompt_ids": [0, 5], "chosen_ids": [7, 3], "rejected_ids": [5]},  # 3 is cut
        {"prompt_ids": [2], "chosen_ids": [9], "rejected_ids": [0]},  # 9 is past the vocabulary
    ]
    kept, outside = to_kept_ids(Dataset.from_list(rows), keep, full_size=8)
    assert outside == 2 and kept.to_list() == [
        {"prompt_ids": [0, 2], "chosen_ids": [3, 1], "rejected_ids": [2]}
    ]
    with pytest.raises(PreferError, match="--full-vocab"):
        to_kept_ids(Dataset.from_list(rows[1:]), keep, full_size=8)


def test_prefer_trains_the_served_vocabulary_and_saves_an_adapter_for_the_whole_model(
    setup, tmp_path, capsys
):

    root, base, tokenizer = setup
    pairs = preference_pairs(root / "openings.jsonl", root / "own.jsonl")
    texts = [p[k] for p in pairs for k in ("prompt", "chosen", "rejected")] + ["\n"]
    adapter, keep = served_adapter(root, tmp_path, tokenizer, texts)
    common = {"openings": root / "openings.jsonl", "scenes": root / "own.jsonl"}
    card = prefer(
        PreferConfig(
            out=tmp_path / "run",
            adapter=adapter,
            base=str(base),
            lr=2e-3,
            epochs=3,
            batch_size=2,
            grad_accum=1,
            sft_weight=0.5,
            **common,
        )
    )
    assert card["head_rows"] == len(keep) < len(tokenizer)
    assert card["pairs"] == 6 and card["pairs_outside_served_vocab"] == 0
    served = (tmp_path / "run" / "served_vocab.json").read_text()
    assert served == (adapter / "served_vocab.json").read_text()  # the head it was trained for
    assert card["precision"] in ("bf16", "fp32") and card["steps"] == 9

    def margins(path) -> list[float]:
        return pair_margins(base, tokenizer, path, pairs)

    # saved for the whole model: it loads on the full base and moved toward the chosen side
    assert all(a > b for a, b in zip(margins(tmp_path / "run"), margins(adapter), strict=True))

    # a pair with a token the served vocabulary lacks is left out; all of them: one line
    lacking, _ = served_adapter(root, tmp_path / "x", tokenizer, texts, drop="Serenity")
    # (every opening has it; the rejected scenes do not, see setup)
    rc = prefer_cli(root, tmp_path / "o", lacking, base)
    err = capsys.readouterr().err.strip().splitlines()  # after the loading progress bars
    assert rc == 2 and err[-1].startswith("error: ") and "--full-vocab" in err[-1], err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o").exists()
