"""The HTTP client and RemoteClassifier against a real service (uvicorn in a thread on 127.0.0.1): exact pixels,
answers equal to the local pipeline's, attacks through HTTP equal to the same attacks run locally, the loopback
guard, the query/deadline bounds and 429 handling."""
from __future__ import annotations

import hashlib
import http.client
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from _serve_helpers import free_port, make_bundle  # noqa: E402
from safedl import registry  # noqa: E402
from safedl.attacks.extraction.base import ExtractionOracle  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.errors import QueryBudgetExceeded, UserError  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.client import (DeadlineExceeded, PipelineClassifier, RejectedQuery, RemoteClassifier,  # noqa: E402
                                 ServiceClient, ServiceError, TierError)
from safedl.serve.keys import KeyStore  # noqa: E402


class ThreadServer:
    """``create_app`` served by uvicorn in a daemon thread on 127.0.0.1 and a free port."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                                    access_log=False, lifespan="on",
                                                    timeout_keep_alive=1))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-thread server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def served(tiny_model, digits_splits, tmp_path_factory):
    """The tiny digits CNN behind feature squeezing (no input detector, so no query is rejected), served; keys of
    each tier plus a slow one (1 request/s) for the 429 tests."""
    root = tmp_path_factory.mktemp("client")
    bundle = load_bundle(make_bundle(tiny_model, digits_splits, root / "bundle", detect=False))
    keys = KeyStore(root / "keys.db", create=True)
    tokens = {t: keys.create(name=t, tier=t, rate_per_s=1000, burst=1000)[1] for t in ("full", "rounded", "label")}
    tokens["slow"] = keys.create(name="slow", tier="full", rate_per_s=1.0, burst=1)[1]
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(root / "audit.db"), config=ServeConfig(max_images=16))
    with ThreadServer(app) as srv:
        srv.tokens, srv.bundle = tokens, bundle
        yield srv


def _remote(served, tier="full", **kw) -> RemoteClassifier:
    client = ServiceClient(served.url, token=served.tokens[tier])
    return RemoteClassifier(client, max_images=16, **kw)


def test_remote_answers_equal_the_local_pipeline_on_the_same_pixels(served, digits_splits):
    x = digits_splits.test.x[:40]
    x = (x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)  # not 8-bit values
    remote = _remote(served)
    got = remote(x)   # 3 requests of <= 16 images
    want = torch.cat([PipelineClassifier(served.bundle.pipeline)(x[i:i + 16]) for i in range(0, 40, 16)])
    assert torch.equal(got, want)
    assert remote.queries_ == remote.client.images_ == 40
    assert remote.client.requests_ == 1 + 3  # GET /v1/model (the class count), then 3 predict requests
    assert torch.allclose(got.softmax(1), want.exp(), atol=1e-6)
    labels = _remote(served, "label", access="labels")(x)
    assert torch.equal(labels.argmax(1), want.argmax(1))
    assert torch.equal(labels.sum(1), torch.ones(40))


def test_the_service_sees_exactly_the_float_pixels_sent(served, digits_splits):
    x = (digits_splits.test.x[:3] * 0.9 + 0.0123).clamp(0, 1)
    doc = ServiceClient(served.url, token=served.tokens["full"]).predict(x)
    sent = [hashlib.sha256(x[i].numpy().astype("float32").tobytes()).hexdigest() for i in range(3)]
    assert [r["input_sha256"] for r in doc["results"]] == sent


def test_square_through_http_equals_square_run_locally(served, digits_splits):
    x, y = digits_splits.test.x[:6], digits_splits.test.y[:6]
    attack = registry.create("evasion", "square", eps=0.15, max_queries=150, seed=3)
    remote = _remote(served, max_queries=6 * 150)
    remote.check_attack(attack)
    adv_remote = attack(remote, x, y)
    q_remote = attack.queries_.clone()
    local = PipelineClassifier(served.bundle.pipeline)
    adv_local = attack(local, x, y)
    assert torch.equal(adv_remote, adv_local)
    assert torch.equal(q_remote, attack.queries_)
    assert remote.queries_ == local.queries_ == int(q_remote.sum())
    fooled = served.bundle.pipeline.decide(adv_remote).labels != y
    assert 0 < int(fooled.sum()) and int(q_remote.max()) > 1  # the attack did work through HTTP


def test_extraction_through_http_logs_the_served_labels(served, digits_splits):
    attack = registry.create("extraction", "jacobian_augmentation", seed_size=30, surrogate="tiny_cnn", epochs=1,
                             seed=0)
    remote = _remote(served, "label", access="labels", max_queries=100)
    remote.check_attack(attack)
    result = attack.extract(ExtractionOracle(remote, budget=100, output="labels"), digits_splits.train.x,
                            num_classes=10)
    assert len(result.log) == 100 == remote.queries_
    assert torch.equal(result.log.answers, served.bundle.pipeline.decide(result.log.x).labels)


def test_tier_that_does_not_suit_the_attack_is_refused(served, digits_splits):
    square = registry.create("evasion", "square", eps=0.1, max_queries=10)
    with pytest.raises(TierError, match="needs scores"):
        _remote(served, "label", access="labels").check_attack(square)
    remote = _remote(served, "label", access="scores")
    with pytest.raises(TierError, match="tier 'label'"):
        square(remote, digits_splits.test.x[:2], digits_splits.test.y[:2])
    assert remote.queries_ == 0


def test_rounded_tier_gives_rounded_scores(served, digits_splits):
    p = _remote(served, "rounded")(digits_splits.test.x[:8]).exp()
    assert torch.allclose(p * 100, (p * 100).round(), atol=1e-4)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://localhost.example.com:80",
                                 "http://0.0.0.0:8000", "ftp://127.0.0.1/"])
def test_loopback_guard_refuses_other_hosts_without_sending(url, monkeypatch):
    opened = []
    monkeypatch.setattr(http.client.HTTPConnection, "connect", lambda self: opened.append(self.host))
    with pytest.raises(UserError):
        ServiceClient(url, token="t")
    assert opened == []


def test_loopback_guard_accepts_loopback_and_explicit_remote():
    for url in ("http://127.0.0.1:1", "http://127.0.0.2:1", "http://[::1]:1", "http://localhost:1"):
        assert ServiceClient(url, token="t").host in ("127.0.0.1", "127.0.0.2", "::1", "localhost")
    assert ServiceClient("http://10.0.0.1:1", token="t", allow_remote=True).host == "10.0.0.1"


def test_max_queries_stops_an_attack_before_sending_more(served, digits_splits):
    remote = _remote(served, max_queries=50)
    attack = registry.create("evasion", "nes", eps=0.3, max_queries=1000, samples=10, seed=0)
    with pytest.raises(QueryBudgetExceeded):
        attack(remote, digits_splits.test.x[:2], digits_splits.test.y[:2])
    assert 0 < remote.queries_ <= 50 and remote.client.images_ == remote.queries_
    assert remote.clipped_ > 0  # NES probes x + sigma * u leave [0, 1] near black pixels; the service takes [0, 1]


def test_deadline_stops_an_attack(served, digits_splits):
    remote = _remote(served, max_queries=10**6, deadline_s=0.5)
    attack = registry.create("evasion", "hopskipjump", max_queries=100_000, seed=0)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        attack(remote, digits_splits.test.x[:1], digits_splits.test.y[:1])  # argmax of log-probs = the label
    assert time.monotonic() - t0 < 0.5 + 5.0
    assert remote.queries_ > 0


def test_idle_connection_closed_by_the_server_is_reopened_once(served, digits_splits):
    client = ServiceClient(served.url, token=served.tokens["full"])
    client.predict(digits_splits.test.x[:1])
    time.sleep(1.6)  # the server closes keep-alive connections idle for 1 s
    assert len(client.predict(digits_splits.test.x[:2])["results"]) == 2
    assert client.requests_ == 2 and client.images_ == 3


def test_unreachable_service_raises_without_retrying():
    client = ServiceClient(f"http://127.0.0.1:{free_port()}", token="t", timeout_s=2)
    with pytest.raises(ConnectionRefusedError):
        client.predict(torch.zeros(1, 1, 8, 8))
    assert client.requests_ == 0


def test_429_is_waited_out_within_bounds(served, digits_splits):
    x = digits_splits.test.x[:1]
    client = ServiceClient(served.url, token=served.tokens["slow"], max_retry_wait_s=3.0)
    t0 = time.monotonic()
    for _ in range(3):
        assert len(client.predict(x)["results"]) == 1
    assert client.throttled_ >= 1 and time.monotonic() - t0 >= 0.9  # the 1-token bucket refills at 1/s
    impatient = ServiceClient(served.url, token=served.tokens["slow"], max_retries=0)
    with pytest.raises(ServiceError) as err:  # two requests well within a second: at most one gets the token
        impatient.predict(x)
        impatient.predict(x)
    assert err.value.status == 429 and err.value.code == "rate_limited"


def test_429_asking_for_more_than_the_wait_bound_raises_at_once(served, digits_splits):
    client = ServiceClient(served.url, token=served.tokens["slow"], max_retry_wait_s=0.5)  # Retry-After is 1 s
    t0 = time.monotonic()
    with pytest.raises(ServiceError) as err:
        for _ in range(3):
            client.predict(digits_splits.test.x[:1])
    assert err.value.status == 429 and client.throttled_ == 0 and time.monotonic() - t0 < 0.5


def test_429_wait_past_the_deadline_raises_instead_of_sleeping(served, digits_splits):
    remote = RemoteClassifier(ServiceClient(served.url, token=served.tokens["slow"], max_retry_wait_s=30.0),
                              deadline_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        for _ in range(5):
            remote(digits_splits.test.x[:1])
    assert time.monotonic() - t0 < 2.0


def test_rejected_image_raises_or_reads_uniform(tiny_model, digits_splits, tmp_path):
    bundle = load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "b", fpr=0.5))
    keys = KeyStore(tmp_path / "k.db", create=True)
    token = keys.create(name="a", tier="full", rate_per_s=1000, burst=1000)[1]
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "a.db"))
    x = digits_splits.test.x[:64]
    rejected = bundle.pipeline.decide(x).rejected
    assert bool(rejected.any())  # fpr 0.5: about half the clean images are rejected
    with ThreadServer(app) as srv:
        with pytest.raises(RejectedQuery):
            RemoteClassifier(ServiceClient(srv.url, token=token))(x)
        remote = RemoteClassifier(ServiceClient(srv.url, token=token), on_reject="uniform")
        p = remote(x).exp()
    assert remote.rejected_ == int(rejected.sum())
    assert torch.allclose(p[rejected], torch.full_like(p[rejected], 0.1))
