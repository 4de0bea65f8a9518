import math

import pytest
import torch
from torch import nn

import dynlens
import dynlens.callbacks.collapse_counts
from dynlens import ConfigurationError, PerpGrad, SoftmaxCollapseMonitor
from dynlens.collapse import collapse_threshold, softmax_collapse_fraction
from tests.helpers import lightning, one_batch_loader, scalars, tb_logger, texts, trainer


def conformance_monitor(eval_set):
    """A small SoftmaxCollapseMonitor for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return SoftmaxCollapseMonitor(
        every_n_steps=1, logits_module="head", per_layer=True, verbose=False
    )


F32 = collapse_threshold(torch.float32)


def scripted_logits(make_logits, targets=None, loss_fn=None, lr=0.01, package="pytorch_lightning"):
    """A module whose training_step returns {"loss", "logits"} with logits = make_logits(step)."""
    pl = lightning(package)

    class Scripted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
            self.loss_fn = loss_fn

        def training_step(self, batch, batch_idx):
            logits = make_logits(self.global_step)
            loss = (self.w**2).sum()
            if self.loss_fn is not None:
                loss = loss + 0 * self.loss_fn(logits, targets)
            return {"loss": loss, "logits": logits}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    return Scripted()


def fit(module, callbacks, tmp_path=None, max_steps=3, batch=None, **kwargs):
    logger = tb_logger(tmp_path) if tmp_path is not None else False
    t = trainer(max_steps=max_steps, logger=logger, callbacks=callbacks, **kwargs)
    loader = batch if batch is not None else one_batch_loader()
    t.fit(module, loader)
    return t


FIXED = torch.tensor([[17.0, 0.0], [16.0, 0.0], [40.0, 0.0], [1.0, 0.0]])
FIXED_TARGETS = torch.tensor([0, 0, 1, 0])


def batch_with(targets, n=4):
    data = torch.utils.data.TensorDataset(torch.randn(n, 2), targets)
    return torch.utils.data.DataLoader(data, batch_size=n)


def test_logged_values_equal_hand_computed_ones(tmp_path):
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    fit(scripted_logits(lambda s: FIXED), [monitor], tmp_path, batch=batch_with(FIXED_TARGETS))
    logged = scalars(tmp_path)
    # float32: gaps 17 and 40 collapse, 16 and 1 do not
    assert logged["dynlens/collapse/sc_fraction"] == [(0, 0.5), (1, 0.5), (2, 0.5)]
    # loss exactly 0 only where collapsed *and* the target is the top class: row 0
    assert [v for _, v in logged["dynlens/collapse/zero_loss_fraction"]] == [0.25] * 3
    # gaps [17, 16, 40, 1]: lower median 16, worst 40
    assert logged["dynlens/collapse/headroom_median"][0][1] == pytest.approx(F32 - 16, abs=1e-5)
    assert logged["dynlens/collapse/headroom_min"][0][1] == pytest.approx(F32 - 40, abs=1e-5)
    assert logged["dynlens/collapse/threshold"][0][1] == pytest.approx(math.log(2 / 2**-23))
    # the loss on a collapsed, correctly classified row really is 0
    assert torch.nn.functional.cross_entropy(FIXED[:1], FIXED_TARGETS[:1]).item() == 0.0


def test_dtype_argument_changes_the_threshold(tmp_path):
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, dtype=torch.float64, verbose=False)
    fit(scripted_logits(lambda s: FIXED), [monitor], tmp_path, max_steps=1)
    logged = scalars(tmp_path)
    assert logged["dynlens/collapse/sc_fraction"] == [(0, 0.25)]  # only the gap of 40 (≥ 37)
    assert logged["dynlens/collapse/threshold"][0][1] == pytest.approx(36.7368, abs=1e-4)
    assert "dynlens/collapse/zero_loss_fraction" not in logged  # the batch has no targets
    events = texts(tmp_path, "dynlens/collapse/events")
    assert events == [
        (0, "`precision` · step 0: measuring softmax collapse in float64 (threshold 36.74)")
    ]


def test_activation_and_dtype_follow_a_dynlens_loss(tmp_path):
    loss_fn = dynlens.CrossEntropyLoss(activation="stablemax")
    module = scripted_logits(lambda s: FIXED, FIXED_TARGETS, loss_fn=loss_fn)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    fit(module, [monitor], tmp_path, max_steps=1, batch=batch_with(FIXED_TARGETS))
    logged = scalars(tmp_path)
    assert logged["dynlens/collapse/sc_fraction"] == [(0, 0.0)]  # StableMax does not collapse
    events = {e["reason"]: e["message"] for e in monitor.events}
    assert "stablemax" in events["precision"]
    # the scripted loss is not the logits' cross-entropy: the labels, one per sample, are read
    assert "the only alignment their shape allows" in events["targets"]


def test_onset_event_and_stablemax_remedy(tmp_path, capsys):
    loss_fn = dynlens.CrossEntropyLoss()
    targets = torch.zeros(4, dtype=torch.long)
    # every row's gap grows by 5 a step: collapsed from step 4 (gap 20 ≥ 17) in float32
    module = scripted_logits(lambda s: torch.tensor([[5.0 * s, 0.0]] * 4), targets, loss_fn=loss_fn)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, remedy="stablemax")
    fit(module, [monitor], tmp_path, max_steps=7, batch=batch_with(targets))
    logged = dict(scalars(tmp_path)["dynlens/collapse/sc_fraction"])
    assert [logged[s] for s in range(4)] == [0.0] * 4
    assert logged[4] == 1.0  # onset, measured with softmax
    assert logged[5] == logged[6] == 0.0  # StableMax from the next step on
    assert monitor.onset_step == 4 and loss_fn.activation == "stablemax"
    reasons = [(e["step"], e["reason"]) for e in monitor.events]
    assert (4, "onset") in reasons and (4, "remedy") in reasons
    assert "Softmax Collapse onset" in capsys.readouterr().out


def test_remedy_is_reapplied_on_resume(tmp_path):
    loss_fn = dynlens.CrossEntropyLoss()
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, remedy="float64", verbose=False)
    targets = torch.zeros(4, dtype=torch.long)
    module = scripted_logits(lambda s: torch.tensor([[40.0, 0.0]] * 4), targets, loss_fn=loss_fn)
    t = fit(module, [monitor], max_steps=2, batch=batch_with(targets))
    assert loss_fn.dtype == torch.float64
    t.save_checkpoint(tmp_path / "c.ckpt")

    fresh_loss = dynlens.CrossEntropyLoss()
    module2 = scripted_logits(
        lambda s: torch.tensor([[40.0, 0.0]] * 4), targets, loss_fn=fresh_loss
    )
    resumed = SoftmaxCollapseMonitor(every_n_steps=1, remedy="float64", verbose=False)
    t2 = trainer(max_steps=3, logger=False, callbacks=[resumed])
    t2.fit(module2, batch_with(targets), ckpt_path=tmp_path / "c.ckpt")
    assert resumed.onset_step == 0 and resumed.remedy_applied
    assert fresh_loss.dtype == torch.float64


def test_remedy_without_a_dynlens_loss_fails_at_setup():
    with pytest.raises(ConfigurationError, match=r"dynlens.CrossEntropyLoss\(\)"):
        fit(
            scripted_logits(lambda s: FIXED),
            [SoftmaxCollapseMonitor(every_n_steps=1, remedy="stablemax")],
        )


def test_missing_logits_error_shows_both_options():
    pl = lightning()

    class NoLogits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def training_step(self, batch, batch_idx):
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ConfigurationError) as info:
        fit(NoLogits(), [SoftmaxCollapseMonitor(every_n_steps=1)])
    assert "'logits': logits.detach()" in str(info.value)
    assert "logits_module='head'" in str(info.value)


def test_unknown_logits_module_lists_the_modules():
    with pytest.raises(ConfigurationError, match="no such submodule"):
        fit(
            scripted_logits(lambda s: FIXED),
            [SoftmaxCollapseMonitor(every_n_steps=1, logits_module="head")],
        )


class Classifier(lightning().LightningModule):
    """A real model whose head's output is the logits; it keeps what it computed."""

    def __init__(self, scale=30.0):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(2, 8)
        self.head = nn.Linear(8, 3)
        self.scale = scale
        self.seen = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.head(torch.tanh(self.body(x))) * self.scale
        self.seen.append((logits.detach().clone(), y))
        return nn.functional.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx):
        x, _ = batch
        self.head(self.body(x)) * 1000  # must not be measured

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def classification_loader(n=64, batch_size=64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def test_hooked_module_matches_brute_force_on_a_real_model(tmp_path):
    model = Classifier(scale=60.0)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, logits_module="head", verbose=False)
    t = trainer(max_steps=4, logger=tb_logger(tmp_path), callbacks=[monitor])
    t.fit(model, classification_loader(), classification_loader())
    logged = scalars(tmp_path)
    # the hook saw the head's output before the scaling: recompute from the module's own record
    expected = [
        softmax_collapse_fraction(logits / model.scale)
        for logits, _ in model.seen[: len(model.seen)]
    ]
    assert [v for _, v in logged["dynlens/collapse/sc_fraction"]] == pytest.approx(expected)
    assert [s for s, _ in logged["dynlens/collapse/sc_fraction"]] == [0, 1, 2, 3]


