"""Issue 20, model cache and serving: stale temp dirs, honest labels for the base served in
place of the tuned default, an adapter hashed whole, verdicts tied to their file, damaged
cache files rebuilt, hostile JSON in one line, and one build for two starts at once.

A temporary SITCOM_CACHE and tiny models only: the tiny base is placed where the packaged
base's converted copy goes, so `seinfeld` means the tiny base plus a tiny adapter."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sitcom.model import cache as model_cache
from sitcom.model import catalog as models
from sitcom.model.adapters import ADAPTER_CARD
from sitcom.model.catalog import ModelLoadError, tuned_model_dir, verified_adapter
from training.extract import extract

ROOT = Path(__file__).resolve().parent.parent
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError unless caught


@pytest.fixture(scope="module")
def pristine(pair, tmp_path_factory):
    """(base dir, adapter dir) to copy from: an int8 rank-2 adapter of the tiny pair."""
    base, tuned = pair
    adapter = tmp_path_factory.mktemp("adapter") / "a"
    extract(tuned, adapter, rank=2, base=str(base), dtype="int8")
    return base, adapter


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SITCOM_CACHE", str(root))
    monkeypatch.delenv("SITCOM_BACKEND", raising=False)
    # what a process remembers of the cache
    forget = (models._fallbacks, models._warned, model_cache._checked)
    for memory in forget:
        memory.clear()
    yield root
    for memory in forget:
        memory.clear()


@pytest.fixture
def adapter(pristine, tmp_path):
    return shutil.copytree(pristine[1], tmp_path / "adapter")


@pytest.fixture
def base(pristine):
    return pristine[0]


def base_in_cache(cache: Path, base: Path) -> Path:
    """The tiny base where the packaged base's converted copy is cached."""
    return shutil.copytree(base, cache / "smollm2-135m-instruct")


def child_env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "SITCOM_CACHE": str(cache),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


# -- 4. the cache removes the temp dirs a killed build left, never a live build's ---------


def test_stale_temp_dirs_are_removed_but_not_a_build_in_progress(adapter, base, cache):
    cache.mkdir()
    stale = cache / ".seinfeld-0123456789ab-k9x2_abc"  # mkdtemp's name, its builder gone
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 100_000)
    aside = cache / ".smollm2-135m-instruct.old"  # publish_dir's, killed mid-swap
    aside.mkdir()
    gemma = cache / ".gemma3-hf-x1y2z3ab"  # Gemma's dequantized copy, ~1 GB when whole
    gemma.mkdir()
    live = cache / ".seinfeld-fedcba987654-abcdefgh"  # another process is building it now
    live.mkdir()
    other = cache / ".notes"  # not ours
    other.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'a'); "
            "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(cache / ".seinfeld-fedcba987654.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        merged = tuned_model_dir(adapter, base_dir=base)
        assert not stale.exists() and not aside.exists() and not gemma.exists()
        assert live.is_dir() and other.is_dir()
    finally:
        holder.kill()  # kill -9: its lock goes with it, its temp dir stays
        holder.wait()
    assert tuned_model_dir(adapter, base_dir=base) == merged  # the next start tidies up
    assert not live.exists() and other.is_dir()


# -- 6. the base served in place of the tuned default is labelled as the base --------------


