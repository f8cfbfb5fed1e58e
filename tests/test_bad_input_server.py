"""The HTTP server answers bad requests with a 400 that names the field and the fix, before any
decoding (issue 30): booleans and strings are not numbers, numbers must be finite, prompt ids
must be in the vocabulary, a prompt with no room for a response says so, and a request larger
than the queue will ever hold is a 400 (a 429 would invite a retry that cannot succeed).

The app runs in this process (FastAPI's test client over the tiny random LLaDA); no request
here reaches the model except the one that checks the server still answers."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from dyllm_fx.serving import ServingEngine, build_app  # noqa: E402
from dyllm_fx.serving.async_engine import AsyncEngine  # noqa: E402
from tiny_checkpoints import tiny_llada, tiny_tokenizer  # noqa: E402

QUEUE = 3
SMALL = {"max_tokens": 8, "block_length": 8}


@pytest.fixture(scope="module")
def client():
    engine = ServingEngine(tiny_llada(seed=0), tiny_tokenizer(), max_num_seqs=2, max_queue_size=QUEUE)
    running = AsyncEngine(engine).start()
    try:
        with TestClient(build_app(running, "default")) as c:
            yield c
    finally:
        running.shutdown()


def _error(response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("temperature", True, "must be a number, not the boolean true"),
        ("top_p", False, "must be a number, not the boolean false"),
        ("temperature", "0.7", "not a string: send it without quotes"),
        ("seed", True, "must be a number, not the boolean true"),
        ("n", True, "must be a number"),
        ("max_tokens", "8", "not a string"),
        ("threshold", True, "must be a number"),
    ],
)
def test_a_boolean_or_a_string_is_not_a_number(client, field, value, words):
    err = _error(client.post("/v1/completions", json={"prompt": "ab", **SMALL, field: value}))
    assert err["param"] == field and words in err["message"]


@pytest.mark.parametrize(
    "field, literal, words",
    [
        ("temperature", "NaN", "temperature must be a finite number"),
        ("temperature", "Infinity", "temperature must be a finite number"),
        ("top_p", "NaN", "top_p must be a finite number"),
        ("threshold", "-Infinity", "threshold must be a finite number"),
        ("seed", str(2**70), "seed must be in"),
        ("temperature", "-1", "temperature must be >= 0"),
    ],
)
def test_numbers_must_be_finite_and_in_range(client, field, literal, words):
    body = '{"prompt": "ab", "max_tokens": 8, "block_length": 8, "%s": %s}' % (field, literal)
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    err = _error(response)
    assert words in err["message"] and err["param"] == field


def test_a_fractional_seed_is_refused_not_truncated(client):
    err = _error(client.post("/v1/completions", json={"prompt": "ab", **SMALL, "seed": 1.5}))
    assert err["param"] == "seed" and "integer" in err["message"]


@pytest.mark.parametrize("ids", [[5, 6, 100000], [5, -2], [44]], ids=["huge", "negative", "vocab"])
def test_prompt_ids_outside_the_vocabulary_get_a_400(client, ids):
    bad = next(t for t in ids if not 0 <= t < 44)
    err = _error(client.post("/v1/completions", json={"prompt": ids, **SMALL}))
    assert err["param"] == "prompt"
    assert (
        f"token id {bad} at position" in err["message"] and "outside the model's vocabulary" in err["message"]
    )


def test_a_prompt_with_no_room_says_so_and_suggests_no_negative_max_tokens(client):
    err = _error(client.post("/v1/completions", json={"prompt": "ab" * 70, **SMALL}))
    assert err["param"] == "prompt"
    assert "leaves no room for a response" in err["message"] and "at most -" not in err["message"]


def test_a_request_larger_than_the_queue_is_a_400_not_a_429(client):
    err = _error(client.post("/v1/completions", json={"prompt": ["ab", "cd"], **SMALL, "n": 2}))
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert "can never be queued" in err["message"] and f"--max-queue-size {2 * 2}" in err["message"]
    metrics = client.get("/metrics").text
    assert 'reason="too_large"' in metrics


def test_the_chat_endpoint_checks_the_same_fields(client):
    body = {"messages": [{"role": "user", "content": "ab"}], **SMALL, "temperature": True}
    err = _error(client.post("/v1/chat/completions", json=body))
    assert err["param"] == "temperature"


def test_the_server_still_answers_a_good_request(client):
    response = client.post("/v1/completions", json={"prompt": [5, 6, 7], **SMALL, "temperature": 0})
    assert response.status_code == 200, response.text
    assert json.loads(response.text)["usage"]["completion_tokens"] <= 8
