"""Cron expressions (6 fields, seconds first; or the classic 5) evaluated in an IANA time zone across DST.

Syntax, per field: ``*``, a value, a range ``a-b``, a step ``*/n``, ``a-b/n`` or ``a/n`` (from a to the end),
and comma-separated lists of those. Months take JAN–DEC, days of the week SUN–SAT (0–7, both 0 and 7 are
Sunday); ``?`` means ``*`` in the two day fields. ``@yearly``, ``@monthly``, ``@weekly``, ``@daily`` and
``@hourly`` are accepted. When both day fields are restricted a day matching either fires (crontab(5));
``L``, ``W`` and ``#`` (Quartz) are refused with a clear message.

The expression is read as wall-clock time in the schedule's time zone. Two moments of the year need a
decision, and we take Vixie cron's (cron(8), "Daylight Saving Time and other time changes"):

- *Spring forward* — a local time that does not exist (02:30 in Europe/Berlin on 2025-03-30): an
  expression that names fixed times of day fires once, at the first instant after the gap (03:00 CEST);
  several such times collapse into that one run. An interval-like expression (``*`` or ``*/n`` in the
  second, minute or hour field) simply has no runs in the hour that does not exist.
- *Fall back* — a local time that occurs twice (02:30 in Europe/Berlin on 2025-10-26): a fixed-time
  expression fires once, at the first occurrence (CEST); an interval-like one fires at both, so "every
  30 minutes" stays every 30 minutes of real time.

Everything is computed in UTC instants; a local wall-clock reading is only ever an intermediate.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import zoneinfo
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from oma_common.errors import Invalid

UTC = timezone.utc
SECOND = timedelta(seconds=1)
# 28 years hold every combination of weekday, leap day and month: a match must appear within them.
HORIZON_YEARS = 28

_FIELDS = (("second", 0, 59), ("minute", 0, 59), ("hour", 0, 23), ("day-of-month", 1, 31), ("month", 1, 12),
           ("day-of-week", 0, 7))
_ORDINAL = ("1st", "2nd", "3rd", "4th", "5th", "6th")
_MONTHS = {n: i + 1 for i, n in enumerate(("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT",
                                           "NOV", "DEC"))}
_DAYS = {n: i for i, n in enumerate(("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"))}
_MACROS = {"@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
           "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *", "@hourly": "0 0 * * * *"}


def _bad(details: str, field: str = "cron_expression") -> Invalid:
    return Invalid(f"invalid {field.replace('_', ' ')}", f"{field}: {details}", field=field)


@functools.lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    # The zones tzdata installs; Debian's zoneinfo directory also holds "localtime" (a link to the host's
    # zone, which would make a schedule mean different times on different appliances) and "posixrules".
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "posixrules"}


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; Invalid naming the `timezone` field otherwise."""
    if name not in _zone_names() and name != "UTC":
        raise _bad(f"{name!r} is not an IANA time zone name (such as 'UTC', 'Europe/Berlin', "
                   "'America/New_York')", "timezone")
    try:
        return ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as e:
        raise _bad(f"{name!r} cannot be loaded: {e}", "timezone") from e


def _value(text: str, name: str, lo: int, hi: int, where: str) -> int:
    names = _MONTHS if name == "month" else _DAYS if name == "day-of-week" else {}
    upper = text.upper()
    if upper in names:
        return names[upper]
    if not text.isdigit():
        if upper in ("L", "W", "LW") or "#" in text or (upper[:-1].isdigit() and upper[-1:] in ("L", "W")):
            raise _bad(f"{where}: {text!r} uses Quartz's L, W or #, which are not supported")
        known = f" or a name ({'-'.join((next(iter(names)), list(names)[-1]))})" if names else ""
        raise _bad(f"{where}: {text!r} is not a number{known}")
    v = int(text)
    if not lo <= v <= hi:
        raise _bad(f"{where}: {v} is out of range {lo}-{hi}")
    return v


