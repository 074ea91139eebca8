"""judge-first (comparison.settled_by) and a queue index without gold or settled pairs

`comparison.settled_by` is the judge rater whose confident verdict settled the pair
(`prefloop judge --judge-first`): NULL for every existing pair, which is what a pair people
should see is. A plain ADD COLUMN on both backends, without a foreign key: SQLite drops a
column in place only when no constraint names it (see 0005), and rebuilding `comparison`,
which every vote references, is what these migrations avoid.

ix_comparison_queue becomes partial: `WHERE gold_winner IS NULL AND settled_by IS NULL`. The
ordinary queue serves neither gold pairs (they are dealt at the gold rate by
feedback_store.gold) nor settled ones, so its walk need not pass them. Both SQLite and
PostgreSQL support partial indexes; SQLite's planner uses one when the query's WHERE names
the same terms, which the queue's statement does.

ix_comparison_gold_winner (0005) becomes partial too, `WHERE gold_winner IS NOT NULL`: it
serves the look-ups of gold pairs, and as a full index it offered SQLite's planner (without
ANALYZE statistics) the queue's `gold_winner IS NULL` as an indexed equality, which it took
over the ordered walk of ix_comparison_queue and then sorted every ordinary pair.

Downgrade restores both full indexes and drops the column (settled pairs return to the queue).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

_QUEUE_COLUMNS = [sa.text('priority DESC'), 'human_votes', 'id']
_QUEUE_WHERE = 'gold_winner IS NULL AND settled_by IS NULL'
_GOLD_WHERE = 'gold_winner IS NOT NULL'


def upgrade() -> None:
    op.add_column('comparison', sa.Column('settled_by', sa.Integer(), nullable=True))
    op.drop_index('ix_comparison_queue', table_name='comparison')
    op.create_index(
        'ix_comparison_queue', 'comparison', _QUEUE_COLUMNS, unique=False,
        sqlite_where=sa.text(_QUEUE_WHERE), postgresql_where=sa.text(_QUEUE_WHERE),
    )
    op.drop_index('ix_comparison_gold_winner', table_name='comparison')
    op.create_index(
        'ix_comparison_gold_winner', 'comparison', ['gold_winner'], unique=False,
        sqlite_where=sa.text(_GOLD_WHERE), postgresql_where=sa.text(_GOLD_WHERE),
    )


def downgrade() -> None:
    op.drop_index('ix_comparison_gold_winner', table_name='comparison')
    op.create_index('ix_comparison_gold_winner', 'comparison', ['gold_winner'], unique=False)
    op.drop_index('ix_comparison_queue', table_name='comparison')
    op.create_index('ix_comparison_queue', 'comparison', _QUEUE_COLUMNS, unique=False)
    op.drop_column('comparison', 'settled_by')
