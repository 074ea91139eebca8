"""Simulated annotators for the reliability suite: real HTTP page sessions (tests.page_client)
that vote as fast as the server answers, with double clicks and retries, and keep a tally of
what the server acknowledged, so a test can hold the store to it afterwards."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from tests.page_client import KEY, SIDES, STATUS, PageSession


@dataclass
class Tally:
    name: str
    attempted: int = 0  # submissions of a new key (a double click or a retry of it is not a new one)
    acknowledged: list[str] = field(default_factory=list)  # keys the server answered "Saved"
    double_submits: int = 0
    retries: int = 0
    errors: list[str] = field(default_factory=list)  # wrong or failed answers: a test failure
    disconnects: int = 0  # connection lost (the server was killed): expected in the fault tests
    statuses: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Behaviour:
    votes: int  # stop after this many acknowledged votes
    double_rate: float = 0.05  # share of submissions sent twice at once (a double click)
    retry_rate: float = 0.05  # share of saved submissions sent again later (a client retry)
    idle_s: float = 0.0  # after opening the page, hold the pair on screen this long before voting
    seed: int = 0


def _saved(result) -> bool:
    return result[0] == "complete" and "Saved" in result[1][STATUS]


async def annotate(url: str, tally: Tally, how: Behaviour, *, everyone_in: asyncio.Barrier | None = None,
                   deadline_s: float = 300.0) -> None:
    """Sign in, open the page, (wait for everyone, idle,) then vote until `how.votes` are saved,
    the queue is empty, the deadline passes or the connection is lost."""
    rng = random.Random(how.seed)
    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession(base_url=url, timeout=aiohttp.ClientTimeout(total=60),
                                     cookie_jar=aiohttp.CookieJar(unsafe=True)) as client:
        page = PageSession(client, f"rel-{tally.name}-{uuid.uuid4().hex[:6]}")
        key = None
        try:
            if await page.start(tally.name):
                [(event, outputs)] = await page.events("open_pairs")
                key = outputs[KEY] if event == "complete" else None
                if event != "complete":
                    tally.errors.append(f"open_pairs: {event} {str(outputs)[:200]}")
            else:
                tally.errors.append(f"could not sign in: {dict(page.statuses)}")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            tally.disconnects += 1
        finally:
            if everyone_in is not None:
                await everyone_in.wait()
        try:
            await asyncio.sleep(how.idle_s)
            while (isinstance(key, str) and key and len(tally.acknowledged) < how.votes
                   and time.monotonic() < deadline):
                key = await _vote(page, tally, how, rng, key)
        except (aiohttp.ClientError, asyncio.TimeoutError):
            tally.disconnects += 1
        finally:
            tally.statuses.update(page.statuses)


async def _vote(page: PageSession, tally: Tally, how: Behaviour, rng: random.Random, key: str) -> str | None:
    """One submission (maybe a double click, maybe retried later); returns the next pair's key."""
    event = f"vote_{rng.choice(SIDES)}"
    copies = 2 if rng.random() < how.double_rate else 1
    tally.attempted += 1
    tally.double_submits += copies == 2
    results = await page.events(event, key, None, "", "", copies=copies)
    saved = [r for r in results if _saved(r)]
    if len(saved) != 1:
        tally.errors.append(f"{len(saved)} saves for one submission: {str(results)[:300]}")
        return None
    tally.acknowledged.append(key)
    if rng.random() < how.retry_rate:
        # The same submission again, as a client does when it did not see the answer in time:
        # it must be recognised, not stored a second time.
        tally.retries += 1
        [retried] = await page.events(event, key, None, "", "")
        if retried[0] != "complete" or "Already saved" not in retried[1][STATUS]:
            tally.errors.append(f"a retry was not recognised: {str(retried)[:300]}")
            return None
        results = [retried]
    last = results[-1]
    return last[1][KEY] if last[0] == "complete" and isinstance(last[1][KEY], str) else None


def run_annotators(url: str, names: list[str], behaviours: list[Behaviour], *, deadline_s: float = 300.0,
                   fault: Callable[[], Awaitable[None]] | None = None) -> list[Tally]:
    """All annotators at once, in one event loop; everyone signs in before anyone votes, and
    `fault` (a kill, say) starts at that moment, beside the voting."""
    tallies = [Tally(name) for name in names]

    async def main() -> None:
        everyone_in = asyncio.Barrier(len(names) + 1)
        voting = asyncio.gather(*(annotate(url, tally, how, everyone_in=everyone_in, deadline_s=deadline_s)
                                  for tally, how in zip(tallies, behaviours)))
        await everyone_in.wait()
        if fault is not None:
            await fault()
        await voting

    asyncio.run(main())
    return tallies
