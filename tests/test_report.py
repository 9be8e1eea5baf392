"""Reports over the usage log: pure aggregation, the stream and file readers, and the CLI."""

from __future__ import annotations

import json
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from budgetguard.eventlog import CLOCK_SKEW, follow_jsonl, read_jsonl, read_stream
from budgetguard.report import ReportError, build_report, format_usd, parse_duration, render

from .eventgen import STREAM, expected, iso, make_event, workload, write_jsonl, write_stream
from .reportcheck import BIN, FORMATS, GROUPINGS, ROOT, check_report, cli, run_all

START = datetime(2026, 3, 14, 0, 0, tzinfo=UTC)
UNTIL = "2026-03-15T00:00:00Z"


@pytest.fixture(scope="module")
def events():
    return workload(2500, START)


@pytest.fixture
def limits(tmp_path):
    path = tmp_path / "limits.yaml"
    path.write_text("redis_url: ${REDIS_URL}\norg: {daily_usd: 400, monthly_usd: 5000}\n")
    return path


# -- pure functions ------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "delta"), [("24h", timedelta(hours=24)), ("7d", timedelta(days=7)),
                                             ("30d", timedelta(days=30)), ("90m", timedelta(minutes=90)),
                                             ("2w", timedelta(weeks=2))])
def test_durations(text, delta):
    assert parse_duration(text) == delta


@pytest.mark.parametrize("text", ["5x", "0h", "-1d", "h", "24", "1.5h", "99999d", ""])
def test_bad_durations(text):
    with pytest.raises(ReportError, match="bad duration"):
        parse_duration(text)


def test_money_is_printed_exactly():
    assert [format_usd(Decimal(v)) for v in ("0", "12", "0.006", "0.000000125", "1234.5")] == \
        ["0.00", "12.00", "0.006", "0.000000125", "1234.50"]


