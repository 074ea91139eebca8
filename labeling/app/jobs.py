"""Background jobs started from the admin page: `prefloop generate|judge|train ...` subprocesses.

Each job is a real CLI run in its own process, so a crash or a long training run never
takes the web server down, and its log file shows the same progress bars a terminal would.
What a job may do is the operator's `JobPolicy` (labeling/app/job_policy.py): allow-listed
flags, configured endpoints, paths inside the job and data directories. The arguments are
checked with the CLI's parsers, which the manager is given (`command_line`, from
labeling/cli/job_commands.py) rather than imports: the CLI is what starts the app. A manager
without one starts no job.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from labeling.app.job_policy import CommandLine, JobPolicy, JobRefused, authorize

JOB_COMMANDS = ("generate", "judge", "train")
_CLI = "import sys; from labeling.cli import main; sys.exit(main(sys.argv[1:]))"
_PERCENT = re.compile(r"(\d{1,3})%\|")  # tqdm's "42%|####  |"
_FRACTION = re.compile(r"(\d+)/(\d+)")


@dataclass
class Job:
    id: int
    command: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen
    started_by: str
    started_at: float = field(default_factory=time.time)

    @property
    def status(self) -> str:
        code = self.process.poll()
        if code is None:
            return "running"
        return "done" if code == 0 else f"failed (exit {code})"

    def label(self) -> str:
        return f"#{self.id} {self.command} · {self.status}"

    def tail(self, max_lines: int = 40, max_bytes: int = 64_000) -> str:
        """The end of the log as a terminal would show it: a carriage return rewrites the line."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(max(0, self.log_path.stat().st_size - max_bytes))
                raw = handle.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in raw.split("\n")]
        return "\n".join(lines[-max_lines:])

    def progress(self) -> float | None:
        """Fraction done from the last progress bar in the log (tqdm or rich), if any."""
        if self.process.poll() == 0:
            return 1.0
        for line in reversed(self.tail(max_lines=10).splitlines()):
            match = _PERCENT.search(line)
            if match:
                return min(int(match.group(1)), 100) / 100
            match = _FRACTION.search(line)
            if match and int(match.group(2)) > 0:
                return min(int(match.group(1)) / int(match.group(2)), 1.0)
        return None


class JobManager:
    def __init__(
        self,
        log_dir: Path,
        *,
        db_url: str,
        policy: JobPolicy | None = None,
        command_line: CommandLine | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.db_url = db_url
        self.policy = policy or JobPolicy(job_dir=self.log_dir)
        self.command_line = command_line
        self._jobs: dict[int, Job] = {}
        self._lock = threading.Lock()

    def start(self, command: str, arguments: str, *, started_by: str) -> Job:
        """Start `prefloop <command> <arguments>` against this server's database."""
        if command not in JOB_COMMANDS:
            raise ValueError(f"unknown job {command!r} (known: {', '.join(JOB_COMMANDS)})")
        if self.command_line is None:
            raise JobRefused(
                "web jobs are off: this app was started without the prefloop command line "
                "(`prefloop serve` gives it; run the job from the CLI on the server)"
            )
        try:
            args = shlex.split(arguments or "")
        except ValueError as error:
            raise ValueError(f"arguments: {error}") from None
        # Refused here, where the admin is looking, rather than in a failed job's log; and
        # before any process starts, since a web admin may not do all that the CLI can.
        launch = authorize(self.policy, command, args, command_line=self.command_line)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**launch.environment(os.environ), "PREFLOOP_DB": self.db_url, "PYTHONUNBUFFERED": "1"}
        with self._lock:
            job_id = len(self._jobs) + 1
            log_path = self.log_dir / f"job-{job_id}-{command}.log"
            argv = list(launch.argv)  # variable names only: a key's value never reaches the log
            with open(log_path, "wb") as log:
                log.write(f"$ prefloop {shlex.join(argv)}\n".encode())
                log.flush()
                process = subprocess.Popen(
                    [sys.executable, "-c", _CLI, *argv],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,  # so stopping a job stops its children too
                )
            job = Job(job_id, command, argv, log_path, process, started_by)
            self._jobs[job_id] = job
        return job

    def get(self, job_id: int) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def all(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda job: -job.id)

    def stop(self, job_id: int) -> None:
        job = self.get(job_id)
        if job is not None and job.process.poll() is None:
            os.killpg(job.process.pid, 15)

    def stop_all(self) -> None:
        for job in self.all():
            self.stop(job.id)
