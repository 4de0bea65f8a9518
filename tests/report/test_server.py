"""The live panels, checked on a real TensorBoard server over HTTP.

A ``tensorboard`` subprocess (the venv's own binary, loopback only, a free port) watches an empty
log directory; a short run trains with every monitor attached; then, over TensorBoard's HTTP API,
the test checks that each monitor's custom-scalars panel is served, that every chart's tag regex
matches exactly the tags it is meant for among all the tags served (``re.match``, as the server
and its front end do), and that the served values and text events are exactly what the callbacks
computed (recorded by a logger of their own, so no value is re-derived here).

Note: ``--samples_per_plugin=scalars=0`` would serve *no* scalar in TensorBoard 2.21 (0 is passed
to the data provider as "down-sample to 0 points"), so the test asks for a large number instead.
"""

from __future__ import annotations

import html
import re
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dynlens.callbacks.layout import layout
from dynlens.report.server import TensorBoardServer
from tests.report.lightning_run import MONITORS, CollapsingClassifier, train

STARTUP_TIMEOUT = 45.0
DATA_TIMEOUT = 30.0
RUN = "run"

# Tag regexes that are patterns rather than one exact tag, with the tags each is meant to match
# in this run (``model`` is the trained module). A monitor that adds a pattern states its intent
# here; the test fails on a pattern it does not know.
PATTERNS: dict[str, Callable[[Any], set[str]]] = {
    "^dynlens/collapse/nlm_cosine/.*$": lambda model: {
        f"dynlens/collapse/nlm_cosine/{name}" for name, _ in model.named_parameters()
    },
    # two tasks, task 0 ended at step 15: per-task accuracies, gap and recovery of task 0
    r"^dynlens/continual/acc_task_\d+$": lambda model: {
        "dynlens/continual/acc_task_0",
        "dynlens/continual/acc_task_1",
    },
    r"^dynlens/continual/gap_task_\d+$": lambda model: {"dynlens/continual/gap_task_0"},
    r"^dynlens/continual/recovery_task_\d+$": lambda model: {"dynlens/continual/recovery_task_0"},
    # one attention layer, the classifier's `attn`
    "^dynlens/logits/attn_max/.*$": lambda model: {"dynlens/logits/attn_max/attn"},
    "^dynlens/logits/attn_rms/.*$": lambda model: {"dynlens/logits/attn_rms/attn"},
}


def exact_tag(regex: str) -> str | None:
    """The one tag an anchored literal regex ``^<escaped tag>$`` matches, else ``None``."""
    m = re.fullmatch(r"\^(.*)\$", regex)
    if m is None:
        return None
    literal = re.sub(r"\\(.)", r"\1", m.group(1))
    return literal if re.escape(literal) == m.group(1) else None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[TensorBoardServer, Path]]:
    logdir = tmp_path / "logs"
    logdir.mkdir()
    with TensorBoardServer(logdir, timeout=STARTUP_TIMEOUT) as tensorboard:
        yield tensorboard, logdir


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DATA_TIMEOUT
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"TensorBoard did not serve {what} within {DATA_TIMEOUT} s")


