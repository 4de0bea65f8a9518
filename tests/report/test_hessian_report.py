"""The report of HessianMonitor(blocks=..., density=True): histograms read back, the per-block
shares and the top eigenvalues summarised, rendered and plotted, against a real written run."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
from matplotlib.figure import Figure
from rich.console import Console
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.util import tensor_util
from torch.utils.tensorboard import SummaryWriter

from dynlens.callbacks.hessian import HessianMonitor
from dynlens.report import build_report
from dynlens.report.eventfile import read_event_file
from dynlens.report.family import Context, Options
from dynlens.report.plots import DRAWERS, plot_report
from dynlens.report.reader import read_run
from tests.callbacks.test_hessian_monitor import fit
from tests.report.test_reader import record

KEY = "dynlens/hessian/"


def f32(x: float) -> float:
    return float(np.float32(x))


@pytest.fixture(scope="module")
def spectrum_run(tmp_path_factory):
    """A short real run of HessianMonitor with per-layer traces and the density."""
    logdir = tmp_path_factory.mktemp("spectrum") / "run"
    monitor = HessianMonitor(
        every_n_steps=3,
        num_probes=8,
        max_iter=10,
        blocks="layer",
        density=True,
        density_iter=12,
        density_top_k=4,
        verbose=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(logdir, monitor, max_steps=7)
    return logdir, monitor


def test_the_reader_reads_the_spectrum_histograms_as_written(spectrum_run):
    logdir, monitor = spectrum_run
    run = read_run(logdir)
    events = run.histograms[KEY + "spectrum"]
    assert [e.step for e in events] == [0, 3, 6] == [int(h["step"]) for h in monitor.history]
    last = events[-1]
    # read in the proto's float64: the buckets exactly as the monitor built them
    assert last.counts.tolist() == monitor.last_spectrum["counts"]
    assert last.rights.tolist() == monitor.last_spectrum["edges"][1:]
    assert last.lefts.tolist() == monitor.last_spectrum["edges"][:-1]
    assert last.total == pytest.approx(21, rel=1e-12)


def test_blocks_and_spectrum_are_summarised_as_logged(spectrum_run):
    logdir, monitor = spectrum_run
    (run,) = build_report([logdir]).runs
    blocks = run.families["hessian_blocks"]
    assert blocks["step"] == 6
    last = monitor.latest
    expected = sorted(
        (
            {"block": b, "trace": f32(last[f"trace/{b}"]), "share": f32(last[f"trace_share/{b}"])}
            for b in ("net.0", "net.2")
        ),
        key=lambda b: -b["share"],
    )
    assert blocks["blocks"] == expected
    spectrum = run.families["hessian_spectrum"]
    first, final = monitor.history[0], monitor.history[-1]
    assert spectrum == {
        "measurements": 3,
        "histograms": 3,
        "first_step": 0,
        "last_step": 6,
        "first_top_eigenvalues": [f32(first[f"spectrum_top/{i}"]) for i in range(1, 5)],
        "final_top_eigenvalues": [f32(final[f"spectrum_top/{i}"]) for i in range(1, 5)],
    }


def test_blocks_and_spectrum_tables_on_a_fixed_width_console(spectrum_run):
    logdir, monitor = spectrum_run
    out = Console(file=io.StringIO(), width=120)
    out.print(build_report([logdir]))
    text = out.file.getvalue()
    assert "Curvature per block (last step)" in text
    assert "Hessian spectrum (top eigenvalues)" in text
    rows = [line.split() for line in text.splitlines() if line.startswith("run ")]
    by_block = {r[1]: r[2:] for r in rows if len(r) == 4 and r[1].startswith("net.")}
    last = monitor.latest
    for block in ("net.0", "net.2"):
        trace, share = by_block[block]
        assert trace == f"{f32(last[f'trace/{block}']):.4g}"
        assert share == f"{100 * f32(last[f'trace_share/{block}']):.1f}%"
    # the blocks' rows are largest share first
    order = [r[1] for r in rows if len(r) == 4 and r[1].startswith("net.")]
    assert order == sorted(by_block, key=lambda b: -last[f"trace_share/{b}"])
    (spectrum,) = [line for line in text.splitlines() if line.startswith("run ") and ", …" in line]
    top = [f"{f32(monitor.history[-1][f'spectrum_top/{i}']):.3g}" for i in (1, 2, 3)]
    assert spectrum.rstrip().endswith(", ".join(top) + ", …")


def test_the_spectrum_figure_draws_the_first_and_last_densities(spectrum_run, tmp_path):
    logdir, monitor = spectrum_run
    report = build_report([logdir])
    fig = Figure()
    DRAWERS["hessian_spectrum"](
        fig, Context(report.data[0], Options()), report.runs[0].families["hessian_spectrum"]
    )
    (ax,) = fig.axes
    curves = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [c.get_label() for c in curves] == ["step 0", "step 6"]
    for curve in curves:
        x, y = curve.get_xdata(), curve.get_ydata()
        assert np.trapezoid(y, x) == pytest.approx(1.0, abs=1e-3)  # a density: integrates to 1
    # the dotted marks sit at each step's largest Ritz value, the logged λ_1
    marks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    for mark, h in zip(marks, (monitor.history[0], monitor.history[-1]), strict=True):
        assert mark == pytest.approx(h["spectrum_top/1"], rel=1e-5)
    assert ax.get_yscale() == "log"
    written = plot_report(report, tmp_path / "fig")
    assert sorted(p.name for p in written) == ["run_hessian.png", "run_hessian_spectrum.png"]


def test_histograms_in_both_encodings_and_a_restart(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    # add_histogram's outermost limit is DBL_MAX: empty end buckets dropped, edges min and max
    writer.add_histogram(
        "h", np.array([1.0, 2.0, 2.0, 4.0]), 0, bins=np.array([0.0, 1.5, 3.0, 5.0])
    )
    writer.add_histogram_raw("h", 0.0, 2.0, 3, 4.0, 6.0, [1.0, 2.0], [1.0, 2.0], global_step=5)
    writer.add_histogram_raw("h", 0.0, 1.0, 1, 1.0, 1.0, [1.0], [1.0], global_step=3)  # resumed
    writer.close()
    run = read_run(tmp_path)
    first, resumed = run.histograms["h"]
    assert (first.step, resumed.step) == (0, 3)  # step 5 was written before the resume to 3
    assert first.counts.tolist() == [1.0, 2.0, 1.0] and first.total == 4.0
    assert first.lefts.tolist() == [1.0, 1.5, 3.0] and first.rights.tolist() == [1.5, 3.0, 4.0]
    assert resumed.lefts.tolist() == [0.0] and resumed.rights.tolist() == [1.0]
    # the histograms plugin's tensor encoding: (k, 3) rows of left, right, count
    value = summary_pb2.Summary.Value(
        tag="t",
        tensor=tensor_util.make_tensor_proto(np.array([[0.0, 1.0, 2.0], [1.0, 3.0, 5.0]])),
    )
    value.metadata.plugin_data.plugin_name = "histograms"
    event = event_pb2.Event(step=7, summary=summary_pb2.Summary(value=[value]))
    path = tmp_path / "other" / "events.out.tfevents.1.x"
    path.parent.mkdir()
    path.write_bytes(record(event.SerializeToString()))
    histograms: dict = {}
    read_event_file(path, {}, {}, {}, histograms)
    (tensor,) = histograms["t"]
    assert tensor.step == 7 and tensor.counts.tolist() == [2.0, 5.0]
    assert tensor.lefts.tolist() == [0.0, 1.0] and tensor.rights.tolist() == [1.0, 3.0]
