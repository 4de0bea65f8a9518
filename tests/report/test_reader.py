"""The event-file reader: every point, TensorBoard's own parsing, and bad input named, not fatal."""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as reference_crc
from torch.utils.tensorboard import SummaryWriter

from dynlens.events import join_events
from dynlens.report.eventfile import masked_crc32c
from dynlens.report.reader import find_runs, read_run


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=300))
def test_crc_matches_tensorboards_reference(data):
    assert masked_crc32c(data) == reference_crc(data)


def write_scalars(directory: Path, points: dict[str, list[tuple[int, float]]]) -> None:
    writer = SummaryWriter(str(directory))
    for tag, series in points.items():
        for step, value in series:
            writer.add_scalar(tag, value, step)
    writer.close()


def event_file(directory: Path) -> Path:
    (path,) = sorted(directory.glob("events.out.tfevents.*"))
    return path


def record(data: bytes) -> bytes:
    """One TFRecord framing ``data``."""
    length = struct.pack("<Q", len(data))
    return (
        length
        + struct.pack("<I", reference_crc(length))
        + data
        + struct.pack("<I", reference_crc(data))
    )


def scalar_event(tag: str, step: int, value: float) -> bytes:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=value)])
    return event_pb2.Event(step=step, wall_time=1.0, summary=summary).SerializeToString()


def test_reads_every_point_exactly_as_tensorboard_does(tmp_path):
    # 1,500 points per tag: more than EventAccumulator keeps by default (1,000), so a
    # down-sampling reader would fail; values must equal TensorBoard's own, float32 and all.
    rng = np.random.default_rng(0)
    points = {
        f"dynlens/x/{name}": [(s, float(rng.normal())) for s in range(0, 3000, 2)]
        for name in ("a", "b", "c")
    }
    write_scalars(tmp_path, points)
    run = read_run(tmp_path, "r")
    ea = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    ea.Reload()
    assert sorted(run.scalars) == sorted(ea.Tags()["scalars"]) == sorted(points)
    for tag, series in run.scalars.items():
        expected = ea.Scalars(tag)
        assert series.steps.tolist() == [e.step for e in expected]
        assert series.values.tolist() == [e.value for e in expected]
        assert series.values.tolist() == [float(np.float32(v)) for _, v in points[tag]]
    assert run.notes == [] and run.readable and run.num_points == 4500


def test_reads_text_events_and_tensorflow2_style_scalars(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    writer.add_text("dynlens/collapse/events", "step 3: Softmax Collapse onset", 3)
    writer.add_scalar("new/float", 0.25, 1, new_style=True)
    writer.add_scalar("new/double", 1 / 3, 2, new_style=True, double_precision=True)
    writer.close()
    run = read_run(tmp_path)
    assert run.texts == {"dynlens/collapse/events": [(3, "step 3: Softmax Collapse onset")]}
    assert run.scalars["new/float"].values.tolist() == [0.25]
    assert run.scalars["new/double"].values.tolist() == [1 / 3]
    assert run.scalars["new/double"].steps.tolist() == [2]


def test_a_steps_events_written_together_are_read_one_by_one(tmp_path):
    # as a monitor writes them (TensorBoard shows one text per step and tag): each write of a
    # step carries its events so far; two separate records of one step (older files) stay two
    a, b, c = "`targets` · step 0: a", "`precision` · step 0: b", "`onset` · step 3: c"
    writer = SummaryWriter(str(tmp_path))
    writer.add_text("dynlens/collapse/events", a, 0)
    writer.add_text("dynlens/collapse/events", join_events([a, b]), 0)
    writer.add_text("dynlens/collapse/events", c, 3)
    writer.add_text("dynlens/collapse/events", "step 3: legacy", 3)
    writer.close()
    run = read_run(tmp_path)
    assert run.texts == {"dynlens/collapse/events": [(0, a), (0, b), (3, c), (3, "step 3: legacy")]}


def test_resumed_run_merges_files_in_order_and_later_points_win(tmp_path):
    # The first file runs to step 7; the run resumes from a checkpoint at step 5 into a second
    # file: steps 5..7 of the first file are the lost future and are replaced.
    first = b"".join(record(scalar_event("t", s, float(s))) for s in range(8))
    second = b"".join(record(scalar_event("t", s, 100.0 + s)) for s in range(5, 10))
    names = ["events.out.tfevents.1700000000.host.1.0", "events.out.tfevents.1700000500.host.2.0"]
    (tmp_path / names[1]).write_bytes(second)  # created first on disk: the name decides
    (tmp_path / names[0]).write_bytes(first)
    run = read_run(tmp_path)
    series = run.scalars["t"]
    assert series.steps.tolist() == list(range(10))
    assert series.values.tolist() == [0, 1, 2, 3, 4, 105, 106, 107, 108, 109]
    assert [f.path.name for f in run.files] == names


def test_empty_file_is_named_and_nothing_is_readable(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"")
    run = read_run(tmp_path)
    assert not run.readable
    assert run.notes == [f"{path}: empty event file (nothing was ever written to it)"]


def good_and_bad(tmp_path: Path, tail: bytes) -> Path:
    good = b"".join(record(scalar_event("t", s, 0.5)) for s in range(3))
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(good + tail)
    return path


@pytest.mark.parametrize("cut", [3, 12, 20])
def test_truncated_record_keeps_what_came_before(tmp_path, cut):
    path = good_and_bad(tmp_path, record(scalar_event("t", 3, 0.5))[:cut])
    run = read_run(tmp_path)
    assert run.scalars["t"].steps.tolist() == [0, 1, 2]
    (note,) = run.notes
    assert note.startswith(f"{path}: ends with") and "truncated" in note


def test_bad_data_crc_skips_only_that_record(tmp_path):
    records = [bytearray(record(scalar_event("t", s, 0.5))) for s in range(5)]
    records[2][-6] ^= 0xFF  # a byte of the float value: parses fine, but the CRC catches it
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(records))
    run = read_run(tmp_path)
    assert run.scalars["t"].steps.tolist() == [0, 1, 3, 4]
    (note,) = run.notes
    assert note.startswith(f"{path}: 1 record(s) failed their data CRC check and were skipped")


