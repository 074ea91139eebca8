"""best-of-n answers as SFT examples: response.sft_source and response.reward_score

`prefloop generate --best-of N` samples N answers per prompt, scores them with a reward and
keeps the best as an SFT example (rejection sampling): that response gets
`sft_source = 'best-of-n'` and its score in `reward_score`. Both are NULL for every existing
response, which is what an ordinary sample (one that comparisons pair) is. Plain ADD COLUMNs
on both backends, without constraints, so SQLite drops them in place on downgrade.

Downgrade drops the columns: kept answers become ordinary responses (the SFT export then no
longer finds them).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('response', sa.Column('sft_source', sa.String(), nullable=True))
    op.add_column('response', sa.Column('reward_score', sa.Float(), nullable=True))


def downgrade() -> None:
    op.drop_column('response', 'reward_score')
    op.drop_column('response', 'sft_source')
