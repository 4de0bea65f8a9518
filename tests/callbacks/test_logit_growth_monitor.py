import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynlens.callbacks.capture.attention as attention_module
from dynlens import ConfigurationError, LogitGrowthMonitor
from dynlens.callbacks.capture.attention import AttentionCapture
from dynlens.logits import output_logit_stats
from tests.helpers import (
    PACKAGES,
    custom_scalars_layout,
    lightning,
    one_batch_loader,
    scalars,
    tb_logger,
    texts,
    trainer,
)
from tests.test_logits import brute_force, mha_brute_force


def conformance_monitor(eval_set):
    """A small LogitGrowthMonitor for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return LogitGrowthMonitor(
        every_n_steps=1, logits_module="head", attention_every_n_steps=1, verbose=False
    )


KEY = "dynlens/logits/"


def fit(
    module, callbacks, tmp_path=None, max_steps=3, loader=None, package="pytorch_lightning", **kw
):
    logger = tb_logger(tmp_path, package) if tmp_path is not None else False
    t = trainer(package, max_steps=max_steps, logger=logger, callbacks=callbacks, **kw)
    t.fit(module, loader if loader is not None else one_batch_loader())
    return t


def values(logged, quantity):
    return [v for _, v in logged[KEY + quantity]]


def scripted(make_logits=None, make_attention=None, package="pytorch_lightning"):
    """training_step returns {"loss", "logits": make_logits(step)} and calls
    F.scaled_dot_product_attention(q, q, q) with q = make_attention(step) from the step itself."""
    pl = lightning(package)

    class Scripted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0]))

        def training_step(self, batch, batch_idx):
            loss = (self.w**2).sum()
            if make_attention is not None:
                q = make_attention(self.global_step)
                loss = loss + 0 * F.scaled_dot_product_attention(q, q, q).sum()
            out = {"loss": loss}
            if make_logits is not None:
                out["logits"] = make_logits(self.global_step)
            return out

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Scripted()


FIXED = torch.tensor([[2.0, -1.0, 0.0, 3.0], [0.5, 0.5, 0.5, 0.5], [-4.0, 1.0, 1.0, 0.0]])


@pytest.mark.parametrize("package", PACKAGES)
def test_output_statistics_equal_hand_computation(tmp_path, package):
    monitor = LogitGrowthMonitor(every_n_steps=1, attention=False, verbose=False)
    fit(scripted(lambda s: FIXED, package=package), [monitor], tmp_path, package=package)
    logged = scalars(tmp_path)
    expected = output_logit_stats(FIXED)
    logz = [math.log(sum(math.exp(v) for v in row)) for row in FIXED.tolist()]
    assert logged[KEY + "max_abs"] == [(0, 4.0), (1, 4.0), (2, 4.0)]
    assert values(logged, "rms") == pytest.approx([math.sqrt(33.0 / 12)] * 3)
    assert values(logged, "logz_mean") == pytest.approx([sum(logz) / 3] * 3)
    assert values(logged, "logz_max") == pytest.approx([max(logz)] * 3)
    assert values(logged, "spread") == pytest.approx([expected.spread] * 3)
    assert values(logged, "growth_rate") == pytest.approx([0.0, 0.0])  # from the 2nd point on
    assert not any(k.startswith(KEY + "attn") for k in logged)
    assert monitor.latest["max_abs"] == 4.0


def test_growth_rate_of_an_exponential_curve(tmp_path):
    # max |z| = 3·exp(0.02·step): 20 e-folds per 1000 steps, whatever the window
    monitor = LogitGrowthMonitor(every_n_steps=1, attention=False, window=3, verbose=False)
    module = scripted(lambda s: torch.tensor([[3.0 * math.exp(0.02 * s), 0.0]]))
    fit(module, [monitor], tmp_path, max_steps=6)
    assert scalars(tmp_path)[KEY + "growth_rate"][0][0] == 1
    assert values(scalars(tmp_path), "growth_rate") == pytest.approx([20.0] * 5, rel=1e-5)


# ------------------------------------------------------------------------ attention in a model
class GroupedAttention(nn.Module):
    """Hand-written attention through F.scaled_dot_product_attention: 4 query heads, 2 key/value
    heads (grouped), with a boolean mask or is_causal; records its q and k."""

    def __init__(self, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.q, self.kv = nn.Linear(8, 8), nn.Linear(8, 4)
        self.causal, self.dropout = causal, dropout
        self.seen = []

    def forward(self, x, mask=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 2).transpose(1, 2)
        k = self.kv(x).view(b, t, 2, 2).transpose(1, 2)
        self.seen.append((q.detach().clone(), k.detach().clone(), mask))
        y = F.scaled_dot_product_attention(
            q,
            k,
            k,
            attn_mask=mask,
            is_causal=self.causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=True,
        )
        return y.transpose(1, 2).reshape(b, t, 8)


def attention_model(package="pytorch_lightning", lr=0.0, dropout=0.0, teacher=False):
    pl = lightning(package)

    class Attending(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Linear(2, 8)
            self.masked = GroupedAttention(causal=False, dropout=dropout)
            self.causal = GroupedAttention(causal=True, dropout=dropout)
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True, dropout=dropout)
            self.head = nn.Linear(8, 3)
            self.teacher = GroupedAttention(causal=False) if teacher else None
            self.mha_seen, self.logits_seen = [], []

        def forward(self, x):
            h = self.embed(x.view(x.shape[0], 3, 2))
            mask = torch.ones(3, 3, dtype=torch.bool).triu()  # key j >= query i
            h = h + self.masked(h, mask)
            h = h + self.causal(h)
            padding = torch.zeros(h.shape[0], 3, dtype=torch.bool)
            padding[0, 2] = True
            self.mha_seen.append((h.detach().clone(), padding))
            h = h + self.mha(h, h, h, key_padding_mask=padding, need_weights=False)[0]
            logits = self.head(torch.nn.functional.dropout(h, dropout, self.training))
            self.logits_seen.append(logits.detach().clone())
            return logits

        def training_step(self, batch, batch_idx):
            x, y = batch
            if self.teacher is not None:
                with torch.no_grad():  # e.g. a frozen teacher: not measured
                    self.teacher(1000 * self.embed(x.view(x.shape[0], 3, 2)))
            logits = self(x)
            return F.cross_entropy(logits.flatten(0, 1), y.flatten())

        if teacher:  # the validation test: a validation step, not measured

            def validation_step(self, batch, batch_idx):
                x, _ = batch
                self.masked(1000 * self.embed(x.view(x.shape[0], 3, 2)))

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=lr)

    return Attending()


def token_loader(n=4, batch_size=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n, 3), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)


def expected_per_layer(model, first, last):
    """Brute-force (max, rms, count) per layer over the forward passes first..last-1, pooled."""
    pooled = {}

    def add(name, stats):
        m, rms, count = stats
        prev = pooled.get(name, (-math.inf, 0.0, 0))
        pooled[name] = (max(prev[0], m), prev[1] + rms**2 * count, prev[2] + count)

    for i in range(first, last):
        q, k, mask = model.masked.seen[i]
        add("masked", brute_force(q, k, mask, enable_gqa=True))
        q, k, _ = model.causal.seen[i]
        add("causal", brute_force(q, k, is_causal=True, enable_gqa=True))
        h, padding = model.mha_seen[i]
        add("mha", mha_brute_force(model.mha, h, h, key_padding_mask=padding))
    return {n: (m, math.sqrt(ss / c)) for n, (m, ss, c) in pooled.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_attention_per_layer_equals_brute_force(tmp_path, package):
    model = attention_model(package)  # lr 0: the MHA weights of every step are the final ones
    monitor = LogitGrowthMonitor(
        every_n_steps=1, logits_module="head", attention_every_n_steps=1, verbose=False
    )
    fit(model, [monitor], tmp_path, max_steps=3, loader=token_loader(), package=package)
    logged = scalars(tmp_path)
    assert monitor.layers == ["masked", "causal", "mha"]  # call order
    for step in range(3):
        expected = expected_per_layer(model, step, step + 1)
        for name, (max_logit, rms) in expected.items():
            assert logged[f"{KEY}attn_max/{name}"][step] == (step, pytest.approx(max_logit, 1e-5))
            assert logged[f"{KEY}attn_rms/{name}"][step][1] == pytest.approx(rms, rel=1e-5)
        overall = max(m for m, _ in expected.values())
        assert logged[KEY + "attn_max"][step][1] == pytest.approx(overall, rel=1e-5)
    # the output logits of the head, through the same capture as SoftmaxCollapseMonitor
    expected = [output_logit_stats(lg) for lg in model.logits_seen]
    assert values(logged, "max_abs") == pytest.approx([e.max_abs for e in expected])
    assert values(logged, "logz_mean") == pytest.approx([e.logz_mean for e in expected])


def test_attention_cadence_and_gradient_accumulation(tmp_path):
    model = attention_model()
    monitor = LogitGrowthMonitor(
        logits_module="head", every_n_steps=1, attention_every_n_steps=2, verbose=False
    )
    fit(
        model,
        [monitor],
        tmp_path,
        max_steps=4,
        loader=token_loader(n=16, batch_size=2),
        accumulate_grad_batches=2,
    )
    logged = scalars(tmp_path)
    assert [s for s, _ in logged[KEY + "max_abs"]] == [0, 1, 2, 3]
    assert [s for s, _ in logged[KEY + "attn_max/mha"]] == [0, 2]
    # each logged value pools both micro-batches of its optimizer step
    for (_, value), first in zip(logged[KEY + "attn_max/causal"], (0, 4), strict=True):
        assert value == pytest.approx(expected_per_layer(model, first, first + 2)["causal"][0])
    rms = logged[KEY + "attn_rms/masked"][1][1]
    assert rms == pytest.approx(expected_per_layer(model, 4, 6)["masked"][1], rel=1e-5)
    # output logits too: micro-batches 2i and 2i + 1 make optimizer step i
    pooled = [torch.cat(model.logits_seen[2 * i : 2 * i + 2]) for i in range(4)]
    assert values(logged, "spread") == pytest.approx([output_logit_stats(p).spread for p in pooled])


def test_validation_and_no_grad_attention_are_not_measured(tmp_path):
    model = attention_model(teacher=True)
    monitor = LogitGrowthMonitor(
        every_n_steps=1, attention_every_n_steps=1, output_logits=False, verbose=False
    )
    t = trainer(max_steps=3, logger=tb_logger(tmp_path), callbacks=[monitor])
    t.fit(model, token_loader(), token_loader())
    logged = scalars(tmp_path)
    assert "teacher" not in monitor.layers and len(model.teacher.seen) == 3
    # validation ran the masked layer (with inputs ×1000) after every step: its training forwards
    # are seen[0], seen[2], seen[4]
    assert len(model.masked.seen) == 6
    expected = []
    for step in range(3):
        q, k, mask = model.masked.seen[2 * step]
        masked = brute_force(q, k, mask, enable_gqa=True)[0]
        q, k, _ = model.causal.seen[step]
        causal = brute_force(q, k, is_causal=True, enable_gqa=True)[0]
        h, padding = model.mha_seen[step]
        mha = mha_brute_force(model.mha, h, h, key_padding_mask=padding)[0]
        expected.append(max(masked, causal, mha))
    got = values(logged, "attn_max")
    assert got == pytest.approx(expected, rel=1e-5)
    assert max(got) < 100


def test_no_observer_effect_with_dropout():
    """Attention with dropout (SDPA's dropout_p and MultiheadAttention's) draws from the global
    RNG: the monitor must not shift a single draw, nor touch the graph or the outputs."""

    def train(callbacks):
        torch.manual_seed(0)
        model = attention_model(lr=1e-2, dropout=0.2)
        t = trainer(max_steps=4, logger=False, callbacks=callbacks)
        t.fit(model, token_loader(n=8, batch_size=4))
        return [p.detach().clone() for p in model.parameters()], torch.get_rng_state()

    monitor = LogitGrowthMonitor(
        every_n_steps=1, logits_module="head", attention_every_n_steps=1, verbose=False
    )
    with_monitor, rng_with = train([monitor])
    assert monitor.layers == ["masked", "causal", "mha"] and monitor.disabled_reason is None
    without, rng_without = train([])
    assert all(torch.equal(a, b) for a, b in zip(with_monitor, without, strict=True))
    assert torch.equal(rng_with, rng_without)


def test_unnamed_calls_events_and_text(tmp_path, capsys):
    # an attention call in training_step itself has no module: call_0. q = a·1 in E = 4 gives
    # logits 4a²/2 = 2a²: 2, 50, 2000 (> 1e3: warning), 3e4 (> 1e4: divergence), 5e4
    maxima = [2.0, 50.0, 2000.0, 3e4, 5e4]
    attention = lambda s: torch.full((1, 1, 2, 4), math.sqrt(maxima[s] / 2))  # noqa: E731
    shift = [0.0, 5.0, 25.0, 30.0, 0.0]  # log Z = shift + log 3: past 20 from step 2
    logits = lambda s: torch.zeros(2, 3) + shift[s]  # noqa: E731
    monitor = LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1)
    fit(scripted(logits, attention), [monitor], tmp_path, max_steps=5)
    logged = scalars(tmp_path)
    assert values(logged, "attn_max/call_0") == pytest.approx(maxima)
    assert monitor.peak_attention_logit == pytest.approx(5e4)
    reasons = [(e["step"], e["reason"]) for e in monitor.events]
    assert reasons == [(2, "attention_warning"), (2, "logz_drift"), (3, "attention_divergence")]
    events = texts(tmp_path, "dynlens/logits/events")
    assert [s for s, _ in events] == [2, 2, 3]
    assert "max attention logit 2000 (layer call_0) passed 1000" in events[0][1]
    assert "divergence likely" in events[2][1]
    assert "mean log Z 26.1 drifted past ±20" in events[1][1]
    assert "logits · step 3: max attention logit 3e+04" in capsys.readouterr().out


def test_panel_charts_are_anchored(tmp_path):
    monitor = LogitGrowthMonitor(
        every_n_steps=1, logits_module="head", attention_every_n_steps=1, verbose=False
    )
    fit(attention_model(), [monitor], tmp_path, max_steps=1, loader=token_loader())
    layout = custom_scalars_layout(tmp_path)
    (category,) = [c for c in layout.category if c.title == "dynlens/logits"]
    charts = {chart.title: list(chart.multiline.tag) for chart in category.chart}
    per_layer = charts["max attention logit per layer"]
    logged = [k for k in scalars(tmp_path) if k.startswith(KEY + "attn_max")]
    layers = [f"attn_max/{name}" for name in monitor.layers]
    assert sorted(logged) == sorted(KEY + k for k in ["attn_max", *layers])
    for tag in logged:
        assert any(re.match(rx, tag) for rx in per_layer)
    for other in (KEY + "attn_rms/mha", KEY + "attn_maximal", "x" + KEY + "attn_max"):
        assert not any(re.match(rx, other) for rx in per_layer)
    assert charts["log Z = logsumexp(output logits)"] == [
        "^dynlens/logits/logz_mean$",
        "^dynlens/logits/logz_max$",
    ]
    assert "output logits" in charts and "attention logit RMS per layer" in charts


def test_state_survives_resume(tmp_path):
    module = lambda: scripted(lambda s: torch.tensor([[math.exp(0.1 * s), 0.0]] * 2))  # noqa: E731
    first = LogitGrowthMonitor(every_n_steps=1, attention=False, logz_threshold=0.5, verbose=False)
    t = fit(module(), [first], max_steps=3)
    assert [e["reason"] for e in first.events] == ["logz_drift"]
    t.save_checkpoint(tmp_path / "c.ckpt")

    resumed = LogitGrowthMonitor(
        every_n_steps=1, attention=False, logz_threshold=0.5, verbose=False
    )
    t2 = trainer(max_steps=5, logger=tb_logger(tmp_path / "tb"), callbacks=[resumed])
    t2.fit(module(), one_batch_loader(), ckpt_path=tmp_path / "c.ckpt")
    logged = scalars(tmp_path / "tb")
    # the growth-rate window came back: a rate at the first step after resuming (100 per 1000)
    assert logged[KEY + "growth_rate"] == [(3, pytest.approx(100.0)), (4, pytest.approx(100.0))]
    assert [e["reason"] for e in resumed.events] == ["logz_drift"]  # not fired a second time


def test_state_round_trip_and_tolerance():
    m = LogitGrowthMonitor(every_n_steps=1, window=3)
    m._history.extend([(0, 1.0), (5, 2.0)])
    m.events.append({"step": 5, "reason": "logz_drift", "message": "x"})
    m.peak_attention_logit = 12.5
    other = LogitGrowthMonitor(every_n_steps=1, window=3)
    other.load_state_dict(m.state_dict())
    assert list(other._history) == [(0, 1.0), (5, 2.0)] and other.peak_attention_logit == 12.5
    assert other.events == m.events
    other.load_state_dict({})
    assert list(other._history) == [] and other.peak_attention_logit is None
    assert (
        LogitGrowthMonitor(every_n_steps=1).state_key
        != LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=5).state_key
    )


def test_measurement_error_fails_soft(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no measurement today")

    monkeypatch.setattr(attention_module, "attention_logit_sums", broken)
    monitor = LogitGrowthMonitor(
        every_n_steps=1, logits_module="head", attention_every_n_steps=1, verbose=False
    )
    model = attention_model(lr=1e-2)
    with pytest.warns(RuntimeWarning, match="disabled itself.*no measurement today"):
        t = fit(model, [monitor], max_steps=3, loader=token_loader())
    assert t.global_step == 3 and "no measurement today" in monitor.disabled_reason
    # nothing is left behind: no interception mode, no global module hooks
    assert not torch._C._is_torch_function_mode_enabled()
    assert not torch.nn.modules.module._global_forward_hooks


def test_missing_logits_and_missing_attention():
    with pytest.raises(ConfigurationError, match="logits_module='head'"):
        fit(
            scripted(),
            [LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1)],
            max_steps=1,
        )
    assert not torch._C._is_torch_function_mode_enabled()  # nothing left armed
    with pytest.warns(UserWarning, match="saw no attention call"):
        fit(
            scripted(lambda s: FIXED),
            [LogitGrowthMonitor(every_n_steps=1, verbose=False)],
            max_steps=1,
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_logits": False, "attention": False}, "measures nothing"),
        ({"output_logits": False, "logits_module": "head"}, "logits_module"),
        ({"attention_every_n_steps": 0}, "attention_every_n_steps"),
        ({"window": 1}, "window"),
        ({"attention_warning": -1.0}, "attention_warning"),
        ({"attention_warning": 1e4, "attention_divergence": 1e3}, "attention_warning` <"),
        ({"logz_threshold": 0}, "logz_threshold"),
        ({"attention_chunk_elements": 0}, "attention_chunk_elements"),
        ({"attention": "yes"}, "bools"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"logits_module": ""}, "logits_module"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ConfigurationError, match=match):
        LogitGrowthMonitor(**kwargs)


# ------------------------------------------------------------------------ the capture itself
def test_multihead_attention_is_counted_once():
    """nn.MultiheadAttention with need_weights=False runs SDPA inside: one call, not two."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    capture = AttentionCapture()
    capture.attach(nn.ModuleDict({"enc": layer}))
    x = torch.randn(3, 5, 8)
    capture.arm()
    layer(x)
    assert capture.calls_seen == 1
    sums = capture.take()
    assert list(sums) == ["enc.self_attn"]
    assert sums["enc.self_attn"].count.item() == 3 * 2 * 5 * 5
    expected = mha_brute_force(layer.self_attn, x, x)
    assert sums["enc.self_attn"].max_logit.item() == pytest.approx(expected[0], rel=1e-5)
    assert not capture.armed and not torch._C._is_torch_function_mode_enabled()


