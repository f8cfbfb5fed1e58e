"""``dyllm serve --replicas N``: N copies of the OpenAI-compatible server behind Ray Serve's
proxy (``dyllm_fx.serving.replicas``). The replica test starts a real local Ray cluster (slow);
the checks of bad input and of a missing Ray need none."""

from __future__ import annotations

import importlib.util
import warnings

import pytest

import dyllm_fx
from dyllm_fx.cli.main import main
from dyllm_fx.errors import MissingDependencyError, UsageError
from dyllm_fx.eval.synthetic_tasks import held_out_set
from dyllm_fx.serving.process import ServerProcess
from dyllm_fx.serving.replicas import ReplicaConfig, openai_deployment, require_ray

POLICY = "dual_cache"


def _without(monkeypatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.split(".")[0] == module else real(name, *a),
    )


def test_without_ray_the_error_names_the_extra(monkeypatch, capsys):
    _without(monkeypatch, "ray")
    with pytest.raises(MissingDependencyError, match=r'pip install "dyllm-fx\[ray\]"'):
        require_ray()
    assert main(["serve", "--replicas", "2"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "dyllm-fx[ray]"' in err and "--replicas" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "0"], "--replicas must be at least 1"),
        (["--replicas", "2", "--max-replicas", "1"], "--max-replicas must be >= --replicas (2)"),
        (["--replicas", "1", "--gpus-per-replica", "-1"], "--gpus-per-replica must be at least 0"),
    ],
)
def test_bad_replica_options_are_refused_before_ray_starts(args, message, capsys):
    pytest.importorskip("ray")
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("count, most", [(0, None), (2, 1), (True, None)])
def test_the_deployment_refuses_bad_replica_counts(count, most):
    pytest.importorskip("ray")
    with pytest.raises(UsageError, match="replicas"):
        openai_deployment(ReplicaConfig(), count, most)