def test_outputs_path_matches_brute_force_and_skips_validation(tmp_path):
    pl = lightning()

    class Returning(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            logits = self.head(torch.tanh(self.body(x))) * self.scale
            self.seen.append((logits.detach().clone(), y))
            return {"loss": nn.functional.cross_entropy(logits, y), "logits": logits.detach()}

    model = Returning(scale=25.0)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    t = trainer(
        max_steps=6, logger=tb_logger(tmp_path), callbacks=[monitor], check_val_every_n_epoch=1
    )
    t.fit(model, classification_loader(), classification_loader())
    logged = scalars(tmp_path)
    assert [v for _, v in logged["dynlens/collapse/sc_fraction"]] == pytest.approx(
        [softmax_collapse_fraction(lg) for lg, _ in model.seen]
    )
    zero = [
        (nn.functional.cross_entropy(lg, y, reduction="none") == 0).float().mean().item()
        for lg, y in model.seen
    ]
    assert [v for _, v in logged["dynlens/collapse/zero_loss_fraction"]] == pytest.approx(zero)
    assert pl is not None


def test_every_n_steps_and_gradient_accumulation(tmp_path):
    model = Classifier(scale=40.0)
    monitor = SoftmaxCollapseMonitor(logits_module="head", every_n_steps=2, verbose=False)
    t = trainer(
        max_steps=4, logger=tb_logger(tmp_path), callbacks=[monitor], accumulate_grad_batches=2
    )
    t.fit(model, classification_loader(n=64, batch_size=16))
    logged = scalars(tmp_path)["dynlens/collapse/sc_fraction"]
    assert [s for s, _ in logged] == [0, 2]
    # each logged value pools both micro-batches of its optimizer step
    seen = [lg / model.scale for lg, _ in model.seen]
    pooled = [torch.cat(seen[0:2]), torch.cat(seen[4:6])]
    assert [v for _, v in logged] == pytest.approx([softmax_collapse_fraction(p) for p in pooled])


class SequenceModel(Classifier):
    """Logits of shape (B, T, C), its loss a dynlens.CrossEntropyLoss on them flattened to rows,
    as a language model computes it."""

    def __init__(self, scale):
        super().__init__(scale=scale)
        self.loss_fn = dynlens.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = (self.head(torch.tanh(self.body(x))) * self.scale).view(-1, 4, 3)
        self.seen.append((logits.detach().clone(), y.view(-1, 4)))
        return {"loss": self.loss_fn(logits.flatten(0, 1), y), "logits": logits.detach()}


def sequence_targets(batch):
    return batch[1].view(-1, 4)


def test_reads_the_log_probs_of_a_dynlens_loss_and_pools_micro_batches(tmp_path, monkeypatch):
    import dynlens.callbacks.collapse as module

    given = []
    measure = module.collapse_indicators

    def spy(*args, log_probs=None, **kwargs):
        given.append(log_probs is not None)
        return measure(*args, log_probs=log_probs, **kwargs)

    monkeypatch.setattr(module, "collapse_indicators", spy)

    def run(logdir):
        model = SequenceModel(scale=30.0)
        monitor = SoftmaxCollapseMonitor(every_n_steps=1, targets=sequence_targets, verbose=False)
        t = trainer(
            max_steps=4,
            logger=tb_logger(logdir),
            callbacks=[monitor],
            accumulate_grad_batches=2,
            log_every_n_steps=2,
        )
        t.fit(model, classification_loader(n=256, batch_size=32))
        assert not model.loss_fn._log_probs_hooks  # the loss is left as it was
        return model, scalars(logdir)

    model, logged = run(tmp_path / "a")
    assert given == [True] * 8  # every micro-batch's log-probabilities came from the loss
    # logged at steps 1 and 3, each pooling two optimizer steps of two micro-batches each
    assert [s for s, _ in logged["dynlens/collapse/sc_fraction"]] == [1, 3]
    pooled = [model.seen[0:4], model.seen[4:8]]
    expected_sc = [softmax_collapse_fraction(torch.cat([lg for lg, _ in p])) for p in pooled]
    expected_zero = [
        torch.cat(
            [
                nn.functional.cross_entropy(lg.flatten(0, 1), y.flatten(), reduction="none")
                for lg, y in p
            ]
        )
        .eq(0)
        .float()
        .mean()
        .item()
        for p in pooled
    ]
    assert 0 < expected_sc[0] < 1
    assert [v for _, v in logged["dynlens/collapse/sc_fraction"]] == pytest.approx(expected_sc)
    assert [v for _, v in logged["dynlens/collapse/zero_loss_fraction"]] == pytest.approx(
        expected_zero
    )
    # counting the indicators every step (a memory bound reached at once) changes nothing
    monkeypatch.setattr(dynlens.callbacks.collapse_counts, "PENDING_SAMPLES", 1)
    _, recounted = run(tmp_path / "b")
    for key in ("sc_fraction", "zero_loss_fraction"):
        assert recounted[f"dynlens/collapse/{key}"] == logged[f"dynlens/collapse/{key}"]


@pytest.mark.parametrize("which", ["none", "others", "float64"])
def test_the_losss_measurement_serves_only_for_the_same_targets_and_precision(tmp_path, which):
    def shifted(batch):  # targets of the monitor's own, not the loss's
        return (batch[1].view(-1, 4) + 1) % 3

    targets = {"none": None, "others": shifted, "float64": sequence_targets}[which]
    dtype = torch.float64 if which == "float64" else "auto"
    model = SequenceModel(scale=200.0)  # collapse in float32 and float64 alike
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, targets=targets, dtype=dtype, verbose=False)
    t = trainer(max_steps=2, logger=tb_logger(tmp_path), callbacks=[monitor])
    t.fit(model, classification_loader(n=64, batch_size=64))
    logged = scalars(tmp_path)
    measure_in = torch.float64 if which == "float64" else torch.float32
    expected = [softmax_collapse_fraction(lg, dtype=measure_in) for lg, _ in model.seen]
    assert 0 < expected[0] < 1
    assert [v for _, v in logged["dynlens/collapse/sc_fraction"]] == pytest.approx(expected)
    if which == "none":
        assert "dynlens/collapse/zero_loss_fraction" not in logged
    else:
        pick = shifted if which == "others" else sequence_targets
        zero = []
        for lg, y in model.seen:
            picked = pick((None, y.flatten())).flatten()
            per_sample = nn.functional.cross_entropy(
                lg.flatten(0, 1).to(measure_in), picked, reduction="none"
            )
            zero.append((per_sample == 0).float().mean().item())
        assert zero[0] > 0
        assert [v for _, v in logged["dynlens/collapse/zero_loss_fraction"]] == pytest.approx(zero)


