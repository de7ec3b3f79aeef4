"""Pure translation between Ollama's shapes and llama-server's."""

from __future__ import annotations

import datetime as dt

import pytest
from pydantic import ValidationError

from ollamad.api.translate import Options, done_reason, durations, now_iso


def test_now_iso_is_utc_with_microseconds_and_current() -> None:
    s = now_iso()
    assert s.endswith("Z") and len(s.split(".")[1]) == 7
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - t).total_seconds()) < 2


def test_options_map_to_llama_server_names() -> None:
    o = Options.model_validate({"num_predict": 5, "num_keep": 2, "temperature": 0.5, "stop": ["x"], "seed": -1,
                                "unknown_option": 1, "num_ctx": 2048})
    assert o.sampling() == {"n_predict": 5, "n_keep": 2, "temperature": 0.5, "stop": ["x"], "seed": -1}
    assert Options.model_validate({"num_predict": -2}).sampling() == {"n_predict": -1}


@pytest.mark.parametrize("bad", [{"temperature": "hot"}, {"num_ctx": -5}, {"top_p": 2}, {"stop": "x"}])
def test_wrong_option_types_name_the_field(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError) as e:
        Options.model_validate(bad)
    assert next(iter(bad)) in str(e.value)


def test_done_reason_and_durations() -> None:
    assert done_reason("limit") == "length" and done_reason("eos") == "stop" and done_reason(None, "length") == "length"
    d = durations({"prompt_n": 3, "prompt_ms": 1.5, "predicted_n": 7, "predicted_ms": 20.0}, 100, 10)
    assert d == {"total_duration": 100, "load_duration": 10, "prompt_eval_count": 3,
                 "prompt_eval_duration": 1_500_000, "eval_count": 7, "eval_duration": 20_000_000}
