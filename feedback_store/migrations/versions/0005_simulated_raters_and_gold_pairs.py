"""simulated raters (rater kind `simulated`) and gold pairs (comparison.gold_winner, gold_kind)

The rater kind is an enum: on PostgreSQL a native type, which gains the value with
ALTER TYPE ... ADD VALUE (allowed inside the migration's transaction since PostgreSQL 12;
nothing here uses the value before commit). On SQLite it is a VARCHAR as long as the longest
name, VARCHAR(8) until now; 'simulated' needs 9. SQLite does not enforce the length, and a
table rebuild would have to drop `rater`, which every vote references (the store runs with
foreign keys on, and PRAGMA foreign_keys cannot change inside a transaction). So the declared
type is rewritten in the schema text, SQLite's documented procedure for changes that leave the
stored rows as they are (https://www.sqlite.org/lang_altertable.html, "otheralter"): no row
moves, only `sqlite_master` and the schema cookie change.

The gold columns are plain ADD COLUMNs on both backends (as in 0003): NULL for every existing
pair, which is what an ordinary pair is.

Downgrade refuses while simulated raters exist (delete them, and their votes, first).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_OLD_SQLITE_KIND = 'kind VARCHAR(8) NOT NULL'
_NEW_SQLITE_KIND = 'kind VARCHAR(9) NOT NULL'


def _rewrite_sqlite_rater_kind(old: str, new: str) -> None:
    bind = op.get_bind()
    version = bind.exec_driver_sql('PRAGMA schema_version').scalar_one()
    bind.exec_driver_sql('PRAGMA writable_schema=ON')
    try:
        changed = bind.exec_driver_sql(
            "UPDATE sqlite_master SET sql = replace(sql, ?, ?) WHERE type = 'table' AND name = 'rater'"
            " AND instr(sql, ?) > 0",
            (old, new, old),
        ).rowcount
        if changed:
            bind.exec_driver_sql(f'PRAGMA schema_version={int(version) + 1}')  # other connections reload
    finally:
        bind.exec_driver_sql('PRAGMA writable_schema=OFF')


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == 'postgresql':
        op.execute("ALTER TYPE raterkind ADD VALUE IF NOT EXISTS 'simulated'")
    elif bind.dialect.name == 'sqlite':
        _rewrite_sqlite_rater_kind(_OLD_SQLITE_KIND, _NEW_SQLITE_KIND)

    op.add_column('comparison', sa.Column(
        'gold_winner', sa.String(),
        sa.CheckConstraint("gold_winner IN ('a', 'b')", name='ck_comparison_gold_winner'), nullable=True,
    ))
    op.add_column('comparison', sa.Column('gold_kind', sa.String(), nullable=True))
    op.create_index('ix_comparison_gold_winner', 'comparison', ['gold_winner'], unique=False)


def downgrade() -> None:
    bind = op.get_bind()
    simulated = bind.execute(sa.text("SELECT count(*) FROM rater WHERE kind = 'simulated'")).scalar_one()
    if simulated:
        raise RuntimeError(
            f"{simulated} simulated rater(s) exist: delete them and their votes before downgrading below 0005"
        )
    op.drop_index('ix_comparison_gold_winner', table_name='comparison')
    op.drop_column('comparison', 'gold_kind')
    # SQLite (3.35+) drops a column whose CHECK constraint is its own in place: no table rebuild.
    op.drop_column('comparison', 'gold_winner')
    if bind.dialect.name == 'postgresql':
        op.execute('ALTER TYPE raterkind RENAME TO raterkind_0005')
        op.execute("CREATE TYPE raterkind AS ENUM ('human', 'judge', 'imported')")
        op.execute('ALTER TABLE rater ALTER COLUMN kind TYPE raterkind USING kind::text::raterkind')
        op.execute('DROP TYPE raterkind_0005')
    elif bind.dialect.name == 'sqlite':
        _rewrite_sqlite_rater_kind(_NEW_SQLITE_KIND, _OLD_SQLITE_KIND)
