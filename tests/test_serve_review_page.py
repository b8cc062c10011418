"""The /review page in real headless Chromium (driven over the DevTools pipe): thumbnails of the queued inputs,
their decision as text (hostile strings never become markup), label buttons that a mouse click sends to the
store as the admin key's label, and nothing but the refusal for a key without the admin scope. A screenshot is
kept in $SAFEDL_TEST_ARTIFACTS."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from _browser import chromium_or_skip  # noqa: E402
from _cdp import Browser  # noqa: E402
from _serve_helpers import Uvicorn, make_bundle  # noqa: E402
from safedl.deploy import load_bundle  # noqa: E402
from safedl.serve import ServeConfig, create_app  # noqa: E402
from safedl.serve.audit import AuditStore  # noqa: E402
from safedl.serve.keys import KeyStore  # noqa: E402
from safedl.serve.review.store import ReviewStore  # noqa: E402

HOSTILE = '<img src=x onerror="document.body.dataset.pwned=1">'


@pytest.fixture(scope="module")
def browser() -> str:
    return chromium_or_skip()


def test_review_page_shows_thumbnails_and_labels_by_click(tmp_path, browser, tiny_model, digits_splits):
    bundle = load_bundle(make_bundle(tiny_model, digits_splits, tmp_path / "bundle"))
    db = tmp_path / "review.db"
    store = ReviewStore(db, create=True)
    now = time.time()
    store.keep([{"ts": now - 5 + i, "request_id": f"{i:032x}", "image_index": 0, "input_sha256": f"{i:064x}",
                 "rejected": True, "reason": HOSTILE if i == 1 else "detector:mahalanobis", "key_id": f"key{i}",
                 "class_names": bundle.pipeline.class_names, "detector_scores": {"mahalanobis": 3.0 + i},
                 "bundle_version": "v-test", "image": digits_splits.test.x[i].numpy()} for i in range(3)])
    keys = KeyStore(tmp_path / "keys.db", create=True)
    ops = keys.create(name="ops", scopes=("admin",))[1]
    user = keys.create(name="user")[1]
    app = create_app(bundle=bundle, keys=keys, audit=AuditStore(tmp_path / "audit.db"),
                     config=ServeConfig(review_db=str(db)))
    out = Path(os.environ.get("SAFEDL_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    with Uvicorn(app) as srv:
        b = Browser(browser, tmp_path / "profile")
        try:
            b.goto(f"{srv.url}/review#key={user}")
            b.wait_for("document.body.dataset.state === 'forbidden'")
            assert b.evaluate("document.querySelectorAll('#queue figure').length") == 0
            assert "admin" in b.evaluate("document.getElementById('status').textContent")
            b.goto("about:blank")  # a new document: only the fragment differs otherwise
            b.wait_for("location.href === 'about:blank'")
            b.goto(f"{srv.url}/review#key={ops}")
            b.wait_for("document.body.dataset.state === 'ok'")
            assert b.evaluate("location.hash") == ""  # the key left the address bar
            figures = b.evaluate("[...document.querySelectorAll('#queue figure')].map(f => f.dataset.item)")
            ids = [it.id for it in store.items()]
            assert figures == [str(i) for i in ids]  # newest first, every unlabelled input
            b.wait_for("[...document.querySelectorAll('#queue img')].every(i => i.complete && i.naturalWidth > 0)")
            labels = b.evaluate(f"[...document.querySelectorAll('figure[data-item=\"{ids[0]}\"] button')]"
                                ".map(x => x.textContent)")
            assert labels == ["attack", "benign", *bundle.pipeline.class_names]
            text = b.evaluate("document.getElementById('queue').textContent")
            assert HOSTILE in text and "mahalanobis 5.000" in text
            assert b.evaluate("document.body.dataset.pwned") is None
            assert b.evaluate("document.querySelectorAll('#queue img').length") == 3  # the hostile <img> is text
            b.click(f'figure[data-item="{ids[1]}"] button[data-label="attack"]')
            b.wait_for("document.body.dataset.labelled === '1' && document.body.dataset.state === 'ok'")
            b.click(f'figure[data-item="{ids[0]}"] button[data-label="{bundle.pipeline.class_names[3]}"]')
            b.wait_for("document.body.dataset.labelled === '2' && "
                       "document.querySelectorAll('#queue figure').length === 1")
            b.screenshot(out / "review_page.png")
        finally:
            b.close()
    got = {it.id: (it.review_label, it.labelled_by) for it in store.items()}
    assert got == {ids[0]: (bundle.pipeline.class_names[3], "key:ops"), ids[1]: ("attack", "key:ops"),
                   ids[2]: (None, None)}
