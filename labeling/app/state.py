"""Everything the app's handlers share, built once and passed into `build_app(state)`.

There are no module-level globals: per-browser-session data lives in `gr.State` values,
per-process data (engine, login limiter, background jobs) in one `AppState`.
"""

from __future__ import annotations

import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine

from feedback_store.db import engine_for, read_scope, session_scope
from labeling.app.auth import LoginLimiter
from labeling.app.job_policy import CommandLine, Endpoint, JobPolicy
from labeling.app.jobs import JobManager


@dataclass(frozen=True)
class AppConfig:
    db_url: str = field(metadata={"help": "SQLAlchemy URL of the store"})
    single_user: str | None = field(
        default=None,
        metadata={"help": "no login: every visitor acts as this admin account (local use only)"},
    )
    reservation_s: float = field(
        default=300.0,
        metadata={"help": "how long a pair stays reserved for the rater it was given to"},
    )
    max_failed_logins: int = field(
        default=5, metadata={"help": "failed logins per user and address before a lockout"}
    )
    max_failed_logins_per_address: int = field(
        default=50, metadata={"help": "failed logins per address, any user, before a lockout"}
    )
    lockout_window_s: float = field(
        default=900.0, metadata={"help": "window over which failed logins are counted"}
    )
    render_cache_size: int = field(
        default=4096, metadata={"help": "rendered prompts and responses kept in memory"}
    )
    identity_cache_s: float = field(
        default=5.0,
        metadata={
            "help": "how long a signed-in user's account (role, active) is reused before being re-read; "
            "a role change or deactivation applies within this time"
        },
    )
    concurrency_limit: int = field(
        default=8,
        metadata={
            "help": "events handled at once (database work is short; more only adds contention)"
        },
    )
    job_dir: Path | None = field(
        default=None,
        metadata={"help": "where background job logs go (default: a temporary directory)"},
    )
    job_data_dirs: tuple[Path, ...] = field(
        default=(),
        metadata={"help": "directories web jobs may read and write besides the job directory"},
    )
    job_endpoints: tuple[Endpoint, ...] = field(
        default=(),
        metadata={"help": "OpenAI-compatible endpoints web jobs may name (URL and key variable)"},
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata={"help": "other origins whose pages may call the app (e.g. https://label.example.com)"},
    )
    forwarded_allow_ips: str | None = field(
        default=None,
        metadata={"help": "proxies whose X-Forwarded-For is believed (comma-separated); none by default"},
    )
    max_upload_mb: int = field(default=50, metadata={"help": "largest prompt file an admin may upload"})
    max_event_kb: int = field(default=1024, metadata={"help": "largest request body of one app event"})
    upload_max_age_s: int = field(
        default=86400, metadata={"help": "uploads and exports are deleted after this long"}
    )
    title: str = "prefloop"


class RenderCache:
    """Rendered HTML of prompts and responses, which never change once stored (LRU, thread-safe)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, render: Callable[[], str]) -> str:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = render()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


@dataclass
class AppState:
    config: AppConfig
    engine: Engine
    limiter: LoginLimiter
    jobs: JobManager
    local_rater_id: int | None = None  # the --single-user account
    renders: RenderCache = field(default_factory=lambda: RenderCache(4096))
    _rater_locks: dict[int, threading.Lock] = field(default_factory=dict)
    _locks_guard: threading.Lock = field(default_factory=threading.Lock)
    _write_lock: threading.Lock | None = None
    callers: dict = field(
        default_factory=dict
    )  # user name -> (Caller, read at), see auth.caller_for

    @classmethod
    def create(
        cls,
        config: AppConfig,
        *,
        engine: Engine | None = None,
        command_line: CommandLine | None = None,
    ) -> "AppState":
        """The app's state; `command_line` (labeling.cli.job_commands.JOB_COMMAND_LINE) turns
        on the admin page's web jobs, which are refused without it."""
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
            jobs=JobManager(
                job_dir,
                db_url=config.db_url,
                policy=JobPolicy(job_dir, config.job_data_dirs, config.job_endpoints),
                command_line=command_line,
            ),
            renders=RenderCache(config.render_cache_size),
            # SQLite runs one transaction at a time (each begins IMMEDIATE). Queueing this
            # process's transactions on a lock wakes the next one as soon as the last commits;
            # left to SQLite's busy handler, waiters poll with sleeps of up to 100 ms.
            _write_lock=threading.Lock() if engine.dialect.name == "sqlite" else None,
        )
        if config.single_user:
            from feedback_store.raters import get_or_create_local_user

            with session_scope(engine) as session:
                state.local_rater_id = get_or_create_local_user(
                    config.single_user, session=session
                ).id
        return state

    @contextmanager
    def session(self) -> Iterator:
        """A unit of work on the store (see feedback_store.db.session_scope)."""
        if self._write_lock is None:
            with session_scope(self.engine) as session:
                yield session
            return
        with self._write_lock, session_scope(self.engine) as session:
            yield session

    def read_session(self):
        """A read-only unit of work: never takes the write lock, so dashboards don't stall votes."""
        return read_scope(self.engine)

    def rater_lock(self, rater_id: int) -> threading.Lock:
        """One rater's events run one at a time in this process: two clicks sent at once then
        see each other's result instead of both acting on the same screen."""
        with self._locks_guard:
            return self._rater_locks.setdefault(rater_id, threading.Lock())