def _field(text: str, index: int, count: int) -> tuple[tuple[int, ...], bool, bool]:
    """(values, the field is "*" or "?", the field starts with "*") of one field."""
    name, lo, hi = _FIELDS[index]
    where = f"the {name} field ({_ORDINAL[index - (6 - count)]} of {count}, {text!r})"
    values: set[int] = set()
    for item in text.split(","):
        base, slash, step_text = item.partition("/")
        step = 1
        if slash:
            if not step_text.isdigit() or int(step_text) == 0:
                raise _bad(f"{where}: the step in {item!r} must be a positive number")
            step = int(step_text)
        if base in ("*", "?"):
            if base == "?" and name not in ("day-of-month", "day-of-week"):
                raise _bad(f"{where}: '?' is only allowed in the day-of-month and day-of-week fields")
            first, last = lo, hi
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, name, lo, hi, where), _value(b, name, lo, hi, where)
            if first > last:
                raise _bad(f"{where}: the range {base!r} runs backwards")
        elif base:
            first = _value(base, name, lo, hi, where)
            last = hi if slash else first
        else:
            raise _bad(f"{where}: an empty item")
        values.update(range(first, last + 1, step))
    if name == "day-of-week" and 7 in values:
        values.discard(7)
        values.add(0)
    return tuple(sorted(values)), text in ("*", "?"), text.startswith("*")


