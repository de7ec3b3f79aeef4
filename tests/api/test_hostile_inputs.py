"""Client mistakes and poisoned files get a clear 4xx (or a clean 5xx), never a traceback (issue 17).

With the fake llama-server: these are checks on ollamad's own handling, before any runner works.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, child_get, fake_with, runner_children
from tests.models.test_gguf_hostile import nested


@pytest.fixture
def folder(tmp_path: Path, models_dir: Path) -> Path:
    out = tmp_path / "models"
    out.mkdir()
    shutil.copy(models_dir / "tiny.gguf", out / "tiny.gguf")
    (out / "bad.gguf").write_bytes(nested(20_000))
    return out


@pytest.fixture
def daemon(daemon_factory: Any, fake_server: Path, folder: Path) -> Daemon:
    return daemon_factory(fake_server, folder, OLLAMAD_MAX_PROMPT="1000",  # type: ignore[no-any-return]
                          OLLAMAD_FORMAT_MAX_PROPERTIES="50", OLLAMAD_FORMAT_MAX_BYTES="4KiB")


def _loaded(d: Daemon) -> list[str]:
    return [m["name"] for m in d.get("/api/ps")[1]["models"]]


def test_a_bad_gguf_is_skipped_and_refused_cleanly(daemon: Daemon, folder: Path) -> None:
    for _ in range(2):
        status, body = daemon.get("/api/tags")
        assert status == 200 and [m["name"] for m in body["models"]] == ["tiny:latest"]
        status, body = daemon.post("/api/show", {"model": "bad"})
        assert status == 500 and body["error"].startswith("invalid model file bad.gguf"), body
        status, body = daemon.post("/api/generate", {"model": "bad", "prompt": "x"})
        assert status == 500 and "invalid model file" in body["error"]
    assert daemon.log().count("skipping a model") == 1 and "Traceback" not in daemon.log()
    # create refuses what it cannot read, and parameters of the wrong type
    blob = folder / "blobs"
    status, body = daemon.post("/api/create", {"model": "x", "from": str(folder / "bad.gguf"), "stream": False})
    assert status == 400 and "invalid model file" in body["error"], body
    status, body = daemon.post("/api/create", {"model": "x", "from": "tiny", "parameters": {"temperature": "hot"},
                                               "stream": False})
    assert status == 400 and "temperature" in body["error"], body
    status, body = daemon.post("/api/create", {"model": "x", "modelfile": "FROM tiny\nPARAMETER num_ctx lots",
                                               "stream": False})
    assert status == 400, body
    assert "x:latest" not in [m["name"] for m in daemon.get("/api/tags")[1]["models"]]
    assert not blob.exists() or not any(p.name.startswith(".") for p in blob.iterdir())


def test_costly_or_malformed_requests_are_400_before_loading(daemon: Daemon) -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(51)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("/api/generate", {"model": "tiny", "prompt": "x", "format": "xml"}, "invalid format"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": 7}, "format"),
        ("/api/generate", {"model": "tiny", "prompt": "x", "format": schema}, "OLLAMAD_FORMAT_MAX_PROPERTIES"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": tools},
         "OLLAMAD_FORMAT_MAX_PROPERTIES"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
         "OLLAMAD_FORMAT_MAX_PROPERTIES"),
        ("/v1/completions", {"model": "tiny", "prompt": "x", "grammar": "root ::= " + '"a" ' * 2000},
         "OLLAMAD_FORMAT_MAX_BYTES"),
        ("/api/generate", {"model": "tiny", "prompt": "x" * 1001}, "OLLAMAD_MAX_PROMPT"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 600}] * 2},
         "OLLAMAD_MAX_PROMPT"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x" * 1001}]},
         "OLLAMAD_MAX_PROMPT"),
        ("/v1/completions", {"model": "tiny", "prompt": ["x" * 600, "y" * 600]}, "OLLAMAD_MAX_PROMPT"),
        ("/api/embed", {"model": "tiny", "input": ["x" * 600, "y" * 600]}, "OLLAMAD_MAX_PROMPT"),
        ("/api/embeddings", {"model": "tiny", "prompt": "x" * 1001}, "OLLAMAD_MAX_PROMPT"),
        ("/v1/embeddings", {"model": "tiny", "input": "x" * 1001}, "OLLAMAD_MAX_PROMPT"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                       "tools": [{"type": "function"}]}, "function"),
        ("/api/chat", {"model": "tiny", "messages": [{"role": "assistant", "tool_calls": [{"function": 5}]}]},
         "tool_calls"),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                  "tools": [{"type": "function", "function": {}}]}, "name"),
    ]
    for path, body, needle in cases:
        status, answer = daemon.post(path, body)
        message = answer["error"]["message"] if path.startswith("/v1/") else answer["error"]
        assert status == 400 and needle in message, (path, status, answer)
    assert _loaded(daemon) == []  # nothing was loaded for any of them
    raw = b'{"model": "tiny", "prompt": "\\ud800 lone"}'
    status, answer = daemon.request("POST", "/api/generate", raw=raw)
    assert status == 400 and b"lone surrogate" in answer, answer
    status, answer = daemon.request("POST", "/v1/chat/completions",
                                    raw=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}')
    assert status == 400
    pair = b'{"model": "tiny", "prompt": "\\ud83d\\ude00", "stream": false}'  # a valid pair is fine
    assert daemon.request("POST", "/api/generate", raw=pair)[0] == 200


def test_deleted_model_file_is_404_not_500(daemon: Daemon, folder: Path) -> None:
    assert daemon.post("/api/generate", {"model": "tiny", "prompt": "x", "stream": False})[0] == 200
    (folder / "tiny.gguf").unlink()
    status, body = daemon.get("/api/ps")
    assert status == 200 and [m["name"] for m in body["models"]] == ["tiny:latest"]
    status, body = daemon.post("/api/generate", {"model": "tiny", "prompt": "x"})
    assert status == 404 and "not found" in body["error"]
    assert daemon.post("/api/show", {"model": "tiny"})[0] == 404
    assert daemon.get("/api/tags")[0] == 200
    assert daemon.request("DELETE", "/api/delete", {"model": "tiny"})[0] == 200  # still deletable


def test_non_utf8_authorization_is_401(daemon_factory: Any, fake_server: Path, folder: Path) -> None:
    d = daemon_factory(fake_server, folder, OLLAMAD_API_KEY="s3cret")
    for value in ("Bearer \xff\xfe", "\xc3\x28", "Bearer s3cret\xff"):
        req = urllib.request.Request(d.url + "/api/tags", headers={"Authorization": value})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 401, value


def test_files_are_private_to_the_service(daemon: Daemon, folder: Path) -> None:
    data = b"some blob"
    import hashlib

    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert daemon.request("POST", f"/api/blobs/{digest}", raw=data)[0] == 201
    blob = folder / "blobs" / digest.replace(":", "-")
    assert blob.stat().st_mode & 0o027 == 0 and (folder / "blobs").stat().st_mode & 0o007 == 0
    state = Path(daemon.env["OLLAMAD_STATE_DIR"])
    assert state.is_dir() and state.stat().st_mode & 0o007 == 0


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounting a small tmpfs needs root")
def test_full_disk_is_507_and_leaves_no_partial_files(daemon_factory: Any, fake_server: Path, folder: Path,
                                                     tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        shutil.copy(folder / "tiny.gguf", small / "tiny.gguf")
        d = daemon_factory(fake_server, small)
        data = os.urandom(5 << 20)
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        status, body = d.request("POST", f"/api/blobs/{digest}", raw=data)
        assert status == 507 and b"disk space" in body, body
        try:  # fill what is left
            with open(small / "filler", "wb", buffering=0) as f:
                while True:
                    f.write(b"\0" * 4096)
        except OSError:
            pass
        status, lines = d.post("/api/create", {"model": "y", "from": "tiny", "system": "s" * 100_000})
        assert status == 200 and lines[-1] == {"error": "not enough disk space for the models folder"}, lines
        status, body = d.post("/api/create", {"model": "y", "from": "tiny", "system": "s" * 100_000, "stream": False})
        assert status == 507, body
        leftovers = [p for p in small.rglob(".*") if p.is_file()]
        assert leftovers == [] and "Traceback" not in d.log()
        d.stop()
    finally:
        subprocess.run(["umount", "-l", str(small)])


@pytest.mark.real
def test_absurd_context_length_is_clamped_for_llama_server(daemon_factory: Any, llama_server: Path,
                                                           tmp_path: Path) -> None:
    from dataclasses import replace

    from ollamad.models.testmodels import TINY, write_llama

    write_llama(tmp_path / "m" / "huge.gguf", replace(TINY, ctx=(1 << 32) - 1), name="huge")
    d = daemon_factory(llama_server, tmp_path / "m")
    for _ in range(2):  # it used to abort on every request: "exceeds the available context size (-1 tokens)"
        status, body = d.post("/api/generate", {"model": "huge", "prompt": "hi", "stream": False,
                                                "options": {"num_predict": 2}})
        assert status == 200 and body["done"], body
    assert d.log().count('"runner starting"') == 1


def test_a_runner_stuck_compiling_a_grammar_is_replaced(daemon_factory: Any, folder: Path, tmp_path: Path) -> None:
    d = daemon_factory(fake_with(tmp_path, FAKE_SCHEMA_DELAY="3600"), folder, OLLAMAD_ACCEPT_TIMEOUT="1s")
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "format": schema, "stream": False})
    assert status == 500 and "OLLAMAD_ACCEPT_TIMEOUT" in body["error"], body
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "stream": False})
    assert status == 200, body
    assert d.log().count('"runner starting"') == 2  # the stuck one was replaced


@pytest.mark.parametrize("slots_delay", ["0", "1.5"])
def test_a_stream_waiting_behind_another_outlasts_the_accept_timeout(daemon_factory: Any, folder: Path,
                                                                      tmp_path: Path, slots_delay: str) -> None:
    """The second stream waits in llama-server's queue (OLLAMAD_SEND_AHEAD) for 3 s, longer than the
    1 s accept timeout: every slot is busy meanwhile (/slots), so the runner is not stuck. Also when
    /slots takes longer than the accept timeout to answer, as llama-server on a loaded machine."""
    d = daemon_factory(fake_with(tmp_path, FAKE_TOKEN_DELAY="0.1", FAKE_TOKENS="30", FAKE_SLOTS_DELAY=slots_delay),
                       folder, OLLAMA_NUM_PARALLEL="1", OLLAMAD_ACCEPT_TIMEOUT="1s")
    assert d.post("/api/generate", {"model": "tiny", "prompt": ""})[0] == 200  # loaded

    def stream(prompt: str) -> Any:
        return d.post("/api/generate", {"model": "tiny", "prompt": prompt})[1]  # streamed: a list of lines

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream, "one")
        time.sleep(0.5)
        second = pool.submit(stream, "two")
        results = [first.result(30), second.result(30)]
    assert [r[-1].get("done") for r in results] == [True, True], results
    assert d.log().count('"runner starting"') == 1
    (child,) = runner_children(d)
    assert child_get(child, "/fake/stats")["peak_sent"] == 2  # the second was sent ahead


def test_a_stream_accepted_while_slots_is_asked_is_kept(daemon_factory: Any, folder: Path, tmp_path: Path) -> None:
    """Past the accept timeout /slots is asked, and answers late (2 s): meanwhile the first stream
    ends, the second takes the slot, and ends too. /slots then says a slot is free, but the
    second's reply began: it is answered, and the runner is kept."""
    d = daemon_factory(fake_with(tmp_path, FAKE_TOKEN_DELAY="0.1", FAKE_SLOTS_DELAY="2"), folder,
                       OLLAMA_NUM_PARALLEL="1", OLLAMAD_ACCEPT_TIMEOUT="1s")
    assert d.post("/api/generate", {"model": "tiny", "prompt": ""})[0] == 200  # loaded
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(d.post, "/api/generate", {"model": "tiny", "prompt": "one", "options": {"num_predict": 20}})
        time.sleep(0.2)  # /slots asked at 1.2 s, answered at 3.2 s; first ends at 2 s, second at 2.1 s
        second = pool.submit(d.post, "/api/generate", {"model": "tiny", "prompt": "two", "options": {"num_predict": 1}})
        results = [first.result(30), second.result(30)]
    assert [(status, body[-1].get("done")) for status, body in results] == [(200, True), (200, True)], results
    assert '"every slot is busy' not in d.log() and '"busy_slots": 0' in d.log()  # /slots said free
    assert d.log().count('"runner starting"') == 1


@pytest.mark.real
def test_real_runner_stuck_on_a_grammar_is_replaced(daemon_factory: Any, llama_server: Path, folder: Path) -> None:
    d = daemon_factory(llama_server, folder, OLLAMAD_FORMAT_MAX_PROPERTIES="100000", OLLAMAD_ACCEPT_TIMEOUT="1s")
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(2000)}}  # ~16 s to compile
    t0 = time.monotonic()
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "format": schema, "stream": False})
    assert status == 500 and "OLLAMAD_ACCEPT_TIMEOUT" in body["error"], body
    assert time.monotonic() - t0 < 10
    status, body = d.post("/api/generate", {"model": "tiny", "prompt": "x", "stream": False,
                                            "options": {"num_predict": 2}})
    assert status == 200, body
    assert d.log().count('"runner starting"') == 2