def test_a_measurement_failing_inside_the_loss_never_breaks_the_training_step(
    tmp_path, monkeypatch
):
    import dynlens.callbacks.collapse as module

    measure = module.collapse_indicators

    def fails_on_the_losss(*args, log_probs=None, **kwargs):
        if log_probs is not None:
            raise RuntimeError("inside the loss")
        return measure(*args, **kwargs)

    monkeypatch.setattr(module, "collapse_indicators", fails_on_the_losss)
    model = SequenceModel(scale=200.0)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, targets=sequence_targets, verbose=False)
    t = trainer(max_steps=2, logger=tb_logger(tmp_path), callbacks=[monitor])
    t.fit(model, classification_loader(n=64, batch_size=64))
    assert t.global_step == 2 and monitor.disabled_reason is None
    expected = [softmax_collapse_fraction(lg) for lg, _ in model.seen]
    logged = scalars(tmp_path)["dynlens/collapse/sc_fraction"]
    assert [v for _, v in logged] == pytest.approx(expected)  # measured from the logits instead


def test_reading_the_losss_log_probs_has_no_observer_effect():
    def train(with_monitor):
        model = SequenceModel(scale=20.0)
        monitor = SoftmaxCollapseMonitor(every_n_steps=2, targets=sequence_targets, verbose=False)
        t = trainer(max_steps=5, logger=False, callbacks=[monitor] if with_monitor else [])
        t.fit(model, classification_loader(batch_size=16))
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False), strict=True))