def test_capture_records_nothing_when_not_armed_or_without_grad():
    capture = AttentionCapture()
    q = torch.randn(1, 2, 3, 4)
    F.scaled_dot_product_attention(q, q, q)
    capture.arm()
    with torch.no_grad():
        F.scaled_dot_product_attention(q, q, q)
    with torch.inference_mode():
        F.scaled_dot_product_attention(q, q, q)
    assert capture.take() == {} and capture.calls_seen == 0
    capture.disarm()  # disarming twice is harmless


def _growing(step):
    return torch.tensor([[2.0 + step, -1.0, 0.0], [0.5, 0.5, 0.5 * step]])


def _attention_input(step):
    return torch.full((1, 1, 2, 4), 0.5 * (step + 1))


def test_steps_are_pooled_and_logged_at_lightnings_logging_steps(tmp_path):
    monitor = LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=2, verbose=False)
    module = scripted(_growing, _attention_input)
    fit(module, [monitor], tmp_path, max_steps=7, log_every_n_steps=4)
    logged = scalars(tmp_path)
    # logged at the last step of each logging interval (3) and at the last step (6)
    assert [s for s, _ in logged[KEY + "max_abs"]] == [3, 6]
    # each log pools every measured step since the last one: the logits of steps 0-3 together
    first = output_logit_stats(torch.cat([_growing(s) for s in range(4)]))
    assert values(logged, "rms")[0] == pytest.approx(first.rms, rel=1e-6)
    assert values(logged, "max_abs")[0] == pytest.approx(first.max_abs)
    assert values(logged, "logz_mean")[0] == pytest.approx(first.logz_mean, rel=1e-6)
    assert values(logged, "spread")[0] == pytest.approx(first.spread, rel=1e-6)
    second = output_logit_stats(torch.cat([_growing(s) for s in range(4, 7)]))
    assert values(logged, "max_abs")[1] == pytest.approx(second.max_abs)
    # attention at steps 0, 2 (logged at 3) and 4, 6: q = k = c·1, so every logit is c²·4/2
    assert values(logged, "attn_max") == pytest.approx([(1.5**2) * 2, (3.5**2) * 2])
    expected_rms = math.sqrt(((0.5**2 * 2) ** 2 + (1.5**2 * 2) ** 2) / 2)
    assert values(logged, "attn_rms")[0] == pytest.approx(expected_rms, rel=1e-6)
    # the growth rate is fitted to the logged points (one per logging interval)
    rate = 1000 * (math.log(second.max_abs) - math.log(first.max_abs)) / 3
    assert logged[KEY + "growth_rate"] == [(6, pytest.approx(rate, rel=1e-6))]


def test_resume_inside_a_logging_interval_logs_what_the_uninterrupted_run_logs(tmp_path):
    pl = lightning()

    def run(max_steps, ckpt_path=None, every=None):
        monitor = LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1, verbose=False)
        callbacks = [monitor]
        if every:
            callbacks.append(
                pl.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1
                )
            )
        name = f"run{max_steps}{ckpt_path is not None}"
        t = trainer(
            max_steps=max_steps,
            logger=tb_logger(tmp_path / name),
            callbacks=callbacks,
            log_every_n_steps=4,
            enable_checkpointing=bool(every),
        )
        t.fit(scripted(_growing, _attention_input), one_batch_loader(), ckpt_path=ckpt_path)
        return scalars(tmp_path / name)

    whole = run(8)
    run(2, every=2)  # stops after step 1, inside the first logging interval (steps 0-3)
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = run(8, ckpt_path=str(ckpt))
    for quantity in ("rms", "max_abs", "logz_mean", "spread", "attn_max", "attn_rms"):
        assert resumed[KEY + quantity] == [
            (s, pytest.approx(v, rel=1e-6)) for s, v in whole[KEY + quantity]
        ], quantity
    assert resumed[KEY + "growth_rate"] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in whole[KEY + "growth_rate"]
    ]