@pytest.mark.slow
def test_two_replicas_answer_as_one_server_does():
    """Two replicas of the embedded model behind Ray Serve's proxy: /v1/models and /health
    answer, every completion equals the model decoding its prompt alone (whichever replica
    took it), both replicas took requests (each has its own /metrics), and a replica killed
    mid-run is replaced without a request lost."""
    pytest.importorskip("ray")
    openai = pytest.importorskip("openai")
    from concurrent.futures import ThreadPoolExecutor

    pool = [e.prompt for e in held_out_set(2)][:8]
    model, tokenizer = dyllm_fx.load("default")
    fast = dyllm_fx.transform(model, policy=POLICY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a window other than the trained 64 warns
        want = dyllm_fx.generate(fast, tokenizer, pool, gen_length=32, block_length=16).texts
    with ServerProcess(
        "--policy", POLICY, "--replicas", "2", "--cpus-per-replica", "0.5", start_timeout_s=300
    ) as server:
        import httpx

        assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
        models = httpx.get(f"{server.url}/v1/models", timeout=60).json()
        assert [m["id"] for m in models["data"]] == ["default"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(prompt: str) -> str:
            out = client.completions.create(
                model="default", prompt=prompt, max_tokens=32, extra_body={"block_length": 16}
            )
            return out.choices[0].text

        with ThreadPoolExecutor(32) as threads:  # 32 requests in flight over the two replicas
            got = list(threads.map(complete, pool * 4))
        assert got == want * 4
        assert "2 replica(s) on Ray Serve" in server.output()
        # each scrape of /metrics reaches one replica; two different processes answer
        started = set()
        for _ in range(30):
            text = httpx.get(f"{server.url}/metrics", timeout=60).text
            started.add(next(ln for ln in text.splitlines() if ln.startswith("process_start_time_seconds")))
            if len(started) == 2:
                break
        assert len(started) == 2, started
        _a_killed_replica_loses_no_request_and_is_replaced(server.url, complete, pool[0], want[0])


def _replica_pids() -> list[int]:
    import subprocess

    found = subprocess.run(["pgrep", "-f", "ServeReplica:dyllm:"], capture_output=True, text=True).stdout
    return sorted(int(p) for p in found.split())


def _a_killed_replica_loses_no_request_and_is_replaced(url, complete, prompt, text) -> None:
    """A replica killed while requests are in flight: every request is answered (the right text,
    or an error status, never silence) within the client's timeout, and Ray starts a new
    replica that answers too."""
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    import openai

    before = _replica_pids()
    assert len(before) == 2, before

    def outcome(_) -> str:
        try:
            return "same" if complete(prompt) == text else "different"
        except openai.APIStatusError as err:
            return f"error {err.status_code}"

    with ThreadPoolExecutor(16) as threads:
        results = threads.map(outcome, range(16))
        time.sleep(0.5)
        os.kill(before[0], signal.SIGKILL)
        outcomes = list(results)  # openai's timeout bounds each: a lost request fails the test
    assert all(o == "same" or o.startswith("error 5") for o in outcomes), outcomes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (len(now := _replica_pids()) == 2 and before[0] not in now):
        time.sleep(0.5)
    assert len(now) == 2 and before[0] not in now, (before, now)
    assert [outcome(i) for i in range(4)] == ["same"] * 4


def _rank_pids(replica: int) -> list[int]:
    """The tensor-parallel ranks a replica started beside itself (multiprocessing's spawned children)."""
    import subprocess

    children = subprocess.run(["pgrep", "-P", str(replica)], capture_output=True, text=True).stdout.split()
    ranks = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                ranks.append(int(pid))
    return ranks


@pytest.mark.slow
def test_a_tensor_parallel_replica_answers_and_a_lost_rank_gets_it_replaced():
    """``dyllm serve --replicas 1 --tensor-parallel-size 2``: the replica is rank 0 and starts rank 1
    beside it; its completions are the model's. Rank 1 killed while requests are in flight: each
    is answered (the text or an error status), the replica fails Ray's health check and is
    replaced by one that answers."""
    pytest.importorskip("ray")
    openai = pytest.importorskip("openai")
    import os
    import signal
    import time
    from concurrent.futures import ThreadPoolExecutor

    pool = [e.prompt for e in held_out_set(2)][:4]
    model, tokenizer = dyllm_fx.load("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = dyllm_fx.generate(
            dyllm_fx.transform(model, policy=POLICY), tokenizer, pool, gen_length=32, block_length=16
        ).texts
    with ServerProcess(
        "--policy", POLICY, "--replicas", "1", "-tp", "2", "--cpus-per-replica", "0.5", start_timeout_s=300
    ) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)

        def complete(prompt: str):
            out = client.completions.create(
                model="default", prompt=prompt, max_tokens=32, extra_body={"block_length": 16}
            )
            return out.choices[0]

        def outcome(prompt: str) -> str:
            """ "same", or how the failure was reported: an error status, or finish_reason "error"
            (the engine stopped while the request decoded), never a wrong text said to be done."""
            try:
                choice = complete(prompt)
            except openai.APIStatusError as err:
                return f"error {err.status_code}"
            if choice.finish_reason == "error":
                return "error finish"
            return "same" if choice.text == want[pool.index(prompt)] else "different"

        with ThreadPoolExecutor(8) as threads:
            assert list(threads.map(outcome, pool * 2)) == ["same"] * 2 * len(pool)
        (replica,) = _replica_pids()
        (rank1,) = _rank_pids(replica)
        with ThreadPoolExecutor(8) as threads:
            results = threads.map(outcome, pool * 2)
            time.sleep(0.5)
            os.kill(rank1, signal.SIGKILL)
            outcomes = list(results)
        assert all(o in ("same", "error finish") or o.startswith("error 5") for o in outcomes), outcomes
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and [replica] == (now := _replica_pids()):
            time.sleep(0.5)
        assert now != [replica], "the replica whose rank died was not replaced"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and outcome(pool[0]) != "same":
            time.sleep(1)
        assert [outcome(p) for p in pool] == ["same"] * len(pool)