def test_corrupt_length_stops_reading_there(tmp_path):
    records = [bytearray(record(scalar_event("t", s, 0.5))) for s in range(4)]
    records[2][0] ^= 0x01  # the length: its CRC fails, the framing after it is lost
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(records))
    run = read_run(tmp_path)
    assert run.scalars["t"].steps.tolist() == [0, 1]
    assert any(n.startswith(f"{path}: record 2") and "corrupt length" in n for n in run.notes)


def test_corrupt_length_running_past_the_end_is_corruption_not_truncation(tmp_path):
    records = [bytearray(record(scalar_event("t", s, 0.5))) for s in range(4)]
    records[2][6] ^= 0x40  # a huge length: the record would run past the end of the file
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(records))
    run = read_run(tmp_path)
    assert run.scalars["t"].steps.tolist() == [0, 1]
    (note,) = run.notes
    assert note.startswith(
        f"{path}: record 2 (byte {len(records[0]) + len(records[1])}) has a corrupt length"
    )


def test_garbage_file_is_reported_not_raised(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    run = read_run(tmp_path)
    assert not run.readable
    assert run.notes and all(n.startswith(str(path)) for n in run.notes)


class _Trap:
    def __reduce__(self):  # unpickling this would create the file
        return (open, (str(TRAP), "w"))


TRAP = Path("/nonexistent")


def test_a_pickle_inside_an_event_file_is_never_unpickled(tmp_path):
    global TRAP
    TRAP = tmp_path / "unpickled"
    payload = pickle.dumps(_Trap())
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(record(scalar_event("t", 0, 1.0)) + record(payload))
    run = read_run(tmp_path)
    assert not TRAP.exists()
    assert run.scalars["t"].values.tolist() == [1.0]
    assert any(n.startswith(str(path)) and "not TensorBoard events" in n for n in run.notes)


def test_non_finite_values_are_named(tmp_path):
    write_scalars(tmp_path, {"t": [(0, 1.0), (1, math.nan), (2, math.inf), (3, 2.0)]})
    run = read_run(tmp_path)
    (note,) = run.notes
    assert (
        note == f"{tmp_path}: 2 non-finite value(s) in t (first at step 1); summaries ignore them"
    )
    assert run.scalars["t"].last() == 2.0


def test_find_runs_names_runs_like_tensorboard_and_reports_paths_without_runs(tmp_path):
    for name in ("a/version_0", "b", "b/nested"):
        write_scalars(tmp_path / "logs" / name, {"t": [(0, 1.0)]})
    (tmp_path / "empty").mkdir()
    runs, problems = find_runs([tmp_path / "logs"])
    assert [name for name, _ in runs] == ["a/version_0", "b", "b/nested"]
    runs, problems = find_runs([tmp_path / "logs", tmp_path / "empty", tmp_path / "missing"])
    assert [name for name, _ in runs] == ["a/version_0", "b", "b/nested"]
    assert problems == [
        f"{tmp_path / 'empty'}: no event files (events.out.tfevents.*) under this path",
        f"{tmp_path / 'missing'}: no such file or directory",
    ]
    # several paths holding runs: names start with the directory given
    runs, _ = find_runs([tmp_path / "logs" / "a", tmp_path / "logs" / "b"])
    assert [name for name, _ in runs] == ["a/version_0", "b", "b/nested"]
    runs, _ = find_runs([tmp_path / "logs" / "b", tmp_path / "logs" / "b" / "nested"])
    assert [name for name, _ in runs] == ["b", "b/nested"]  # each run once
    single = event_file(tmp_path / "logs" / "b")
    runs, problems = find_runs([single])
    assert runs == [("b", tmp_path / "logs" / "b")] and problems == []


def test_points_repeated_at_one_step_are_kept_and_per_step_keeps_the_last(tmp_path):
    # Lightning logs `epoch` from training and from validation at the same step.
    points = [(0, 0.0), (1, 1.0), (1, 2.0), (2, 3.0)]
    (tmp_path / "events.out.tfevents.1.host").write_bytes(
        b"".join(record(scalar_event("epoch", s, v)) for s, v in points)
    )
    series = read_run(tmp_path).scalars["epoch"]
    assert list(zip(series.steps.tolist(), series.values.tolist(), strict=True)) == points
    last = series.per_step()
    assert last.steps.tolist() == [0, 1, 2] and last.values.tolist() == [0.0, 2.0, 3.0]
