"""Runtime beat jobs for sauna-supervisor, from application code on any host.

sauna-supervisor's beat runs the jobs of sauna.toml and the *runtime jobs* stored in Redis on
its broker. This module adds, changes, pauses and removes runtime jobs; the leading supervisor
picks each change up at the job's next slot, with no reload. Needs only the standard library and
the ``redis`` package Celery already uses::

    import redis, sauna_beat
    beat = sauna_beat.Beat(redis.Redis.from_url("redis://localhost:6379/0"))
    beat.add("report-42", task="reports.send", cron="0 8 * * mon-fri",
             timezone="Europe/Helsinki", kwargs={"tenant": 42})
    beat.add("poll-7", task="feeds.poll", every=30, args=[7])   # seconds, a timedelta or "30s"
    beat.pause("poll-7"); beat.resume("poll-7"); beat.remove("report-42")

A job is checked here before it is written (``InvalidJob``, a ``ValueError``, names every
problem) and nothing is stored when it is refused. The supervisor checks every stored job again
with the rules of ``[beat.jobs.NAME]`` and skips (and shows in ``sauna-supervisor beat list``)
one it refuses. A sauna.toml job's name is refused (``TomlJobName``). The Redis layout is
documented in the README ("Runtime jobs"); the Lua scripts below are the ones the supervisor
uses, so every write changes the document, its ``since`` time and the change stream together.
"""

import datetime
import json
import re
import unicodedata

__all__ = ["Beat", "InvalidJob", "TomlJobName", "NoSuchJob"]

CHANGES_MAXLEN = 100000
MAX_NAME_LEN = 200

PUT_LUA = """
if redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 1 then
  return redis.error_reply('TOMLJOB job "' .. ARGV[1] .. '" is defined in sauna.toml; a runtime job cannot replace it')
end
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local created = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], ms)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'name', ARGV[1])
return created
"""

REMOVE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'name', ARGV[1])
return 1
"""

PAUSE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return -1 end
local changed
if ARGV[3] == '1' then
  changed = redis.call('SADD', KEYS[4], ARGV[1])
else
  changed = redis.call('SREM', KEYS[4], ARGV[1])
  if changed == 1 then
    local now = redis.call('TIME')
    redis.call('HSET', KEYS[2], ARGV[1], tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
  end
end
if changed == 1 then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'name', ARGV[1])
end
return changed
"""


class InvalidJob(ValueError):
    """The job was refused before anything was written; ``problems`` lists why."""

    def __init__(self, name, problems):
        self.name = name
        self.problems = list(problems)
        super().__init__("runtime job %r: %s" % (name, "; ".join(self.problems)))


class TomlJobName(ValueError):
    """The name belongs to a sauna.toml job, which a runtime job cannot replace."""


class NoSuchJob(KeyError):
    """No runtime job has this name."""


# --- validation (the rules of [beat.jobs.NAME]; the supervisor checks again) ---

