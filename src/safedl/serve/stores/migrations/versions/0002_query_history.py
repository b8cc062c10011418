"""The stateful query detectors' shared per-key history (serve/stores/history.py): ``query_history_keys`` (each
(detector, key)'s query count across replicas: the order of its rows) and ``query_history`` (one row per observed
batch: its end in that order, the writer, the features as float16 bytes). New tables only: no row of an older
database is touched.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("query_history_keys", sa.Column("detector", sa.Text(), nullable=False),
                    sa.Column("key_id", sa.Text(), nullable=False), sa.Column("seq", sa.BigInteger(), nullable=False),
                    sa.Column("updated_at", sa.Float(), nullable=False),
                    sa.PrimaryKeyConstraint("detector", "key_id"))
    op.create_table("query_history", sa.Column("detector", sa.Text(), nullable=False),
                    sa.Column("key_id", sa.Text(), nullable=False), sa.Column("seq", sa.BigInteger(), nullable=False),
                    sa.Column("writer", sa.Text(), nullable=False), sa.Column("n", sa.BigInteger(), nullable=False),
                    sa.Column("dim", sa.BigInteger(), nullable=False),
                    sa.Column("feats", sa.LargeBinary(), nullable=False), sa.Column("ts", sa.Float(), nullable=False),
                    sa.PrimaryKeyConstraint("detector", "key_id", "seq"))
    op.create_index("query_history_ts", "query_history", ["ts"])


def downgrade() -> None:
    op.drop_index("query_history_ts", "query_history")
    op.drop_table("query_history")
    op.drop_table("query_history_keys")
