"""Read one TensorBoard event file: its TFRecord framing checked, its events parsed, every point.

An event file is a sequence of TFRecords, each framing one serialized ``tensorboard.Event``
protobuf::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

(little-endian; ``masked(c) = ((c >> 15) | (c << 17)) + 0xA282EAD8`` mod 2³², CRC-32C the
Castagnoli polynomial). This module walks the framing, checks **both** checksums of every
record, and parses the records with TensorBoard's own ``event_pb2.Event`` — protobuf parsing
only: nothing in a file is executed or unpickled. Assembling the files of a run into series is
:mod:`dynlens.report.reader`'s part.

Why not ``EventAccumulator`` (or ``EventFileLoader``)? Three reasons:

* **Every point.** ``EventAccumulator`` down-samples by default (reservoir sampling, 1,000 scalars
  per tag) unless given ``size_guidance``; this reader keeps every point.
* **Errors are reported.** TensorBoard's loaders stop silently at a corrupt or truncated record
  (they log at debug level and return what they have); this reader names the file, the byte
  offset and what was wrong, and goes on where it safely can.
* **Speed.** Without TensorFlow installed, TensorBoard checks CRCs in a pure-Python byte loop,
  which dominates reading. Here the CRCs of all records of a file are computed together with numpy
  (one vectorised table lookup per byte *position*, across all records at once), so a file costs
  one Python-level step per record: the protobuf parse.

Scalars are accepted in both encodings TensorBoard knows: ``simple_value`` (what
``torch.utils.tensorboard`` and Lightning's ``TensorBoardLogger`` write) and a rank-0 tensor with
the ``scalars`` plugin's metadata (TensorFlow 2 style). Text events (``add_text``, tag
``<tag>/text_summary``) are kept as strings. TensorBoard stores scalars as float32, so values read
back are the logged floats rounded to float32.

Histograms are kept too (:class:`Histogram`: buckets as left edge, right edge and count), in both
encodings: a ``histo`` ``HistogramProto`` (what ``torch.utils.tensorboard``'s ``add_histogram``
and ``add_histogram_raw`` write, read in its float64) and a ``(k, 3)`` tensor with the
``histograms`` plugin's metadata. A ``HistogramProto``'s empty buckets at either end are dropped
and its outer edges set to its ``min`` and ``max``, as TensorBoard converts it for display. They
are rare records, so reading them costs next to nothing beside the scalars.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf.message import DecodeError
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

__all__ = ["FileReport", "Histogram", "masked_crc32c", "read_event_file"]

_HEADER = 12  # uint64 length + uint32 CRC of the length
_FOOTER = 4  # uint32 CRC of the data
_MASK_DELTA = 0xA282EAD8
_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def _crc32c_table() -> np.ndarray:
    # Reflected CRC-32C (Castagnoli), polynomial 0x82F63B78: the byte-wise lookup table.
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_TABLE = _crc32c_table()


def _mask(crc: np.ndarray) -> np.ndarray:
    crc = crc.astype(np.uint64)
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    return ((rotated + _MASK_DELTA) & 0xFFFFFFFF).astype(np.uint32)


def _masked_crcs(buffer: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Masked CRC-32C of ``buffer[starts[i] : starts[i] + lengths[i]]`` for every ``i`` at once.

    CRC-32C is a byte-serial recurrence ``c ← T[(c ⊕ b) & 0xFF] ⊕ (c >> 8)``, so one record cannot
    be vectorised, but many can: records are sorted by length (longest first) and byte position
    ``j`` of every record still longer than ``j`` is folded in with one numpy gather. The cost is
    about (longest length) numpy operations per file instead of one Python step per byte.
    """
    count = len(starts)
    if count == 0:
        return np.zeros(0, dtype=np.uint32)
    order = np.argsort(-lengths, kind="stable")
    sorted_starts = starts[order].astype(np.int64)
    sorted_lengths = lengths[order]
    # active[j] = how many records are longer than j (a prefix, as lengths are sorted).
    active = np.searchsorted(-sorted_lengths, -np.arange(int(sorted_lengths[0])), side="left")
    crc = np.full(count, 0xFFFFFFFF, dtype=np.uint32)
    for j, k in enumerate(active.tolist()):
        head = crc[:k]
        head[:] = _TABLE[(head ^ buffer[sorted_starts[:k] + j]) & 0xFF] ^ (head >> 8)
    result = np.empty(count, dtype=np.uint32)
    result[order] = _mask(crc ^ np.uint32(0xFFFFFFFF))
    return result


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C that frames TFRecords (as TensorFlow's ``crc32c::Mask``).

    The CRC-32C of ``b"123456789"`` is the standard check value 0xE3069283; masked:

    >>> hex(masked_crc32c(b"123456789"))
    '0xc78ab0e5'
    >>> hex(masked_crc32c(b""))  # CRC 0, rotated 0, plus the mask delta
    '0xa282ead8'
    """
    buffer = np.frombuffer(data, dtype=np.uint8)
    return int(_masked_crcs(buffer, np.zeros(1, np.int64), np.array([len(data)], np.int64))[0])


@dataclass
class Histogram:
    """One histogram event: bucket i holds ``counts[i]`` over (``lefts[i]``, ``rights[i]``]."""

    step: int
    lefts: np.ndarray
    rights: np.ndarray
    counts: np.ndarray

    @property
    def total(self) -> float:
        return float(self.counts.sum())


@dataclass
class FileReport:
    """What reading one event file found: records read and anything wrong, with its offset."""

    path: Path
    records: int = 0
    problems: list[str] = field(default_factory=list)


def _frame(data: bytes, path: Path, report: FileReport) -> tuple[np.ndarray, np.ndarray]:
    """Walk the record framing; return the data offsets and lengths of the records whose two
    checksums are right. Problems are appended to ``report``."""
    size = len(data)
    offsets: list[int] = []
    lengths: list[int] = []
    unpack = _LENGTH.unpack_from
    pos = 0
    framing_lost = False
    while pos + _HEADER <= size:
        (length,) = unpack(data, pos)
        end = pos + _HEADER + length + _FOOTER
        if end > size:
            # A record running past the end: truncated, unless its length is itself corrupt.
            (stored,) = _CRC.unpack_from(data, pos + 8)
            framing_lost = masked_crc32c(data[pos : pos + 8]) != stored
            break
        offsets.append(pos)
        lengths.append(length)
        pos = end
    headers = np.asarray(offsets, dtype=np.int64)
    lengths_arr = np.asarray(lengths, dtype=np.int64)
    buffer = np.frombuffer(data, dtype=np.uint8)

    # Header checks: a wrong length CRC means the framing itself can no longer be trusted, so
    # reading stops there (as TensorFlow's reader does).
    if len(headers):
        header_crcs = _masked_crcs(buffer, headers, np.full(len(headers), 8, dtype=np.int64))
        stored_header = _gather_u32(buffer, headers + 8)
        bad = np.flatnonzero(header_crcs != stored_header)
        if bad.size:
            first = int(bad[0])
            report.problems.append(
                f"{path}: record {first} (byte {int(headers[first])}) has a corrupt length "
                f"(failed its CRC check); the {len(headers) - first} records from there on "
                "are not read"
            )
            headers, lengths_arr = headers[:first], lengths_arr[:first]
            pos = -1  # framing lost: the tail is reported above, not as truncation
    if framing_lost and pos >= 0:
        report.problems.append(
            f"{path}: record {len(headers)} (byte {pos}) has a corrupt length (failed its CRC "
            f"check); the {size - pos} bytes from there on are not read"
        )
    elif 0 <= pos < size:
        what = "an incomplete record" if pos + _HEADER <= size else "a partial record header"
        report.problems.append(
            f"{path}: ends with {what} at byte {pos} ({size - pos} bytes; the file is truncated, "
            "or a writer is still writing it)"
        )

    # Data checks: the framing is intact, so a record with bad data is skipped and reading goes on.
    starts = headers + _HEADER
    if len(starts):
        data_crcs = _masked_crcs(buffer, starts, lengths_arr)
        stored_data = _gather_u32(buffer, starts + lengths_arr)
        bad = np.flatnonzero(data_crcs != stored_data)
        if bad.size:
            where = ", ".join(f"byte {int(headers[i])}" for i in bad[:3])
            more = f" and {bad.size - 3} more" if bad.size > 3 else ""
            report.problems.append(
                f"{path}: {bad.size} record(s) failed their data CRC check and were skipped "
                f"({where}{more})"
            )
            keep = np.ones(len(starts), dtype=bool)
            keep[bad] = False
            starts, lengths_arr = starts[keep], lengths_arr[keep]
    return starts, lengths_arr


def _gather_u32(buffer: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Little-endian uint32 at each offset (offsets need not be aligned)."""
    b = [buffer[offsets + i].astype(np.uint32) for i in range(4)]
    return b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)


