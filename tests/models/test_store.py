"""Ollama's store layout, names, the per-model settings file and pure API helpers (no server)."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import pytest

from ollamad.api.embedding import shorten
from ollamad.api.manage import model_info, parameters_text
from ollamad.api.openai_compat import encode_base64, upstream_payload
from ollamad.models import store
from ollamad.models.catalog import Catalog, InvalidName, normalize
from ollamad.models.config import ModelConfigError, parse_model_config
from ollamad.models.ggufmeta import SkippedArray
from ollamad.models.testmodels import write_llama


@pytest.mark.parametrize(("text", "key"), [
    ("gemma3", "gemma3:latest"),
    ("gemma3:4b", "gemma3:4b"),
    ("library/gemma3:4b", "gemma3:4b"),
    ("registry.ollama.ai/library/gemma3:4b", "gemma3:4b"),
    ("someone/model:q4_K_M", "someone/model:q4_k_m"),
    ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t"),
])
def test_names(text: str, key: str) -> None:
    assert store.parse_name(text).key == key
    assert normalize(text) == key


@pytest.mark.parametrize("text", ["../x", "a/../b", "a/b/c/d", "x:../../y", "", "a//b", ".hidden", "a/b:c/d",
                                  "x:" + "t" * 200, "m:tag/../../etc"])
def test_bad_names_never_become_paths(text: str) -> None:
    with pytest.raises(store.StoreError):
        store.parse_name(text)
    with pytest.raises(InvalidName):
        normalize(text)


@pytest.mark.parametrize("digest", ["sha256:abc", "sha256:" + "g" * 64, "md5:" + "0" * 64, "../" + "0" * 64,
                                    "sha256:" + "0" * 64 + "/../x"])
def test_bad_digests(digest: str) -> None:
    with pytest.raises(store.StoreError):
        store.blob_path(Path("/store"), digest)


def test_blob_path_accepts_both_spellings() -> None:
    d = "0" * 64
    assert store.blob_path(Path("/s"), f"sha256:{d}") == store.blob_path(Path("/s"), f"sha256-{d}")
    assert store.blob_path(Path("/s"), f"sha256:{d}") == Path(f"/s/blobs/sha256-{d}")


def test_catalog_reads_store_layers_and_config(tmp_path: Path) -> None:
    gguf = write_llama(tmp_path / "src" / "m.gguf")
    root = tmp_path / "models"
    model = store.Layer(store.MODEL, store.sha256_file(gguf), gguf.stat().st_size)
    store.link_blob(root, gguf, model.digest)
    layers = [model]
    for media, text in ((store.PARAMS, json.dumps({"num_ctx": 1000, "temperature": 0.5, "stop": ["x"]})),
                        (store.SYSTEM, "sys"), (store.TEMPLATE, "{{ .Prompt }}"), (store.LICENSE, "MIT")):
        b = store.write_blob(root, text.encode())
        layers.append(store.Layer(media, b.digest, b.size))
    store.write_manifest(root, store.parse_name("fam/thing:v1"), layers)
    store.write_manifest(root, store.parse_name("missingblob"), [store.Layer(store.MODEL, "sha256:" + "1" * 64, 5)])
    cfg = tmp_path / "models.toml"
    cfg.write_text('[models."fam/thing:v1"]\nnum_parallel = 3\naliases = ["t1"]\noptions = { temperature = 0.9 }\n')
    cat = Catalog(root, cfg)
    cat.scan()
    assert [m.name for m in cat.list()] == ["fam/thing:v1"]  # the manifest without its blob is skipped
    m = cat.resolve("t1")
    assert m is not None and m.name == "fam/thing:v1" and m.system == "sys" and m.license == "MIT"
    assert m.template == "{{ .Prompt }}" and m.path == store.blob_path(root, model.digest)
    assert m.defaults.num_ctx == 1000 and m.defaults.num_parallel == 3
    assert m.defaults.options == {"temperature": 0.9, "stop": ["x"]}  # the settings file wins
    assert m.digest == store.sha256_file(root / "manifests/registry.ollama.ai/fam/thing/v1").split(":")[1]
    assert cat.facts(m).architecture == "llama"
    # removing the manifest removes its blobs nobody else uses; a waiting upload stays
    store.write_manifest(root, store.parse_name("twin"), [model])
    upload = store.write_blob(root, b"uploaded, not yet in a model")
    assert store.remove_manifest(root, store.parse_name("fam/thing:v1"))
    assert store.blob_path(root, model.digest).exists() and store.blob_path(root, upload.digest).exists()
    assert not store.blob_path(root, layers[2].digest).exists()  # the system layer was only its
    assert store.remove_manifest(root, store.parse_name("twin"))
    assert not store.blob_path(root, model.digest).exists()
    assert not store.remove_manifest(root, store.parse_name("fam/thing:v1"))


@pytest.mark.parametrize(("text", "needle"), [
    ('[models."a"]\nnum_ctx = "x"\n', "models.a.num_ctx"),
    ('[models."a"]\nkeep_alive = "forever-ish"\n', "models.a.keep_alive"),
    ('[models."a"]\ncolour = 1\n', "models.a.colour"),
    ('[other]\nx = 1\n', "unknown section"),
    ('[models."a"]\noptions = { temperature = "hot" }\n', "models.a.options"),
    ("[models\n", "models.toml"),
])
def test_model_config_errors_name_the_field(text: str, needle: str) -> None:
    with pytest.raises(ModelConfigError, match=needle.replace(".", r"\.")):
        parse_model_config(text, "models.toml")


def test_model_config_values() -> None:
    cfg = parse_model_config('[models."a:b"]\nkeep_alive = "10m"\naliases = ["x"]\n[models.c]\nkeep_alive = -1\n')
    assert cfg.entries["a:b"].keep_alive == 600 and cfg.entries["a:b"].aliases == ["x"]
    assert cfg.entries["c"].keep_alive is not None and cfg.entries["c"].keep_alive > 1e9


def test_shorten_renormalises() -> None:
    v = shorten([3.0, 4.0, 12.0], 2)
    assert v == pytest.approx([0.6, 0.8])
    assert shorten([1.0, 2.0], None) == [1.0, 2.0] and shorten([1.0, 2.0], 5) == [1.0, 2.0]


def test_openai_helpers() -> None:
    payload = upstream_payload({"model": "m", "messages": [], "temperature": 0.2, "max_completion_tokens": 9},
                               {"temperature": 0.7, "top_k": 5, "num_predict": 3, "nonsense": 1})
    assert payload == {"temperature": 0.2, "top_k": 5, "max_tokens": 9, "messages": [], "cache_prompt": True}
    raw = base64.b64decode(encode_base64([1.0, -2.5]))
    assert struct.unpack("<2f", raw) == (1.0, -2.5)


def test_show_helpers() -> None:
    text = parameters_text({"stop": ["a", "b"], "temperature": 0.5})
    assert text.splitlines() == [f"{'stop':<30} \"a\"", f"{'stop':<30} \"b\"", f"{'temperature':<30} 0.5"]
    info = model_info({"general.architecture": "llama", "tokenizer.ggml.tokens": SkippedArray(50000),
                       "tokenizer.ggml.scores": [0.0] * 100, "x.list": [1, 2]}, 1234, verbose=False)
    assert info["tokenizer.ggml.tokens"] is None and info["tokenizer.ggml.scores"] is None
    assert info["x.list"] == [1, 2] and info["general.parameter_count"] == 1234
    assert model_info({"a": [0] * 100}, 1, verbose=True)["a"] == [0] * 100


def test_generate_images_become_multimodal_prompt() -> None:
    from ollamad.api.translate import MEDIA_MARKER, image_data, multimodal_prompt, with_media_markers

    png = base64.b64encode(b"\x89PNG fake").decode()
    assert image_data([png, f"data:image/png;base64,{png}"]) == [png, png]
    with pytest.raises(ValueError, match=r"images\.1"):
        image_data([png, "not base64!"])
    assert multimodal_prompt("hi", []) == "hi"
    p = multimodal_prompt("describe", [png, png])
    assert isinstance(p, dict) and p["multimodal_data"] == [png, png]
    assert p["prompt_string"].count(MEDIA_MARKER) == 2 and p["prompt_string"].endswith("describe")
    templated = "<|user|>" + with_media_markers("what is it", 1) + "<|assistant|>"
    assert multimodal_prompt(templated, [png])["prompt_string"] == templated  # type: ignore[index]


def test_projector_layer_gives_vision(tmp_path: Path) -> None:
    from ollamad.models.describe import capabilities
    from ollamad.models.testmodels import write_metadata_only

    gguf = write_llama(tmp_path / "src" / "m.gguf")
    proj = write_metadata_only(tmp_path / "src" / "p.gguf", "clip", {"clip.has_vision_encoder": True})
    root = tmp_path / "models"
    layers = []
    for path, media in ((gguf, store.MODEL), (proj, store.PROJECTOR)):
        digest = store.sha256_file(path)
        store.link_blob(root, path, digest)
        layers.append(store.Layer(media, digest, path.stat().st_size))
    store.write_manifest(root, store.parse_name("seer:1b"), layers)
    cat = Catalog(root)
    cat.scan()
    m = cat.resolve("seer:1b")
    assert m is not None and m.projector == store.blob_path(root, layers[1].digest)
    assert "vision" in capabilities(cat.facts(m))


def test_modelfile() -> None:
    from ollamad.models.modelfile import ModelfileError, parse_modelfile

    body = parse_modelfile('# a comment\nFROM tiny\nPARAMETER temperature 0.4\nPARAMETER num_ctx 512\n'
                           'PARAMETER stop "<|im_end|>"\nPARAMETER stop </s>\nSYSTEM """You are\nterse."""\n'
                           'TEMPLATE {{ .Prompt }}\nlicense MIT\n')
    assert body == {"from": "tiny", "system": "You are\nterse.", "template": "{{ .Prompt }}", "license": "MIT",
                    "parameters": {"temperature": 0.4, "num_ctx": 512, "stop": ["<|im_end|>", "</s>"]}}
    for bad, needle in (("PARAMETER x 1\n", "no FROM"), ("FROM a\nBOGUS x\n", "unknown command"),
                        ('FROM a\nSYSTEM """never ends\n', "unterminated"), ("FROM a\nPARAMETER top_k\n", "value")):
        with pytest.raises(ModelfileError, match=needle):
            parse_modelfile(bad)


