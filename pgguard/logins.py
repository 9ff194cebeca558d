"""Sans-IO login slots: at most ``[backend] max_logins_in_flight`` server logins at once, the rest wait.

Theory
------
A server login (PostgreSQL forks a backend, authenticates it, loads its caches) is the most
expensive moment of a session for the server, and a surge of admitted clients makes it fork
and authenticate them all at the same instant: every other session on the server stalls
meanwhile. ``LoginSlots`` spreads a surge out in time, after admission (a login slot is not a
connection slot: the limits in ``limits.py`` decide *whether* a client gets a session, this
decides *when* its server login starts).

``take`` answers with a ``LoginSlot``: HELD when fewer than ``cap`` logins are in flight and
nobody waits, else WAITING. Waiters are served round-robin over the (role, database) pairs
that have one, FIFO inside a pair, so one pair's surge cannot starve another's login, as the
gate's queues are fair between pairs. ``give_back`` ends a slot, whatever its state: a held
one frees its place (and returns the waiter that now holds it), a waiting one leaves its
queue, a done one is left alone.

Invariants (checked by a hypothesis stateful test against a model):

- no slot is granted while ``in_flight`` is at ``cap`` or over it, so ``in_flight`` never
  exceeds ``cap`` (0: off, everything is granted and still counted); a lowered cap stops
  grants until the logins already in flight have ended;
- a slot is given back exactly once: a second ``give_back`` is a no-op;
- inside a pair, waiters are granted in arrival order; a pair with waiters is served before
  any pair served after it last was;
- nobody waits while a place is free.

What is *not* here: the deadline (the shell bounds a wait by ``connect_timeout`` with a
timer of its own and gives the slot back when it fires), and which logins need a slot (a
warm session handed out by ``[pool]`` reuse needs none: the shell does not ask). Pair keys
are client data: a pair is forgotten the moment its last waiter is granted or leaves.
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from typing import Final

__all__ = ["OFF", "LoginSlot", "LoginSlots", "SlotState"]

OFF: Final = 0  # max_logins_in_flight = 0: no cap (logins are still counted)


class SlotState(enum.Enum):
    WAITING = "waiting"
    HELD = "held"
    DONE = "done"


class LoginSlot:
    """One client's claim to a server login: waiting, held, or done (given back)."""

    __slots__ = ("role", "database", "context", "state")

    def __init__(self, role: str, database: str, context: object, state: SlotState) -> None:
        self.role = role
        self.database = database
        self.context = context  # the shell's object for this login (the client connection)
        self.state = state

    @property
    def held(self) -> bool:
        return self.state is SlotState.HELD

    def __repr__(self) -> str:
        return f"LoginSlot({self.role!r}, {self.database!r}, {self.state.value})"


class LoginSlots:
    """Counts server logins in flight and queues the ones over ``cap``, fair between pairs."""

    def __init__(self, cap: int = OFF) -> None:
        if cap < 0:
            raise ValueError("cap must be 0 (off) or positive")
        self._cap = cap
        self.in_flight = 0
        self.waiting = 0
        # Pairs with waiters, in the order they are served next; each pair's waiters in
        # arrival order. A pair is removed as soon as its deque is empty.
        self._queues: OrderedDict[tuple[str, str], deque[LoginSlot]] = OrderedDict()

    @property
    def cap(self) -> int:
        return self._cap

    def take(self, role: str, database: str, context: object) -> LoginSlot:
        """A slot for a login of (role, database): HELD if there is room now, else WAITING."""
        # The common case, a cap with room: one test and one increment.
        if not self.waiting and (self._cap == OFF or self.in_flight < self._cap):
            self.in_flight += 1
            return LoginSlot(role, database, context, SlotState.HELD)
        slot = LoginSlot(role, database, context, SlotState.WAITING)
        key = (role, database)
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(slot)
        self.waiting += 1
        return slot

    def give_back(self, slot: LoginSlot) -> LoginSlot | None:
        """End ``slot`` (held: the login is over; waiting: it left the queue; done: nothing).

        Returns the waiter granted the freed place, now HELD, or None.
        """
        state = slot.state
        if state is SlotState.DONE:
            return None
        slot.state = SlotState.DONE
        if state is SlotState.WAITING:
            self._withdraw(slot)
            return None
        self.in_flight -= 1
        if self.waiting and (self._cap == OFF or self.in_flight < self._cap):
            return self._grant_next()
        return None

    def set_cap(self, cap: int) -> list[LoginSlot]:
        """A new cap (reload): returns the waiters it lets in, now HELD, in grant order."""
        if cap < 0:
            raise ValueError("cap must be 0 (off) or positive")
        self._cap = cap
        granted = []
        while self.waiting and (cap == OFF or self.in_flight < cap):
            granted.append(self._grant_next())
        return granted

    def waiters(self) -> list[LoginSlot]:
        """Every waiting slot, pair by pair in serving order (for reports)."""
        return [slot for queue in self._queues.values() for slot in queue]

    def _grant_next(self) -> LoginSlot:
        key, queue = next(iter(self._queues.items()))
        slot = queue.popleft()
        if queue:
            self._queues.move_to_end(key)  # round-robin: this pair is served again last
        else:
            del self._queues[key]
        self.waiting -= 1
        self.in_flight += 1
        slot.state = SlotState.HELD
        return slot

    def _withdraw(self, slot: LoginSlot) -> None:
        key = (slot.role, slot.database)
        queue = self._queues[key]
        queue.remove(slot)
        if not queue:
            del self._queues[key]
        self.waiting -= 1