def test_a_monitor_that_fails_mid_step_leaves_no_hook_behind(monkeypatch):
    import dynlens.callbacks.collapse as module

    def broken(*args, **kwargs):
        raise RuntimeError("no gradient rule")

    monkeypatch.setattr(module, "nlm_cosines", broken)  # between the step's start and its end
    model = SequenceModel(scale=20.0)
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, targets=sequence_targets, verbose=False)
    left = []

    class Probe(lightning().Callback):  # runs after the monitor's hooks
        def on_train_batch_end(self, trainer, pl_module, *args):
            left.append((len(pl_module.loss_fn._log_probs_hooks), monitor.capture._armed))

    t = trainer(max_steps=3, logger=False, callbacks=[monitor, Probe()])
    with pytest.warns(RuntimeWarning, match="disabled itself"):
        t.fit(model, classification_loader(batch_size=16))
    assert t.global_step == 3 and monitor.disabled_reason is not None
    assert left == [(0, False)] * 3  # nothing keeps recording while training goes on


def test_nlm_cosine_against_hand_computation(tmp_path):
    pl = lightning()
    c = torch.tensor([3.0, 1.0])

    class Linear(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0]))
            self.v = nn.Parameter(torch.tensor([-1.0]))

        def training_step(self, batch, batch_idx):
            loss = -(self.w * c).sum() + 2 * self.v.sum()  # ∇w = -c, ∇v = 2
            return {"loss": loss, "logits": torch.zeros(1, 2)}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # parameters stay put

    monitor = SoftmaxCollapseMonitor(every_n_steps=1, per_layer=True, verbose=False)
    fit(Linear(), [monitor], tmp_path, max_steps=2)
    logged = scalars(tmp_path)
    w, v = torch.tensor([1.0, 2.0]), torch.tensor([-1.0])
    descent = torch.cat([c, torch.tensor([-2.0])])
    theta = torch.cat([w, v])
    expected = (descent @ theta / (descent.norm() * theta.norm())).item()
    assert logged["dynlens/collapse/nlm_cosine"][0][1] == pytest.approx(expected)
    assert logged["dynlens/collapse/nlm_cosine/w"][0][1] == pytest.approx(
        (c @ w / (c.norm() * w.norm())).item()
    )
    assert logged["dynlens/collapse/nlm_cosine/v"][0][1] == pytest.approx(1.0)  # -2 along -1


