"""The review queue: every input the service rejected (a detector fired) is kept with its decision (detector
scores, reason, key, bundle version, request id) and the pixels the model saw, in a SQLite file or a PostgreSQL
database (serve/stores/engine.py), until a person labels it: ``attack``, ``benign`` or a class name.

Bounded: new inputs are skipped (logged, counted) once the stored images take ``max_bytes``; rows older than
``retention_days`` are deleted when the store opens and then at most once an hour as inputs arrive. The images
are stored as zlib-compressed ``.npy`` float32 [C, H, W] arrays (exactly what the model saw, after decoding and
resizing), never as pickles."""
from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from safedl.errors import UserError
from safedl.serve.stores import engine as engines
from safedl.serve.stores.migrate import ensure_schema
from safedl.serve.stores.schema import review_queue

log = logging.getLogger("safedl.serve.review")
LABELS = ("attack", "benign")      # besides the bundle's class names
STATES = ("unlabelled", "labelled", "all")
PRUNE_EVERY_S = 3600.0
MAX_LABELLER = 200


@dataclass(frozen=True, kw_only=True)
class ReviewItem:
    """One queued input: its decision, where it came from and (``review_label``) what a reviewer said it is."""

    id: int
    ts: float
    request_id: str
    image_index: int
    key_id: str | None
    client: str | None
    input_sha256: str
    shape: list[int]
    label: int | None
    class_name: str | None
    confidence: float | None
    rejected: bool
    reason: str | None
    detector_scores: dict[str, float]
    bundle_version: str | None
    source: str
    class_names: list[str]
    size_bytes: int
    review_label: str | None = None
    labelled_by: str | None = None
    labelled_at: float | None = None
    image: np.ndarray | None = field(default=None, repr=False, compare=False)

    def public(self) -> dict[str, Any]:
        """The item as JSON (without its pixels)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("image", "class_names")}


def encode_image(x: np.ndarray) -> bytes:
    """A float32 [C, H, W] array as zlib-compressed ``.npy`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return zlib.compress(buf.getvalue(), 6)


def decode_image(blob: bytes) -> np.ndarray:
    """The array ``encode_image`` stored."""
    return np.load(io.BytesIO(zlib.decompress(blob)), allow_pickle=False)


def _item(row: Any, *, with_image: bool) -> ReviewItem:
    m = row._mapping
    return ReviewItem(
        id=int(m["id"]), ts=float(m["ts"]), request_id=m["request_id"], image_index=int(m["image_index"]),
        key_id=m["key_id"], client=m["client"], input_sha256=m["input_sha256"], shape=json.loads(m["shape"]),
        label=None if m["label"] is None else int(m["label"]), class_name=m["class_name"],
        confidence=m["confidence"], rejected=bool(m["rejected"]), reason=m["reason"],
        detector_scores=json.loads(m["detector_scores"]), bundle_version=m["bundle_version"], source=m["source"],
        class_names=json.loads(m["class_names"]), size_bytes=int(m["size_bytes"]), review_label=m["review_label"],
        labelled_by=m["labelled_by"], labelled_at=m["labelled_at"],
        image=decode_image(m["image"]) if with_image else None)


class ReviewStore:
    """``keep`` (the service, after answering), ``items`` / ``get`` / ``label`` (reviewers: the CLI, ``/review``)."""

    def __init__(self, target: str | os.PathLike, *, max_bytes: int = 100 * 2**20, retention_days: float = 30.0,
                 create: bool = False, flag: str = "--review", clock=time.time):
        self.target = engines.parse_target(target, flag=flag)
        if not create and self.target.is_sqlite and not self.target.path.is_file():
            raise UserError(f"{flag} {self.target.display}: no such review database (`safedl serve --review "
                            f"{self.target.display}` creates it)")
        if max_bytes <= 0 or not retention_days > 0:
            raise UserError(f"{flag}: the size cap ({max_bytes} bytes) and retention ({retention_days} days) must "
                            "be positive")
        self.max_bytes, self.retention_s, self.clock = int(max_bytes), float(retention_days) * 86400.0, clock
        self.engine = engines.open_engine(self.target, flag=flag, create=create, pool_size=2, max_overflow=2)
        try:
            ensure_schema(self.engine, what=f"review database {self.target.display}")
        except engines.StoreUnavailable as exc:
            self.engine.dispose()
            raise UserError(f"{flag} {self.target.display}: cannot open the review database ({exc})") from None
        self.skipped_full = 0
        self._lock = threading.Lock()
        self._pruned_at = -float("inf")

    def close(self) -> None:
        self.engine.dispose()

    # -- the service ---------------------------------------------------------------------------------------------
    def prune(self) -> int:
        """Delete the rows older than the retention period; returns how many."""
        now = self.clock()
        with engines.write(self.engine, what="review queue prune") as conn:
            n = conn.execute(review_queue.delete().where(review_queue.c.ts < now - self.retention_s)).rowcount
        self._pruned_at = now
        return int(n or 0)

    def keep(self, rows: list[dict[str, Any]]) -> int:
        """Store rows (the ``review_queue`` columns, ``image`` a float32 [C, H, W] array); returns how many were
        kept: one already queued (same request id and image index) is not stored twice, and once the cap is
        reached new ones are skipped (logged)."""
        if self.clock() - self._pruned_at >= PRUNE_EVERY_S:
            self.prune()
        kept = 0
        with self._lock, engines.write(self.engine, what="review queue") as conn:
            used = int(conn.execute(sa.select(sa.func.coalesce(sa.func.sum(review_queue.c.size_bytes), 0))).scalar())
            for r in rows:
                blob = encode_image(r["image"])
                if used + len(blob) > self.max_bytes:
                    self.skipped_full += 1
                    log.warning("review queue %s is full (%d bytes cap): input %s of request %s not kept",
                                self.target.display, self.max_bytes, r["input_sha256"], r["request_id"],
                                extra={"event": "review_full"})
                    continue
                dup = conn.execute(sa.select(review_queue.c.id).where(
                    review_queue.c.request_id == r["request_id"],
                    review_queue.c.image_index == r["image_index"])).first()
                if dup is not None:
                    continue
                conn.execute(review_queue.insert().values(**_columns(r, blob)))
                used += len(blob)
                kept += 1
        return kept

    # -- reviewers -----------------------------------------------------------------------------------------------
    def items(self, *, state: str = "all", limit: int = 1000, with_images: bool = False) -> list[ReviewItem]:
        """Queued inputs, newest first (``state``: unlabelled, labelled or all)."""
        if state not in STATES:
            raise UserError(f"--state {state!r}: choose one of {', '.join(STATES)}")
        if limit < 1:
            raise UserError(f"--limit {limit}: must be at least 1")
        q = sa.select(review_queue).order_by(review_queue.c.id.desc()).limit(limit)
        if state == "unlabelled":
            q = q.where(review_queue.c.review_label.is_(None))
        elif state == "labelled":
            q = q.where(review_queue.c.review_label.is_not(None))
        with engines.read(self.engine, what="review queue") as conn:
            return [_item(r, with_image=with_images) for r in conn.execute(q)]

    def labelled(self) -> list[ReviewItem]:
        """Every labelled input with its pixels, oldest first (what ``export`` writes)."""
        q = sa.select(review_queue).where(review_queue.c.review_label.is_not(None)).order_by(review_queue.c.id)
        with engines.read(self.engine, what="review queue") as conn:
            return [_item(r, with_image=True) for r in conn.execute(q)]

    def get(self, item_id: int, *, with_image: bool = True) -> ReviewItem:
        """One queued input; UserError naming the id when there is none."""
        with engines.read(self.engine, what="review queue") as conn:
            row = conn.execute(sa.select(review_queue).where(review_queue.c.id == int(item_id))).first()
        if row is None:
            raise UserError(f"review item {item_id}: not in the queue {self.target.display} (`safedl review list` "
                            "shows the ids)")
        return _item(row, with_image=with_image)

    def label(self, item_id: int, *, label: str, by: str) -> ReviewItem:
        """Record what a reviewer says input ``item_id`` is: ``attack``, ``benign`` or one of its bundle's class
        names (relabelling replaces the label, who and when)."""
        item = self.get(item_id, with_image=False)
        check_label(label, item.class_names, item_id=item_id)
        by = str(by).strip()
        if not by or len(by) > MAX_LABELLER:
            raise UserError(f"--by {by!r}: say who labels (1-{MAX_LABELLER} characters)")
        with engines.write(self.engine, what="review label") as conn:
            conn.execute(review_queue.update().where(review_queue.c.id == item.id).values(
                review_label=label, labelled_by=by, labelled_at=self.clock()))
        return self.get(item_id, with_image=False)


def check_label(label: str, class_names: list[str], *, item_id: int) -> None:
    """UserError unless ``label`` is ``attack``, ``benign`` or one of ``class_names``."""
    if label not in LABELS and label not in class_names:
        raise UserError(f"label {label!r} for review item {item_id}: allowed are attack, benign or a class name "
                        f"({', '.join(class_names)})")


def _columns(r: dict[str, Any], blob: bytes) -> dict[str, Any]:
    scores = {k: (float(v) if np.isfinite(v) else None) for k, v in (r.get("detector_scores") or {}).items()}
    return {"ts": float(r["ts"]), "request_id": r["request_id"], "image_index": int(r["image_index"]),
            "key_id": r.get("key_id"), "client": r.get("client"), "input_sha256": r["input_sha256"],
            "shape": json.dumps(list(r["image"].shape)), "label": r.get("label"), "class_name": r.get("class_name"),
            "confidence": r.get("confidence"), "rejected": int(bool(r.get("rejected"))), "reason": r.get("reason"),
            "detector_scores": json.dumps(scores), "bundle_version": r.get("bundle_version"),
            "source": r.get("source", "rejected"), "class_names": json.dumps(list(r["class_names"])), "image": blob,
            "size_bytes": len(blob)}