def test_api_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ollamad.settings import load_settings

    monkeypatch.setenv("OLLAMAD_CREATE_DIRS", "/srv/ggufs, /data/models")
    monkeypatch.setenv("OLLAMAD_MODEL_SETTINGS", "/etc/ollamad/models.toml")
    s = load_settings()
    assert s.create_dirs == (Path("/srv/ggufs"), Path("/data/models"))
    assert s.model_settings == Path("/etc/ollamad/models.toml")


def test_skip_strings_walks_across_buffer_boundaries() -> None:
    import io

    from ollamad.models.ggufmeta import GGUFError, _Reader

    words = [b"a", b"", b"x" * (3 << 19), *(b"tok%d" % i for i in range(300_000)), b"end"]
    data = b"".join(struct.pack("<Q", len(w)) + w for w in words)
    f = io.BytesIO(data + b"MARK")
    _Reader(f, len(data) + 4).skip_strings(len(words))
    assert f.read() == b"MARK"
    with pytest.raises(GGUFError, match="past the end"):
        _Reader(io.BytesIO(data[:100]), 100).skip_strings(len(words))
    bogus = struct.pack("<Q", 1 << 62) + b"x"
    with pytest.raises(GGUFError, match="past the end"):
        _Reader(io.BytesIO(bogus), len(bogus)).skip_strings(1)
