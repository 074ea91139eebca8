"""Everything the app's handlers share, built once and passed into `build_app(state)`.

There are no module-level globals: per-browser-session data lives in `gr.State` values,
per-process data (engine, login limiter, background jobs) in one `AppState`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from feedback_store.db import engine_for, session_scope
from labeling.app.auth import LoginLimiter
from labeling.app.jobs import JobManager


@dataclass(frozen=True)
class AppConfig:
    db_url: str = field(metadata={"help": "SQLAlchemy URL of the store"})
    single_user: str | None = field(
        default=None,
        metadata={"help": "no login: every visitor acts as this admin account (local use only)"},
    )
    reservation_s: float = field(default=300.0, metadata={"help": "how long a pair stays reserved for the rater it was given to"})
    max_failed_logins: int = field(default=5, metadata={"help": "failed logins per user and address before a lockout"})
    max_failed_logins_per_address: int = field(default=50, metadata={"help": "failed logins per address, any user, before a lockout"})
    lockout_window_s: float = field(default=900.0, metadata={"help": "window over which failed logins are counted"})
    concurrency_limit: int = field(default=8, metadata={"help": "events handled at once (database work is short; more only adds contention)"})
    job_dir: Path | None = field(default=None, metadata={"help": "where background job logs go (default: a temporary directory)"})
    title: str = "prefloop"


@dataclass
class AppState:
    config: AppConfig
    engine: Engine
    limiter: LoginLimiter
    jobs: JobManager
    local_rater_id: int | None = None  # the --single-user account

    @classmethod
    def create(cls, config: AppConfig, *, engine: Engine | None = None) -> "AppState":
        engine = engine or engine_for(config.db_url)
        job_dir = config.job_dir or Path(tempfile.mkdtemp(prefix="prefloop-jobs-"))
        state = cls(
            config=config,
            engine=engine,
            limiter=LoginLimiter(
                max_failures=config.max_failed_logins,
                max_failures_per_address=config.max_failed_logins_per_address,
                window_s=config.lockout_window_s,
            ),
            jobs=JobManager(job_dir, db_url=config.db_url),
        )
        if config.single_user:
            from feedback_store.raters import get_or_create_local_user

            with session_scope(engine) as session:
                state.local_rater_id = get_or_create_local_user(config.single_user, session=session).id
        return state

    def session(self):
        return session_scope(self.engine)
