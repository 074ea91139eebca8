"""Experiment trackers for `--report-to`: the names transformers' Trainer reports to.

Every method's trainer is a transformers Trainer (PPO's too: its loop calls `Trainer.log`), so a
tracker named here receives the same curves the store records. The names come from
transformers' own registry, so a new integration is accepted without a change here; one whose
package is not installed is refused before the run starts rather than after the model loads.
"""

from __future__ import annotations

# Trackers that write files under the run's output directory and reach no host: the only ones a
# web job may name (labeling/app/job_policy.py), since the others send runs to a service with
# the server's own credentials.
OFFLINE_TRACKERS = ("tensorboard",)
SPECIAL = ("none", "all")


class TrackerError(ValueError):
    """A `--report-to` value transformers cannot report to: one line naming the tracker."""


def known_trackers() -> tuple[str, ...]:
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    return tuple(INTEGRATION_TO_CALLBACK)


def installed_trackers() -> tuple[str, ...]:
    from transformers.integrations import get_available_reporting_integrations

    return tuple(get_available_reporting_integrations())


def parse_report_to(value: str) -> list[str]:
    """`tensorboard`, `wandb,mlflow`, `all` or `none` as the list transformers takes."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise TrackerError("expected a tracker name, 'all' or 'none'")
    if len(names) > 1 and set(names) & set(SPECIAL):
        raise TrackerError(f"'all' and 'none' stand alone, not in a list: {value}")
    known = known_trackers()
    unknown = [name for name in names if name not in (*known, *SPECIAL)]
    if unknown:
        raise TrackerError(f"unknown tracker {unknown[0]!r} (transformers reports to: "
                           f"{', '.join(known)}; or all, none)")
    installed = installed_trackers()
    missing = [name for name in names if name in known and name not in installed]
    if missing:
        raise TrackerError(f"tracker {missing[0]!r} is not installed: pip install {missing[0].replace('_', '-')}")
    return names
