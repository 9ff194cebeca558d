"""The fault-rule language: parsing, canonical text, validation, and the keyword form (no sockets)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgguard.rules import FaultRule, FaultSpecError, parse_rule, rule_from_kwargs

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=12)


@st.composite
def rules(draw: st.DrawFn) -> FaultRule:
    kind = draw(st.sampled_from(["reject", "delay", "drop", "terminate"]))
    args: dict[str, object] = {"kind": kind}
    if draw(st.booleans()):
        args["role"] = draw(names)
    if draw(st.booleans()):
        args["database"] = draw(names)
    if kind != "terminate":
        if draw(st.booleans()):
            args["count"] = draw(st.integers(1, 10**6))
        if draw(st.booleans()):
            args["fraction"] = draw(st.floats(0.001, 1.0))
        if draw(st.booleans()):
            args["seed"] = draw(st.integers(0, 2**31))
    if kind == "delay":
        a = draw(st.floats(0.001, 100))
        args["delay"] = (a, a + draw(st.floats(0, 100)))
    if kind in ("reject", "terminate"):
        if draw(st.booleans()):
            args["sqlstate"] = draw(st.from_regex(r"[0-9A-Z]{5}", fullmatch=True))
        if draw(st.booleans()):
            args["message"] = draw(st.text(min_size=1, max_size=30))
    if kind == "terminate" and draw(st.booleans()):
        args["after"] = draw(st.floats(0.001, 1000))
    return FaultRule(**args)  # type: ignore[arg-type]


@given(rules())
def test_canonical_text_parses_back_to_the_same_rule(rule: FaultRule) -> None:
    again = parse_rule(rule.describe())
    assert again.describe() == rule.describe()
    assert (again.kind, again.role, again.database, again.count, again.sqlstate, again.message) == (
        rule.kind, rule.role, rule.database, rule.count, rule.sqlstate, rule.message,
    )  # fmt: skip


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_fault_spec_error(text: str) -> None:
    try:
        parse_rule(text)
    except FaultSpecError:
        pass


def test_keywords_are_case_insensitive_and_values_may_be_quoted() -> None:
    rule = parse_rule("reject next 2 role \"My App\" message 'no room for {role}'")
    assert (rule.kind, rule.count, rule.role) == ("reject", 2, "My App")
    assert rule.error("My App", "db", "53300").message == "no room for My App"
    assert rule.error("My App", "db", "53300").sqlstate == "53300"


def test_default_messages_are_postgresql_s() -> None:
    err = parse_rule("REJECT SQLSTATE 3D000").error("app", "gone", "53300")
    assert (err.sqlstate, err.message, err.severity) == (
        "3D000",
        'database "gone" does not exist',
        "FATAL",
    )
    err = parse_rule("TERMINATE").error("app", "db", "57P01")
    assert err.message == "terminating connection due to administrator command"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("ZAP", "unknown fault kind"),
        ("DELAY", "DELAY needs a time"),
        ("DELAY soon", "DELAY needs seconds"),
        ("REJECT NEXT 0", "NEXT must be 1 or more"),
        ("REJECT FRACTION 0", "FRACTION must be in (0, 1]"),
        ("REJECT SQLSTATE 5330", "SQLSTATE must be five"),
        ("DROP MESSAGE hi", "DROP does not take MESSAGE"),
        ("TERMINATE NEXT 1", "TERMINATE does not take NEXT"),
        ("REJECT ROLE", "ROLE needs a value"),
        ("REJECT MESSAGE 'open", "No closing quotation"),
    ],
)
def test_bad_rules_say_what_is_wrong(text: str, problem: str) -> None:
    with pytest.raises(FaultSpecError, match=problem.replace("(", r"\(").replace("]", r"\]")):
        parse_rule(text)


def test_keyword_form_builds_the_same_rules() -> None:
    assert rule_from_kwargs(reject_next=3, role="app").describe() == "REJECT NEXT 3 ROLE app"
    assert (
        rule_from_kwargs(reject_fraction=0.25, seed=1).describe() == "REJECT FRACTION 0.25 SEED 1"
    )
    assert rule_from_kwargs(delay=(0.1, 0.5), count=2).describe() == "DELAY 0.1..0.5 NEXT 2"
    assert rule_from_kwargs(delay=1).describe() == "DELAY 1"
    assert rule_from_kwargs(drop_next=1).describe() == "DROP NEXT 1"
    assert (
        rule_from_kwargs(terminate=True, role="app", after=2).describe()
        == "TERMINATE ROLE app AFTER 2"
    )
    with pytest.raises(FaultSpecError, match="exactly one"):
        rule_from_kwargs(role="app")


class _Host:
    """The engine's owner, for rules that never touch a client (no loop needed)."""

    loop = None

    def live_clients(self) -> list[object]:
        return []

    def admit_now(self, client: object) -> None: ...

    def terminate(self, client: object, exc: object) -> None: ...

    def count_rejection(self, reason: str) -> None: ...


def test_a_restarted_workers_copy_keeps_ids_firings_and_states() -> None:
    from pgguard.config import FaultsConfig
    from pgguard.faults import Faults

    config = FaultsConfig(rules=("DELAY 0.01 ROLE x",))
    donor = Faults(_Host(), config)  # type: ignore[arg-type]
    once = donor.add(parse_rule("REJECT NEXT 1 ROLE a SQLSTATE 08004"), source="console")
    donor._fired(once)  # spent now
    donor.add(parse_rule("DROP ROLE b"), source="api")
    donor.remove(donor.add(parse_rule("DROP ROLE c")).id)
    snapshot = json.loads(json.dumps(donor.snapshot()))  # as it crosses the channel

    copy = Faults(_Host(), config)  # type: ignore[arg-type]
    assert copy.restore(snapshot) == 3
    assert copy.table() == donor.table()
    assert copy.active is donor.active is True
    assert copy.add(parse_rule("DROP")).id == donor.add(parse_rule("DROP")).id == 5
    copy.configure(config)  # a reload of the same file keeps the copied config rule
    assert [r.id for r in copy.rules][:1] == [1]
