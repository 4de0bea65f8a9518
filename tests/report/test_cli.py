"""``dynlens report``: exit status, the JSON schema, the figures, and plain text in a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dynlens.report
from dynlens.cli import main
from dynlens.report.registry import FAMILIES


def f32(x: float) -> float:
    return float(np.float32(x))


def test_json_has_the_documented_schema_and_the_callbacks_values(monitored_run, tmp_path):
    logdir, monitors, _ = monitored_run
    out = tmp_path / "out" / "summary.json"
    assert main(["report", str(logdir), str(tmp_path / "missing"), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data) == ["schema", "version", "options", "runs", "problems"]
    assert (data["schema"], data["version"]) == ("dynlens.report", 1)
    assert data["options"] == {
        "prefix": "dynlens",
        "threshold": 0.99,
        "grokking_delay": 1000,
        "onset_threshold": 0.5,
    }
    assert data["problems"] == [f"{tmp_path / 'missing'}: no such file or directory"]
    (run,) = data["runs"]
    assert list(run) == [
        "name",
        "path",
        "files",
        "tags",
        "points",
        "first_step",
        "last_step",
        "families",
        "notes",
    ]
    assert (run["name"], run["files"], run["first_step"], run["last_step"]) == ("run", 1, 0, 29)
    assert run["notes"] == []
    for name, values in run["families"].items():
        assert tuple(values) == FAMILIES[name].fields
    # the values are the ones the callbacks computed live
    g, c = monitors["grokking"], monitors["collapse"]
    grokking, collapse = run["families"]["grokking"], run["families"]["collapse"]
    assert {k: grokking[k] for k in ("memorized_step", "generalized_step", "delay", "kind")} == {
        "memorized_step": g.report.memorized_step,
        "generalized_step": g.report.generalized_step,
        "delay": g.report.delay,
        "kind": g.report.kind,
    }
    assert grokking["evaluations"] == len(g.steps)
    assert collapse["onset_step"] == c.onset_step and collapse["onset_source"] == "event"
    assert collapse["peak_sc_fraction"] == f32(c.peak_sc_fraction)
    assert collapse["final_headroom_median"] == f32(c.latest["headroom_median"])
    assert collapse["final_headroom_min"] == f32(c.latest["headroom_min"])
    h, hessian = monitors["hessian"], run["families"]["hessian"]
    assert hessian["measurements"] == h.num_measurements == len(h.history)
    assert hessian["peak_eos_ratio"] == max(f32(m["eos_ratio"]) for m in h.history)
    assert hessian["final_eos_ratio"] == f32(h.latest["eos_ratio"])
    assert hessian["final_precond_ratio"] == f32(h.latest["precond_ratio"])
    share = sum(f32(m["trace_ratio"]) >= 1 for m in h.history) / len(h.history)
    assert hessian["share_trace_ratio_at_least_1"] == share
    live, continual = monitors["continual"].metrics.summary(), run["families"]["continual"]
    assert continual["tasks"] == [0, 1]
    for key in ("acc", "min_acc", "wc_acc"):
        assert continual[key] == pytest.approx(live[key], abs=1e-6), key
    assert continual["per_task"]["0"]["gap"] == pytest.approx(live["gap"][0], abs=1e-6)
    assert continual["per_task"]["0"]["recovery"] == pytest.approx(live["recovery"][0], abs=1e-6)
    assert continual["wf"] == pytest.approx({str(w): v for w, v in live["wf"].items()}, abs=1e-6)


def test_schema_fields_are_documented_in_the_module_docstring():
    doc = dynlens.report.__doc__
    assert "version 1" in doc
    for fam in FAMILIES.values():
        assert f"``{fam.name}``" in doc
        for field in fam.fields:
            assert f"``{field}``" in doc, (fam.name, field)


def test_non_finite_values_are_null_in_json(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("dynlens/collapse/sc_fraction", float("nan"), 0)
    writer.close()
    out = tmp_path / "s.json"
    assert main(["report", str(tmp_path / "run"), "--json", str(out)]) == 0
    text = out.read_text()
    assert "NaN" not in text
    (run,) = json.loads(text)["runs"]
    assert run["families"]["collapse"]["peak_sc_fraction"] is None
    assert "non-finite" in run["notes"][0]


def test_exit_status_is_non_zero_only_when_nothing_could_be_read(tmp_path, monitored_run, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero").mkdir()
    (tmp_path / "zero" / "events.out.tfevents.1.host").write_bytes(b"")
    assert main(["report", str(tmp_path / "empty"), str(tmp_path / "zero")]) == 1
    out = capsys.readouterr().out
    assert "nothing could be read" in out and str(tmp_path / "empty") in out
    assert main(["report", str(tmp_path / "empty"), str(monitored_run[0])]) == 0


def test_plot_writes_the_figures_of_the_families_present(monitored_run, tmp_path):
    assert main(["report", str(monitored_run[0]), "--plot", str(tmp_path / "fig")]) == 0
    written = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert written == [
        "run_collapse.png",
        "run_continual.png",
        "run_grokking.png",
        "run_hessian.png",
    ]
    for name in written:
        assert (tmp_path / "fig" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install_it(
    monitored_run, tmp_path, monkeypatch, capsys
):
    for module in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code = main(["report", str(monitored_run[0]), "--plot", str(tmp_path / "fig")])
    assert code == 1
    out = capsys.readouterr().out
    assert 'pip install "dynlens[plot]"' in out
    assert "dynlens report" not in out  # said before reading anything
    assert not (tmp_path / "fig").exists()


def test_unwritable_json_path_is_an_error_message(monitored_run, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["report", str(monitored_run[0]), "--json", str(tmp_path / "file" / "s.json")]) == 1
    assert "error:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--threshold", "1.5"], ["--grokking-delay", "-1"]])
def test_bad_options_are_refused(monitored_run, argv, capsys):
    assert main(["report", str(monitored_run[0]), *argv]) == 2
    assert "error:" in capsys.readouterr().out


def test_command_line_in_a_pipe_prints_plain_tables_wide_enough_for_every_cell(monitored_run):
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run(
        [sys.executable, "-m", "dynlens", "report", str(monitored_run[0])],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout and "…" not in done.stdout
    assert "dynlens report: 1 run" in done.stdout
    assert "comprehension" in done.stdout and "float32" in done.stdout