_DURATION_GROUP = re.compile(r"([0-9.]+)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _duration_seconds(text):
    """Seconds in a duration written like sauna.toml's ("500ms", "30s", "1h30m"), or None."""
    text = text.strip()
    if text == "0":
        return 0.0
    position, total = 0, 0.0
    while position < len(text):
        match = _DURATION_GROUP.match(text, position)
        if not match:
            return None
        try:
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        except ValueError:
            return None
        position = match.end()
    return total if text else None


def _duration(key, value, problems):
    """A duration as stored: text kept as written, numbers (seconds) and timedeltas converted."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool):
        problems.append("%s: expected a duration, not %r" % (key, value))
        return None
    if isinstance(value, (int, float)):
        milliseconds = round(value * 1000)
        if value < 0 or abs(milliseconds - value * 1000) > 1e-6:
            problems.append("%s: %r seconds is not a whole number of milliseconds >= 0" % (key, value))
            return None
        return "%ds" % (milliseconds // 1000) if milliseconds % 1000 == 0 else "%dms" % milliseconds
    if isinstance(value, str):
        if _duration_seconds(value) is None:
            problems.append(
                '%s: invalid duration "%s": expected a number with a unit, like "500ms", "30s", '
                '"5m", "1h30m" or "1d"' % (key, value))
            return None
        return value
    problems.append("%s: expected a duration, not %r" % (key, value))
    return None


_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_MAX_DAYS = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]
_SHORTCUTS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
              "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
              "@hourly": "0 * * * *"}


def _cron_field(text, what, low, high, names, name_base):
    def value(token):
        if token.isdigit() and token.isascii():
            return int(token)
        if token.lower() in names:
            return names.index(token.lower()) + name_base
        raise ValueError('%s field "%s": "%s" is not a number%s' % (
            what, text, token, " or a name (%s)" % ", ".join(names) if names else ""))

    values = set()
    for item in text.split(","):
        if not item:
            raise ValueError('%s field "%s": empty list item' % (what, text))
        rng, _, step = item.partition("/")
        if _:
            if not (step.isdigit() and step.isascii()):
                raise ValueError('%s field "%s": step "%s" is not a number' % (what, text, step))
            step = int(step)
            if step == 0:
                raise ValueError('%s field "%s": a step of 0 never advances' % (what, text))
        else:
            step = None
        if rng == "*":
            start, end = low, high
        elif "-" in rng:
            first, _, last = rng.partition("-")
            start, end = value(first), value(last)
        else:
            start = value(rng)
            end = high if step else start
        for bound in (start, end):
            if bound < low or bound > high:
                raise ValueError('%s field "%s": %d is outside %d-%d' % (what, text, bound, low, high))
        if start > end:
            raise ValueError('%s field "%s": range %d-%d runs backwards' % (what, text, start, end))
        values.update(range(start, end + 1, step or 1))
    return values


def check_cron(expr, celery_crontab=False):
    """Raises ValueError unless ``expr`` is a 5-field crontab (or @shortcut) that can fire."""
    trimmed = expr.strip()
    lowered = trimmed.lower()
    if lowered.startswith("@"):
        if lowered not in _SHORTCUTS:
            raise ValueError('unknown shortcut "%s": use @hourly, @daily, @weekly, @monthly or @yearly'
                             % trimmed)
        trimmed = _SHORTCUTS[lowered]
    fields = trimmed.split()
    if len(fields) != 5:
        raise ValueError('cron expression "%s" has %d field(s); expected 5: minute hour '
                         'day-of-month month day-of-week' % (expr.strip(), len(fields)))
    minute, hour, dom, month, dow = fields
    _cron_field(minute, "minute", 0, 59, [], 0)
    _cron_field(hour, "hour", 0, 23, [], 0)
    days = _cron_field(dom, "day-of-month", 1, 31, [], 0)
    months = _cron_field(month, "month", 1, 12, _MONTHS, 1)
    _cron_field(dow, "day-of-week", 0, 7, _DAYS, 0)
    either = not celery_crontab and not dom.startswith("*") and not dow.startswith("*")
    possible = any(day <= _MAX_DAYS[m] for m in months for day in days)
    if not (possible or either):
        raise ValueError('cron expression "%s" can never fire (no month has such a day)'
                         % expr.strip())


def _check_zone(name):
    try:
        import zoneinfo
    except ImportError:  # Python < 3.9: the supervisor checks the zone
        return None
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return ('timezone: unknown time zone "%s"; expected an IANA name such as "UTC" or '
                '"Europe/Helsinki"' % name)
    return None


def job_document(name, task, cron=None, every=None, timezone=None, args=None, kwargs=None,
                 queue=None, priority=None, expires=None, catch_up=None, catch_up_window=None,
                 one_off=False):
    """The JSON document stored for a job; raises InvalidJob listing every problem."""
    problems = []
    if not isinstance(name, str) or not name.strip():
        problems.append("a job name must not be empty")
    elif len(name.encode("utf-8")) > MAX_NAME_LEN:
        problems.append("job name is %d bytes long; at most %d" % (len(name.encode("utf-8")), MAX_NAME_LEN))
    elif any(unicodedata.category(char) == "Cc" for char in name):
        problems.append("job name %r contains a control character" % name)
    if not isinstance(task, str) or not task.strip():
        problems.append('task: a job needs the Celery task to send, e.g. "myapp.tasks.cleanup"')
    doc = {"task": task}
    if (cron is None) == (every is None):
        problems.append("set either cron or every, not both" if cron is not None else
                        'a job needs a schedule: cron (e.g. "*/5 * * * *") or every (e.g. "30s")')
    if cron is not None:
        if not isinstance(cron, str):
            problems.append("cron: expected a string, not %r" % (cron,))
        else:
            try:
                check_cron(cron)
                doc["cron"] = cron
            except ValueError as error:
                problems.append("cron: %s" % error)
    if every is not None:
        text = _duration("every", every, problems)
        if text is not None:
            if _duration_seconds(text) == 0:
                problems.append("every: must be longer than 0s")
            doc["every"] = text
    if timezone is not None:
        problem = ("timezone: expected a string, not %r" % (timezone,)
                   if not isinstance(timezone, str) else _check_zone(timezone))
        if problem:
            problems.append(problem)
        doc["timezone"] = timezone
    if args is not None:
        if isinstance(args, tuple):
            args = list(args)
        if not isinstance(args, list):
            problems.append("args: must be a list (a JSON array), not %r" % (args,))
        doc["args"] = args
    if kwargs is not None:
        if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
            problems.append("kwargs: must be a dict with str keys (a JSON object), not %r" % (kwargs,))
        doc["kwargs"] = kwargs
    if queue is not None:
        if not isinstance(queue, str) or not queue.strip():
            problems.append('queue: must not be empty; the default is "celery"')
        doc["queue"] = queue
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 9:
            problems.append("priority: %r is out of range; expected 0 to 9 (0 is the highest under "
                            "Redis)" % (priority,))
        doc["priority"] = priority
    if expires is not None:
        text = _duration("expires", expires, problems)
        if text is not None:
            if _duration_seconds(text) == 0:
                problems.append('expires: "0s" would expire every task at once; leave it out for '
                                'tasks that never expire')
            doc["expires"] = text
    if catch_up is not None:
        if catch_up not in ("skip", "once", "all"):
            problems.append('catch_up: "%s" is not a policy; expected "skip", "once" or "all"'
                            % (catch_up,))
        doc["catch_up"] = catch_up
    if catch_up_window is not None:
        text = _duration("catch_up_window", catch_up_window, problems)
        if text is not None:
            doc["catch_up_window"] = text
    if one_off:
        doc["one_off"] = True
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        problems.append("args and kwargs must be JSON: %s" % error)
        text = None
    if problems:
        raise InvalidJob(name, problems)
    return text


class Beat:
    """Runtime jobs on one broker. ``client`` is a ``redis.Redis`` for beat's broker (the URL
    of ``[beat].broker``); ``key_prefix`` is ``[beat].key_prefix``."""

    def __init__(self, client, key_prefix="sauna:beat:"):
        self.client = client
        self.prefix = key_prefix
        self._put = client.register_script(PUT_LUA)
        self._remove = client.register_script(REMOVE_LUA)
        self._pause = client.register_script(PAUSE_LUA)

    def _key(self, name):
        return self.prefix + name

    def add(self, name, task, cron=None, every=None, **options):
        """Adds the job, or replaces the runtime job of that name; True when it is new.

        Options: timezone, args, kwargs, queue, priority, expires, catch_up, catch_up_window,
        one_off — as in ``[beat.jobs.NAME]``. Durations are "30s"-style text, seconds or a
        timedelta."""
        document = job_document(name, task, cron=cron, every=every, **options)
        import redis

        try:
            created = self._put(
                keys=[self._key("jobs"), self._key("since"), self._key("changes"),
                      self._key("static"), self._key("paused")],
                args=[name, document, CHANGES_MAXLEN])
        except redis.ResponseError as error:
            if str(error).startswith("TOMLJOB") or "is defined in sauna.toml" in str(error):
                raise TomlJobName("job %r is defined in sauna.toml; a runtime job cannot replace it"
                                  % name) from None
            raise
        return created == 1

    def remove(self, name):
        """Removes the job; raises NoSuchJob when there is none."""
        removed = self._remove(
            keys=[self._key("jobs"), self._key("since"), self._key("changes"),
                  self._key("paused"), self._key("last")],
            args=[name, CHANGES_MAXLEN])
        if removed != 1:
            raise NoSuchJob(name)

    def _set_paused(self, name, paused):
        changed = self._pause(
            keys=[self._key("jobs"), self._key("since"), self._key("changes"),
                  self._key("paused")],
            args=[name, CHANGES_MAXLEN, "1" if paused else "0"])
        if changed == -1:
            raise NoSuchJob(name)
        return changed == 1

    def pause(self, name):
        """Pauses the job; False when it already was."""
        return self._set_paused(name, True)

    def resume(self, name):
        """Resumes the job from its next slot; False when it was not paused."""
        return self._set_paused(name, False)

    def get(self, name):
        """The stored job as a dict (with "paused"), or None."""
        document = self.client.hget(self._key("jobs"), name)
        if document is None:
            return None
        job = json.loads(document)
        job["paused"] = bool(self.client.sismember(self._key("paused"), name))
        return job

    def names(self):
        """Every runtime job name, sorted."""
        return sorted(
            name.decode() if isinstance(name, bytes) else name
            for name in self.client.hkeys(self._key("jobs")))
