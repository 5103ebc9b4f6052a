"""The benchmark's pure parts: statistics, ratios and verdicts, table text, run diffs,
size parsing and RESULTS.md's generated block. No server is started here."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.mgmt import figures_from
from bench.stats import (
    Figure,
    Target,
    diff_runs,
    digest,
    fmt_summary,
    fmt_value,
    format_table,
    paired_ratios,
    parse_size,
    percentile,
    ratio,
    summarize,
)


def test_summarize_odd_and_even() -> None:
    s = summarize([5, 1, 3])
    assert (s.n, s.median, s.min, s.max) == (3, 3, 1, 5)
    assert (s.q1, s.q3) == (2, 4)
    e = summarize([4, 1, 3, 2])
    assert e.median == 2.5
    assert e.q1 == pytest.approx(1.75) and e.q3 == pytest.approx(3.25)
    assert e.iqr == pytest.approx(1.5)
    assert e.samples == (1, 2, 3, 4)


def test_summarize_single_and_empty() -> None:
    s = summarize([7.0])
    assert (s.median, s.q1, s.q3, s.min, s.max) == (7, 7, 7, 7, 7)
    with pytest.raises(ValueError):
        summarize([])


def test_percentile_p99() -> None:
    xs = list(range(1, 101))
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile(xs, 0) == 1 and percentile(xs, 100) == 100


@pytest.mark.parametrize(
    ("mesh", "sshd", "target", "better", "expected"),
    [
        pytest.param([300.0], [200.0], Target(">=", 1.0), "higher", "ok", id="throughput-faster"),
        pytest.param([190.0], [200.0], Target(">=", 1.0), "higher", "MISS", id="throughput-slower"),
        pytest.param([200.0], [200.0], Target(">=", 1.0), "higher", "ok", id="throughput-equal-holds"),
        pytest.param([30.0], [100.0], Target("<=", 0.4), "lower", "ok", id="latency-under-0.4"),
        pytest.param([50.0], [100.0], Target("<=", 0.4), "lower", "MISS", id="latency-over-0.4"),
        pytest.param([10.0], [100.0], Target("<=", 0.1), "lower", "ok", id="memory-exactly-0.1"),
        pytest.param([11.0], [100.0], Target("<=", 0.1), "lower", "MISS", id="memory-over-0.1"),
        pytest.param([5.0], [1.0], None, "lower", "n/a", id="no-target"),
    ],
)
def test_ratio_and_verdict(mesh, sshd, target, better, expected) -> None:
    fig = Figure("x", "u", better, summarize(sshd), summarize(mesh), target)
    assert fig.ratio == pytest.approx(mesh[0] / sshd[0])
    assert fig.verdict == expected


def test_missing_side_is_not_measured() -> None:
    fig = Figure("x", "s", "lower", summarize([1.0]), None, Target("<=", 0.4), note="no client")
    assert fig.ratio is None
    assert fig.verdict == "not measured"
    assert ratio(summarize([1.0]), summarize([0.0])) is None
    row = format_table([fig]).splitlines()[2]
    assert "not measured: no client" in row


def test_absolute_target_uses_the_median_not_a_ratio() -> None:
    fast = Figure("map", "s", "lower", None, summarize([0.5, 0.7, 0.9]), Target("<=", 1.0, "absolute"))
    slow = Figure("map", "s", "lower", None, summarize([1.5]), Target("<=", 1.0, "absolute"))
    assert fast.ratio is None and fast.verdict == "ok"
    assert slow.verdict == "MISS"


def test_paired_ratios_skip_zero_baseline() -> None:
    assert paired_ratios([2.0, 3.0, 4.0], [1.0, 0.0, 2.0]) == [2.0, 2.0]


def test_units_and_table_shape() -> None:
    assert fmt_value(2**20 * 3, "bytes") == "3.0 MiB"
    assert fmt_value(0.0123, "s") == "12.3 ms"
    assert fmt_value(2.5, "s") == "2.50 s"
    assert fmt_value(812.4, "MB/s") == "812 MB/s"
    assert fmt_summary(summarize([0.1, 0.2, 0.3]), "s") == "200.0 ms (100.0–300.0)"
    figs = [
        Figure("bulk", "MB/s", "higher", summarize([100, 110]), summarize([120, 130]), Target(">=", 1.0)),
        Figure("mem", "bytes", "lower", summarize([2**30]), summarize([2**26]), Target("<=", 0.1)),
    ]
    lines = format_table(figs).splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert "| 1.19  |" in lines[2] and "ok" in lines[2]
    assert "0.06" in lines[3] and "<= 0.1" in lines[3]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("64M", 64 * 2**20), ("1G", 2**30), ("1GiB", 2**30), ("512k", 512 * 1024), ("1000", 1000),
     ("0.5G", 2**29)],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "G", "abc", "-1M", "0"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_diff_runs_reports_moves_new_and_gone() -> None:
    prev = {"a": {"ratio": 1.0}, "b": {"ratio": 0.5}, "gone": {"ratio": 1.0}}
    cur = {"a": {"ratio": 1.05}, "b": {"ratio": 0.8}, "new": {"ratio": 2.0}}
    lines = diff_runs(prev, cur)
    assert "- b: ratio 0.50 → 0.80 (+60%)" in lines
    assert not any(line.startswith("- a:") for line in lines)
    assert "- new: new figure (ratio 2.00)" in lines
    assert "- gone: not in this run" in lines
    assert diff_runs({"a": {"ratio": 1.0}}, {"a": {"ratio": 1.01}}) == [
        "- no ratio moved by 10% or more"
    ]


def test_results_md_keeps_handwritten_text_and_diffs(tmp_path) -> None:
    md = tmp_path / "RESULTS.md"
    machine = {"cpu_model": "cpu", "cores": 2, "kernel": "k", "python": "3", "asyncssh": "a",
               "cryptography": "c", "openssh": "o", "uvloop": None, "git_commit": "abc"}
    first = [Figure("bulk", "MB/s", "higher", summarize([100]), summarize([90]), Target(">=", 1.0))]
    report.update_results_md(first, machine, {"rounds": 1}, [], "T1", path=md)
    text = md.read_text()
    assert "first recorded run" in text and "## Profiles and what bounds us" in text
    md.write_text(text + "hand-written profile notes\n")
    second = [Figure("bulk", "MB/s", "higher", summarize([100]), summarize([120]), Target(">=", 1.0))]
    report.update_results_md(second, machine, {"rounds": 1}, ["a note"], "T2", path=md)
    text = md.read_text()
    assert "hand-written profile notes" in text
    assert "T1" not in text and "Latest run (T2)" in text
    assert "- bulk: ratio 0.90 → 1.20 (+33%)" in text
    assert report.previous_digest(text) == json.loads(json.dumps(digest(second)))


def test_mgmt_json_becomes_absolute_figures() -> None:
    figs = figures_from({"map_compute_seconds": [0.4, 0.6], "propagation_p99_seconds": 2.5})
    assert [f.verdict for f in figs] == ["ok", "MISS"]
    assert figures_from({"unrelated": 1}) == []


def test_long_multiline_note_stays_one_table_cell() -> None:
    note = "ssh exited 255:\nconnect failed | " + "x" * 300
    fig = Figure("proxy", "s", "lower", summarize([0.2]), None, Target("<=", 1.0), note=note)
    lines = format_table([fig]).splitlines()
    assert len(lines) == 3
    assert lines[2].count("|") == 7
    assert "…" in lines[2]


def test_parse_negotiated_from_ssh_v() -> None:
    from bench.measure import parse_negotiated

    text = (
        "debug1: Remote protocol version 2.0, remote software version OpenSSH_9.2p1 Debian-2\n"
        "debug1: kex: algorithm: sntrup761x25519-sha512\n"
        "debug1: kex: host key algorithm: ssh-ed25519\n"
        "debug1: kex: server->client cipher: chacha20-poly1305@openssh.com MAC: <implicit> compression: none\n"
    )
    assert parse_negotiated(text) == {
        "server_version": "OpenSSH_9.2p1 Debian-2", "kex": "sntrup761x25519-sha512",
        "host_key": "ssh-ed25519", "cipher": "chacha20-poly1305@openssh.com",
    }


def test_collapsed_stack_summary() -> None:
    from bench.profile import summarize_collapsed

    text = "main;loop;read 30\nmain;loop;send 50\nmain;spawn 20\ngarbage line\n"
    self_top, total_top, n = summarize_collapsed(text, top=3)
    assert n == 100
    assert self_top[0] == ("send", 50)
    assert dict(total_top)["main"] == 100 and dict(total_top)["loop"] == 80


def test_small_byte_values_in_kib() -> None:
    assert fmt_value(30 * 1024, "bytes") == "30.0 KiB"
