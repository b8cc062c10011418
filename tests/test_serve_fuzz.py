"""Property-based fuzzing of the service (hypothesis): random, truncated and huge image bytes, random JSON, random
headers against every operation of the OpenAPI document; and a seeded corpus of 5,000 hostile bodies across every
content type (tests/_fuzz_corpus.py) through the service and straight into the decoder. Properties: never a 5xx
(except the documented 503), the service keeps running, every answer matches the response schema the OpenAPI
document declares for its status, and the decoder raises nothing but InputError."""
from __future__ import annotations

import base64
import collections
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
hyp = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from _fuzz_corpus import corpus  # noqa: E402
from _serve_helpers import make_bundle, npy_bytes, png_bytes  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.decode import InputError, decode_items, declared_pixels, items_from_json  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve import schemas  # noqa: E402

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
CTYPES = ["image/png", "image/jpeg", "image/bmp", "image/webp", "application/x-npy", "application/octet-stream",
          "application/json", "multipart/form-data; boundary=xyz", "text/plain", ""]


@pytest.fixture(scope="module")
def service(tiny_model, digits_splits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = KeyStore(tmp / "k.db", create=True)
    tokens = [keys.create(name=t, tier=t, rate_per_s=1e6, burst=10**6, daily_quota=10**9)[1]
              for t in ("full", "rounded", "topk", "label")]
    app = create_app(bundle=load_bundle(make_bundle(tiny_model, digits_splits, tmp / "b")), keys=keys,
                     audit=AuditStore(tmp / "a.db"), config=ServeConfig(max_body_bytes=256 * 1024, max_pixels=250_000))
    with TestClient(app, raise_server_exceptions=True) as client:
        client.openapi = client.get("/openapi.json").json()
        yield client, tokens


def _seed_files(x) -> list[bytes]:
    out = [png_bytes(x[i], fmt) for i, fmt in enumerate(["PNG", "JPEG", "BMP", "WEBP"])]
    out.append(npy_bytes(x[:3].numpy()))
    big = Image.new("L", (600, 600))
    buf = io.BytesIO()
    big.save(buf, "PNG")
    out.append(buf.getvalue())  # 360000 pixels: over this service's max_pixels
    return out


def _component(openapi: dict, ref: str):
    return getattr(schemas, ref.rsplit("/", 1)[-1])


def _check(client, r, path: str, method: str) -> None:
    """No 5xx except the documented 503; the body validates against the schema declared for this status."""
    assert r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    op = client.openapi["paths"][path][method]
    declared = op["responses"].get(str(r.status_code))
    if r.status_code in (404, 405) or path == "/metrics":
        return
    assert declared is not None, f"{method.upper()} {path}: status {r.status_code} not in the OpenAPI document"
    schema = declared.get("content", {}).get("application/json", {}).get("schema", {})
    if "$ref" in schema:
        _component(client.openapi, schema["$ref"]).model_validate(r.json())


@given(data=st.data())
@FUZZ
def test_random_truncated_and_mutated_images_never_5xx(service, eval_batch, data):
    client, tokens = service
    seeds = _seed_files(eval_batch[0])
    seed = data.draw(st.sampled_from(seeds))
    mode = data.draw(st.sampled_from(["random", "truncate", "flip", "as_is"]))
    if mode == "random":
        body = data.draw(st.binary(max_size=2048))
    elif mode == "truncate":
        body = seed[: data.draw(st.integers(0, len(seed)))]
    elif mode == "flip":
        b = bytearray(seed)
        for _ in range(data.draw(st.integers(1, 8))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
        body = bytes(b)
    else:
        body = seed
    how = data.draw(st.sampled_from(["raw", "json", "multipart"]))
    headers = {"X-API-Key": data.draw(st.sampled_from(tokens))}
    if how == "raw":
        r = client.post("/v1/predict", content=body, headers={**headers, "Content-Type": data.draw(st.sampled_from(CTYPES))})
    elif how == "json":
        r = client.post("/v1/predict", json={"images": [base64.b64encode(body).decode()]}, headers=headers)
    else:
        r = client.post("/v1/predict", files={"f": ("x", body, "application/octet-stream")}, headers=headers)
    _check(client, r, "/v1/predict", "post")
    if mode == "as_is" and how != "raw" and seed is not seeds[-1]:
        assert r.status_code == 200


JSON = st.recursive(st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=12)
HEADER_VALUES = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=300),
                          st.sampled_from(["../../etc/passwd", "/dev/zero", "Bearer ", "Bearer " + "A" * 4000,
                                           "sdl_000000000000_" + "a" * 43, "%00%0d%0a"]))


