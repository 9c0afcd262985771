"""`training blend`: an adapter part of the way between two LoRA adapters, on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import build_tiny_model, save_tiny_model_dir

from training.__main__ import main


def lora(tokenizer, seed: int, r: int = 4):
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model(tokenizer)
    torch.manual_seed(seed)  # after the base, which seeds itself
    model = get_peft_model(
        base,
        LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False),
    )
    return model


def deltas(base, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return {
        name: module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {})
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("blend")
    base = str(save_tiny_model_dir(root / "base"))
    tokenizer = AutoTokenizer.from_pretrained(base)
    start = lora(tokenizer, 1)
    start.save_pretrained(root / "start")
    # a later run of the same adapter (as a `prefer` run is of the one it starts from): here
    # the same A factors and new B factors, so the blend's change keeps the rank exactly
    with torch.no_grad():
        for name, p in start.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p))
    start.save_pretrained(root / "end")
    (root / "end" / "served_vocab.json").write_text('{"ids": [0, 1, 2]}')
    lora(tokenizer, 3, r=2).save_pretrained(root / "other-rank")
    return root, base


def test_blend_lands_part_of_the_way_and_keeps_the_rank(setup, capsys):
    root, base = setup
    start, end = deltas(base, root / "start"), deltas(base, root / "end")
    assert start and start.keys() == end.keys()
    assert not any(torch.allclose(start[k], end[k]) for k in start)  # two different runs
    for weight in (0.25, 1.0):
        out = root / "new" / f"blend{weight}"  # its folder made as needed
        rc = main(["blend", str(root / "start"), str(root / "end"), "--weight", str(weight),
                   "--base", base, "--out", str(out)])  # fmt: skip
        assert rc == 0
        assert "of the way" in capsys.readouterr().out
        got = deltas(base, out)
        for name, want in start.items():
            want = (1 - weight) * want + weight * end[name]
            assert torch.allclose(got[name], want, atol=1e-4 * want.abs().max()), name
            # not the start, not the end: really in between
            if weight < 1:
                assert not torch.allclose(got[name], end[name], atol=1e-3)
        config = json.loads((out / "adapter_config.json").read_text())
        assert config["r"] == 4  # the same size as the adapters blended
        card = json.loads((out / "blend.json").read_text())
        assert card["weight"] == weight and card["modules"] == len(start)
        assert card["refit_rel_error_max"] < 1e-3
        assert (out / "served_vocab.json").read_text() == '{"ids": [0, 1, 2]}'


def test_blend_errors_are_one_line(setup, capsys, tmp_path):
    root, base = setup

    def run(*args) -> str:
        rc = main(["blend", *map(str, args), "--base", base])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and "\n" not in err and "Traceback" not in err
        return err

    assert "not a LoRA adapter" in run(tmp_path, root / "end", "--weight", "0.5",
                                       "--out", tmp_path / "x")  # fmt: skip
    assert "differ in r" in run(root / "start", root / "other-rank", "--weight", "0.5",
                                "--out", tmp_path / "x")  # fmt: skip
    # peft writes target_modules from a set: another order is the same adapter
    shuffled = tmp_path / "shuffled"
    shutil.copytree(root / "end", shuffled)
    config = json.loads((shuffled / "adapter_config.json").read_text())
    assert len(config["target_modules"]) > 1
    config["target_modules"] = sorted(config["target_modules"], reverse=True)
    (shuffled / "adapter_config.json").write_text(json.dumps(config))
    assert main(["blend", str(root / "start"), str(shuffled), "--weight", "0.5", "--base", base,
                 "--out", str(tmp_path / "y")]) == 0  # fmt: skip
    capsys.readouterr()
    config["target_modules"] = config["target_modules"][1:]
    (shuffled / "adapter_config.json").write_text(json.dumps(config))
    assert "differ in target_modules" in run(root / "start", shuffled, "--weight", "0.5",
                                             "--out", tmp_path / "z")  # fmt: skip
    assert "must be a number" in run(root / "start", root / "end", "--weight", "nan",
                                     "--out", tmp_path / "x")  # fmt: skip
    (tmp_path / "taken").mkdir()
    assert "exists" in run(root / "start", root / "end", "--weight", "0.5",
                           "--out", tmp_path / "taken")  # fmt: skip