_SIMPLE = "simple_value"
_TENSOR = "tensor"
_HISTO = "histo"
_TEXT_SUFFIX = "/text_summary"


def read_event_file(
    path: str | os.PathLike[str],
    scalars: dict[str, tuple[list[int], list[float]]],
    texts: dict[str, list[tuple[int, str]]],
    plugins: dict[str, str],
    histograms: dict[str, list[Histogram]] | None = None,
) -> FileReport:
    """Append the scalar points and text events of one event file to ``scalars`` and ``texts``
    (and its histograms to ``histograms``, when given).

    ``scalars`` maps a tag to ``(steps, values)`` lists in file order; ``plugins`` remembers the
    plugin of tags whose metadata came in an earlier event (TensorFlow 2 writers send it once per
    tag). Returns what was read and any problem found; never raises for bad content (only
    ``OSError`` when the file cannot be opened).
    """
    path = Path(path)
    report = FileReport(path)
    data = path.read_bytes()
    if not data:
        report.problems.append(f"{path}: empty event file (nothing was ever written to it)")
        return report
    starts, lengths = _frame(data, path, report)
    parse = event_pb2.Event.FromString
    undecodable = 0
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        try:
            event = parse(data[start : start + length])
        except DecodeError:
            undecodable += 1
            continue
        report.records += 1
        if not event.HasField("summary"):
            continue
        step = event.step
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            tag = value.tag
            if kind == _SIMPLE:
                points = scalars.get(tag)
                if points is None:
                    points = scalars[tag] = ([], [])
                points[0].append(step)
                points[1].append(value.simple_value)
            elif kind == _TENSOR:
                _read_tensor(value, step, scalars, texts, plugins, histograms)
            elif kind == _HISTO and histograms is not None:
                histograms.setdefault(tag, []).append(_from_proto(step, value.histo))
    if undecodable:
        report.problems.append(
            f"{path}: {undecodable} record(s) are not TensorBoard events (protobuf decode "
            "failed) and were skipped"
        )
    if report.records == 0 and not report.problems:
        report.problems.append(f"{path}: no events in the file")
    return report