def plain(text_html: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", text_html)).strip()


def test_every_monitor_panel_is_served_with_exact_tags_values_and_events(server):
    tb, logdir = server
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        monitors, recorder, _ = train(logdir, name=RUN)  # written while the server watches
    logged = {k: v for k, v in recorder.logged.items() if k.startswith("dynlens/")}
    assert {m.name for m in monitors} == {name for name, _ in MONITORS}

    def scalars(tag: str) -> list[list[float]]:
        return tb.get("/data/plugin/scalars/scalars", run=RUN, tag=tag)

    def complete() -> bool:
        tags = tb.get("/data/plugin/scalars/tags").get(RUN, {})
        texts = tb.get("/data/plugin/text/tags").get(RUN, [])
        return (
            set(logged) <= set(tags)
            and all(len(scalars(t)) == len(points) for t, points in logged.items())
            and all(f"{m.key('events')}/text_summary" in texts for m in monitors if m.events)
            and bool(tb.get("/data/plugin/custom_scalars/layout"))
        )

    wait_until(complete, "every logged point")
    assert tb.get("/data/runs") == [RUN]
    served_tags = set(tb.get("/data/plugin/scalars/tags")[RUN])

    # 1. one panel (category) per monitor, holding exactly the monitor's charts
    served_layout = tb.get("/data/plugin/custom_scalars/layout")["category"]
    expected_layout = layout(monitors)
    assert [c["title"] for c in served_layout] == list(expected_layout)
    assert list(expected_layout) == [f"dynlens/{m.name}" for m in monitors]
    for category in served_layout:
        charts = expected_layout[category["title"]]
        assert [c["title"] for c in category["chart"]] == list(charts)
        for chart in category["chart"]:
            kind, content = charts[chart["title"]]
            if kind == "Multiline":
                assert chart["multiline"]["tag"] == content
            else:
                margin = chart["margin"]["series"]
                assert [[s["value"], s["lower"], s["upper"]] for s in margin] == [content]

    # 2. each chart's regexes match exactly the tags they are meant for, among all served tags
    model = CollapsingClassifier()
    for category in served_layout:
        for chart in category["chart"]:
            regexes = chart.get("multiline", {}).get("tag", [])
            intended: set[str] = set()
            for regex in regexes:
                tag = exact_tag(regex)
                if tag is None:
                    assert regex in PATTERNS, f"state which tags {regex!r} is meant for"
                    meant = PATTERNS[regex](model)
                else:
                    meant = {tag}
                matched = {t for t in served_tags if re.match(regex, t)}
                assert matched == meant, (category["title"], chart["title"], regex)
                intended |= meant
            for series in chart.get("margin", {}).get("series", []):
                for tag in (series["value"], series["lower"], series["upper"]):
                    intended.add(tag)
                    assert tag in served_tags, (chart["title"], tag)
            assert intended, chart["title"]

    # 3. served values are exactly the floats the callbacks logged (stored as float32)
    for tag, points in logged.items():
        served = [(int(step), value) for _, step, value in scalars(tag)]
        assert served == [(s, float(np.float32(v))) for s, v in points], tag

    # ...and agree with what the callbacks hold (the detections shown in the tables)
    by_name = {m.name: m for m in monitors}
    grokking, collapse = by_name["grokking"], by_name["collapse"]
    served_val = [(int(s), v) for _, s, v in scalars("dynlens/grokking/val_acc")]
    assert served_val == [
        (s, float(np.float32(a))) for s, a in zip(grokking.steps, grokking.val_acc, strict=True)
    ]
    (_, _, memorised), *_ = scalars("dynlens/grokking/memorized_step")
    assert memorised == grokking.report.memorized_step == 9
    sc = [(int(s), v) for _, s, v in scalars("dynlens/collapse/sc_fraction")]
    assert next(s for s, v in sc if v > 0.5) == collapse.onset_step
    assert max(v for _, v in sc) == float(np.float32(collapse.peak_sc_fraction))

    # 4. every event is served as text at its step (a monitor without events has no text tag)
    text_tags = set(tb.get("/data/plugin/text/tags")[RUN])
    for monitor in monitors:
        tag = f"{monitor.key('events')}/text_summary"
        assert (tag in text_tags) == bool(monitor.events), monitor.name
        texts = tb.get("/data/plugin/text/text", run=RUN, tag=tag) if monitor.events else []
        # one text per step (TensorBoard shows the last written): a step's events, each a
        # paragraph
        by_step: dict[int, list[str]] = {}
        for e in monitor.events:
            by_step.setdefault(e["step"], []).append(
                f"{e['reason']} · step {e['step']}: {e['message']}"
            )
        assert [(t["step"], plain(t["text"])) for t in texts] == [
            (step, "\n".join(events)) for step, events in by_step.items()
        ], monitor.name
    assert {m.name for m in monitors if m.events} >= {"grokking", "collapse", "continual"}