@given(data=st.data())
@FUZZ
def test_every_openapi_operation_with_random_requests(service, data):
    client, tokens = service
    ops = [(p, m) for p, item in client.openapi["paths"].items() for m in item]
    path, method = data.draw(st.sampled_from(ops))
    auth = data.draw(st.one_of(st.none(), st.sampled_from(tokens), HEADER_VALUES))
    headers = {} if auth is None else {data.draw(st.sampled_from(["X-API-Key", "Authorization"])): auth}
    kind = data.draw(st.sampled_from(["json", "bytes", "none"]))
    kw = {}
    if kind == "json":
        kw["json"] = data.draw(st.one_of(JSON, st.fixed_dictionaries({"images": st.lists(
            st.one_of(st.text(max_size=40), st.binary(max_size=60).map(lambda b: base64.b64encode(b).decode())),
            max_size=3)})))
    elif kind == "bytes":
        kw["content"] = data.draw(st.binary(max_size=512))
        headers["Content-Type"] = data.draw(st.sampled_from(CTYPES))
    try:
        r = client.request(method.upper(), path, headers=headers, **kw)
    except ValueError:  # the client itself refuses a malformed header value: nothing reached the service
        return
    _check(client, r, path, method)
    assert client.get("/v1/health").status_code == 200


@given(dims=st.one_of(st.lists(st.integers(0, 5000), max_size=5), st.sampled_from([[8, 8], [1, 8, 8], [0, 1, 8, 8],
                                                                                  [2, 1, 8, 8], [65, 1, 8, 8]])),
              dtype=st.sampled_from(["<f4", ">f8", "|u1", "<i8", "<f2", "|b1", "<c8"]),
       cut=st.one_of(st.integers(0, 64), st.sampled_from([64, 128, 256, 512, 1024])))
@FUZZ
def test_npy_headers_of_any_shape_and_dtype(service, dims, dtype, cut):
    client, tokens = service
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0,), dtype))
    header["shape"] = tuple(dims)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    body = buf.getvalue() + b"\0" * cut
    r = client.post("/v1/predict", content=body, headers={"X-API-Key": tokens[0], "Content-Type": "application/x-npy"})
    _check(client, r, "/v1/predict", "post")
    d = tuple(dims)
    n = 1 if d in ((8, 8), (1, 8, 8)) else d[0] if len(d) == 4 and d[1:] == (1, 8, 8) else 0
    valid = dtype in ("<f4", ">f8", "|u1", "<f2") and 1 <= n <= 64 and cut == n * 64 * np.dtype(dtype).itemsize
    assert (r.status_code == 200) == valid and (valid or r.status_code in (400, 413, 422)), r.text[:200]


CORPUS_SIZE = 5000


@pytest.fixture(scope="module")
def hostile_corpus():
    return corpus(CORPUS_SIZE, seed=0)


def test_seeded_corpus_of_5000_hostile_bodies_never_5xx(service, hostile_corpus, eval_batch):
    """Every body of the corpus through /v1/predict with one valid key: 4xx with an error code or 200, never a
    5xx but the documented 503; afterwards the service still answers a valid request."""
    client, tokens = service
    key = {"X-API-Key": tokens[0]}
    statuses: collections.Counter = collections.Counter()
    for ctype, body in hostile_corpus:
        r = client.post("/v1/predict", content=body, headers={**key, "Content-Type": ctype})
        statuses[r.status_code] += 1
        _check(client, r, "/v1/predict", "post")
        assert r.status_code == 200 or r.json()["error"]["code"], r.text[:200]
    assert statuses[200] > 200 and set(statuses) <= {200, 400, 413, 415, 422, 503}, statuses
    r = client.post("/v1/predict", content=png_bytes(eval_batch[0][0]), headers={**key, "Content-Type": "image/png"})
    assert r.status_code == 200 and client.get("/v1/health").status_code == 200


def test_seeded_corpus_straight_into_the_decoder_raises_only_input_errors(hostile_corpus):
    """items_from_json, declared_pixels and decode_items over the same corpus: an InputError or a batch, nothing else."""
    config = ServeConfig(max_body_bytes=256 * 1024, max_pixels=250_000)
    outcomes: collections.Counter = collections.Counter()
    for ctype, body in hostile_corpus:
        try:
            items = items_from_json(body, config=config) if ctype.startswith("application/json") else [body]
            pixels = declared_pixels(items, shape=(1, 8, 8), config=config)
            x = decode_items(items, shape=(1, 8, 8), config=config).x
            assert x.dtype.is_floating_point and x.shape[1:] == (1, 8, 8) and len(pixels) == len(items)
            outcomes["ok"] += 1
        except InputError as exc:
            assert exc.status in (400, 413, 415, 422) and exc.code
            outcomes[exc.code] += 1
    assert outcomes["ok"] > 200 and len(outcomes) > 8, outcomes