@pytest.mark.asyncio
async def test_unusable_adapter_labels_the_base_everywhere(
    adapter, base, cache, tmp_path, monkeypatch, caplog
):
    from bot.config import Config
    from bot.core import Core
    from bot.db import Place
    from sitcom.settings import SceneSettings

    base_in_cache(cache, base)
    (adapter / "adapter_config.json").write_text("{}")  # not what the card's hash says
    monkeypatch.setattr(models, "SHIPPED_ADAPTER", adapter)
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    (tmp_path / "checkpoints").mkdir()
    config = Config(
        db_path=tmp_path / "bot.db",
        checkpoints_dir=tmp_path / "checkpoints",
        default_checkpoint="seinfeld",
        db_timeout_s=1,
        timeout_s=60,
    )
    with caplog.at_level(logging.INFO):
        core = await Core.start(config)  # the real loader
    try:
        assert core.checkpoint == "smollm2"
        assert "smollm2  ← active" in core.checkpoint_listing()
        assert "seinfeld  ← active" not in core.checkpoint_listing()
        why = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("adapter_config.json" in m and "damaged" in m and "smollm2" in m for m in why), (
            why
        )
        place = Place("console", "0", "0")
        job = await core.submit("JERRY: Hello.", SceneSettings(max_new_tokens=16), "u")
        stored = await core.record(await job.result(), place=place, user_id="u", prompt=job.prompt)
        row = (
            sqlite3.connect(tmp_path / "bot.db")
            .execute("SELECT model_name FROM scenes WHERE id = ?", (stored.id,))
            .fetchone()
        )
        assert row == ("smollm2",)
        assert await core.use_checkpoint("seinfeld") == "smollm2"  # a swap says it too
        assert core.checkpoint == "smollm2"
    finally:
        await core.close()


def test_a_cache_that_cannot_be_written_serves_the_base_labelled_so(adapter, base, cache):
    base_in_cache(cache, base)
    code = (
        "import logging, resource, signal, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from sitcom.model import catalog as models\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"  # EFBIG, as a full disk's ENOSPC
        "resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, 32 * 1024))\n"
        "models.SHIPPED_ADAPTER = Path(sys.argv[1])\n"
        "print(models.resolve_tuned_default())\n"
        "print(models.served_model_name('seinfeld'))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(adapter)],
        capture_output=True,
        text=True,
        env=child_env(cache),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(cache / "smollm2-135m-instruct"), "smollm2"]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if "instead" in x]
    assert "cannot write the model cache" in line and "'smollm2' instead" in line
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [
        "smollm2-135m-instruct"
    ]  # no half-written merge left behind


# -- one path from a name to a served model (sitcom.model.serving) --------------------------------


@pytest.mark.asyncio
async def test_a_start_resolves_the_name_once(adapter, base, cache, monkeypatch):
    """The engine's loader works the tuned default out once: the adapter is hashed once,
    and what is served (label, files, backend) is one value the engine switches on."""
    pytest.importorskip("llama_cpp")
    from sitcom.engine import SceneEngine

    base_in_cache(cache, base)
    monkeypatch.setattr(models, "SHIPPED_ADAPTER", adapter)
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")  # no self-test child here
    merged = tuned_model_dir(adapter)  # built once, beforehand
    hashed = []
    verify = models._verified_adapter

    def counting(adapter_dir):
        hashed.append(adapter_dir)
        return verify(adapter_dir)

    monkeypatch.setattr(models, "_verified_adapter", counting)
    engine = SceneEngine("seinfeld", max_batch=2)
    await engine.start()
    try:
        assert len(hashed) == 1
        served = engine.served
        assert (served.label, served.hf_dir, served.gguf, served.backend, served.fell_back) == (
            "seinfeld",
            str(merged),
            merged / "model.gguf",
            "llamacpp",
            False,
        )
        assert engine.model_name == "seinfeld"
    finally:
        await engine.close()


def test_an_unusable_adapter_resolves_to_the_base_saying_why(adapter, base, cache, monkeypatch):
    from sitcom.model.serving import load_model, resolve

    base_in_cache(cache, base)
    (adapter / "adapter_config.json").write_text("{}")  # not what the card's hash says
    monkeypatch.setattr(models, "SHIPPED_ADAPTER", adapter)
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    served = resolve("seinfeld")
    assert (served.name, served.label, served.hf_dir, served.gguf, served.backend) == (
        "seinfeld",
        "smollm2",
        str(cache / "smollm2-135m-instruct"),
        None,
        "torch",
    )
    assert served.fell_back and "adapter_config.json" in served.why
    model, tokenizer, again = load_model("seinfeld")
    assert again == served and model.config.model_type == "llama"
    monkeypatch.setenv("SITCOM_BACKEND", "gpu")
    with pytest.raises(ModelLoadError, match="SITCOM_BACKEND must be auto, torch or llamacpp"):
        resolve("seinfeld")


