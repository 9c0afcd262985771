"""Issue 20, items 1, 2, 3, 5 and 9 (`python -m training` and `python -m data`): outputs that
replaced what was there, a full disk while the Trainer saves, and a wrong `extract --base`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EPISODE, build_tiny_tokenizer, finetune_args, save_tiny_model_dir, write_corpus

from sitcom.model.catalog import load_model
from training.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus", [EPISODE] * 6, [EPISODE])


def last_err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(base dir, tuned dir): the tuned model is the base with a rank-2 change of its linear
    layers, and its card names the base, as finetune's card does."""
    root = tmp_path_factory.mktemp("pair")
    base = save_tiny_model_dir(root / "base")
    model, tok = load_model(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            lin = layer.self_attn.q_proj
            out_f, in_f = lin.weight.shape
            lin.weight += torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen)
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    (tuned / "checkpoint.json").write_text(json.dumps({"steps": 7, "base_model": str(base)}))
    return base, tuned


def extract_args(tuned: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return [
        "extract",
        str(tuned),
        "--base",
        str(base),
        "--rank",
        "2",
        "--dtype",
        "float32",
        "--out",
        str(out),
        *extra,
    ]


# -- 1. extract --out refuses an existing OUT unless --overwrite ---------------------------


def test_extract_refuses_an_existing_out_unless_overwrite(tmp_path, pair, capsys):
    base, tuned = pair
    out = tmp_path / "corpus-folder"
    out.mkdir()
    (out / "train.txt").write_text("a corpus somebody cares about")
    assert main(extract_args(tuned, base, out)) == 2
    line = last_err(capsys)
    assert line.startswith("error: ") and "--overwrite" in line and str(out) in line
    assert (out / "train.txt").read_text() == "a corpus somebody cares about"

    assert main(extract_args(tuned, base, out, "--overwrite")) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "train.txt").exists()


# -- 2. outputs are regular files or new names; the same for every output of the CLIs -------


def special_files(tmp_path: Path) -> dict[str, Path]:
    """A symlink to a file, a dangling symlink, a named pipe and (where allowed) a device."""
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    found = {
        "symlink": tmp_path / "link.json",
        "dangling": tmp_path / "dangling.json",
        "fifo": tmp_path / "fifo.json",
    }
    found["symlink"].symlink_to(precious)
    found["dangling"].symlink_to(tmp_path / "nowhere" / "x")
    os.mkfifo(found["fifo"])
    try:
        os.mknod(tmp_path / "null.json", 0o666 | 0o020000, os.makedev(1, 3))  # like /dev/null
        found["device"] = tmp_path / "null.json"
    except (PermissionError, OSError):
        pass
    return found


def kinds(paths: dict[str, Path]) -> dict[str, tuple]:
    return {
        k: (os.lstat(p).st_mode, os.readlink(p) if p.is_symlink() else None)
        for k, p in paths.items()
    }


def test_evaluate_json_writes_only_a_regular_file_or_a_new_name(
    tmp_path, corpus, tiny_model_dir, capsys
):
    specials = special_files(tmp_path)
    before = kinds(specials)
    for name, path in specials.items():
        assert (
            main(
                [
                    "evaluate",
                    str(tiny_model_dir),
                    "--data",
                    str(corpus),
                    "--samples",
                    "0",
                    "--json",
                    str(path),
                ]
            )
            == 2
        ), name
        line = last_err(capsys)
        assert line.startswith("error: --json ") and "not a regular file" in line, line
    assert kinds(specials) == before
    assert (tmp_path / "precious.txt").read_text() == "keep me"

    plain = tmp_path / "runs" / "eval.json"
    assert (
        main(
            [
                "evaluate",
                str(tiny_model_dir),
                "--data",
                str(corpus),
                "--samples",
                "0",
                "--json",
                str(plain),
            ]
        )
        == 0
    )
    assert json.loads(plain.read_text())["val"]["bpb"] > 0
    assert (
        main(
            [
                "evaluate",
                str(tiny_model_dir),
                "--data",
                str(corpus),
                "--samples",
                "0",
                "--json",
                str(plain),
            ]
        )
        == 0
    )  # a regular file: replaced


