"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-29
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('appsetting',
    sa.Column('key', sa.String(), nullable=False),
    sa.Column('value', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('prompt',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('messages', sa.JSON(), nullable=False),
    sa.Column('content_hash', sa.String(), nullable=False),
    sa.Column('source', sa.String(), nullable=True),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('prompt', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_prompt_content_hash'), ['content_hash'], unique=True)

    op.create_table('rater',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('kind', sa.Enum('human', 'judge', 'imported', name='raterkind'), nullable=False),
    sa.Column('role', sa.Enum('annotator', 'admin', name='role'), nullable=True),
    sa.Column('password_hash', sa.String(), nullable=True),
    sa.Column('judge_model', sa.String(), nullable=True),
    sa.Column('judge_template_version', sa.String(), nullable=True),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('rater', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rater_name'), ['name'], unique=True)

    op.create_table('trainingrun',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(), nullable=False),
    sa.Column('status', sa.Enum('running', 'done', 'failed', 'aborted', name='runstatus'), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('snapshot_hash', sa.String(), nullable=True),
    sa.Column('snapshot_ids', sa.JSON(), nullable=False),
    sa.Column('git_commit', sa.String(), nullable=True),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('metrics', sa.JSON(), nullable=False),
    sa.Column('output_path', sa.String(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('base_model', sa.String(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('trainingrun', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_trainingrun_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_trainingrun_status'), ['status'], unique=False)

    op.create_table('judgerun',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('rater_id', sa.Integer(), nullable=False),
    sa.Column('backend', sa.String(), nullable=False),
    sa.Column('model', sa.String(), nullable=False),
    sa.Column('template_version', sa.String(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('status', sa.Enum('running', 'done', 'failed', 'aborted', name='runstatus'), nullable=False),
    sa.Column('n_requests', sa.Integer(), nullable=False),
    sa.Column('n_decided', sa.Integer(), nullable=False),
    sa.Column('n_inconsistent', sa.Integer(), nullable=False),
    sa.Column('n_failed', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('cost', sa.Float(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['rater_id'], ['rater.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('judgerun', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judgerun_rater_id'), ['rater_id'], unique=False)

    op.create_table('policyversion',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('base_model', sa.String(), nullable=False),
    sa.Column('adapter_path', sa.String(), nullable=True),
    sa.Column('parent_id', sa.Integer(), nullable=True),
    sa.Column('training_run_id', sa.Integer(), nullable=True),
    sa.Column('description', sa.String(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['parent_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['training_run_id'], ['trainingrun.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('policyversion', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_policyversion_name'), ['name'], unique=True)

    op.create_table('runmetric',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('step', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('logged_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['trainingrun.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('runmetric', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_runmetric_run_id'), ['run_id'], unique=False)

    op.create_table('response',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('text_hash', sa.String(), nullable=False),
    sa.Column('generation_params', sa.JSON(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('edited_from_id', sa.Integer(), nullable=True),
    sa.Column('author_rater_id', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['author_rater_id'], ['rater.id'], ),
    sa.ForeignKeyConstraint(['edited_from_id'], ['response.id'], ),
    sa.ForeignKeyConstraint(['policy_id'], ['policyversion.id'], ),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompt.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('prompt_id', 'policy_id', 'text_hash')
    )
    with op.batch_alter_table('response', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_response_policy_id'), ['policy_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_response_prompt_id'), ['prompt_id'], unique=False)

    op.create_table('comparison',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('prompt_id', sa.Integer(), nullable=False),
    sa.Column('response_a_id', sa.Integer(), nullable=False),
    sa.Column('response_b_id', sa.Integer(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('human_votes', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['prompt_id'], ['prompt.id'], ),
    sa.ForeignKeyConstraint(['response_a_id'], ['response.id'], ),
    sa.ForeignKeyConstraint(['response_b_id'], ['response.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('response_a_id', 'response_b_id')
    )
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_comparison_prompt_id'), ['prompt_id'], unique=False)
        batch_op.create_index('ix_comparison_queue', [sa.text('priority DESC'), 'human_votes', 'id'], unique=False)

    op.create_table('rating',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('response_id', sa.Integer(), nullable=False),
    sa.Column('rater_id', sa.Integer(), nullable=False),
    sa.Column('thumbs_up', sa.Boolean(), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('idempotency_key', sa.String(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['rater_id'], ['rater.id'], ),
    sa.ForeignKeyConstraint(['response_id'], ['response.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('idempotency_key'),
    sa.UniqueConstraint('response_id', 'rater_id')
    )
    with op.batch_alter_table('rating', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_rating_rater_id'), ['rater_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_rating_response_id'), ['response_id'], unique=False)

    op.create_table('assignment',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('comparison_id', sa.Integer(), nullable=False),
    sa.Column('rater_id', sa.Integer(), nullable=False),
    sa.Column('left_response_id', sa.Integer(), nullable=False),
    sa.Column('reserved_until', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['comparison_id'], ['comparison.id'], ),
    sa.ForeignKeyConstraint(['left_response_id'], ['response.id'], ),
    sa.ForeignKeyConstraint(['rater_id'], ['rater.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('comparison_id', 'rater_id')
    )
    with op.batch_alter_table('assignment', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_assignment_comparison_id'), ['comparison_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_assignment_rater_id'), ['rater_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_assignment_reserved_until'), ['reserved_until'], unique=False)

    op.create_table('judgecall',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('judge_run_id', sa.Integer(), nullable=False),
    sa.Column('comparison_id', sa.Integer(), nullable=False),
    sa.Column('order', sa.String(), nullable=False),
    sa.Column('status', sa.String(), nullable=False),
    sa.Column('verdict', sa.String(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('raw_text', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('prompt_tokens', sa.Integer(), nullable=False),
    sa.Column('completion_tokens', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['comparison_id'], ['comparison.id'], ),
    sa.ForeignKeyConstraint(['judge_run_id'], ['judgerun.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('judgecall', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_judgecall_comparison_id'), ['comparison_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_judgecall_judge_run_id'), ['judge_run_id'], unique=False)

    op.create_table('vote',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('comparison_id', sa.Integer(), nullable=False),
    sa.Column('rater_id', sa.Integer(), nullable=False),
    sa.Column('choice', sa.Enum('a', 'b', 'tie', 'both_bad', name='choice'), nullable=False),
    sa.Column('strength', sa.Integer(), nullable=True),
    sa.Column('rationale', sa.Text(), nullable=True),
    sa.Column('left_response_id', sa.Integer(), nullable=True),
    sa.Column('time_spent_ms', sa.Integer(), nullable=True),
    sa.Column('confidence', sa.Float(), nullable=True),
    sa.Column('idempotency_key', sa.String(), nullable=True),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['comparison_id'], ['comparison.id'], ),
    sa.ForeignKeyConstraint(['left_response_id'], ['response.id'], ),
    sa.ForeignKeyConstraint(['rater_id'], ['rater.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('comparison_id', 'rater_id'),
    sa.UniqueConstraint('idempotency_key')
    )
    with op.batch_alter_table('vote', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_vote_comparison_id'), ['comparison_id'], unique=False)
        batch_op.create_index('ix_vote_rater_created', ['rater_id', 'created_at'], unique=False)

    op.create_table('voterevision',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('vote_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('choice', sa.Enum('a', 'b', 'tie', 'both_bad', name='choice'), nullable=False),
    sa.Column('strength', sa.Integer(), nullable=True),
    sa.Column('rationale', sa.Text(), nullable=True),
    sa.Column('left_response_id', sa.Integer(), nullable=True),
    sa.Column('time_spent_ms', sa.Integer(), nullable=True),
    sa.Column('idempotency_key', sa.String(), nullable=True),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('replaced_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['vote_id'], ['vote.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('voterevision', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_voterevision_vote_id'), ['vote_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('voterevision', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_voterevision_vote_id'))

    op.drop_table('voterevision')
    with op.batch_alter_table('vote', schema=None) as batch_op:
        batch_op.drop_index('ix_vote_rater_created')
        batch_op.drop_index(batch_op.f('ix_vote_comparison_id'))

    op.drop_table('vote')
    with op.batch_alter_table('judgecall', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judgecall_judge_run_id'))
        batch_op.drop_index(batch_op.f('ix_judgecall_comparison_id'))

    op.drop_table('judgecall')
    with op.batch_alter_table('assignment', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_assignment_reserved_until'))
        batch_op.drop_index(batch_op.f('ix_assignment_rater_id'))
        batch_op.drop_index(batch_op.f('ix_assignment_comparison_id'))

    op.drop_table('assignment')
    with op.batch_alter_table('rating', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rating_response_id'))
        batch_op.drop_index(batch_op.f('ix_rating_rater_id'))

    op.drop_table('rating')
    with op.batch_alter_table('comparison', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_comparison_prompt_id'))

    op.drop_table('comparison')
    with op.batch_alter_table('response', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_response_prompt_id'))
        batch_op.drop_index(batch_op.f('ix_response_policy_id'))

    op.drop_table('response')
    with op.batch_alter_table('runmetric', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_runmetric_run_id'))

    op.drop_table('runmetric')
    with op.batch_alter_table('policyversion', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_policyversion_name'))

    op.drop_table('policyversion')
    with op.batch_alter_table('judgerun', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_judgerun_rater_id'))

    op.drop_table('judgerun')
    with op.batch_alter_table('trainingrun', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_trainingrun_status'))
        batch_op.drop_index(batch_op.f('ix_trainingrun_kind'))

    op.drop_table('trainingrun')
    with op.batch_alter_table('rater', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_rater_name'))

    op.drop_table('rater')
    with op.batch_alter_table('prompt', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_prompt_content_hash'))

    op.drop_table('prompt')
    op.drop_table('appsetting')
    # PostgreSQL keeps the enum types that create_table made; without this a second upgrade fails.
    for enum_name in ('choice', 'runstatus', 'role', 'raterkind'):
        sa.Enum(name=enum_name).drop(op.get_bind(), checkfirst=True)
