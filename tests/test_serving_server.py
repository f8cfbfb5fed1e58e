"""``dyllm serve`` as a real process on 127.0.0.1 (a free port it picks itself), driven by the
official ``openai`` client and raw HTTP: completions, chat, streaming, 32 requests in flight,
bad requests, a full queue, a client that disconnects mid-stream.

Every server started here binds 127.0.0.1 only, stops by itself (``--lifetime``) should the
fixture's teardown not run, and every loop below is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import dyllm_fx  # noqa: E402
from dyllm_fx.eval.synthetic_tasks import held_out_set  # noqa: E402
from dyllm_fx.serving.process import ServerProcess  # noqa: E402

# Slow (`-m "not slow"` leaves it out): starts real `dyllm serve` processes.
pytestmark = pytest.mark.slow

START_TIMEOUT_S = 180  # model load on a busy 2-core machine
REQUEST_TIMEOUT_S = 120
LIFETIME_S = 900  # the server stops by itself after this, whatever happens to the test process
POLICY = "dual_cache"  # exact (a row decodes what it decodes alone) and fast
SHORT_ARGS = {
    "max_tokens": 32,
    "extra_body": {"block_length": 16},
}  # two blocks: rows join and leave at block boundaries


class Server(ServerProcess):
    """``dyllm serve`` in a subprocess, with an openai client and its metrics."""

    def __init__(self, *args: str):
        super().__init__(*args, threads=1, lifetime_s=LIFETIME_S, start_timeout_s=START_TIMEOUT_S)
        self.client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
        )

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return {
            k: float(v)
            for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
        }

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> dict[str, float]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if predicate(m):
                return m
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; metrics: {m}")


@pytest.fixture(scope="module")
def server():
    with Server("--policy", POLICY, "--max-num-seqs", "16", "--max-queue-size", "64") as s:
        yield s


@pytest.fixture(scope="module")
def reference():
    """The embedded model under the server's policy, decoding each prompt alone."""
    model, tokenizer = dyllm_fx.load("default")
    fast = dyllm_fx.transform(model, policy=POLICY)
    cache: dict = {}

    def alone(prompt: str, max_tokens: int = 32, block_length: int = 16) -> str:
        key = (prompt, max_tokens, block_length)
        if key not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a window other than the trained 64 warns
                cache[key] = dyllm_fx.generate(
                    fast, tokenizer, [prompt], gen_length=max_tokens, block_length=block_length
                ).texts[0]
        return cache[key]

    return alone


def prompts(n: int) -> list[str]:
    """Held-out prompts of every task (different lengths), cycled to ``n``."""
    pool = [e.prompt for e in held_out_set(3)]
    return [pool[i % len(pool)] for i in range(n)]


def error_body(response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


# --- endpoints ----------------------------------------------------------------------------------


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
    (card,) = server.client.models.list().data
    assert card.id == "default" and card.owned_by == "dyllm-fx"
    m = server.metrics()
    for name in (
        "dyllm_num_requests_waiting",
        "dyllm_num_requests_running",
        "dyllm_tokens_per_second",
        "dyllm_active_fraction",
        "dyllm_request_nfe_count",
        "dyllm_requests_received_total",
    ):
        assert name in m, name


def test_completion_matches_generate_alone(server, reference):
    prompt = prompts(1)[0]
    r = server.client.completions.create(
        model="default", prompt=prompt, max_tokens=32, extra_body={"block_length": 16}
    )
    (choice,) = r.choices
    assert choice.text == reference(prompt) and choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(choice.text) and r.usage.prompt_tokens == len(prompt)
    assert r.model_extra["metrics"]["nfe"] > 0 and 0 < r.model_extra["metrics"]["active_fraction"] < 1


def test_chat_completion_with_the_trivial_template(server, reference):
    prompt = prompts(2)[1]
    r = server.client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=32,
        extra_body={"block_length": 16},
    )
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == reference(prompt)