# -- 7. every file of the adapter is hashed; the cache is keyed on all of them --------------


def test_a_changed_adapter_config_is_refused(adapter):
    card = json.loads((adapter / ADAPTER_CARD).read_text())
    assert set(card["adapter_files"]) == {"adapter_config.json", card["adapter_file"]}
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = 4096
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"adapter_config.json is damaged"):
        verified_adapter(adapter)


def test_the_cache_is_keyed_on_every_file_of_the_adapter(adapter, base, cache):
    # An older card without adapter_files: the config is not checked, but it is hashed.
    card = json.loads((adapter / ADAPTER_CARD).read_text())
    card.pop("adapter_files", None)
    (adapter / ADAPTER_CARD).write_text(json.dumps(card))
    genuine = tuned_model_dir(adapter, base_dir=base)
    weights = (genuine / "model.safetensors").read_bytes()
    config_path = adapter / "adapter_config.json"
    original = config_path.read_text()
    config = json.loads(original)
    config["lora_alpha"] = 4096
    config_path.write_text(json.dumps(config))
    broken = tuned_model_dir(adapter, base_dir=base)
    assert broken != genuine and (broken / "model.safetensors").read_bytes() != weights
    config_path.write_text(original)
    assert tuned_model_dir(adapter, base_dir=base) == genuine
    assert (genuine / "model.safetensors").read_bytes() == weights
    # A changed card (another gguf_qtype) is another entry too.
    card["gguf_qtype"] = "f16"
    (adapter / ADAPTER_CARD).write_text(json.dumps(card))
    assert tuned_model_dir(adapter, base_dir=base) not in (genuine, broken)


