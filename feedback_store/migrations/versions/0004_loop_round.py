"""loop rounds (`prefloop loop`)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('loopround',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('loop', sa.String(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('method', sa.String(), nullable=False),
    sa.Column('step', sa.String(), nullable=False),
    sa.Column('start_policy_id', sa.Integer(), nullable=False),
    sa.Column('comparison_ids', sa.JSON(), nullable=False),
    sa.Column('training_run_id', sa.Integer(), nullable=True),
    sa.Column('candidate_policy_id', sa.Integer(), nullable=True),
    sa.Column('evaluation_id', sa.Integer(), nullable=True),
    sa.Column('promoted', sa.Boolean(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['candidate_policy_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['evaluation_id'], ['evaluation.id'], ),
    sa.ForeignKeyConstraint(['start_policy_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['training_run_id'], ['trainingrun.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('loop', 'round', name='uq_loopround_loop_round')
    )
    with op.batch_alter_table('loopround', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_loopround_loop'), ['loop'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('loopround', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_loopround_loop'))
    op.drop_table('loopround')
