"""index superseded idempotency keys

Every keyed record_vote looks its key up among superseded vote states too; without an
index that lookup scans the whole revision history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('voterevision', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_voterevision_idempotency_key'), ['idempotency_key'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('voterevision', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_voterevision_idempotency_key'))