def test_evaluate_json_is_checked_again_when_written(tmp_path, monkeypatch):
    """The path is checked before minutes of evaluation and again at the rename."""
    from training.evaluate import write_json

    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    link = tmp_path / "eval.json"
    link.symlink_to(precious)
    with pytest.raises(ValueError, match="symbolic link"):
        write_json(link, {"x": 1})
    assert link.is_symlink() and precious.read_text() == "keep me"
    assert not [p for p in tmp_path.iterdir() if p.name not in ("precious.txt", "eval.json")]


def test_finetune_and_extract_never_replace_a_link_or_a_file_as_out(
    tmp_path, corpus, pair, tiny_model_dir, capsys
):
    base, tuned = pair
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("mine")
    link = tmp_path / "linked"
    link.symlink_to(elsewhere)
    a_file = tmp_path / "afile"
    a_file.write_text("a file")
    for out in (link, a_file):
        assert main(finetune_args(corpus, out, tiny_model_dir, "--overwrite")) == 2
        line = last_err(capsys)
        assert line.startswith("error: --out ") and "not a directory" in line, line
        assert main(extract_args(tuned, base, out, "--overwrite")) == 2
        line = last_err(capsys)
        assert line.startswith("error: --out ") and "not a directory" in line, line
    assert link.is_symlink() and a_file.read_text() == "a file"
    assert snapshot(elsewhere) == {"notes.txt": b"mine"}
    assert not (tmp_path / "linked.work").exists() and not (tmp_path / "afile.work").exists()


def test_finetune_work_files_are_regular_files_or_new_names(
    tmp_path, corpus, tiny_model_dir, capsys
):
    precious = tmp_path / "precious.jsonl"
    precious.write_text('{"step": 0, "note": "keep me"}\n')
    work = tmp_path / "T.work"
    work.mkdir()
    (work / "metrics.jsonl").symlink_to(precious)
    assert main(finetune_args(corpus, tmp_path / "T", tiny_model_dir, "--resume")) == 2
    line = last_err(capsys)
    assert line.startswith("error: --out ") and "symbolic link" in line, line
    assert (work / "metrics.jsonl").is_symlink()
    assert precious.read_text() == '{"step": 0, "note": "keep me"}\n'


def test_gguf_export_out_is_a_regular_file_or_a_new_name(tmp_path, tiny_model_dir, capsys):
    from training.gguf_export import main as gguf_main

    specials = special_files(tmp_path)
    before = kinds(specials)
    for name, path in specials.items():
        assert gguf_main([str(tiny_model_dir), "--out", str(path)]) == 2, name
        line = last_err(capsys)
        assert line.startswith("error: --out ") and "not a regular file" in line, line
    assert kinds(specials) == before
    # Nor a file of the checkpoint it reads.
    copy = shutil.copytree(tiny_model_dir, tmp_path / "ck")
    weights = (copy / "model.safetensors").read_bytes()
    assert gguf_main([str(copy), "--out", str(copy / "model.safetensors")]) == 2
    assert "would replace" in last_err(capsys)
    assert (copy / "model.safetensors").read_bytes() == weights


FIXTURES = ROOT / "tests" / "fixtures" / "data"


def test_data_prepare_outputs_are_regular_files_or_new_names(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES / "other_show", raw)
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    for name in ("train.txt", "manifest.json"):
        out = tmp_path / f"out-{name}"
        out.mkdir()
        (out / name).symlink_to(precious)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "data",
                "prepare",
                str(raw),
                str(out),
                "--min-turns",
                "5",
                "--val-fraction",
                "0.3",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert "symbolic link" in proc.stderr
        assert (out / name).is_symlink() and sorted(p.name for p in out.iterdir()) == [name]
    assert precious.read_text() == "keep me"


def test_data_download_leaves_links_and_specials_alone(tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from data.download import download

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=FIXTURES / "site")
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "raw"
        out.mkdir()
        (out / "TheFakeOne.txt").symlink_to(tmp_path / "gone" / "x")  # dangling
        report = download(out, base_url=f"http://127.0.0.1:{server.server_address[1]}", delay=0)
    finally:
        server.shutdown()
        server.server_close()
    assert report.startswith("1 fetched, 0 already present, 1 failed"), report
    assert "TheFakeOne.txt" in report and "not a regular file" in report
    assert (out / "TheFakeOne.txt").is_symlink() and not (tmp_path / "gone").exists()
    assert (out / "TheFakeTwo.txt").is_file()


# -- 3. an output never is, or holds, an input -----------------------------------------------


