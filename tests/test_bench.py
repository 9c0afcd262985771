"""bench.scene_time: whole models' single-scene time through the real engine, compared in
one run (the speed goal of a new default lives there, not in a timed test)."""

from __future__ import annotations

import json
import shutil

import pytest


@pytest.mark.e2e
def test_scene_time_compares_models_in_turns(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from bench.scene_time import OPENINGS, main
    from sitcom.settings import SceneSettings

    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    other = str(shutil.copytree(tiny_model_dir, tmp_path / "other")) + "@best_of=1,guidance=2"
    out = tmp_path / "scene_time.json"
    assert main([str(tiny_model_dir), str(other), "--rounds", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for model in (str(tiny_model_dir), other):
        (run,) = result["runs"][model]
        assert len(run["times"]) == len(run["tokens"]) == len(OPENINGS)
        assert all(t > 0 for t in run["times"]) and all(n > 0 for n in run["tokens"])
    assert result["summary"][str(tiny_model_dir)]["ratio"] == 1.0
    assert result["summary"][other]["ratio"] > 0
    # a preset is timed with its settings (`MODEL@key=value,...`), the first with the defaults
    assert result["runs"][other][0]["settings"]["guidance"] == 2.0
    assert result["runs"][other][0]["settings"]["best_of"] == 1
    default = SceneSettings()
    assert result["runs"][str(tiny_model_dir)][0]["settings"]["guidance"] == default.guidance
    assert "x the first" in capsys.readouterr().out
    assert main(["/no/such/model", "--rounds", "1", "--out", str(out)]) == 1
    assert "error: /no/such/model" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad setting is refused before any model loads
        main([f"{tiny_model_dir}@guidance=9", "--out", str(out)])
    assert "guidance must be between 1 and 3" in capsys.readouterr().err
