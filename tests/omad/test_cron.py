"""Cron expressions: 6 and 5 fields, validation that names the field, and firing instants across DST changes
(a time that does not exist in spring, a time that occurs twice in autumn) in several zones, checked by hand
and against a brute-force minute-by-minute reference."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from oma_common.errors import Invalid
from omad.schedule.cron import Cron, parse, zone

UTC = timezone.utc


def z(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def runs(expr: str, tz: str, start: str, n: int) -> list[str]:
    cron, zi = parse(expr), zone(tz)
    out, t = [], z(start)
    for _ in range(n):
        t = cron.next_after(t, zi)
        out.append(t.astimezone(zi).isoformat())
    return out


def test_fixed_time_in_the_spring_gap_runs_once_when_the_gap_ends() -> None:
    # Europe/Berlin, 2025-03-30: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert runs("0 30 2 * * *", "Europe/Berlin", "2025-03-28T00:00:00Z", 4) == [
        "2025-03-28T02:30:00+01:00", "2025-03-29T02:30:00+01:00",
        "2025-03-30T03:00:00+02:00",  # the first instant after the gap, once
        "2025-03-31T02:30:00+02:00"]
    # Several nonexistent times collapse into that one run.
    assert runs("0 0,15,30 2 * * *", "Europe/Berlin", "2025-03-29T23:00:00Z", 2) == [
        "2025-03-30T03:00:00+02:00", "2025-03-31T02:00:00+02:00"]


def test_fixed_time_in_the_repeated_hour_runs_once_at_its_first_occurrence() -> None:
    # Europe/Berlin, 2025-10-26: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
    assert runs("0 30 2 * * *", "Europe/Berlin", "2025-10-25T00:00:00Z", 3) == [
        "2025-10-25T02:30:00+02:00", "2025-10-26T02:30:00+02:00", "2025-10-27T02:30:00+01:00"]
    # Asked from inside the second pass, it does not fire again that day.
    assert runs("0 30 2 * * *", "Europe/Berlin", "2025-10-26T01:10:00Z", 1) == ["2025-10-27T02:30:00+01:00"]


def test_interval_expressions_follow_real_time_across_both_changes() -> None:
    assert runs("0 */30 * * * *", "Europe/Berlin", "2025-03-29T23:40:00Z", 4) == [
        "2025-03-30T01:00:00+01:00", "2025-03-30T01:30:00+01:00", "2025-03-30T03:00:00+02:00",
        "2025-03-30T03:30:00+02:00"]  # nothing in the hour that does not exist
    assert runs("0 */30 * * * *", "Europe/Berlin", "2025-10-25T23:40:00Z", 6) == [
        "2025-10-26T02:00:00+02:00", "2025-10-26T02:30:00+02:00", "2025-10-26T02:00:00+01:00",
        "2025-10-26T02:30:00+01:00", "2025-10-26T03:00:00+01:00", "2025-10-26T03:30:00+01:00"]
    # From late in the first pass, the next run is the second pass's 02:00, not 03:00.
    assert runs("0 */30 * * * *", "Europe/Berlin", "2025-10-26T00:50:00Z", 1) == ["2025-10-26T02:00:00+01:00"]


def test_five_fields_mean_second_zero() -> None:
    for tz, start in (("Europe/Berlin", "2025-03-28T00:00:00Z"), ("Europe/Berlin", "2025-10-24T00:00:00Z"),
                      ("America/New_York", "2025-03-08T00:00:00Z"), ("America/New_York", "2025-11-01T00:00:00Z")):
        assert runs("30 2 * * *", tz, start, 4) == runs("0 30 2 * * *", tz, start, 4)
        assert runs("*/20 * * * *", tz, start, 200) == runs("0 */20 * * * *", tz, start, 200)


def test_new_york_and_lord_howe() -> None:
    # America/New_York 2025-11-02: 02:00 EDT becomes 01:00 EST, so 01:30 happens twice: once is run.
    assert runs("30 1 * * *", "America/New_York", "2025-11-01T00:00:00Z", 3) == [
        "2025-11-01T01:30:00-04:00", "2025-11-02T01:30:00-04:00", "2025-11-03T01:30:00-05:00"]
    # 2025-03-09: 02:00 EST becomes 03:00 EDT.
    assert runs("0 2 * * *", "America/New_York", "2025-03-08T12:00:00Z", 2) == [
        "2025-03-09T03:00:00-04:00", "2025-03-10T02:00:00-04:00"]
    # Australia/Lord_Howe moves by 30 minutes: 02:00 becomes 02:30 on 2025-10-05.
    assert runs("0 15 2 * * *", "Australia/Lord_Howe", "2025-10-03T00:00:00Z", 3) == [
        "2025-10-04T02:15:00+10:30", "2025-10-05T02:30:00+11:00", "2025-10-06T02:15:00+11:00"]


def test_seconds_field_and_syntax() -> None:
    assert runs("15,45 * * * * *", "UTC", "2025-01-01T00:00:00Z", 3) == [
        "2025-01-01T00:00:15+00:00", "2025-01-01T00:00:45+00:00", "2025-01-01T00:01:15+00:00"]
    assert runs("0 0 9 * JAN-MAR MON-FRI", "UTC", "2025-03-28T10:00:00Z", 2) == [
        "2025-03-31T09:00:00+00:00", "2026-01-01T09:00:00+00:00"]
    assert runs("0 0 0 ? * 7", "UTC", "2025-01-01T00:00:00Z", 1) == ["2025-01-05T00:00:00+00:00"]  # 7 = Sunday
    # Both day fields restricted: either matches (crontab(5)); the 13th or a Friday.
    assert runs("0 0 12 13 * FRI", "UTC", "2025-06-10T00:00:00Z", 3) == [
        "2025-06-13T12:00:00+00:00", "2025-06-20T12:00:00+00:00", "2025-06-27T12:00:00+00:00"]
    assert runs("0 0 0 29 2 *", "UTC", "2025-01-01T00:00:00Z", 2) == [
        "2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]
    assert runs("@daily", "Europe/Berlin", "2025-01-01T00:00:00Z", 1) == ["2025-01-02T00:00:00+01:00"]
    assert parse("@hourly").interval and not parse("@daily").interval
    assert parse("0 5/20 * * * *").minutes == (5, 25, 45)
    assert parse("  0  0 2 * * *  ").text == "0 0 2 * * *"


@pytest.mark.parametrize("expr, words", [
    ("", "empty"),
    ("* * * *", "4 fields; expected 6"),
    ("* * * * * * *", "7 fields"),
    ("61 * * * * *", "the second field (1st of 6, '61'): 61 is out of range 0-59"),
    ("0 0 25 * * *", "the hour field (3rd of 6, '25'): 25 is out of range 0-23"),
    ("0 25 * * *", "the hour field (2nd of 5, '25')"),
    ("0 0 0 0 * *", "day-of-month field (4th of 6, '0'): 0 is out of range 1-31"),
    ("0 0 0 * 13 *", "month field"),
    ("0 0 0 * FOO *", "'FOO' is not a number or a name (JAN-DEC)"),
    ("0 0 0 * * 8", "day-of-week field (6th of 6, '8')"),
    ("0 0 0 L * *", "Quartz's L, W or #"),
    ("0 0 0 * * 5#3", "Quartz's L, W or #"),
    ("0 */0 * * * *", "the step in '*/0' must be a positive number"),
    ("0 30-10 * * * *", "the range '30-10' runs backwards"),
    ("? * * * * *", "'?' is only allowed in the day-of-month and day-of-week fields"),
    ("0 0 0 1,,2 * *", "an empty item"),
    ("0 0 0 30 2 *", "never matches a real date"),
    ("@fortnightly", "unknown shorthand"),
])
def test_invalid_expressions_name_the_field(expr: str, words: str) -> None:
    with pytest.raises(Invalid) as e:
        parse(expr)
    assert e.value.extra["field"] == "cron_expression"
    assert e.value.details.startswith("cron_expression: ")
    assert words in e.value.details, e.value.details


@pytest.mark.parametrize("name", ["Mars/Olympus", "localtime", "posixrules", "../../etc/passwd", "/etc/localtime",
                                  "", "utc "])
def test_unknown_time_zones_name_the_field(name: str) -> None:
    with pytest.raises(Invalid) as e:
        zone(name)
    assert e.value.extra["field"] == "timezone" and e.value.details.startswith("timezone: ")


# -- against a brute-force reference -------------------------------------------------------------------

def _matches(cron: Cron, r: datetime) -> bool:
    dom, dow = r.day in cron.days, r.isoweekday() % 7 in cron.weekdays
    day = dow if cron.any_day else dom if cron.any_weekday else dom or dow
    return (r.second in cron.seconds and r.minute in cron.minutes and r.hour in cron.hours
            and r.month in cron.months and day)


def reference(cron: Cron, tz_name: str, start: datetime, end: datetime) -> list[datetime]:
    """Walk every UTC minute: fire where the local reading matches (a repeated reading only on its first pass
    unless the expression is interval-like); a fixed-time reading skipped by a gap fires when the gap ends."""
    tz = zone(tz_name)
    out = []
    t = start
    while t <= end:
        local = t.astimezone(tz)
        reading = local.replace(tzinfo=None)
        repeated = reading.replace(tzinfo=tz, fold=0).utcoffset() != reading.replace(tzinfo=tz, fold=1).utcoffset()
        if _matches(cron, reading) and (not repeated or local.fold == 0 or cron.interval):
            out.append(t)
        nxt = t + timedelta(minutes=1)
        before, after = local.utcoffset(), nxt.astimezone(tz).utcoffset()
        if after > before and not cron.interval:  # a gap opens at nxt: readings [nxt+before, nxt+after)
            r = (nxt + before).replace(tzinfo=None)
            while r < (nxt + after).replace(tzinfo=None):
                if _matches(cron, r):
                    out.append(nxt)
                    break
                r += timedelta(minutes=1)
        t = nxt
    return sorted(set(out))


ZONES = {  # zone → days with a change in 2025
    "Europe/Berlin": ["2025-03-30", "2025-10-26"],
    "America/New_York": ["2025-03-09", "2025-11-02"],
    "Australia/Sydney": ["2025-04-06", "2025-10-05"],
    "Australia/Lord_Howe": ["2025-04-06", "2025-10-05"],
    "America/Santiago": ["2025-04-06", "2025-09-07"],  # changes at midnight: the day itself moves
    "Asia/Kolkata": ["2025-06-01"],
}
EXPRESSIONS = ["30 2 * * *", "*/20 * * * *", "0 * * * *", "15 1-3 * * *", "*/7 2 * * *", "0 2,3 * * 0",
               "45 1 * * *", "0 0 * * *", "*/30 1-3 * * *", "59 23 * * *", "10 0-5/2 * * *"]


@pytest.mark.parametrize("tz_name", sorted(ZONES))
def test_matches_the_brute_force_reference_around_every_change(tz_name: str) -> None:
    for day in ZONES[tz_name]:
        d = date.fromisoformat(day)
        start = datetime(d.year, d.month, d.day, tzinfo=UTC) - timedelta(days=1, hours=1)
        end = start + timedelta(days=3)
        for expr in EXPRESSIONS:
            cron = parse(expr)
            expected = reference(cron, tz_name, start + timedelta(minutes=1), end)
            got, t = [], start
            while (t := cron.next_after(t, zone(tz_name))) is not None and t <= end:  # type: ignore[assignment]
                got.append(t)
            assert got == expected, (tz_name, day, expr, [g.isoformat() for g in set(got) ^ set(expected)])
