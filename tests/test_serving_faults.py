"""Serve under replica failure: a SIGKILLed Grounder or Answerer loses no accepted request.

The app (serve/test.yaml's deployments, one replica each, with temporary paths) is
deployed under its own name for this module. A bounded loopback load of ``/v1/answer``
requests (4 at a time, a hard time cap) runs while the test kills a Grounder replica and
an Answerer replica, each while it holds requests, with a real SIGKILL to the replica's
process. Every request must
end in a 2xx, or in a 503 that carries ``Retry-After``; never a 500 or a dropped
connection. The figures (status counts, latencies, replacement times) are printed so a
run with ``-s`` shows them. The retry and error mechanisms are also tested without a
cluster (fast), below.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from d2vlm_ray.config import ModelConfig, from_dict
from d2vlm_ray.data.testclips import write_barcode_clip
from d2vlm_ray.model.checkpoint import init_checkpoint

REPO = Path(__file__).resolve().parents[1]
APP = "d2vlm-faults"
REQUESTS = 32
CONCURRENCY = 4
# The load stops issuing requests after this long; each request has its own HTTP timeout.
LOAD_CAP_S = 50.0
HTTP_TIMEOUT_S = 45.0
DEADLINE_S = 30.0
BATCH_WAIT_S = 0.3
# The replicas are killed (together: one replacement window) once this many requests finished.
KILL_AFTER_DONE = 4
KILLED = ("Grounder", "Answerer")

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def fault_app(ray_cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    from d2vlm_ray.serving.app import start_app, stop_app

    root = tmp_path_factory.mktemp("serving_faults")
    ckpt = init_checkpoint(from_dict(ModelConfig, {"preset": "tiny"}), root / "ckpt", seed=0)
    videos = root / "videos"
    videos.mkdir()
    write_barcode_clip(videos / "a.mp4", fps=4, duration_s=4)
    config = yaml.safe_load((REPO / "serve" / "test.yaml").read_text())["applications"][0]
    features = dict(config["args"].get("features", {}), cache_root=str(root / "cache"))
    args = dict(config["args"], checkpoint_dir=str(ckpt), features=features, media_roots=[str(videos)])
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in config["deployments"]}
    for name in ("Grounder", "Answerer"):
        # Requests wait this long inside the replica for a batch to fill, so a kill lands on work in flight.
        options[name]["user_config"] = {"batch_wait_timeout_s": BATCH_WAIT_S}
    url = start_app(args, port=_free_port(), name=APP, deployment_options=options)
    try:
        yield {"url": url, "args": args, "handle": lambda name: serve.get_deployment_handle(name, app_name=APP)}
    finally:
        stop_app(APP)


def _replica_pid(deployment: str) -> tuple[str, int]:
    """Name and process id of the (single) running replica of ``deployment`` in this app."""
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    assert len(names) == 1, f"expected one {deployment} replica, found {names}"
    actor = ray.get_actor(names[0], namespace="serve")
    return names[0], int(ray.get(actor.__ray_call__.remote(lambda _self: os.getpid()), timeout=30))


def _wait_replaced(killed: dict[str, str], start: float, cap_s: float) -> dict[str, tuple[float, float]]:
    """Per deployment of ``killed`` ({deployment: killed replica's name}): seconds from ``start``
    (monotonic) until its replacement replica existed, and until it was serving."""
    import ray

    created_s: dict[str, float] = {}
    serving_s: dict[str, float] = {}
    while len(serving_s) < len(killed) and time.monotonic() - start < cap_s:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        for deployment, old in killed.items():
            prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
            if deployment in serving_s or not any(n.startswith(prefix) and n != old for n in names):
                continue
            created_s.setdefault(deployment, time.monotonic() - start)
            if _running_replicas(deployment) >= 1:  # the killed one left RUNNING before its successor existed
                serving_s[deployment] = time.monotonic() - start
        time.sleep(0.1)
    missing = sorted(set(killed) - set(serving_s))
    assert not missing, f"no replacement replica of {missing} within {cap_s} s"
    return {d: (created_s[d], serving_s[d]) for d in killed}


def _running_replicas(deployment: str) -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments[deployment].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


def _wait_busy(handle: Any, cap_s: float) -> int:
    """Wait until the deployment's replica holds requests (so a kill hits work in flight); their number."""
    start = time.monotonic()
    while time.monotonic() - start < cap_s:
        busy = int(handle.counters.remote().result(timeout_s=10).get("in_flight", 0))
        if busy > 0:
            return busy
        time.sleep(0.01)
    return 0


@dataclass
class _Outcome:
    status: int
    latency_s: float
    reason: str
    retry_after: str | None


def _one(url: str, index: int) -> _Outcome:
    body = {
        "video": "a.mp4",
        "question": f"what happens in clip {index} ?",
        "options": {"max_new_tokens": 6, "deadline_s": DEADLINE_S},
    }
    start = time.monotonic()
    try:
        response = requests.post(url + "/v1/answer", json=body, timeout=HTTP_TIMEOUT_S)
    except requests.RequestException as exc:  # a dropped connection is a lost request too
        return _Outcome(-1, time.monotonic() - start, type(exc).__name__, None)
    reason = "" if response.ok else str(response.json().get("reason", ""))
    return _Outcome(response.status_code, time.monotonic() - start, reason, response.headers.get("Retry-After"))


@pytest.mark.ray
@pytest.mark.slow  # ~80 s on a busy 2-core machine: deploying the app (~50 s) and a replacement (~20 s)
@pytest.mark.timeout(240)
def test_sigkilled_replicas_lose_no_accepted_request(fault_app: dict[str, Any]) -> None:
    url = fault_app["url"]
    warm = _one(url, -1)  # decodes the video once; the load then hits the cache
    assert warm.status == 200, warm

    done = 0
    lock = threading.Lock()

    def run(index: int) -> _Outcome | None:
        nonlocal done
        if time.monotonic() - load_start > LOAD_CAP_S:
            return None
        try:
            return _one(url, index)
        finally:
            with lock:
                done += 1

    inflight_at_kill: dict[str, int] = {}
    load_start = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(run, i) for i in range(REQUESTS)]
        while done < KILL_AFTER_DONE and time.monotonic() - load_start < LOAD_CAP_S:
            time.sleep(0.02)
        replicas = {deployment: _replica_pid(deployment) for deployment in KILLED}
        for deployment in KILLED:
            inflight_at_kill[deployment] = _wait_busy(fault_app["handle"](deployment), cap_s=10.0)
        killed_at = time.monotonic()
        for _, pid in replicas.values():
            os.kill(pid, signal.SIGKILL)
        replaced_s = _wait_replaced({d: name for d, (name, _) in replicas.items()}, killed_at, cap_s=LOAD_CAP_S)
        outcomes = [o for o in (f.result() for f in futures) if o is not None]
    load_s = time.monotonic() - load_start

    statuses = Counter(o.status for o in outcomes)
    latencies = sorted(o.latency_s for o in outcomes)
    print(
        f"\nfaults: {len(outcomes)} requests in {load_s:.1f} s, statuses {dict(statuses)}, "
        f"reasons {dict(Counter(o.reason for o in outcomes if o.reason))}, "
        f"latency p50 {statistics.median(latencies):.2f} s max {latencies[-1]:.2f} s, "
        f"in the replica at kill {inflight_at_kill}, replacement (created, serving) { ({k: (round(a, 1), round(b, 1)) for k, (a, b) in replaced_s.items()}) } s"
    )
    assert inflight_at_kill and all(n > 0 for n in inflight_at_kill.values()), "a kill must hit in-flight work"
    lost = [o for o in outcomes if not (200 <= o.status < 300 or (o.status == 503 and o.retry_after))]
    assert not lost, f"requests lost to the replica kills: {lost}"
    # The retry is the point: most requests must succeed, not be turned away.
    assert statuses[200] >= len(outcomes) // 2, dict(statuses)


# --- The mechanisms, without a cluster -------------------------------------------------------


def _ingress(tmp_path: Path, **overrides: Any) -> Any:
    """An Ingress object with ``ServeArgs`` but no handles: enough for its retry and error plumbing."""
    from d2vlm_ray.serving.args import ServeArgs
    from d2vlm_ray.serving.deployments import Ingress

    # The class as written, not Serve's ASGI wrapper around it (whose async __del__ needs a replica).
    written = next(c for c in Ingress.func_or_class.__mro__ if "_call" in vars(c))
    ingress = object.__new__(written)
    ingress.args = ServeArgs.model_validate(
        {"checkpoint_dir": str(tmp_path), "features": {"cache_root": str(tmp_path)}, **overrides}
    )
    ingress._replacing = set()
    return ingress


class _Flaky:
    """Issues calls whose first ``failures`` die with ``error``, then succeed with ``"done"``."""

    def __init__(self, failures: int, error: Callable[[], BaseException]) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        fail = self.calls <= self.failures

        async def result() -> str:
            if fail:
                raise self.error()
            return "done"

        return result()


def _actor_died() -> BaseException:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def _actor_unavailable() -> BaseException:
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("the replica's node is unreachable", None)


def _task_error_wrapping_death() -> BaseException:
    from ray.exceptions import RayTaskError

    return RayTaskError("ground", "traceback", _actor_died()).as_instanceof_cause()


@pytest.mark.parametrize("error", [_actor_died, _actor_unavailable, _task_error_wrapping_death])
def test_a_lost_replica_is_retried_on_another(tmp_path: Path, error: Callable[[], BaseException]) -> None:
    ingress = _ingress(tmp_path, max_replica_retries=2)
    flaky = _Flaky(2, error)
    assert asyncio.run(ingress._call(flaky, time.time() + 10, "ground")) == "done"
    assert flaky.calls == 3


def test_retries_run_out_as_503_with_retry_after(tmp_path: Path) -> None:
    from d2vlm_ray.serving.deployments import _error_response
    from d2vlm_ray.serving.errors import ReplicaLost

    ingress = _ingress(tmp_path, max_replica_retries=1, retry_after_s=3)
    flaky = _Flaky(5, _actor_died)
    with pytest.raises(ReplicaLost) as caught:
        asyncio.run(ingress._call(flaky, time.time() + 10, "answer"))
    assert flaky.calls == 2
    response = _error_response(caught.value)
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"
    assert json.loads(response.body)["reason"] == "replica_unavailable"


def test_a_deadline_spent_waiting_for_a_replacement_is_503_not_504(tmp_path: Path) -> None:
    from d2vlm_ray.serving.errors import ReplicaLost

    ingress = _ingress(tmp_path, max_replica_retries=2)
    calls = 0

    def start() -> Any:
        nonlocal calls
        calls += 1

        async def result() -> str:
            if calls == 1:
                raise _actor_died()
            await asyncio.sleep(5)  # the retry waits for a replacement that comes too late
            return "done"

        return result()

    with pytest.raises(ReplicaLost, match="within the deadline"):
        asyncio.run(ingress._call(start, time.time() + 0.5, "ground"))
    assert calls == 2


def test_a_deadline_without_a_lost_replica_stays_504(tmp_path: Path) -> None:
    from d2vlm_ray.serving.errors import DeadlineExceeded

    async def slow() -> str:
        await asyncio.sleep(5)
        return "done"

    with pytest.raises(DeadlineExceeded):
        asyncio.run(_ingress(tmp_path)._call(slow, time.time() + 0.2, "ground"))


def test_requests_queued_behind_a_lost_replica_get_503_until_one_succeeds(tmp_path: Path) -> None:
    from d2vlm_ray.serving.errors import DeadlineExceeded, ReplicaLost

    ingress = _ingress(tmp_path, max_replica_retries=0)

    async def slow() -> str:
        await asyncio.sleep(5)
        return "done"

    async def fast() -> str:
        return "done"

    with pytest.raises(ReplicaLost):
        asyncio.run(ingress._call(_Flaky(1, _actor_died), time.time() + 10, "ground"))
    # A request that never met the dead replica but waits for its replacement past its deadline.
    with pytest.raises(ReplicaLost, match="within the deadline"):
        asyncio.run(ingress._call(slow, time.time() + 0.2, "ground"))
    with pytest.raises(DeadlineExceeded):  # another kind of call is not affected
        asyncio.run(ingress._call(slow, time.time() + 0.2, "answer"))
    assert asyncio.run(ingress._call(fast, time.time() + 10, "ground")) == "done"
    with pytest.raises(DeadlineExceeded):  # replaced: slowness is a 504 again
        asyncio.run(ingress._call(slow, time.time() + 0.2, "ground"))


def test_bugs_are_not_retried(tmp_path: Path) -> None:
    flaky = _Flaky(1, lambda: ValueError("a bug, not a lost replica"))
    with pytest.raises(ValueError, match="a bug"):
        asyncio.run(_ingress(tmp_path)._call(flaky, time.time() + 10, "ground"))
    assert flaky.calls == 1


async def _asgi_get(app: Any, path: str, query: bytes) -> tuple[int, Any]:
    """Status and JSON body of one GET through an ASGI app (no HTTP client library needed)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # the old wiring crashed here: report it as the 500 a client would see
        return 500, repr(exc)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_request_validation_errors_get_the_project_body() -> None:
    """FastAPI's own parameter validation answers 422 ``validation_error`` through the app's handlers."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    from d2vlm_ray.serving.deployments import _on_request_validation, api

    assert api.exception_handlers[RequestValidationError] is _on_request_validation
    # The Ingress's routes parse their bodies themselves, so a probe route with a typed
    # parameter provokes FastAPI's validation under the same handlers.
    probe = FastAPI()
    probe.exception_handlers.update(api.exception_handlers)

    @probe.get("/probe")
    async def _probe(count: int) -> dict[str, int]:
        return {"count": count}

    status, body = asyncio.run(_asgi_get(probe, "/probe", b"count=many"))
    assert status == 422, body
    assert body["reason"] == "validation_error"
    assert [d["loc"] for d in body["detail"]] == [["query", "count"]]


class _FakeStream:
    """A streamed answer: ``tokens`` StreamTokens, then the final result; dies after ``die_after`` steps."""

    def __init__(self, tokens: int, die_after: int | None) -> None:
        from d2vlm_ray.serving.core import StreamToken

        self.steps: list[Any] = [StreamToken(i, f"t{i}", None, i) for i in range(tokens)] + ["final"]
        self.die_after = die_after
        self.sent = 0
        self.cancelled = False

    async def __anext__(self) -> Any:
        if self.die_after == -1:  # a replacement that never comes up
            await asyncio.sleep(60)
        if self.die_after is not None and self.sent >= self.die_after:
            raise _actor_died()
        if self.sent >= len(self.steps):
            raise StopAsyncIteration
        self.sent += 1
        return self.steps[self.sent - 1]

    def cancel(self) -> None:
        self.cancelled = True


class _FakeAnswerer:
    """Stands in for the Answerer's handle: hands out the prepared streams in order."""

    def __init__(self, streams: list[_FakeStream]) -> None:
        self.streams = streams
        self.started = 0

    def options(self, **_: Any) -> _FakeAnswerer:
        return self

    @property
    def answer_stream(self) -> _FakeAnswerer:
        return self

    def remote(self, _item: Any) -> _FakeStream:
        self.started += 1
        return self.streams[self.started - 1]


def _stream_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, streams: list[_FakeStream], deadline_s: float = 10.0
) -> list[tuple]:
    """Run the Ingress's SSE generator against fake streams (payload rendering stubbed out)."""
    from d2vlm_ray.config import DecodeSettings
    from d2vlm_ray.serving import deployments

    class _Validated:
        def __init__(self, body: dict[str, Any]) -> None:
            self.body = body

        def model_dump(self, **_: Any) -> dict[str, Any]:
            return self.body

    ingress = _ingress(tmp_path, max_replica_retries=2)
    # Serve's ingress decorator keeps its own copy of the class, so patch the globals its methods see.
    scope = type(ingress)._sse.__globals__
    monkeypatch.setitem(scope, "grounding_payload", lambda *a, **k: {})
    monkeypatch.setitem(scope, "answer_payload", lambda _g, result, *a, **k: {"response": result})
    monkeypatch.setattr(scope["AnswerResponse"], "model_validate", classmethod(lambda cls, body: _Validated(body)))
    ingress.answerer = _FakeAnswerer(streams)
    ingress.tokenizer = None
    ingress.inflight = {7: time.time() + 60}
    ref = type("Ref", (), {"cache_hit": True, "warnings": [], "missing_timestamps_s": []})()
    item = deployments.AnswerItem(None, DecodeSettings(max_new_tokens=3), time.time() + deadline_s)

    async def collect() -> list[str]:
        return [event async for event in ingress._sse(item, ref, {}, time.perf_counter(), 7)]

    events = [block.split("\n") for block in asyncio.run(collect())]
    assert 7 not in ingress.inflight, "the stream must release its in-flight slot"
    return [(lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))) for lines in events]


def test_a_stream_lost_before_its_first_token_restarts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    streams = [_FakeStream(3, die_after=0), _FakeStream(3, die_after=None)]
    events = _stream_events(tmp_path, monkeypatch, streams)
    assert [name for name, _ in events] == ["grounding", "token", "token", "token", "answer"]
    assert events[-1][1]["response"] == "final"


def test_a_stream_lost_after_a_token_reports_503_in_band(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    streams = [_FakeStream(3, die_after=1), _FakeStream(3, die_after=None)]
    events = _stream_events(tmp_path, monkeypatch, streams)
    assert [name for name, _ in events] == ["grounding", "token", "error"]
    error = events[-1][1]
    assert (error["status"], error["reason"], error["retry_after_s"]) == (503, "replica_unavailable", 1)
    assert streams[0].cancelled and streams[1].sent == 0


def test_a_stream_whose_replacement_misses_the_deadline_reports_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streams = [_FakeStream(3, die_after=0), _FakeStream(3, die_after=-1)]
    events = _stream_events(tmp_path, monkeypatch, streams, deadline_s=0.5)
    assert [name for name, _ in events] == ["grounding", "error"]
    assert (events[-1][1]["status"], events[-1][1]["reason"]) == (503, "replica_unavailable")