def test_streaming_completion_sends_text_as_each_block_commits(server, reference):
    prompt = prompts(3)[2]
    chunks = list(
        server.client.completions.create(
            model="default",
            prompt=prompt,
            stream=True,
            stream_options={"include_usage": True},
            **{"max_tokens": 32},
            extra_body={"block_length": 16},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    expected = reference(prompt)
    assert "".join(texts) == expected
    assert len(texts) == -(-len(expected) // 16)  # one chunk per block that holds text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens == len(expected)


def test_streaming_chat(server, reference):
    prompt = prompts(4)[3]
    chunks = list(
        server.client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            max_tokens=32,
            extra_body={"block_length": 16},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference(prompt)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_32_requests_in_flight_each_equal_alone(server, reference):
    """32 requests from a thread pool (more than --max-num-seqs 16: the rest wait and join
    running batches at block boundaries); every one answered with its tokens alone."""
    batch = prompts(32)

    def ask(prompt):
        r = server.client.completions.create(
            model="default", prompt=prompt, extra_body={"block_length": 16}, max_tokens=32
        )
        return r.choices[0].text, r.model_extra["metrics"]

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, batch, timeout=REQUEST_TIMEOUT_S * 2))
    assert len(answers) == 32
    for prompt, (text, _) in zip(batch, answers):
        assert text == reference(prompt), prompt
    assert any(m["relayouts"] for _, m in answers)  # some joined running batches
    assert server.metrics()["dyllm_num_requests_running"] == 0


def test_the_docs_client_example_runs_against_the_server(server, reference):
    text = (Path(__file__).resolve().parent.parent / "docs" / "serving.md").read_text()
    block = next(
        b for b in re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M) if "openai.OpenAI(" in b
    )
    assert "http://127.0.0.1:8000/v1" in block
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        code = compile(block.replace("http://127.0.0.1:8000", server.url), "docs/serving.md", "exec")
        exec(code, namespace)
    # the example's own request, decoded alone, and the text its comment promises
    prompt = re.search(r'prompt="([^"]+)"', block).group(1)
    max_tokens = int(re.search(r"max_tokens=(\d+)", block).group(1))
    block_length = int(re.search(r'"block_length": (\d+)', block).group(1))
    promised = re.search(r"# the text: (\S+)", block).group(1)
    assert namespace["r"].choices[0].text == reference(prompt, max_tokens, block_length) == promised
    assert printed.getvalue().strip()


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "nope", "prompt": "add:1+2="}, "model"),
        ({"prompt": "add:1+2=", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "add:1+2=", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "add:" + "1" * 240 + "="}, "prompt"),
        ({"prompt": "add:1+2=", "max_tokens": "many"}, "max_tokens"),
        ({"prompt": "add:1+2=", "temperature": -1}, None),
        ({"prompt": "add:1+2=", "n": 0}, None),
        ({"prompt": "add:1+2=", "logprobs": 2}, "logprobs"),
        ({"prompt": ""}, None),
        ({"max_tokens": 8}, "prompt"),
    ],
)
def test_bad_requests_get_a_400_with_an_openai_error_body(server, body, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = error_body(r)
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param


def test_malformed_json_and_unknown_routes(server):
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b'{"prompt": "add:1+',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert r.status_code == 400 and "not valid JSON" in error_body(r)["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": "hi"}, timeout=30)
    assert r.status_code == 400 and error_body(r)["param"].startswith("messages")
    r = httpx.get(f"{server.url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and error_body(r)["type"] == "not_found_error"


def test_the_openai_client_sees_the_errors_and_the_server_keeps_serving(server, reference):
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        server.client.completions.create(model="gpt-4", prompt="add:1+2=")
    with pytest.raises(openai.BadRequestError, match="exceeds the model's window"):
        server.client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "a" * 250}]
        )
    prompt = prompts(5)[4]
    assert server.client.completions.create(model="default", prompt=prompt, **SHORT_ARGS).choices[
        0
    ].text == reference(prompt)
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


# --- disconnects and a full queue -------------------------------------------------------------