def test_the_merge_is_exported_from_memory(adapter, base, cache, monkeypatch, tmp_path):
    """The merged model goes to GGUF as it is in memory, not saved and loaded back first;
    the file is the one the command line's path-taking export writes of the saved merge."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from training.gguf_export import export_gguf

    def no_reload(*args, **kwargs):
        raise AssertionError("the merge was loaded back to be exported")

    with monkeypatch.context() as patch:
        patch.setattr(models, "load_model", no_reload)
        merged = tuned_model_dir(adapter, base_dir=base)
    again = export_gguf(merged, tmp_path / "again.gguf", "q8_0")
    ours, theirs = gguf.GGUFReader(merged / "model.gguf"), gguf.GGUFReader(again)
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name
    fields = set(ours.fields) - {"general.name"}  # the name: the base's, or the saved dir's
    assert fields == set(theirs.fields) - {"general.name"}
    for key in fields:
        assert ours.fields[key].parts[-1].tobytes() == theirs.fields[key].parts[-1].tobytes(), key


# -- 8. cached files checked before serving; verdicts tied to their file, parsed strictly ---


def test_a_damaged_cached_merge_is_built_again(adapter, base, cache, caplog):
    merged = tuned_model_dir(adapter, base_dir=base)
    gguf, weights = merged / "model.gguf", merged / "model.safetensors"
    whole, size = gguf.read_bytes(), weights.stat().st_size
    gguf.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="sitcom.model.catalog"):
        assert tuned_model_dir(adapter, base_dir=base) == merged
    assert gguf.stat().st_size == len(whole)  # built again (its general.name differs)
    [line] = [r.getMessage() for r in caplog.records]
    assert "damaged (model.gguf: truncated" in line
    weights.write_bytes(weights.read_bytes()[:-100])
    tuned_model_dir(adapter, base_dir=base)
    assert weights.stat().st_size == size

    from sitcom.files import safetensors_problem
    from sitcom.model.gguf_export import gguf_problem

    assert gguf_problem(gguf) is None and safetensors_problem(weights) is None
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)
    assert gguf_problem(gguf) == "damaged header"
    gguf.write_bytes(b"not a gguf")
    assert gguf_problem(gguf) == "not a GGUF file"
    weights.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    assert safetensors_problem(weights) == "tensor 'a' has no data offsets"


def ok_command(text: str = '{"ok": true, "reason": "fine"}') -> list[str]:
    return [sys.executable, "-c", f"print({text!r})"]


@pytest.fixture
def gguf_copy(base, tmp_path):
    from training.gguf_export import export_gguf

    pytest.importorskip("llama_cpp")
    model = shutil.copytree(base, tmp_path / "m")
    export_gguf(model, qtype="f32")
    return model


def test_verdicts_are_parsed_strictly(gguf_copy, cache):
    from sitcom.model.llamacpp_check import check_llamacpp, probe_key

    gguf = gguf_copy / "model.gguf"
    record = cache / "llamacpp-probe" / f"{probe_key(gguf)}.json"
    record.parent.mkdir(parents=True)
    record.write_text('{"ok": "false", "reason": "a string is not a verdict"}')
    verdict = check_llamacpp(gguf, str(gguf_copy), command=ok_command('{"ok": "false"}'))
    assert not verdict.ok and not verdict.cached
    assert not check_llamacpp(gguf, str(gguf_copy), command=ok_command('{"ok": 1}')).ok
    record.unlink()
    assert check_llamacpp(gguf, str(gguf_copy), command=ok_command()).ok


def test_a_verdict_belongs_to_its_file(gguf_copy, cache):
    from sitcom.model.llamacpp_check import check_llamacpp

    gguf = gguf_copy / "model.gguf"
    crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
    assert not check_llamacpp(gguf, str(gguf_copy), command=crash).ok
    assert check_llamacpp(gguf, str(gguf_copy), command=ok_command()).cached
    data = gguf.read_bytes()  # repaired: the same file written again
    gguf.unlink()
    gguf.write_bytes(data)
    verdict = check_llamacpp(gguf, str(gguf_copy), command=ok_command())
    assert verdict.ok and not verdict.cached


def test_a_truncated_gguf_with_an_ok_verdict_is_served_by_transformers(
    gguf_copy, cache, caplog, monkeypatch
):
    from sitcom.model import llamacpp, serving
    from sitcom.model.llamacpp_check import check_llamacpp

    gguf = gguf_copy / "model.gguf"
    assert check_llamacpp(gguf, str(gguf_copy), command=ok_command()).ok
    stat = gguf.stat()
    gguf.write_bytes(gguf.read_bytes()[: stat.st_size // 2])
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the mtime kept
    with caplog.at_level(logging.WARNING, logger="sitcom.model.serving"):
        model, _ = serving.load_serving_model(str(gguf_copy))
    assert not isinstance(model, llamacpp.LlamaCppModel)
    [line] = [r.getMessage() for r in caplog.records if r.name == "sitcom.model.serving"]
    assert "damaged" in line and "training.gguf_export" in line
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    with pytest.raises(ModelLoadError, match="damaged"):
        serving.load_serving_model(str(gguf_copy))


# -- 11. deeply nested JSON and an unsupported gguf_qtype: one line, then the fallback ------


def test_a_deeply_nested_card_is_one_line(adapter, base, cache, caplog):
    (adapter / ADAPTER_CARD).write_text(DEEP)
    with pytest.raises(ModelLoadError, match="unreadable"):
        verified_adapter(adapter)
    base_in_cache(cache, base)
    with caplog.at_level(logging.WARNING, logger="sitcom.model.catalog"):
        assert models.resolve_tuned_default(adapter) == str(cache / "smollm2-135m-instruct")
    assert len(caplog.records) == 1 and "unreadable" in caplog.records[0].getMessage()


def test_deeply_nested_json_in_the_cache_is_built_again(adapter, base, cache):
    merged = tuned_model_dir(adapter, base_dir=base)
    (merged / "config.json").write_text(DEEP)
    assert tuned_model_dir(adapter, base_dir=base) == merged
    assert json.loads((merged / "config.json").read_text())["model_type"] == "llama"
    models.load_model(merged)


def test_deeply_nested_verdicts_are_judged_again(gguf_copy, cache):
    from sitcom.model.llamacpp_check import check_llamacpp, probe_key

    gguf = gguf_copy / "model.gguf"
    record = cache / "llamacpp-probe" / f"{probe_key(gguf)}.json"
    record.parent.mkdir(parents=True)
    record.write_text(DEEP)
    stale = record.parent / "tmpabc123.tmp"  # a killed start's half-written verdict
    stale.write_text("{")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    deep_child = [sys.executable, "-c", "print('[' * 100000 + ']' * 100000)"]
    verdict = check_llamacpp(gguf, str(gguf_copy), command=deep_child)
    assert not verdict.ok and "self-test failed" in verdict.reason
    again = check_llamacpp(gguf, str(gguf_copy), command=ok_command())
    assert again.cached and not again.ok  # that failure is now a readable record
    assert not stale.exists()


def test_an_unsupported_gguf_qtype_is_one_line_before_the_merge(
    adapter, base, cache, caplog, monkeypatch
):
    card = json.loads((adapter / ADAPTER_CARD).read_text())
    card["gguf_qtype"] = "q2_k"
    (adapter / ADAPTER_CARD).write_text(json.dumps(card))

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before the card was checked")

    monkeypatch.setattr(models, "merge_adapter", no_merge)
    with pytest.raises(ModelLoadError, match="gguf_qtype 'q2_k'; supported: q8_0"):
        tuned_model_dir(adapter, base_dir=base)
    base_in_cache(cache, base)
    with caplog.at_level(logging.WARNING, logger="sitcom.model.catalog"):
        assert models.resolve_tuned_default(adapter) == str(cache / "smollm2-135m-instruct")
    [record] = caplog.records
    assert "gguf_qtype" in record.getMessage() and "untuned base" in record.getMessage()


# -- 18. two starts at once on an empty cache: one builds, the other waits for it ----------


def test_two_starts_at_once_build_the_cache_once(adapter, base, cache):
    cache.mkdir()
    entry = models.tuned_cache_entry(adapter)
    code = (
        "import logging, os, sys\n"
        "from pathlib import Path\n"
        "logging.basicConfig(level=logging.INFO, format='%(message)s', stream=sys.stdout)\n"
        "from sitcom.model.catalog import tuned_model_dir\n"
        "print('ready', flush=True)\n"
        "d = tuned_model_dir(Path(sys.argv[1]), base_dir=Path(sys.argv[2]))\n"
        "print('inode', os.stat(d / 'model.gguf').st_ino, flush=True)\n"
    )
    outputs: list[list[str]] = [[], []]
    # Hold the entry's lock as a build in progress would, so both arrive while it is held.
    procs: list[subprocess.Popen] = []
    try:
        with open(cache / f".{entry.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            procs = [
                subprocess.Popen(
                    [sys.executable, "-c", code, str(adapter), str(base)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=child_env(cache),
                )
                for _ in range(2)
            ]
            readers = [
                threading.Thread(target=lambda p=p, out=out: out.extend(p.stdout), daemon=True)
                for p, out in zip(procs, outputs, strict=True)
            ]
            for r in readers:
                r.start()
            deadline = time.monotonic() + 240
            while not all(any("waiting" in line for line in out) for out in outputs):
                assert time.monotonic() < deadline, outputs
                assert not any(any("inode" in line for line in out) for out in outputs), (
                    f"a start went on while another build held the cache: {outputs}"
                )
                time.sleep(0.2)
        for p in procs:
            assert p.wait(timeout=240) == 0, outputs
        for r in readers:
            r.join(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = [line for out in outputs for line in out]
    assert sum(line.startswith("building ") for line in text) == 1, text
    inodes = {line.split()[1] for line in text if line.startswith("inode")}
    assert len(inodes) == 1, text  # both serve the one file that was built
    assert not [
        p
        for p in cache.iterdir()
        if p.name.startswith(".seinfeld-") and not p.name.endswith(".lock")
    ]
