"""Coverage: every packet the kernel sends towards the queue is either counted for a process or
recorded as unaccounted, with when and why.

Fail-open accepts a packet unseen when the queue is full, and bypass does so when no daemon is
bound; the kernel numbers neither. The ruleset's counting rule (see `rules`) counts them all, so
the difference between that counter and what the engine received is what went unaccounted.
`covered` is the counter value up to which every packet is settled: in a process's totals (live
or checkpointed) or in an unaccounted gap. It is stored with each checkpoint, so the next daemon
knows where its predecessor stopped, whether it stopped cleanly, crashed or handed over.
"""

from __future__ import annotations

from dataclasses import dataclass

QUEUE_FULL = "queue full or socket buffer overrun (fail-open)"
NOT_COUNTING = "no daemon counting (stopped, restarting or killed)"
RULES_RESET = "ruleset reinstalled (counter restarted); at least this many"
STALLED = "daemon stalled (stopped or stuck): the guard let them pass unseen"
# The namespace's name went away and its counting rule could not be read a last time: the packets
# it counted after the last checkpoint without the daemon seeing them are not known (0 recorded).
NETNS_GONE = "network namespace gone; its counting rule could not be read again: unseen packets since unknown"


@dataclass
class Gap:
    start: float
    end: float
    packets: int
    reason: str

    def as_dict(self) -> dict:
        return vars(self).copy()


class Coverage:
    def __init__(self, covered: int, since: float, carry: int = 0):
        self.covered = covered
        self.since = since
        self.seen = carry  # engine packets settled by `covered` (see `update` for why it may be < 0)
        self.unaccounted = 0  # recorded by this daemon

    def state(self, seen: int) -> str:
        """What a successor needs to continue: `covered@since@carry` (see `parse`)."""
        return f"{self.covered}@{self.since}@{self.seen - seen}"

    @classmethod
    def parse(cls, text: str) -> Coverage:
        covered, since, *carry = text.split("@")
        return cls(int(covered), float(since), int(carry[0]) if carry else 0)

    def update(
        self, counter: int, seen: int, waiting: int, now: float, reason: str = QUEUE_FULL
    ) -> Gap | None:
        """Settle what the kernel counted up to now, except packets still waiting for us.

        `seen` is the engine's running packet count; `waiting` the packets queued but not yet read.
        """
        if counter < self.covered:  # the counting rule was recreated and started again from zero
            self.covered, reason = 0, RULES_RESET
        reached = counter - waiting
        missing = (reached - self.covered) - (seen - self.seen)
        self.covered, self.seen = reached, seen
        if missing < 0:
            # Read skew: packets that arrived between reading the counter and the queue figures
            # were subtracted as waiting but never added by the counter. They are seen later
            # (by us or by a successor, hence the carry in `state`) and must not count twice.
            self.seen += missing
            missing = 0
        start, self.since = self.since, now
        if missing == 0:
            return None
        self.unaccounted += missing
        return Gap(start, now, missing, reason)

    def missing_now(self, counter: int, seen: int, waiting: int) -> int:
        """Unaccounted so far, the unsettled part included: what `update` would record now,
        without recording it (a snapshot for `status`)."""
        pending = counter - waiting - self.covered
        return self.unaccounted + max(0, pending - (seen - self.seen))
