"""Events by reason (DESIGN.md, monitor contract 11): the report reads the reason each event
carries in its TensorBoard text, never the English wording."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.tensorboard import SummaryWriter

import dynlens
from dynlens.events import (
    REASON_PATTERN,
    REASONS,
    CollapseReason,
    WarningReason,
    format_event,
    parse_event,
)
from dynlens.report import build_report
from dynlens.report.family import Context
from dynlens.report.reader import read_run
from tests.report.lightning_run import MONITORS, CollapsingClassifier, train, train_acc_at

reasons = st.from_regex(rf"\A{REASON_PATTERN}\Z", fullmatch=True)


@given(reason=reasons, text=st.text())
def test_format_then_parse_gives_back_the_reason_and_the_text(reason, text):
    assert parse_event(format_event(reason, text)) == (reason, text)


def test_the_text_is_one_markdown_line_led_by_the_reason_in_backticks():
    text = format_event("onset", "step 120: Softmax Collapse onset: 62.5% of samples collapsed")
    assert text == "`onset` · step 120: Softmax Collapse onset: 62.5% of samples collapsed"


@pytest.mark.parametrize(
    "text",
    [
        "step 10: Softmax Collapse onset: 40.0% of samples collapsed (> 30%)",  # before reasons
        "",
        "`onset` without the separator",
        "`two words` · a reason has no spaces",
        "step 3: `onset` · not the first token",
    ],
)
def test_a_text_without_a_leading_reason_is_legacy_and_kept_whole(text):
    assert parse_event(text) == (None, text)


@pytest.mark.parametrize("reason", ["", "two words", "back`tick", "line\nbreak", None])
def test_a_malformed_reason_is_refused_with_what_a_reason_may_be(reason):
    with pytest.raises(ValueError, match=r"letters, digits, '_', '\.' or '-'"):
        format_event(reason, "message")


class LossModuleClassifier(CollapsingClassifier):
    """:class:`CollapsingClassifier` with its loss through ``dynlens.CrossEntropyLoss``, so that
    ``SoftmaxCollapseMonitor(remedy=...)`` has a loss to switch (and logs its remedy event)."""

    def __init__(self) -> None:
        super().__init__()
        self.loss_fn = dynlens.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        scale = 1.0 + 20.0 * max(0, self.global_step - 11)
        logits = self(x) * scale
        self.attn(self.layer.weight * scale)
        self.log("train_acc", train_acc_at(self.global_step), batch_size=len(x))
        return {"loss": self.loss_fn(logits, y), "logits": logits.detach()}


def monitors() -> list[dynlens.Monitor]:
    made = [factory() for _, factory in MONITORS]
    return [
        dynlens.SoftmaxCollapseMonitor(every_n_steps=2, remedy="float64", verbose=False)
        if m.name == "collapse"
        else m
        for m in made
    ]


def report_json(logdir) -> dict:
    data = build_report([logdir]).to_json()
    for run in data["runs"]:
        run["path"] = "<run>"
    return data


def test_rewording_every_event_message_leaves_the_report_unchanged(tmp_path, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written, _, _ = train(tmp_path / "a", monitors=monitors(), module=LossModuleClassifier)
        expected = report_json(tmp_path / "a")

        # patched at write time: every event of the second run says the same thing
        log_event = dynlens.Monitor.log_event

        def reword(self, trainer, step, reason, message, **options):
            return log_event(self, trainer, step, reason, "something else happened here", **options)

        monkeypatch.setattr(dynlens.Monitor, "log_event", reword)
        rewritten, _, run_dir = train(
            tmp_path / "b", monitors=monitors(), module=LossModuleClassifier
        )
        got = report_json(tmp_path / "b")

    # the same events at the same steps, the report relying on some of them, only worded apart
    def events(ms):
        return [(m.name, e["step"], e["reason"]) for m in ms for e in m.events]

    assert events(rewritten) == events(written)
    assert {CollapseReason.ONSET, CollapseReason.REMEDY} <= {r for _, _, r in events(written)}
    assert {e["message"] for m in rewritten for e in m.events} == {"something else happened here"}
    for tag, texts in read_run(run_dir).texts.items():
        for _, text in texts:
            assert parse_event(text)[0] is not None and "something else" in text, tag

    collapse = expected["runs"][0]["families"]["collapse"]
    assert collapse["onset_source"] == "event" and collapse["remedy_step"] is not None
    assert got == expected


def test_the_report_asks_only_for_reasons_of_the_monitors_enums(
    monitored_run, tmp_path, monkeypatch
):
    # every reason a family reads is a member of its monitor's enum in dynlens.events: the one
    # definition the callbacks write with
    writer = SummaryWriter(str(tmp_path / "warning"))  # the monitored run has no warning data
    writer.add_scalar("dynlens/warning/collapse/gap_median", 3.0, 0)
    writer.close()
    asked = []
    event_steps = Context.event_steps

    def record(self, family, reason):
        asked.append((family, reason))
        return event_steps(self, family, reason)

    monkeypatch.setattr(Context, "event_steps", record)
    logdir, _, _ = monitored_run
    build_report([logdir, tmp_path])
    assert {("collapse", CollapseReason.ONSET), ("warning", WarningReason.WARN_COLLAPSE)} <= set(
        asked
    )
    for family, reason in asked:
        assert isinstance(reason, REASONS[family]), (family, reason)
