"""LoginSlots (pgguard/logins.py): the cap on server logins in flight, checked without a loop."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pgguard.logins import LoginSlot, LoginSlots, SlotState


def test_third_login_waits_when_cap_is_two() -> None:
    slots = LoginSlots(2)
    taken = [slots.take("app", "db", i) for i in range(3)]
    assert [s.state for s in taken] == [SlotState.HELD, SlotState.HELD, SlotState.WAITING]
    assert (slots.in_flight, slots.waiting) == (2, 1)
    assert slots.give_back(taken[0]) is taken[2]
    assert taken[2].held and (slots.in_flight, slots.waiting) == (2, 0)


def test_give_back_twice_frees_one_place() -> None:
    slots = LoginSlots(1)
    first = slots.take("a", "d", None)
    second = slots.take("a", "d", None)
    third = slots.take("a", "d", None)
    assert slots.give_back(first) is second
    assert slots.give_back(first) is None  # a second give_back is a no-op
    assert third.state is SlotState.WAITING and slots.in_flight == 1


def test_waiters_served_round_robin_between_pairs_fifo_inside() -> None:
    slots = LoginSlots(1)
    holder = slots.take("x", "d", None)
    a = [slots.take("a", "d", f"a{i}") for i in range(3)]
    b = [slots.take("b", "d", f"b{i}") for i in range(2)]
    c = slots.take("c", "d", "c0")
    order = []
    current = holder
    while True:
        nxt = slots.give_back(current)
        if nxt is None:
            break
        order.append(nxt.context)
        current = nxt
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2"]
    assert all(s.state is SlotState.DONE for s in [*a, *b, c])
    assert (slots.in_flight, slots.waiting) == (0, 0)


def test_waiting_slot_given_back_leaves_queue_and_frees_pair() -> None:
    slots = LoginSlots(1)
    holder = slots.take("a", "d", None)
    waiter = slots.take("evil\x00name", "d", None)
    assert slots.give_back(waiter) is None
    assert slots.waiters() == [] and slots.waiting == 0
    assert slots.give_back(holder) is None and slots.in_flight == 0


def test_off_grants_everything_and_still_counts() -> None:
    slots = LoginSlots(0)
    taken = [slots.take("a", "d", None) for _ in range(50)]
    assert all(s.held for s in taken) and slots.in_flight == 50
    for s in taken:
        assert slots.give_back(s) is None
    assert slots.in_flight == 0


def test_raising_the_cap_grants_waiters_in_order() -> None:
    slots = LoginSlots(1)
    slots.take("a", "d", None)
    waiting = [slots.take("a", "d", i) for i in range(3)]
    assert [s.context for s in slots.set_cap(3)] == [0, 1]
    assert [s.context for s in slots.set_cap(0)] == [2]
    assert all(s.held for s in waiting)


def test_negative_cap_is_refused() -> None:
    with pytest.raises(ValueError):
        LoginSlots(-1)


PAIRS = [("a", "d1"), ("a", "d2"), ("b", "d1")]


class LoginSlotsMachine(RuleBasedStateMachine):
    """LoginSlots against an independent model: a cap, one FIFO per pair, a rotation of pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.cap = 2
        self.slots = LoginSlots(self.cap)
        self.held: list[LoginSlot] = []
        self.done: list[LoginSlot] = []
        # The model: pairs in serving order, each with its waiters in arrival order.
        self.rotation: list[tuple[str, str]] = []
        self.queues: dict[tuple[str, str], deque[LoginSlot]] = {}
        self.n = 0
        # A lowered cap stops new grants; logins already in flight end as they do.
        self.allowed = self.cap

    def _model_grant(self) -> LoginSlot:
        pair = self.rotation.pop(0)
        slot = self.queues[pair].popleft()
        if self.queues[pair]:
            self.rotation.append(pair)
        else:
            del self.queues[pair]
        return slot

    def _room(self) -> bool:
        return self.cap == 0 or len(self.held) < self.cap

    @rule(pair=st.sampled_from(PAIRS))
    def take(self, pair: tuple[str, str]) -> None:
        self.n += 1
        slot = self.slots.take(*pair, self.n)
        if not self.queues and self._room():
            assert slot.held
            self.held.append(slot)
        else:
            assert slot.state is SlotState.WAITING
            if pair not in self.queues:
                self.queues[pair] = deque()
                self.rotation.append(pair)
            self.queues[pair].append(slot)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(min_value=0, max_value=100))
    def finish_login(self, i: int) -> None:
        slot = self.held.pop(i % len(self.held))
        granted = self.slots.give_back(slot)
        self.done.append(slot)
        if self.queues and self._room():
            expected = self._model_grant()
            assert granted is expected and granted.held
            self.held.append(granted)
        else:
            assert granted is None
        self.allowed = max(self.cap, min(self.allowed, len(self.held)))

    @precondition(lambda self: self.queues)
    @rule(data=st.data())
    def waiter_leaves(self, data: st.DataObject) -> None:
        pair = data.draw(st.sampled_from(sorted(self.queues)))
        queue = self.queues[pair]
        slot = queue[data.draw(st.integers(min_value=0, max_value=len(queue) - 1))]
        queue.remove(slot)
        if not queue:
            del self.queues[pair]
            self.rotation.remove(pair)
        assert self.slots.give_back(slot) is None
        self.done.append(slot)

    @precondition(lambda self: self.done)
    @rule(i=st.integers(min_value=0, max_value=100))
    def give_back_again(self, i: int) -> None:
        assert self.slots.give_back(self.done[i % len(self.done)]) is None

    @rule(cap=st.integers(min_value=0, max_value=4))
    def set_cap(self, cap: int) -> None:
        self.cap = cap
        granted = self.slots.set_cap(cap)
        expected = []
        while self.queues and self._room():
            slot = self._model_grant()
            self.held.append(slot)
            expected.append(slot)
        assert granted == expected
        self.allowed = max(cap, len(self.held))

    @invariant()
    def counts_match_model(self) -> None:
        slots = self.slots
        assert slots.in_flight == len(self.held)
        assert slots.waiting == sum(len(q) for q in self.queues.values())
        if self.cap:
            assert slots.in_flight <= self.allowed
        # nobody waits while a place is free
        assert not (slots.waiting and self._room())
        assert slots.waiters() == [s for p in self.rotation for s in self.queues[p]]
        assert all(s.state is SlotState.DONE for s in self.done)


LoginSlotsMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLoginSlotsInvariants = LoginSlotsMachine.TestCase