@pytest.mark.parametrize("by", GROUPINGS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_report_equals_independent_sums(events, by, fmt):
    report = build_report(events, by=by, since=START, until=START + timedelta(days=1))
    check_report(render(report, fmt), fmt, by, events)


def test_groups_cover_missing_tags_and_hours(events):
    features = {key for key, _ in build_report(events, by="feature").groups}
    assert features == {"chat", "search", "summarise", "(none)"}
    hours = [key for key, _ in build_report(events, by="hour").groups]
    assert hours == sorted(hours) and hours[0] == "2026-03-14T00:00Z" and len(hours) == 20


def test_top_spenders_rank_users_by_cost(events):
    report = build_report(events, top=3)
    want = expected(events, "user")
    ranked = sorted(want, key=lambda u: -want[u]["cost_nano"])[:3]
    assert [u for u, _ in report.top_spenders] == ranked
    doc = json.loads(render(report, "json"))
    assert [t["user"] for t in doc["top_spenders"]] == ranked


def test_bad_events_are_skipped_and_counted():
    now = datetime(2026, 3, 14, 12, tzinfo=UTC)
    good = make_event(ts=now, future_field={"nested": True})  # unknown keys are fine
    bad = [
        {**make_event(ts=now), "cost_usd": 0.006},  # a float: money must be exact
        {**make_event(ts=now), "ts": "yesterday"},
        {**make_event(ts=now), "input_tokens": -5},
        {**make_event(ts=now), "kind": "mystery"},
    ]
    report = build_report([good, *bad])
    assert report.skipped == 4
    assert report.totals.events == 1 and report.totals.cost_usd == Decimal(good["cost_usd"])
    assert "warning: skipped 4 entries" in render(report, "table")


def test_estimate_accuracy_definition():
    now = datetime(2026, 3, 14, 12, tzinfo=UTC)
    a = {**make_event(ts=now), "cost_usd": "1", "estimated_cost_usd": "2"}  # 50% off
    b = {**make_event(ts=now), "cost_usd": "3", "estimated_cost_usd": "3"}  # exact
    released = {**make_event(ts=now, outcome="released"), "estimated_cost_usd": "5"}  # not settled: excluded
    t = build_report([a, b, released]).totals
    assert t.estimate_ratio == Decimal("0.8")  # (1 + 3) / (2 + 3)
    assert t.estimate_mape_pct == Decimal("25")  # mean(50%, 0%)
    assert t.requests == 3 and t.estimated_requests == 2


def test_any_tag_groups_and_a_name_that_cannot_be_one_is_refused():
    from .eventgen import make_event

    events = [make_event(ts=START, tags={"team": "search"}), make_event(ts=START, tags={"team": "search"}),
              make_event(ts=START, tags={"team": "ads"}), make_event(ts=START)]
    groups = dict(build_report(events, by="team").groups)
    assert {key: t.requests for key, t in groups.items()} == {"search": 2, "ads": 1, "(none)": 1}
    with pytest.raises(ReportError, match="cannot group by 'col our'"):
        build_report([], by="col our")


# -- readers -------------------------------------------------------------------------------


def test_stream_reader_stops_at_the_range_start(real_redis):
    old = workload(1500, START - timedelta(days=10), seed=1)
    recent = workload(300, START, seed=2)
    write_stream(real_redis, old + recent)
    real_redis.xadd(STREAM, {"e": b"not json"})
    real_redis.xadd(STREAM, {"e": b"[1, 2]"})
    calls = []

    class Counting:
        def xrevrange(self, *args, **kwargs):
            reply = real_redis.xrevrange(*args, **kwargs)
            calls.append(len(reply))
            return reply

    loaded = read_stream(Counting(), STREAM, START, START + timedelta(days=1))  # type: ignore[arg-type]
    assert loaded.events == recent and loaded.skipped == 2
    # 302 newer entries plus one page reaching past the skew margin, not all 1802.
    assert sum(calls) <= 302 + 500
    assert read_stream(real_redis, STREAM, START - timedelta(days=10) - CLOCK_SKEW, START).events == old


def test_jsonl_reader_filters_by_time_and_skips_junk(tmp_path):
    path = tmp_path / "usage.jsonl"
    inside = make_event(ts=START + timedelta(hours=1))
    write_jsonl(path, [make_event(ts=START - timedelta(hours=1)), inside, make_event(ts=START + timedelta(days=2))])
    with path.open("a") as fh:
        fh.write("{truncated\n\n\"a string\"\n")
    loaded = read_jsonl(path, START, START + timedelta(days=1))
    assert loaded.events == [inside] and loaded.skipped == 2


def test_jsonl_follower_reads_only_complete_lines(tmp_path):
    path = tmp_path / "usage.jsonl"
    first, second = make_event(ts=START), make_event(ts=START, user="bob")
    write_jsonl(path, [first])
    with path.open("a") as fh:
        fh.write(json.dumps(second)[:20])  # a writer caught mid-line
    ticks = iter(range(1000))
    follower = follow_jsonl(path, backlog=5, poll_s=0, idle_timeout=3, clock=lambda: next(ticks))
    assert next(follower) == first
    with path.open("a") as fh:
        fh.write(json.dumps(second)[20:] + "\n")
    assert list(follower) == [second]


# -- the CLI -------------------------------------------------------------------------------


def test_cli_report_from_the_stream_in_every_format(real_redis, real_redis_url, limits, events):
    # The full grouping x format matrix runs in-process above (and through the real guard in
    # test_workload_report); here each format goes through the installed command.
    write_stream(real_redis, events)
    env = {"REDIS_URL": real_redis_url}
    cases = [("hour", "table"), ("feature", "csv"), ("user", "json"), (None, "json")]
    args = [("report", "--config", str(limits), "--since", "24h", "--until", UNTIL, "--format", fmt,
             *(("--by", by) if by else ())) for by, fmt in cases]
    for (by, fmt), out in zip(cases, run_all(args, env), strict=True):
        assert out.returncode == 0, out.stderr
        check_report(out.stdout, fmt, by, events)


def test_cli_report_from_a_file(tmp_path, limits, events):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, events)
    env = {"REDIS_URL": "redis://127.0.0.1:1/0"}  # never contacted when reading a file
    cases = [("tenant", "csv"), ("model", "table")]
    args = [("report", "--config", str(limits), "--file", str(path), "--since", "1d", "--until", UNTIL,
             "--format", fmt, "--by", by) for by, fmt in cases]
    for (by, fmt), out in zip(cases, run_all(args, env), strict=True):
        assert out.returncode == 0, out.stderr
        check_report(out.stdout, fmt, by, events)
    # --since counts back from --until: the last 2 hours of the 20 hold a tenth of the events.
    out = cli("report", "--file", str(path), "--since", "2h", "--until", "2026-03-14T20:00Z", "--format", "json")
    last = [e for e in events if e["ts"] >= "2026-03-14T18:00:00.000Z"]
    assert json.loads(out.stdout)["totals"]["events"] == len(last) > 0