def test_finetune_out_never_deletes_the_corpus(tmp_path, tiny_model_dir, capsys):
    corpus = write_corpus(tmp_path / "c", [EPISODE] * 6, [EPISODE])
    inner = write_corpus(tmp_path / "big" / "corpus", [EPISODE] * 6, [EPISODE])
    work_named = write_corpus(tmp_path / "ck.work", [EPISODE] * 6, [EPISODE])
    keep = {p: snapshot(p) for p in (corpus, inner, work_named)}
    for data, out in [
        (corpus, corpus),
        (inner, tmp_path / "big"),
        (work_named, tmp_path / "ck"),
        (corpus, corpus / "train.txt"),
    ]:
        assert main(finetune_args(data, out, tiny_model_dir, "--overwrite")) == 2, (data, out)
        line = last_err(capsys)
        assert line.startswith("error: --out ") and "would replace the corpus" in line, line
    # Nor the model it trains from.
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    assert main(finetune_args(corpus, base, base, "--overwrite")) == 2
    assert "would replace the base model" in last_err(capsys)
    assert {p: snapshot(p) for p in keep} == keep
    assert (base / "config.json").is_file()


def test_extract_out_never_replaces_its_inputs(tmp_path, pair, capsys):
    base, tuned = pair
    corpus = write_corpus(tmp_path / "c", [EPISODE] * 6, [EPISODE])
    tuned_copy = shutil.copytree(tuned, tmp_path / "tuned")
    keep = {p: snapshot(p) for p in (corpus, tuned_copy)}
    for out, what in [
        (tuned_copy, "the checkpoint"),
        (corpus, "the corpus"),
        (tmp_path, "the checkpoint"),
    ]:
        assert (
            main([*extract_args(tuned_copy, base, out, "--overwrite"), "--data", str(corpus)]) == 2
        ), out
        line = last_err(capsys)
        assert line.startswith("error: --out ") and f"would replace {what}" in line, line
    assert {p: snapshot(p) for p in keep} == keep


def test_evaluate_json_never_replaces_an_input(tmp_path, corpus, tiny_model_dir, capsys):
    ck = shutil.copytree(tiny_model_dir, tmp_path / "ck")
    keep = {p: snapshot(p) for p in (corpus, ck)}
    for path, what in [
        (corpus / "val.txt", "the corpus"),
        (corpus / "manifest.json", "the corpus"),
        (ck / "config.json", "a file of the checkpoint"),
    ]:
        assert (
            main(
                ["evaluate", str(ck), "--data", str(corpus), "--samples", "0", "--json", str(path)]
            )
            == 2
        ), path
        line = last_err(capsys)
        assert line.startswith("error: --json ") and f"would replace {what}" in line, line
    assert {p: snapshot(p) for p in keep} == keep
    # An evaluation kept beside the checkpoint may be written, and written again.
    for _ in range(2):
        assert (
            main(
                [
                    "evaluate",
                    str(ck),
                    "--data",
                    str(corpus),
                    "--samples",
                    "0",
                    "--json",
                    str(ck / "eval.json"),
                ]
            )
            == 0
        )
    assert json.loads((ck / "eval.json").read_text())["checkpoint"] == str(ck)


# -- 5. a full disk while the Trainer saves a checkpoint --------------------------------------

DRIVER = """
import os, resource, signal, sys
from transformers import Trainer
from training.__main__ import main

save = Trainer._save_checkpoint
def save_then_fill_the_disk(self, *args, **kwargs):
    save(self, *args, **kwargs)
    # After the first complete checkpoint no file may grow past LIMIT bytes: the next save
    # fails part-way through a file, as on a full disk (EFBIG instead of ENOSPC).
    limit = int(os.environ["LIMIT"])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
Trainer._save_checkpoint = save_then_fill_the_disk
sys.exit(main(sys.argv[1:]))
"""


def steps_logged(path: Path) -> list[int]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


