"""The ``warning`` family on synthetic event files written as ``EarlyWarningMonitor`` writes
them: warnings and events as reason-led text, ``<event>/steps_to`` and the signals as scalars."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from dynlens.events import INSTABILITIES, format_event
from dynlens.report import build_report
from dynlens.report.family import Options
from dynlens.report.reader import read_run
from dynlens.report.summary import summarise_run

W = "dynlens/warning/"


def write(directory: Path, scalars: dict[str, dict[int, float]], events=()) -> Path:
    """An event file with the scalars and, as ``Monitor.log_event`` writes them, the events
    ``(step, reason, message)`` under ``<prefix>/warning/events``."""
    writer = SummaryWriter(str(directory))
    for tag, points in scalars.items():
        for step, value in points.items():
            writer.add_scalar(tag, value, step)
    for step, reason, message in events:
        writer.add_text(W + "events", format_event(reason, f"step {step}: {message}"), step)
    writer.close()
    return directory


def summarise(directory: Path, **options) -> dict:
    return summarise_run(read_run(directory), Options(**options)).families


SCALARS = {
    W + "collapse/gap_median": {s: 8.0 + 0.05 * s for s in range(0, 170, 10)},
    W + "collapse/threshold": {0: 16.635532},
    # expected from step 100 on: 57.25 steps at the warning, the forecast moving after it
    W + "collapse/steps_to": {100: 57.25, 110: 50.0, 120: 41.5, 150: 6.0},
    W + "divergence/update_ratio": {s: 0.2 + 0.001 * s for s in range(0, 170, 50)},
    W + "divergence/steps_to": {50: 200.0, 100: 190.0},
    W + "attention/max_logit": {s: 10.0 * 2 ** (s / 10) for s in range(0, 140, 10)},
    W + "attention/steps_to": {110: 30.0, 120: 0.0, 130: 0.0},
}
EVENTS = [
    (0, "logits_found", "logits from the 'head' module"),
    (0, "no_update_ratio", "the update ratio is not measured under manual optimisation"),
    (50, "warn_divergence", "divergence expected at step 250 (in 200 steps, range 150–∞)"),
    (100, "warn_collapse", "collapse expected at step 158 (in 57 steps, range 40–90)"),
    (120, "warn_attention", "attention expected at step 120 (in 0 steps, range 120–120)"),
    (130, "attention", "attention: the largest attention logit is 1.2e+04 (10 steps after)"),
    (160, "collapse", "collapse: 62.5% of the samples in Softmax Collapse (60 steps after)"),
]
EXPECTED = {
    "warnings": [
        {
            "event": "divergence",
            "warned_step": 50,
            "expected_step": 250,
            "happened_step": None,
            "lead": None,
        },
        {
            "event": "collapse",
            "warned_step": 100,
            "expected_step": 158,  # ⌈100 + 57.25⌉
            "happened_step": 160,
            "lead": 60,
        },
        {
            "event": "attention",
            "warned_step": 120,
            "expected_step": 120,  # the fit already past the threshold: 0 steps to go
            "happened_step": 130,
            "lead": 10,
        },
    ],
    "happened": {"collapse": 160, "attention": 130},
}


def test_each_warning_its_expected_step_and_when_its_event_came(tmp_path):
    assert summarise(write(tmp_path, SCALARS, EVENTS)) == {"warning": EXPECTED}


def test_every_instability_the_monitor_forecasts_is_read(tmp_path):
    events = [(10 * i, f"warn_{e}", "coming") for i, e in enumerate(INSTABILITIES, 1)]
    events += [(100 + 10 * i, e, "came") for i, e in enumerate(INSTABILITIES, 1)]
    got = summarise(write(tmp_path, {}, events))["warning"]
    assert [(w["event"], w["happened_step"]) for w in got["warnings"]] == [
        (e, 100 + 10 * i) for i, e in enumerate(INSTABILITIES, 1)
    ]
    assert list(got["happened"]) == list(INSTABILITIES)


def test_warnings_are_in_step_order_and_a_repeated_warning_waits_for_the_same_event(tmp_path):
    # collapse warned at 20, cleared, warned again at 60 and happened at 90; divergence
    # happened at 70 without a warning; attention warned at the same step as collapse's first
    events = [
        (60, "warn_collapse", "again"),
        (20, "warn_attention", "a"),
        (20, "warn_collapse", "first"),
        (70, "divergence", "no warning came"),
        (90, "collapse", "it came"),
    ]
    scalars = {
        W + "collapse/steps_to": {20: 100.0, 30: 80.0, 60: 29.5},
        W + "attention/steps_to": {20: 0.5},
    }
    got = summarise(write(tmp_path, scalars, events))["warning"]
    rows = [tuple(w.values()) for w in got["warnings"]]
    assert rows == [
        ("collapse", 20, 120, 90, 70),
        ("attention", 20, 21, None, None),
        ("collapse", 60, 90, 90, 30),
        ("divergence", None, None, 70, None),  # the event no warning named has its own row
    ]
    assert got["happened"] == {"collapse": 90, "divergence": 70}


def test_events_that_came_unwarned_are_rows_of_their_own_in_the_table(tmp_path):
    # the run of the report's issue: three events, no warning at all
    events = [(430, "collapse", "c"), (50, "divergence", "d"), (150, "attention", "a")]
    directory = write(tmp_path, {W + "collapse/gap_median": {0: 3.0}}, events)
    got = summarise(directory)["warning"]
    assert [(w["event"], w["warned_step"], w["happened_step"]) for w in got["warnings"]] == [
        ("divergence", None, 50),
        ("attention", None, 150),
        ("collapse", None, 430),
    ]
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(build_report([directory]))
    table = out.getvalue()
    for event, step in (("divergence", "50"), ("attention", "150"), ("collapse", "430")):
        (line,) = [row for row in table.splitlines() if event in row and "not warned" in row]
        assert step in line


def test_a_warning_without_steps_to_at_its_step_has_no_expected_step(tmp_path):
    scalars = {W + "collapse/steps_to": {10: 40.0, 30: 20.0}}  # nothing at the warning's step
    got = summarise(write(tmp_path, scalars, [(20, "warn_collapse", "m")]))["warning"]
    assert got["warnings"] == [
        {
            "event": "collapse",
            "warned_step": 20,
            "expected_step": None,
            "happened_step": None,
            "lead": None,
        }
    ]


def test_an_event_before_its_warning_gives_a_negative_lead(tmp_path):
    events = [(40, "attention", "came first"), (50, "warn_attention", "late")]
    got = summarise(write(tmp_path, {W + "attention/steps_to": {50: 0.0}}, events))["warning"]
    assert [(w["happened_step"], w["lead"]) for w in got["warnings"]] == [(40, -10)]


def test_without_warning_data_nothing_with_signals_only_an_empty_list(tmp_path):
    other = write(tmp_path / "other", {"train_loss": {0: 1.0}, "dynlens/collapse/x": {0: 1.0}})
    assert "warning" not in summarise(other)
    signals = write(tmp_path / "signals", {W + "collapse/gap_median": {0: 3.0, 10: 3.1}})
    assert summarise(signals)["warning"] == {"warnings": [], "happened": {}}
    # under another prefix the same files hold no warning data
    assert "warning" not in summarise(signals, prefix="mine")
    # texts without a reason, or other reasons, are no warnings
    texts = write(
        tmp_path / "texts",
        {},
        [(5, "logits_found", "warn_collapse expected at step 9")],
    )
    assert summarise(texts)["warning"] == {"warnings": [], "happened": {}}


def test_the_json_carries_the_list_of_warnings(tmp_path):
    write(tmp_path / "run", SCALARS, EVENTS)
    data = json.loads(json.dumps(build_report([tmp_path]).to_json(), allow_nan=False))
    (run,) = data["runs"]
    assert run["families"] == {"warning": EXPECTED}
    assert list(run["families"]["warning"]["warnings"][0]) == [
        "event",
        "warned_step",
        "expected_step",
        "happened_step",
        "lead",
    ]


def test_the_table_has_a_row_per_warning_and_only_for_runs_with_warning_data(tmp_path):
    write(tmp_path / "warned", SCALARS, EVENTS)
    write(tmp_path / "quiet", {W + "collapse/gap_median": {0: 3.0}})
    write(tmp_path / "plain", {"train_loss": {0: 1.0}})
    out = Console(file=io.StringIO(), width=120)
    out.print(build_report([tmp_path]))
    text = out.file.getvalue()
    assert "Warnings" in text
    table = text[text.index("Warnings") :].splitlines()
    assert table[1].split() == [
        "run",
        "event",
        "warned",
        "at",
        "expected",
        "happened",
        "at",
        "lead",
    ]
    assert [line.split() for line in table[3:] if line.strip()] == [
        ["quiet", "—", "—", "—", "—", "—"],
        ["warned", "divergence", "50", "250", "—", "—"],
        ["warned", "collapse", "100", "158", "160", "60"],
        ["warned", "attention", "120", "120", "130", "10"],
    ]
    # a report of runs without warning data has no Warnings table
    out = Console(file=io.StringIO(), width=120)
    out.print(build_report([tmp_path / "plain"]))
    assert "Warnings" not in out.file.getvalue()


def test_rewording_every_message_leaves_the_json_unchanged(tmp_path):
    def report(directory: Path) -> dict:
        data = build_report([directory]).to_json()
        (run,) = data["runs"]
        return {k: v for k, v in run.items() if k != "path"}

    write(tmp_path / "written" / "run", SCALARS, EVENTS)
    # the same reasons at the same steps, worded apart, misleadingly so
    reworded = [(s, r, f"collapse expected at step {s + 999} (in 999 steps)") for s, r, _ in EVENTS]
    write(tmp_path / "reworded" / "run", SCALARS, reworded)
    assert report(tmp_path / "reworded") == report(tmp_path / "written")
    assert report(tmp_path / "written")["families"] == {"warning": EXPECTED}