@pytest.mark.parametrize(("args", "message"), [
    (("report", "--since", "5x"), "bad duration '5x'"),
    (("report", "--by", "col our"), "cannot group by 'col our'"),
    (("report", "--format", "xml"), "invalid choice: 'xml'"),
    (("report", "--until", "soon"), "bad --until 'soon'"),
    (("report", "--file", "/nonexistent/usage.jsonl"), "cannot read /nonexistent/usage.jsonl"),
    (("report", "--config", "/nonexistent/limits.yaml"), "cannot read /nonexistent/limits.yaml"),
    (("tail", "--count", "0"), "--count and --timeout above 0"),
    (("tail", "--file", "/nonexistent/usage.jsonl"), "cannot read /nonexistent/usage.jsonl"),
    (("status", "--config", "/nonexistent/limits.yaml"), "cannot read /nonexistent/limits.yaml"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    out = cli(*args, env={"REDIS_URL": ""}, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr
    assert out.stdout == ""


def test_cli_bad_config_and_embedded_store(tmp_path):
    bad = tmp_path / "limits.yaml"
    bad.write_text("tiers: [1, 2]\n")
    out = cli("report", env={"REDIS_URL": ""}, cwd=tmp_path)  # ./limits.yaml is read by default
    assert out.returncode == 2 and out.stderr.startswith("budgetguard: tiers:") and out.stderr.count("\n") == 1
    bad.unlink()
    out = cli("report", env={"REDIS_URL": ""}, cwd=tmp_path)
    assert out.returncode == 2 and "no usage stream to read" in out.stderr


@pytest.mark.parametrize("command", ["status", "report", "tail"])
def test_cli_help(command):
    out = cli(command, "--help")
    assert out.returncode == 0 and "--config" in out.stdout


def test_cli_tail_prints_the_backlog_then_follows_the_stream(real_redis, real_redis_url, limits):
    older = [make_event(ts=START + timedelta(minutes=i), user=f"u{i}") for i in range(3)]
    write_stream(real_redis, older)
    proc = subprocess.Popen([str(BIN), "tail", "--config", str(limits), "-n", "2", "--count", "4", "--timeout", "30"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "REDIS_URL": real_redis_url})
    assert proc.stdout is not None
    # Once the backlog is out, the follow position is fixed: later events cannot be missed.
    first = [proc.stdout.readline() for _ in range(2)]
    newer = [make_event(ts=START + timedelta(hours=1), user="late", outcome="denied", limit="user.hourly",
                        tags={"feature": "chat"}), make_event(ts=START + timedelta(hours=2), user="later")]
    real_redis.xadd(STREAM, {"e": b"{not json"})
    write_stream(real_redis, newer)
    rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == "budgetguard: skipped an entry that is not a JSON object\n"
    lines = first + rest.splitlines(keepends=True)
    assert [line.split()[2] for line in lines] == ["u1", "u2", "late", "later"]
    assert lines[0].startswith(iso(START + timedelta(minutes=1)))
    assert "user.hourly: denied: user.hourly cap would be exceeded" in lines[2] and "feature=chat" in lines[2]


def test_cli_tail_json_from_a_file_and_ctrl_c(tmp_path):
    path = tmp_path / "usage.jsonl"
    events = [make_event(ts=START, user=f"u{i}") for i in range(3)]
    write_jsonl(path, events)
    out = cli("tail", "--file", str(path), "--json", "-n", "2", "--count", "2")
    assert out.returncode == 0, out.stderr
    assert [json.loads(line) for line in out.stdout.splitlines()] == events[1:]

    proc = subprocess.Popen([str(BIN), "tail", "--file", str(path), "-n", "1"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().split()[2] == "u2"  # following now
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err


def test_cli_tail_timeout_ends_an_idle_follow(real_redis, real_redis_url, limits):
    out = cli("tail", "--config", str(limits), "--timeout", "0.3", env={"REDIS_URL": real_redis_url})
    assert out.returncode == 0 and out.stdout == "", out.stderr


def test_stream_reader_accepts_a_decoding_client(real_redis, real_redis_url):
    import redis

    events = [make_event(ts=START + timedelta(minutes=i)) for i in range(3)]
    write_stream(real_redis, events)
    client = redis.Redis.from_url(real_redis_url, decode_responses=True)
    try:
        assert read_stream(client, STREAM, START).events == events
    finally:
        client.close()


def test_cli_reads_the_configured_file_when_there_is_no_stream(tmp_path):
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [make_event(ts=START, user="carol", cost_usd="0.25")])
    limits = tmp_path / "limits.yaml"
    limits.write_text(f"events: {{stream_maxlen: 0, jsonl_path: {json.dumps(str(path))}}}\n")
    out = cli("report", "--config", str(limits), "--until", UNTIL, "--format", "json", env={"REDIS_URL": ""})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["top_spenders"] == [{"user": "carol", "cost_usd": "0.25", "requests": 1,
                                                       "denials": 0}]
    out = cli("tail", "--config", str(limits), "--count", "1", env={"REDIS_URL": ""})
    assert out.returncode == 0 and " carol (pro) " in out.stdout
    limits.write_text("events: {stream_maxlen: 0}\n")
    out = cli("report", "--config", str(limits), env={"REDIS_URL": ""})
    assert out.returncode == 2 and "events.stream_maxlen is 0 and events.jsonl_path is unset" in out.stderr