@dataclasses.dataclass(frozen=True)
class Cron:
    """A parsed expression; `next_after` gives the next firing instant in a time zone."""

    text: str
    seconds: tuple[int, ...]
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: tuple[int, ...]
    months: tuple[int, ...]
    weekdays: tuple[int, ...]  # 0 = Sunday
    any_day: bool  # the day-of-month field is * or ?
    any_weekday: bool  # the day-of-week field is * or ?
    interval: bool  # * or */n in the second, minute or hour field: see the module docstring

    @classmethod
    def parse(cls, text: str) -> Cron:
        """Parse and validate; Invalid names the `cron_expression` field and what is wrong with it."""
        expr = " ".join(text.split())
        if not expr:
            raise _bad("the expression is empty")
        expanded = expr
        if expr.startswith("@"):
            if expr.lower() not in _MACROS:
                raise _bad(f"unknown shorthand {expr!r} (known: {', '.join(_MACROS)})")
            expanded = _MACROS[expr.lower()]
        parts = expanded.split(" ")
        count = len(parts)
        if count not in (5, 6):
            raise _bad(f"{count} fields; expected 6 (second minute hour day-of-month month day-of-week) "
                       "or 5 (minute hour day-of-month month day-of-week)")
        if count == 5:
            fields = [((0,), False, False)] + [_field(p, i + 1, 5) for i, p in enumerate(parts)]
        else:
            fields = [_field(p, i, 6) for i, p in enumerate(parts)]
        cron = cls(expr, fields[0][0], fields[1][0], fields[2][0], fields[3][0], fields[4][0], fields[5][0],
                   any_day=fields[3][1], any_weekday=fields[5][1], interval=any(f[2] for f in fields[:3]))
        if cron._next_naive(datetime(2000, 1, 1), 2000 + HORIZON_YEARS) is None:
            raise _bad(f"{expr!r} never matches a real date")
        return cron

    # -- local wall-clock readings ------------------------------------------------------------------

    def _day_ok(self, d: date) -> bool:
        dom = d.day in self.days
        dow = d.isoweekday() % 7 in self.weekdays
        if self.any_day:
            return dow
        if self.any_weekday:
            return dom
        return dom or dow

    def _next_naive(self, after: datetime, last_year: int) -> datetime | None:
        """The first matching wall-clock reading strictly after `after` (naive, whole seconds)."""
        t = after.replace(microsecond=0) + SECOND
        while t.year <= last_year:
            if t.month not in self.months:
                m = _above(self.months, t.month)
                t = datetime(t.year + 1, self.months[0], 1) if m is None else datetime(t.year, m, 1)
                continue
            if not self._day_ok(t.date()):
                t = datetime(t.year, t.month, t.day) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                h = _above(self.hours, t.hour)
                t = datetime(t.year, t.month, t.day) + (timedelta(days=1) if h is None else timedelta(hours=h))
                continue
            if t.minute not in self.minutes:
                m = _above(self.minutes, t.minute)
                t = t.replace(minute=0, second=0) + (timedelta(hours=1) if m is None else timedelta(minutes=m))
                continue
            if t.second not in self.seconds:
                s = _above(self.seconds, t.second)
                t = t.replace(second=0) + (timedelta(minutes=1) if s is None else timedelta(seconds=s))
                continue
            return t
        return None

    # -- instants -----------------------------------------------------------------------------------

    def _instants(self, reading: datetime, tz: ZoneInfo) -> list[datetime]:
        """The UTC instants at which a matching local reading fires: one, none or two (DST, see above)."""
        a = reading.replace(tzinfo=tz, fold=0).astimezone(UTC)
        b = reading.replace(tzinfo=tz, fold=1).astimezone(UTC)
        if a == b:
            return [a]
        if a < b:  # a repeated reading; PEP 495: fold=0 is its first occurrence
            return [a, b] if self.interval else [a]
        # A reading in a gap: fold=1 reads it with the offset after the change, fold=0 with the one before,
        # which puts b before the change and a after it.
        return [] if self.interval else [_transition(b, a, tz)]

    def next_after(self, after: datetime, tz: ZoneInfo) -> datetime | None:
        """The first firing instant strictly after `after` (aware), in UTC; None if none is left."""
        after = after.astimezone(UTC)
        local = after.astimezone(tz)
        start = local.replace(tzinfo=None, microsecond=0)
        last_year = start.year + HORIZON_YEARS
        best: datetime | None = None
        reading: datetime | None = start
        # Readings from now on. Their first instants never decrease, so the first one at or past the best
        # candidate ends the search.
        while (reading := self._next_naive(reading, last_year)) is not None:  # type: ignore[arg-type]
            instants = self._instants(reading, tz)
            for i in instants:
                if i > after and (best is None or i < best):
                    best = i
            if instants and best is not None and instants[0] >= best:
                break
        # In the first pass of a repeated hour, the second occurrences of readings already passed are still
        # ahead (interval-like expressions fire at both).
        if self.interval and local.fold == 0:
            twin = start.replace(tzinfo=tz, fold=1).astimezone(UTC) - start.replace(tzinfo=tz).astimezone(UTC)
            if twin > timedelta(0):
                reading = start - twin - SECOND
                while reading is not None:
                    reading = self._next_naive(reading, last_year)
                    if reading is None or reading > start:
                        break
                    instants = self._instants(reading, tz)
                    if len(instants) == 2 and instants[1] > after and (best is None or instants[1] < best):
                        best = instants[1]
        return best

    def runs_between(self, after: datetime, until: datetime, tz: ZoneInfo, limit: int) -> list[datetime]:
        """Firing instants in (after, until], at most `limit` of them."""
        out: list[datetime] = []
        t: datetime | None = after
        while len(out) < limit and (t := self.next_after(t, tz)) is not None and t <= until:  # type: ignore[arg-type]
            out.append(t)
        return out


def _above(values: tuple[int, ...], v: int) -> int | None:
    i = bisect.bisect_right(values, v)
    return values[i] if i < len(values) else None


def _transition(before: datetime, after: datetime, tz: ZoneInfo) -> datetime:
    """The first whole second in (before, after] whose UTC offset is the one at `after` (the DST change)."""
    target = after.astimezone(tz).utcoffset()
    lo, hi = int(before.timestamp()), int(after.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if datetime.fromtimestamp(mid, tz).utcoffset() == target:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, UTC)


parse = Cron.parse