# The tiny model's weights are ~130 KB, its optimizer state ~260 KB: a 2 KB limit stops
# safetensors writing the weights, a 192 KB one torch.save writing optimizer.pt.
@pytest.mark.parametrize("how", ["safetensors", "torch-writer", "enospc"])
def test_disk_full_while_saving_a_checkpoint_is_one_line_and_resumable(
    tmp_path, corpus, tiny_model_dir, capsys, monkeypatch, how
):
    out = tmp_path / "T"
    args = finetune_args(corpus, out, tiny_model_dir, "--keep-work")
    if how != "enospc":
        # The real writers failing (safetensors, torch's zip writer) in a child process.
        limit = "2048" if how == "safetensors" else str(192 * 1024)
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "LIMIT": limit},
        )
        rc, err = proc.returncode, proc.stderr
    else:
        # A plain write of the second checkpoint failing with ENOSPC half-way.
        import errno

        real_save = torch.save
        calls = []

        def half_then_enospc(obj, f, *a, **kw):
            calls.append(str(f))
            if "checkpoint-2" in str(f):
                Path(f).write_bytes(b"PK\x03\x04 half a zip")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
            return real_save(obj, f, *a, **kw)

        monkeypatch.setattr(torch, "save", half_then_enospc)
        rc = main(args)
        err = capsys.readouterr().err
        monkeypatch.undo()
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "--resume" in last, last
    assert "disk" in last or "write" in last, last
    work = tmp_path / "T.work"
    assert (work / "checkpoint-1" / "trainer_state.json").is_file()
    assert (work / "checkpoint-2").is_dir()  # half-saved
    assert not out.exists()

    # --resume goes on from checkpoint-1, the last complete one, to the end.
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err[-3000:]
    card = json.loads((out / "checkpoint.json").read_text())
    assert card["steps"] == 3
    assert steps_logged(out / "metrics.jsonl") == [1, 2, 3]
    state = json.loads((work / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_write_failure_reads_torch_chained_writer_errors(tmp_path):
    """torch.save on a full disk: 'file write failed', then, while closing the zip,
    'unexpected pos' (the last error raised, the first one its context)."""
    from training.__main__ import write_failure

    error = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1472 vs 1366")
    error.__context__ = RuntimeError(
        "[enforce fail at inline_container.cc:858] . "
        "PytorchStreamWriter failed writing file data/0: "
        "file write failed"
    )
    reason = write_failure(error, tmp_path)
    assert reason is not None and "checkpoint" in reason and "\n" not in reason
    alone = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1 vs 0")
    assert write_failure(alone, tmp_path) is not None
    assert write_failure(RuntimeError("something else"), tmp_path) is None


# -- 9. extract --base must be the checkpoint's base ----------------------------------------


def test_extract_refuses_a_base_the_checkpoint_was_not_trained_from(tmp_path, pair, capsys):
    base, tuned = pair
    other = save_tiny_model_dir(tmp_path / "other", seed=1)  # same shape, other weights
    out = tmp_path / "a"
    assert main(extract_args(tuned, other, out)) == 2
    line = last_err(capsys)
    assert line.startswith("error: ") and str(base) in line and str(other) in line, line
    assert not out.exists()
    assert main(extract_args(tuned, base, out)) == 0  # its own base


def test_extract_accepts_any_stage_the_checkpoint_descends_from(tmp_path, pair, capsys):
    """Stage 2 of make_default.sh is fine-tuned from stage 1, stage 1 from the packaged base:
    `extract STAGE2 --base smollm2` is right, and so is `--base STAGE1`."""
    base, tuned = pair
    stage1 = shutil.copytree(base, tmp_path / "stage1")
    (stage1 / "checkpoint.json").write_text(json.dumps({"base_model": str(base)}))
    stage2 = shutil.copytree(tuned, tmp_path / "stage2")
    (stage2 / "checkpoint.json").write_text(json.dumps({"steps": 3, "base_model": str(stage1)}))
    assert main(extract_args(stage2, base, tmp_path / "a")) == 0
    assert main(extract_args(stage2, stage1, tmp_path / "b")) == 0
    other = save_tiny_model_dir(tmp_path / "other", seed=1)
    assert main(extract_args(stage2, other, tmp_path / "c")) == 2
    assert str(stage1) in last_err(capsys)


def test_extract_with_a_base_of_another_shape_is_one_line(tmp_path, pair, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    base, tuned = pair
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    wide = tmp_path / "wide"
    LlamaForCausalLM(config).save_pretrained(wide)
    tok.save_pretrained(wide)
    # A card without base_model (an older or hand-made checkpoint): the shapes still count.
    unnamed = shutil.copytree(tuned, tmp_path / "unnamed")
    (unnamed / "checkpoint.json").write_text(json.dumps({"steps": 7}))
    for checkpoint in (tuned, unnamed):
        assert main(extract_args(checkpoint, wide, tmp_path / "a")) == 2
        line = last_err(capsys)
        assert line.startswith("error: ") and str(wide) in line, line
    assert not (tmp_path / "a").exists()
