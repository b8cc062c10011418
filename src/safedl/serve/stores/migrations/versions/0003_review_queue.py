"""The review queue: every flagged or rejected input with its decision and, once reviewed, its label
(serve/review/store.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _t(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Text(), nullable=nullable)


def _f(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.Float(), nullable=nullable)


def _i(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.BigInteger(), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "review_queue", sa.Column("id", SERIAL, primary_key=True, autoincrement=True), _f("ts", False),
        _t("request_id", False), _i("image_index", False), _t("key_id"), _t("client"), _t("input_sha256", False),
        _t("shape", False), _i("label"), _t("class_name"), _f("confidence"), _i("rejected", False), _t("reason"),
        _t("detector_scores", False), _t("bundle_version"), _t("source", False), _t("class_names", False),
        sa.Column("image", sa.LargeBinary(), nullable=False), _i("size_bytes", False), _t("review_label"),
        _t("labelled_by"), _f("labelled_at"),
        sa.UniqueConstraint("request_id", "image_index", name="review_queue_request"), sqlite_autoincrement=True)
    op.create_index("review_queue_ts", "review_queue", ["ts"])


def downgrade() -> None:
    op.drop_table("review_queue")
