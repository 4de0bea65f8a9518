"""Rich tables against a fixed-width console's text; plain text when not on a terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from torch.utils.tensorboard import SummaryWriter

from dynlens.report import build_report


def console(width: int = 120, **kwargs) -> Console:
    return Console(file=io.StringIO(), width=width, **kwargs)


def rows(text: str, first: str) -> list[str]:
    return [line.split() for line in text.splitlines() if line.startswith(first)]


def test_overview_then_one_table_per_family_then_problems(monitored_run, tmp_path):
    logdir, monitors, recorder = monitored_run
    writer = SummaryWriter(str(tmp_path / "plain"))
    writer.add_scalar("train_loss", 1.0, 0)
    writer.close()
    out = console()
    report = build_report([logdir, tmp_path / "plain", tmp_path / "missing"])
    out.print(report)
    text = out.file.getvalue()
    assert out.is_terminal is False and "\x1b[" not in text  # plain text, no escape codes
    titles = [
        "dynlens report: 2 runs",
        "Grokking (detect_grokking on the logged accuracies)",
        "Softmax Collapse",
        "Curvature (ratios to the stability thresholds; 1 = at the threshold)",
        "Logit growth (Wortsman et al. 2023)",
        "Continual evaluation (ContinualMetrics replayed on the logged accuracies)",
        "1 problem",
    ]
    positions = [text.index(t) for t in titles]
    assert positions == sorted(positions)
    name = f"{logdir.name}/run"
    overview, grokking, collapse, hessian, logits, continual = rows(text, name)
    points = sum(len(p) for p in recorder.logged.values())
    assert overview[1:] == [
        "0–29",
        str(len(recorder.logged)),
        str(points),
        *["grokking,", "collapse,", "hessian,", "logits,", "continual"],
    ]
    assert hessian[1] == str(monitors["hessian"].num_measurements)
    peak_attention = max(v for _, v in recorder.logged["dynlens/logits/attn_max"])
    assert float(logits[1]) == pytest.approx(peak_attention, rel=1e-4) and logits[2] == "attn"
    assert continual[1:5] == [
        "2",
        *(
            f"{100 * monitors['continual'].metrics.summary()[k]:.1f}%"
            for k in ("acc", "min_acc", "wc_acc")
        ),
    ]
    assert rows(text, "plain") == [["plain", "0–0", "1", "1", "none"]]
    g = monitors["grokking"].report
    assert grokking == [
        name,
        str(g.memorized_step),
        str(g.generalized_step),
        str(g.delay),
        g.kind,
        str(g.transition_steps),
        "100.0%",
        "100.0%",
    ]
    c = monitors["collapse"]
    sc = recorder.logged["dynlens/collapse/sc_fraction"]
    peak_step = max(sc, key=lambda point: point[1])[0]
    assert collapse[:4] == [
        name,
        str(c.onset_step),
        f"{100 * c.peak_sc_fraction:.1f}%",
        str(peak_step),
    ]
    assert collapse[-2:] == ["float32", f"{c.latest['nlm_cosine']:.2f}"]
    assert f"• {tmp_path / 'missing'}: no such file or directory" in text


def test_narrow_console_keeps_every_line_within_its_width(monitored_run):
    out = console(width=80)
    out.print(build_report([monitored_run[0]]))
    assert max(len(line) for line in out.file.getvalue().splitlines()) <= 80


def test_progress_bar_only_on_a_terminal(monitored_run):
    logdir = monitored_run[0]
    plain = console()
    build_report([logdir], console=plain)
    assert plain.file.getvalue() == ""  # nothing drawn into a pipe or file
    terminal = console(force_terminal=True)
    build_report([logdir], console=terminal)
    assert "reading runs" in terminal.file.getvalue()


def test_nothing_readable_says_so(tmp_path):
    (tmp_path / "events.out.tfevents.1.host").write_bytes(b"")
    out = console()
    report = build_report([tmp_path])
    out.print(report)
    text = out.file.getvalue()
    assert not report.readable
    assert "nothing could be read from the paths given" in text
    assert f"{tmp_path / 'events.out.tfevents.1.host'}: empty event file" in text