def test_no_observer_effect_on_weights():
    def train(with_monitor):
        model = Classifier(scale=20.0)
        callbacks = [
            SoftmaxCollapseMonitor(
                every_n_steps=1, logits_module="head", per_layer=True, verbose=False
            )
        ]
        t = trainer(max_steps=5, logger=False, callbacks=callbacks if with_monitor else [])
        t.fit(model, classification_loader(batch_size=16))
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(train(True), train(False), strict=True))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"activation": "relu"}, "activation"),
        ({"dtype": torch.int32}, "dtype"),
        ({"onset_threshold": 1.5}, "onset_threshold"),
        ({"remedy": "bf16"}, "remedy"),
        ({"targets": 3}, "targets"),
        ({"logits_module": ""}, "logits_module"),
        ({"every_n_steps": 0}, "every_n_steps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        SoftmaxCollapseMonitor(**kwargs)


def test_state_round_trip():
    m = SoftmaxCollapseMonitor(every_n_steps=1)
    m.onset_step, m.remedy_applied = 12, True
    other = SoftmaxCollapseMonitor(every_n_steps=1)
    other.load_state_dict(m.state_dict())
    assert (other.onset_step, other.remedy_applied) == (12, True)
    other.load_state_dict({})
    assert (other.onset_step, other.remedy_applied) == (None, False)


def test_perpgrad_projects_every_step():
    pl = lightning()
    checks = []

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            for p in pl_module.parameters():
                cos = (p.grad.flatten() @ p.detach().flatten()) / (p.grad.norm() * p.norm())
                checks.append(abs(cos.item()))

    model = Classifier(scale=5.0)
    t = trainer(max_steps=3, logger=False, callbacks=[PerpGrad(), Check()])
    t.fit(model, classification_loader())
    assert len(checks) == 3 * 4 and max(checks) < 1e-5


def test_perpgrad_changes_training_like_orthograd():
    def run(callbacks):
        model = Classifier(scale=5.0)
        t = trainer(max_steps=3, logger=False, callbacks=callbacks)
        t.fit(model, classification_loader())
        return [p.detach().clone() for p in model.parameters()]

    def manual():
        model = Classifier(scale=5.0)
        opt = dynlens.OrthoGrad(model.parameters(), torch.optim.SGD, lr=0.5)
        for _ in range(3):
            x, y = next(iter(classification_loader()))
            opt.zero_grad()
            model.training_step((x, y), 0).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    with_perp = run([PerpGrad()])
    assert not all(torch.equal(a, b) for a, b in zip(with_perp, run([]), strict=True))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(with_perp, manual(), strict=True))