def _read_tensor(
    value: event_pb2.summary_pb2.Summary.Value,
    step: int,
    scalars: dict[str, tuple[list[int], list[float]]],
    texts: dict[str, list[tuple[int, str]]],
    plugins: dict[str, str],
    histograms: dict[str, list[Histogram]] | None = None,
) -> None:
    tag = value.tag
    if value.HasField("metadata") and value.metadata.plugin_data.plugin_name:
        plugins[tag] = value.metadata.plugin_data.plugin_name
    plugin = plugins.get(tag)
    if plugin == "scalars":
        array = tensor_util.make_ndarray(value.tensor)
        if array.size == 1 and array.dtype.kind == "f":
            points = scalars.setdefault(tag, ([], []))
            points[0].append(step)
            points[1].append(float(array.reshape(())))
    elif plugin == "histograms" and histograms is not None:
        array = tensor_util.make_ndarray(value.tensor)
        if array.ndim == 2 and array.shape[1] == 3:
            b = array.astype(np.float64)
            histograms.setdefault(tag, []).append(Histogram(step, b[:, 0], b[:, 1], b[:, 2]))
    elif plugin == "text":
        strings = value.tensor.string_val
        if strings:
            name = tag[: -len(_TEXT_SUFFIX)] if tag.endswith(_TEXT_SUFFIX) else tag
            text = b"\n".join(strings).decode("utf-8", errors="replace")
            texts.setdefault(name, []).append((step, text))


def _from_proto(step: int, histo: event_pb2.summary_pb2.HistogramProto) -> Histogram:
    """A ``HistogramProto`` as TensorBoard shows it: empty end buckets dropped, the outer edges
    its ``min`` and ``max`` (bucket i is (limit[i−1], limit[i]]; a writer may put ±DBL_MAX
    outermost)."""
    counts = np.asarray(histo.bucket, dtype=np.float64)
    limits = np.asarray(histo.bucket_limit, dtype=np.float64)
    full = np.flatnonzero(counts > 0)
    if not full.size or len(limits) != len(counts):
        empty = np.zeros(0)
        return Histogram(step, empty, empty, empty)
    start, end = int(full[0]), int(full[-1])
    inner = limits[start:end]
    return Histogram(
        step,
        np.concatenate([[histo.min], inner]),
        np.concatenate([inner, [histo.max]]),
        counts[start : end + 1],
    )
