"""prompt split (train / eval) and the evaluation table

Existing prompts get the split the store gives a prompt imported without one: `eval` when
the sha256 content hash, read as a number, is below 10 modulo 100 (the rule of
feedback_store.splits.default_split, copied here so this migration keeps meaning what it
meant when it was written). The column is added with server default 'train' and the eval
share is then written in batches, on SQLite and PostgreSQL alike.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

EVAL_PERCENT = 10
BATCH = 900


def _is_eval(content_hash: str) -> bool:
    return int(content_hash, 16) % 100 < EVAL_PERCENT


def upgrade() -> None:
    # A plain ADD COLUMN on both backends (SQLite accepts a column CHECK there): no table rebuild,
    # so the foreign keys into prompt are never touched.
    op.add_column('prompt', sa.Column(
        'split', sa.String(), sa.CheckConstraint("split IN ('train', 'eval')", name='ck_prompt_split'),
        nullable=False, server_default='train',
    ))
    prompt = sa.table('prompt', sa.column('id', sa.Integer()), sa.column('content_hash', sa.String()),
                      sa.column('split', sa.String()))
    bind = op.get_bind()
    eval_ids = [row.id for row in bind.execute(sa.select(prompt.c.id, prompt.c.content_hash))
                if _is_eval(row.content_hash)]
    for start in range(0, len(eval_ids), BATCH):
        bind.execute(prompt.update().where(prompt.c.id.in_(eval_ids[start:start + BATCH])).values(split='eval'))

    op.create_table('evaluation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('against_id', sa.Integer(), nullable=False),
    sa.Column('training_run_id', sa.Integer(), nullable=True),
    sa.Column('judge_rater_id', sa.Integer(), nullable=False),
    sa.Column('judge_run_id', sa.Integer(), nullable=True),
    sa.Column('n', sa.Integer(), nullable=False),
    sa.Column('wins', sa.Integer(), nullable=False),
    sa.Column('ties', sa.Integer(), nullable=False),
    sa.Column('losses', sa.Integer(), nullable=False),
    sa.Column('undecided', sa.Integer(), nullable=False),
    sa.Column('win_rate', sa.Float(), nullable=False),
    sa.Column('ci_low', sa.Float(), nullable=False),
    sa.Column('ci_high', sa.Float(), nullable=False),
    sa.Column('mean_length_policy', sa.Float(), nullable=False),
    sa.Column('mean_length_against', sa.Float(), nullable=False),
    sa.Column('judge_requests', sa.Integer(), nullable=False),
    sa.Column('judge_prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('judge_completion_tokens', sa.Integer(), nullable=False),
    sa.Column('judge_cost', sa.Float(), nullable=True),
    sa.Column('prompt_ids', sa.JSON(), nullable=False),
    sa.Column('comparison_ids', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['against_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['judge_rater_id'], ['rater.id'], ),
    sa.ForeignKeyConstraint(['judge_run_id'], ['judgerun.id'], ),
    sa.ForeignKeyConstraint(['policy_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['training_run_id'], ['trainingrun.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluation_policy_id'), ['policy_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_training_run_id'), ['training_run_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evaluation', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluation_training_run_id'))
        batch_op.drop_index(batch_op.f('ix_evaluation_policy_id'))

    op.drop_table('evaluation')
    # SQLite (3.35+) drops a column whose CHECK constraint is its own in place: no table rebuild.
    op.drop_column('prompt', 'split')