def _step_logits(step):
    # step s: 4 samples, the first s of them collapsed (gaps 20) and the others not (gap 1 + s)
    gaps = torch.tensor([20.0 if i < step else 1.0 + step for i in range(4)])
    return torch.stack([gaps, torch.zeros(4)], dim=-1)


def test_measured_steps_are_pooled_and_logged_at_lightnings_logging_steps(tmp_path):
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, onset_threshold=0.4, verbose=False)
    targets = torch.tensor([0, 1, 0, 0])
    fit(
        scripted_logits(_step_logits),
        [monitor],
        tmp_path,
        max_steps=6,
        batch=batch_with(targets),
        log_every_n_steps=4,
    )
    logged = scalars(tmp_path)
    # logged at the end of the logging interval (step 3) and at the last step (5); the shares
    # pool every measured step since the last log: steps 0-3 hold 0+1+2+3 of 16 collapsed
    assert logged["dynlens/collapse/sc_fraction"] == [(3, 6 / 16), (5, (4 + 4) / 8)]
    # zero loss: collapsed with target 0 (sample 1 has target 1): steps 0-3 give 0+1+1+2
    assert logged["dynlens/collapse/zero_loss_fraction"] == [(3, 4 / 16), (5, 6 / 8)]
    # headroom is read at the logged step itself: step 3's gaps are [20, 20, 20, 4]
    assert logged["dynlens/collapse/headroom_min"] == [
        (3, pytest.approx(F32 - 20, abs=1e-5)),
        (5, pytest.approx(F32 - 20, abs=1e-5)),
    ]
    assert logged["dynlens/collapse/headroom_median"][0] == (3, pytest.approx(F32 - 20, abs=1e-5))
    # the onset is the first *step* above the threshold (step 2: 2 of 4), not the logged one
    assert monitor.onset_step == 2
    assert (
        2,
        "`onset` · step 2: Softmax Collapse onset: 50.0% of samples collapsed (> 40%)",
    ) in texts(tmp_path, "dynlens/collapse/events")
    assert monitor.peak_sc_fraction == 1.0
    assert [s for s, _ in logged["dynlens/collapse/nlm_cosine"]] == [3, 5]


def test_a_run_stopped_early_logs_its_pending_steps(tmp_path):
    monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
    fit(
        scripted_logits(_step_logits),
        [monitor],
        tmp_path,
        max_steps=-1,
        max_epochs=3,
        log_every_n_steps=50,
    )
    logged = scalars(tmp_path)  # three one-batch epochs, no max_steps: logged at train end
    assert logged["dynlens/collapse/sc_fraction"] == [(2, 3 / 12)]
    assert "dynlens/collapse/headroom_min" not in logged  # read only at logging steps


def test_resume_inside_a_logging_interval_logs_what_the_uninterrupted_run_logs(tmp_path):
    pl = lightning()

    def run(max_steps, ckpt_path=None, every=None):
        monitor = SoftmaxCollapseMonitor(every_n_steps=1, verbose=False)
        callbacks = [monitor]
        if every:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1
                )
            )
        t = trainer(
            max_steps=max_steps,
            logger=tb_logger(tmp_path / f"run{max_steps}{ckpt_path is not None}"),
            callbacks=callbacks,
            log_every_n_steps=4,
            enable_checkpointing=bool(every),
        )
        t.fit(scripted_logits(_step_logits), one_batch_loader(), ckpt_path=ckpt_path)
        return scalars(tmp_path / f"run{max_steps}{ckpt_path is not None}")

    whole = run(8)
    run(2, every=2)  # stops after step 1, inside the first logging interval (steps 0-3)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = run(8, ckpt_path=str(ckpt))
    assert resumed["dynlens/collapse/sc_fraction"] == whole["dynlens/collapse/sc_fraction"]
    assert [s for s, _ in whole["dynlens/collapse/sc_fraction"]] == [3, 7]
