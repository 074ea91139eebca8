"""Client-side pacing for endpoints with requests-per-minute and tokens-per-minute quotas.

A token bucket per quota: it refills continuously at quota/60 per second and holds at most
one second's worth, so bursts stay small and the per-minute total never exceeds the quota.
Token costs are estimated before a request and settled with the real usage after it (the
bucket may go negative; later requests then wait for it to refill).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    per_minute: float
    level: float = field(init=False)
    updated: float = field(init=False, default_factory=time.monotonic)
    lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        if self.per_minute <= 0:
            raise ValueError(f"a per-minute limit must be positive (got {self.per_minute})")
        self.level = self.capacity

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0

    @property
    def capacity(self) -> float:
        return max(1.0, self.rate)

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    async def take(self, amount: float) -> None:
        """Wait until `amount` can be taken (a request larger than the bucket waits for a full one)."""
        amount = min(amount, self.capacity)
        async with self.lock:  # first come, first served
            self._refill()
            while self.level < amount:
                await asyncio.sleep((amount - self.level) / self.rate)
                self._refill()
            self.level -= amount

    def settle(self, estimated: float, actual: float) -> None:
        """Correct an earlier `take(estimated)` once the real cost is known."""
        self._refill()
        self.level -= actual - min(estimated, self.capacity)


@dataclass
class RateLimiter:
    rpm: float | None = None
    tpm: float | None = None
    _requests: TokenBucket | None = field(init=False, default=None)
    _tokens: TokenBucket | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self._requests = TokenBucket(self.rpm) if self.rpm else None
        self._tokens = TokenBucket(self.tpm) if self.tpm else None

    async def acquire(self, estimated_tokens: int) -> None:
        if self._requests:
            await self._requests.take(1)
        if self._tokens:
            await self._tokens.take(estimated_tokens)

    def settle(self, estimated_tokens: int, actual_tokens: int) -> None:
        if self._tokens:
            self._tokens.settle(estimated_tokens, actual_tokens)
