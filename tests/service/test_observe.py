"""Logs (one JSON line per request, child output tagged) and /metrics."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ollamad.service.metrics import reason_label
from tests.conftest import Daemon
from tests.service.test_service import slow_fake

SECRET = "SECRET-PROMPT-7f3a"


def scrape(d: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, raw = d.request("GET", "/metrics")
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(raw.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(d: Daemon) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in d.log().splitlines() if ln.startswith("{")]


def wait_for_log(d: Daemon, pred: Any, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in json_lines(d) if pred(e)]
        if found:
            return found[-1]
        time.sleep(0.05)
    raise AssertionError(f"no such log line in {d.log()[-3000:]}")


def test_one_log_line_per_request_without_the_prompt(daemon_factory: Any, fake_server: Path,
                                                     models_dir: Path) -> None:
    d: Daemon = daemon_factory(fake_server, models_dir)
    status, lines = d.post("/api/generate", {"model": "tiny", "prompt": SECRET, "options": {"num_predict": 5}})
    assert status == 200 and lines[-1]["eval_count"] == 5
    status, body = d.post("/api/chat", {"model": "tiny", "stream": False, "options": {"num_predict": 3},
                                        "messages": [{"role": "user", "content": SECRET}]})
    assert status == 200 and body["eval_count"] == 3
    d.post("/api/generate", {"model": "nope", "prompt": SECRET})
    gen = wait_for_log(d, lambda e: e.get("event") == "request" and e.get("route") == "/api/generate"
                       and e.get("status") == 200)
    assert gen["model"] == "tiny:latest" and gen["tokens"] == 5 and gen["prompt_tokens"] == 3
    assert len(gen["request_id"]) == 16 and gen["level"] == "info"
    assert gen["load_time"] > 0 and gen["queue_wait"] >= 0 and gen["ttft"] >= gen["load_time"]
    assert gen["seconds"] >= gen["ttft"]
    chat = wait_for_log(d, lambda e: e.get("event") == "request" and e.get("route") == "/api/chat")
    assert chat["status"] == 200 and chat["tokens"] == 3 and chat["load_time"] == 0  # already loaded
    assert chat["request_id"] != gen["request_id"]
    missing = wait_for_log(d, lambda e: e.get("event") == "request" and e.get("status") == 404)
    assert missing["route"] == "/api/generate" and "model" not in missing
    assert SECRET not in d.log()


def test_debug_raises_the_level(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    quiet: Daemon = daemon_factory(fake_server, models_dir)
    loud: Daemon = daemon_factory(fake_server, models_dir, OLLAMA_DEBUG="1")
    for d in (quiet, loud):
        assert d.get("/api/version")[0] == 200
    wait_for_log(loud, lambda e: e.get("route") == "/api/version" and e["level"] == "debug")
    # child output (llama-server's chatter is debug-level: --verbosity 4 prints ~150 lines a load)
    # is tagged with its model and pid
    loud.post("/api/generate", {"model": "tiny", "prompt": "x", "options": {"num_predict": 1}})
    child = wait_for_log(loud, lambda e: e.get("event") == "llama-server")
    assert child["model"] == "tiny:latest" and isinstance(child["runner_pid"], int)
    time.sleep(0.2)
    assert not [e for e in json_lines(quiet) if e.get("level") == "debug"]


def test_metrics(daemon_factory: Any, fake_server: Path, models_dir: Path) -> None:
    d: Daemon = daemon_factory(fake_server, models_dir, OLLAMA_MAX_LOADED_MODELS="1")
    assert d.post("/api/generate", {"model": "tiny", "prompt": "a", "options": {"num_predict": 4}})[0] == 200
    assert d.post("/api/generate", {"model": "tiny", "prompt": "b", "options": {"num_predict": 6},
                                    "stream": False})[0] == 200
    assert d.post("/api/generate", {"model": "nope", "prompt": "x"})[0] == 404
    m = scrape(d)
    assert value(m, "ollamad_requests_total", route="/api/generate", status="200") == 2
    assert value(m, "ollamad_requests_total", route="/api/generate", status="404") == 1
    assert value(m, "ollamad_tokens_generated_total", model="tiny:latest") == 10
    assert value(m, "ollamad_time_to_first_token_seconds_count", model="tiny:latest") == 2
    assert value(m, "ollamad_request_duration_seconds_count", route="/api/generate") == 3
    assert value(m, "ollamad_model_loads_total", model="tiny:latest", result="ok") == 1
    assert value(m, "ollamad_in_flight", model="tiny:latest") == 0
    assert value(m, "ollamad_slots", model="tiny:latest") == 4
    assert value(m, "ollamad_queue_length_total") == 0 and value(m, "ollamad_accepting") == 1
    mem = [v for (name, labels), v in m.items() if name == "ollamad_runner_memory_bytes"
           and ("model", "tiny:latest") in labels]
    assert mem and mem[0] > 0
    # a second model with room for one: tiny is evicted, and the reason is counted
    assert d.post("/api/generate", {"model": "small", "prompt": "c", "options": {"num_predict": 2}})[0] == 200
    m = scrape(d)
    assert value(m, "ollamad_model_unloads_total", model="tiny:latest", reason="evicted") == 1
    assert value(m, "ollamad_model_loads_total", model="small:latest", result="ok") == 1
    assert value(m, "ollamad_in_flight", model="tiny:latest") == 0
    # keep_alive 0 unloads; that reason is counted too
    d.post("/api/generate", {"model": "small", "keep_alive": 0})
    deadline = time.monotonic() + 10
    while value(m, "ollamad_model_unloads_total", model="small:latest", reason="keep_alive") == 0:
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
        m = scrape(d)
    assert value(m, "ollamad_requests_total", route="/metrics", status="200") >= 2


def test_reason_labels_stay_bounded() -> None:
    assert reason_label("evicted to load llama3:8b") == "evicted"
    assert reason_label("keep-alive expired") == "keep_alive"
    assert reason_label("reload with a new plan") == "reload"
    assert reason_label("ollamad is shutting down") == "shutdown"
    assert reason_label("something new") == "other"


def test_client_that_goes_away_is_logged_as_499_and_frees_its_slot(daemon_factory: Any, tmp_path: Path,
                                                                   models_dir: Path) -> None:
    d: Daemon = daemon_factory(slow_fake(tmp_path, 0.2), models_dir)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=30)
    conn.request("POST", "/api/generate", json.dumps({"model": "tiny", "prompt": "x",
                                                      "options": {"num_predict": 200}}))
    resp = conn.getresponse()
    assert json.loads(resp.readline())["done"] is False
    conn.close()
    gone = wait_for_log(d, lambda e: e.get("event") == "request" and e.get("status") == 499)
    assert gone["model"] == "tiny:latest" and gone["tokens"] >= 1  # what it made before the cut
    deadline = time.monotonic() + 10
    while value(m := scrape(d), "ollamad_in_flight", model="tiny:latest") != 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert value(m, "ollamad_requests_total", route="/api/generate", status="499") == 1