def _open_stream(
    url: str, prompt: str, max_tokens: int = 64, steps: int | None = None, first_chunk: bool = True
):
    """A streaming request whose response has begun (with ``first_chunk``: whose first block's
    text has arrived, so its row is decoding); close the returned client to disconnect."""
    client = httpx.Client(timeout=REQUEST_TIMEOUT_S)
    try:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "block_length": 16,
            "steps": steps,
            "stream": True,
        }
        stream = client.stream("POST", f"{url}/v1/completions", json=body)
        response = stream.__enter__()
        assert response.status_code == 200
        lines = response.iter_lines()
        if first_chunk:
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
    except BaseException:
        client.close()
        raise
    stream.lines = lines  # keep the line iterator alive: collecting it would close the response
    return client, stream


def test_a_disconnect_mid_stream_frees_the_slot(server, reference):
    before = server.metrics().get('dyllm_requests_total{finish_reason="abort"}', 0)
    # its first block has arrived; 128 steps per block leave the rest far from done when it leaves
    client, stream = _open_stream(server.url, prompts(6)[5], steps=512)
    stream.__exit__(None, None, None)
    client.close()
    server.wait_for(
        lambda m: (
            m.get('dyllm_requests_total{finish_reason="abort"}', 0) > before
            and m["dyllm_num_requests_running"] == 0
        ),
        "the disconnected request to be cancelled",
    )
    prompt = prompts(7)[6]
    assert server.client.completions.create(model="default", prompt=prompt, **SHORT_ARGS).choices[
        0
    ].text == reference(prompt)


def test_a_full_queue_gets_429_and_loses_no_other_request(reference):
    with Server("--policy", POLICY, "--max-num-seqs", "1", "--max-queue-size", "1") as small:
        # takes the one slot, for 4096 steps: it cannot finish before the client leaves
        running_client, stream = _open_stream(small.url, prompts(1)[0], steps=4096, first_chunk=False)
        small.wait_for(lambda m: m["dyllm_num_requests_running"] == 1, "the first request to run")
        waiting: dict = {}
        prompt = prompts(2)[1]

        def wait_in_queue():
            waiting["r"] = small.client.completions.create(model="default", prompt=prompt, **SHORT_ARGS)

        thread = threading.Thread(target=wait_in_queue, daemon=True)
        thread.start()
        small.wait_for(lambda m: m["dyllm_num_requests_waiting"] == 1, "the second request to wait")
        with pytest.raises(openai.RateLimitError) as info:
            small.client.completions.create(model="default", prompt="add:1+2=", **SHORT_ARGS)
        assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
        stream.__exit__(None, None, None)  # the first client leaves: its slot goes to the waiting one
        running_client.close()
        thread.join(REQUEST_TIMEOUT_S)
        assert waiting["r"].choices[0].text == reference(prompt)
        m = small.metrics()
        assert m['dyllm_requests_rejected_total{reason="queue_full"}'] == 1
        assert m['dyllm_requests_total{finish_reason="abort"}'] == 1


# --- the command line ---------------------------------------------------------------------------


def _dyllm(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dyllm_fx.cli.main", *args], capture_output=True, text=True, timeout=timeout
    )


def test_serve_help_lists_its_options():
    out = _dyllm("serve", "--help", timeout=60).stdout
    for option in (
        "--model",
        "--policy",
        "--host",
        "--port",
        "--max-num-seqs",
        "--max-queue-size",
        "--lifetime",
    ):
        assert option in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--port", "70000"], "--port must be in 0..65535"),
        (["--max-num-seqs", "0"], "--max-num-seqs must be at least 1"),
        (["--policy", "nope"], "unknown policy"),
    ],
)
def test_serve_rejects_bad_options_in_one_line(args, message):
    r = _dyllm("serve", *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_serve_says_when_the_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        r = _dyllm("serve", "--port", str(taken.getsockname()[1]))
    assert r.returncode == 2 and "cannot listen on 127.0.0.1:" in r.stderr and "--port" in r.stderr, r.stderr


def test_serve_without_fastapi_names_the_extra(monkeypatch, capsys):
    import importlib.util

    from dyllm_fx.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a)
    )
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "dyllm-fx[serve]"' in err and "fastapi" in err and len(err.strip().splitlines()) == 1
