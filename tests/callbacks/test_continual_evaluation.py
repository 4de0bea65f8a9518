import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from dynlens.callbacks.continual import ContinualEvaluation, accuracy_counts
from dynlens.callbacks.validate import ConfigurationError
from dynlens.continual import ContinualMetrics
from dynlens.data import SplitDigits
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


def conformance_monitor(eval_set):
    """A small ContinualEvaluation for the monitor-contract suite
    (``tests/test_conformance.py``): its model has attention, BatchNorm, dropout and the logits
    from ``head``; ``eval_set`` is one of its evaluation sets."""
    return ContinualEvaluation({0: eval_set}, subset_size=16, verbose=False)


# SplitDigits serves validation sets that the tiny test models do not use.
pytestmark = pytest.mark.filterwarnings("ignore:.*no `validation_step`")

N = 20  # samples per scripted task: accuracies are multiples of 0.05
CLASSES = 4
STEPS = 10  # optimizer steps per task


def task0_curve(k: int) -> float:
    """Task 0 accuracy after k optimizer steps: learned, then a stability gap during task 1."""
    if k <= STEPS:
        return min(1.0, k / 5)
    return [0.6, 0.3, 0.2, 0.4, 0.6, 0.8, 0.85, 0.9, 0.9, 0.9][k - STEPS - 1]


def task1_curve(k: int) -> float:
    return min(1.0, (k - STEPS) / 4)


CURVES = {0: task0_curve, 1: task1_curve, 2: lambda k: 0.5}


def scripted_sets(tasks=(0, 1)) -> dict[int, TensorDataset]:
    """Task t: samples (index i, task t) labelled t; see `scripted_module`."""
    return {
        t: TensorDataset(
            torch.stack([torch.arange(N), torch.full((N,), t)], dim=1).float(),
            torch.full((N,), t),
        )
        for t in tasks
    }


def scripted_module(package="pytorch_lightning"):
    """A classifier whose accuracy on task t after k optimizer steps is CURVES[t](k).

    Sample (i, t) is classified correctly iff i < CURVES[t](k)·N; `k` is a buffer counted in
    training_step, so it survives checkpoints and spans Trainers.
    """
    pl = lightning(package)

    class Scripted(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(1, 1)
            self.register_buffer("k", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            index, task = x[:, 0], x[:, 1].long()
            accuracy = torch.tensor([CURVES[int(t)](int(self.k)) for t in task])
            right = index < torch.round(accuracy * N)
            predicted = torch.where(right, task, (task + 1) % CLASSES)
            return nn.functional.one_hot(predicted, CLASSES).float()

        def training_step(self, batch, batch_idx):
            self.k += 1
            return self.layer(torch.ones(1, 1)).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    return Scripted()


def reference_summary(tasks=(0, 1), steps=2 * STEPS, windows=(10, 100)):
    """ContinualMetrics fed the scripted curves directly: what the callback must reproduce."""
    m = ContinualMetrics(windows)
    for k in range(1, steps + 1):
        task = tasks[(k - 1) // STEPS]
        if task not in m.tasks:
            m.start_task(task)
        m.update(k - 1, {t: CURVES[t](k) for t in m.tasks})
    return m.summary()


def run_tasks(evaluation, module, logger_for=lambda task: False, package="pytorch_lightning"):
    """One new Trainer per task, STEPS optimizer steps each; returns the last Trainer."""
    for task in range(2):
        t = trainer(package, max_steps=STEPS, logger=logger_for(task), callbacks=[evaluation])
        t.fit(module, one_batch_loader())
    return t


@pytest.mark.parametrize("package", PACKAGES)
def test_logged_accuracies_and_metrics_match_the_scripted_curves(tmp_path, package):
    evaluation = ContinualEvaluation(scripted_sets(), verbose=False)
    logger = tb_logger(tmp_path, package)
    run_tasks(evaluation, scripted_module(package), lambda task: logger, package)
    logged = scalars(tmp_path)

    def series(name):
        return logged[f"dynlens/continual/{name}"]

    # one axis across the two Trainers; evaluation after step k is logged at Lightning's k - 1
    assert series("acc_task_0") == [(k - 1, pytest.approx(task0_curve(k))) for k in range(1, 21)]
    assert series("acc_task_1") == [(k - 1, pytest.approx(task1_curve(k))) for k in range(11, 21)]
    assert [v for _, v in series("task")] == [0] * 10 + [1] * 10

    expected = reference_summary()
    assert evaluation.summary() == expected  # exact: k/20 correct of 20, as in the curves
    final = {k.split("/")[-1]: points[-1] for k, points in logged.items() if "continual" in k}
    assert final["min_acc"] == (19, pytest.approx(0.2))
    assert final["acc"][1] == pytest.approx(expected["acc"])
    assert final["wc_acc"][1] == pytest.approx(expected["wc_acc"])
    assert final["wf_10"][1] == pytest.approx(expected["wf"][10])
    assert final["wp_100"][1] == pytest.approx(expected["wp"][100])
    assert final["gap_task_0"][1] == pytest.approx(0.8)  # end of task 0: 1.0; minimum 0.2
    assert final["recovery_task_0"][1] == pytest.approx(0.7)
    assert final["lca"][1] == pytest.approx(expected["lca"])
    assert "min_acc" not in {k.split("/")[-1] for k, p in logged.items() if p[0][0] < 10}

    events = texts(tmp_path, "dynlens/continual/events")
    assert [step for step, _ in events] == [0, 9, 10, 10, 13, 19]
    assert [e["reason"] for e in evaluation.events] == [
        "task_start",
        "summary",
        "task_start",
        "gap",
        "recovery",
        "summary",
    ]
    assert "stability gap on task 0" in events[3][1] and "40.0 points" in events[3][1]
    assert "recovered 20.0 points" in events[4][1]
    assert "task 0 gap 80.0, recovery 70.0" in events[5][1]


def test_panel_charts_every_task_with_anchored_patterns(tmp_path):
    evaluation = ContinualEvaluation(scripted_sets(), verbose=False)
    logger = tb_logger(tmp_path)
    run_tasks(evaluation, scripted_module(), lambda task: logger)
    logged = {t for t in scalars(tmp_path) if t.startswith("dynlens/continual/")}
    (category,) = custom_scalars_layout(tmp_path).category
    assert category.title == "dynlens/continual"
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    covered = set()
    for regexes in charts.values():
        for regex in regexes:
            hits = {t for t in logged if re.match(regex, t)}
            assert hits, regex
            covered |= hits
    assert covered == logged
    (task_regex,) = charts["accuracy per task"]
    assert {t for t in logged if re.match(task_regex, t)} == {
        "dynlens/continual/acc_task_0",
        "dynlens/continual/acc_task_1",
    }
    for near_miss in ("dynlens/continual/acc_task_1x", "xdynlens/continual/acc_task_1"):
        assert not re.match(task_regex, near_miss)
    assert charts["ACC, min-ACC, WC-ACC"] == [
        "^dynlens/continual/acc$",
        "^dynlens/continual/min_acc$",
        "^dynlens/continual/wc_acc$",
    ]


class MLP:
    """Tiny real models on SplitDigits for the training-side tests."""

    @staticmethod
    def make(package="pytorch_lightning", dropout_bn=False, outputs=10):
        pl = lightning(package)

        class Net(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                layers = [nn.Linear(64, 16)]
                if dropout_bn:
                    layers += [nn.BatchNorm1d(16), nn.Dropout(0.3)]
                self.net = nn.Sequential(*layers, nn.ReLU(), nn.Linear(16, outputs))

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                return nn.functional.cross_entropy(self(batch[0]), batch[1])

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        torch.manual_seed(0)
        return Net()


def train_on_digits(
    callbacks, *, same_trainer=False, steps=12, module=None, tasks=2, labels="global", **kw
):
    dm = SplitDigits(batch_size=32, num_tasks=tasks, labels=labels)
    module = module if module is not None else MLP.make()
    t = None
    for task in range(tasks):
        dm.current_task = task
        if same_trainer and t is not None:
            t.fit_loop.epoch_loop.max_steps = steps * (task + 1)  # one more task on this Trainer
        else:
            t = trainer(max_steps=steps, logger=False, callbacks=callbacks, **kw)
        t.fit(module, datamodule=dm)
    return module, dm


def test_separate_trainers_and_repeated_fits_give_identical_metrics():
    separate = ContinualEvaluation(SplitDigits().test_sets(), subset_size=50, verbose=False)
    _, dm = train_on_digits([separate])
    repeated = ContinualEvaluation(dm.test_sets(), subset_size=50, verbose=False)
    train_on_digits([repeated], same_trainer=True)
    assert separate.total_steps == repeated.total_steps == 24
    assert separate.metrics.state_dict() == repeated.metrics.state_dict()
    assert separate.summary()["gap"][0] > 0.5  # real forgetting was measured, not just zeros
    assert torch.equal(separate.generator.get_state(), repeated.generator.get_state())


def test_monitor_does_not_change_the_trained_weights():
    # Dropout draws from the global RNG and BatchNorm updates buffers in train mode, so any
    # RNG use or mode leak by the evaluation would change the weights.
    plain = MLP.make(dropout_bn=True)
    train_on_digits([], module=plain, steps=8)
    watched = MLP.make(dropout_bn=True)
    evaluation = ContinualEvaluation(SplitDigits().test_sets(), subset_size=40, verbose=False)
    train_on_digits([evaluation], module=watched, steps=8)
    assert len(evaluation.metrics.tasks) == 2 and evaluation.summary()["acc"] is not None
    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class Stub:
    """The parts of a Trainer that `measure` uses, for one rank of a simulated DDP job."""

    def __init__(self, world_size=1, rank=0):
        self.world_size, self.global_rank = world_size, rank
        self.reduced = []
        self.strategy = SimpleNamespace(reduce=self._reduce)

    def _reduce(self, tensor, reduce_op):
        self.reduced.append((tensor.clone(), reduce_op))
        return tensor


class Recording(Dataset):
    """A map-style dataset that records which indices were read."""

    def __init__(self, x, y):
        self.x, self.y, self.read = x, y, []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.read.append(i)
        return {"image": self.x[i], "label": self.y[i]}


def digits_module():
    module = MLP.make(dropout_bn=True)
    module.net[1].eval()  # a submodule the user froze: must stay in eval mode
    return module


class CountHostSyncs(TorchFunctionMode):
    """Counts the tensor methods that move a value to the host (a sync on an accelerator)."""

    SYNCS = frozenset(
        {
            torch.Tensor.tolist,
            torch.Tensor.item,
            torch.Tensor.cpu,
            torch.Tensor.numpy,
            torch.Tensor.__bool__,
            torch.Tensor.__float__,
            torch.Tensor.__int__,
            torch.Tensor.__index__,
        }
    )

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_measure_restores_modes_keeps_global_rng_and_syncs_once():
    module = digits_module()
    evaluation = ContinualEvaluation(SplitDigits().test_sets(), subset_size=30, verbose=False)
    for task in range(3):
        evaluation.metrics.start_task(task)
    modes = [m.training for m in module.modules()]
    rng = torch.get_rng_state()
    stub = Stub()
    with CountHostSyncs() as syncs:
        accuracies = evaluation.measure(stub, module)
    assert [m.training for m in module.modules()] == modes and modes[0] and not modes[3]
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(accuracies) == {0, 1, 2} and all(0 <= a <= 1 for a in accuracies.values())
    assert all(a * 30 == round(a * 30) for a in accuracies.values())  # 30 samples per task
    assert syncs.calls == ["tolist"]  # one transfer for all three tasks
    # one reduction for all three tasks (the strategy's: on a single device it changes nothing)
    assert [op for _, op in stub.reduced] == ["sum"]


def test_ddp_ranks_evaluate_disjoint_shards_whose_counts_sum_to_the_whole():
    dm = SplitDigits()
    x, y = dm.test_set(0).tensors
    module = MLP.make()

    def run(world_size, rank):
        data = Recording(x, y)
        evaluation = ContinualEvaluation(
            {0: DataLoader(data, batch_size=7)},
            subset_size=60,
            forward_fn=lambda m, batch, task: (m(batch["image"]), batch["label"]),
            verbose=False,
        )
        evaluation.metrics.start_task(0)
        stub = Stub(world_size, rank)
        accuracy = evaluation.measure(stub, module)[0]
        return data.read, stub.reduced, accuracy

    whole, _, accuracy = run(1, 0)
    read0, ((counts0, op0),), _ = run(2, 0)
    read1, ((counts1, op1),), _ = run(2, 1)
    assert len(whole) == 60 and len(set(whole)) == 60
    assert not set(read0) & set(read1) and sorted(read0 + read1) == sorted(whole)
    assert op0 == op1 == "sum"  # one collective per evaluation, summing [correct, total, bad]
    correct, total, bad = (counts0 + counts1).tolist()
    assert (total, bad) == (60, 0) and correct / total == accuracy


def test_random_subsets_change_every_evaluation_fixed_ones_do_not():
    x, y = SplitDigits().test_set(0).tensors
    module = MLP.make()
    reads = {}
    for mode in ("random", "fixed"):
        data = Recording(x, y)
        evaluation = ContinualEvaluation(
            {0: data},
            subset_size=25,
            subset=mode,
            batch_size=10,
            forward_fn=lambda m, batch, task: (m(batch["image"]), batch["label"]),
            verbose=False,
        )
        evaluation.metrics.start_task(0)
        passes = []
        for _ in range(3):
            data.read = []
            evaluation.measure(Stub(), module)
            passes.append(sorted(data.read))
        reads[mode] = passes
        assert all(len(p) == 25 == len(set(p)) for p in passes)
    assert reads["random"][0] != reads["random"][1] != reads["random"][2]
    assert reads["fixed"][0] == reads["fixed"][1] == reads["fixed"][2]


def test_custom_metric_and_forward_fn():
    sets = scripted_sets()

    def never_right(outputs, targets):  # numbers are accepted as well as tensors
        return 0, len(targets)

    calls = []

    def forward(module, batch, task):
        calls.append((task, torch.is_inference_mode_enabled(), module.training))
        return module(batch[0]), batch[1]

    evaluation = ContinualEvaluation(sets, metric=never_right, forward_fn=forward, verbose=False)
    module = scripted_module()
    t = trainer(max_steps=3, logger=False, callbacks=[evaluation])
    t.fit(module, one_batch_loader())
    assert evaluation.summary()["task_acc"] == {0: 0.0}
    assert calls == [(0, True, False)] * 3  # evaluated in eval mode under inference mode
    assert module.training


def test_labels_outside_the_outputs_fail_at_the_first_evaluation_naming_the_task():
    # trained with task-local labels 0/1 on a two-way head, evaluated on global digit labels:
    # task 0 (digits 0, 1) fits, task 1 (digits 2, 3) cannot
    evaluation = ContinualEvaluation(SplitDigits().test_sets(), verbose=False)
    with pytest.raises(ConfigurationError, match=r"task 1 has \d+ evaluation labels outside"):
        train_on_digits([evaluation], module=MLP.make(outputs=2), steps=3, labels="task")
    assert evaluation.total_steps == 4  # task 0 was fine; task 1 failed at its first step
    assert evaluation.disabled_reason is None


@pytest.mark.parametrize(
    ("outputs", "match"),
    [(lambda m, b, t: (m(b[0])[:, 0], b[1]), "logits"), (lambda m, b, t: b, "integer class")],
)
def test_outputs_the_default_metric_cannot_score_say_what_to_pass(outputs, match):
    sets = {0: TensorDataset(torch.randn(8, 64), torch.randn(8))}
    evaluation = ContinualEvaluation(sets, forward_fn=outputs, verbose=False)
    evaluation.metrics.start_task(0)
    with pytest.raises(ConfigurationError, match=f"{match}.*metric"):
        evaluation.measure(Stub(), MLP.make())


def test_dict_batches_without_forward_fn_say_to_pass_one():
    x, y = SplitDigits().test_set(0).tensors
    evaluation = ContinualEvaluation({0: Recording(x, y)}, verbose=False)
    evaluation.metrics.start_task(0)
    with pytest.raises(ConfigurationError, match="forward_fn=lambda module, batch, task"):
        evaluation.measure(Stub(), MLP.make())


def test_start_task_wins_over_the_datamodule_and_follows_mid_fit_changes():
    pl = lightning()
    dm = SplitDigits(batch_size=32, num_tasks=3)
    evaluation = ContinualEvaluation(dm.test_sets(), verbose=False)

    class SwitchAtStep4(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 4:
                evaluation.start_task(2)  # e.g. a task switch inside one fit

    evaluation.start_task(1)  # wins over dm.current_task == 0 at the next fit
    t = trainer(max_steps=6, logger=False, callbacks=[evaluation, SwitchAtStep4()])
    t.fit(MLP.make(), datamodule=dm)
    assert evaluation.metrics.tasks == (1, 2)
    starts = [e["step"] for e in evaluation.events if e["reason"] == "task_start"]
    assert starts == [0, 4]  # the batch after the switch (step 4) was task 2's first

    # a datamodule attribute that changes mid-fit starts that task at the next evaluation
    dm2 = SplitDigits(batch_size=32, num_tasks=3)
    follow = ContinualEvaluation(dm2.test_sets(), verbose=False)

    class DatamoduleSwitch(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                dm2.current_task = 2

    t = trainer(max_steps=5, logger=False, callbacks=[follow, DatamoduleSwitch()])
    t.fit(MLP.make(), datamodule=dm2)
    assert follow.metrics.tasks == (0, 2)


def test_fit_order_without_datamodule_and_bad_task_sources():
    evaluation = ContinualEvaluation(scripted_sets(), verbose=False)
    module = scripted_module()
    run_tasks(evaluation, module)
    assert evaluation.metrics.tasks == (0, 1)
    t = trainer(max_steps=2, logger=False, callbacks=[evaluation])
    with pytest.raises(
        ConfigurationError, match="every task of `eval_sets` \\[0, 1\\] was trained"
    ):
        t.fit(module, one_batch_loader())
    with pytest.raises(ConfigurationError, match="already trained"):
        evaluation.start_task(0)
    with pytest.raises(ConfigurationError, match=r"names task 7.*add its evaluation set"):
        evaluation.start_task(7)

    dm = SplitDigits(num_tasks=3)
    dm.current_task = 2
    few = ContinualEvaluation({0: dm.test_set(0), 1: dm.test_set(1)}, verbose=False)
    t = trainer(max_steps=2, logger=False, callbacks=[few])
    with pytest.raises(ConfigurationError, match=r"datamodule's `current_task`.*names task 2"):
        t.fit(MLP.make(), datamodule=dm)


def test_gradient_accumulation_counts_optimizer_steps():
    evaluation = ContinualEvaluation(scripted_sets(), verbose=False)
    t = trainer(max_steps=3, logger=False, callbacks=[evaluation], accumulate_grad_batches=2)
    module = scripted_module()
    four_batches = DataLoader(TensorDataset(torch.randn(8, 2), torch.randn(8, 1)), batch_size=2)
    t.fit(module, four_batches)
    assert int(module.k) == 6 and evaluation.total_steps == 3  # six batches, three steps
    assert evaluation.metrics.state_dict()["tasks"][0]["num_evals"] == 3


def test_cadence_and_end_of_fit_evaluation(tmp_path):
    evaluation = ContinualEvaluation(scripted_sets(), every_n_steps=4, verbose=False)
    logger = tb_logger(tmp_path)
    run_tasks(evaluation, scripted_module(), lambda task: logger)
    steps = [s for s, _ in scalars(tmp_path)["dynlens/continual/acc_task_0"]]
    # after every 4th step (3, 7, 11, 15, 19 on Lightning's axis) plus each fit's end (9)
    assert steps == [3, 7, 9, 11, 15, 19]
    boundaries = ContinualEvaluation(scripted_sets(), every_n_steps=STEPS, verbose=False)
    run_tasks(boundaries, scripted_module())
    assert boundaries.metrics.state_dict()["tasks"][0]["num_evals"] == 2  # task ends only
    assert boundaries.summary()["min_acc"] == pytest.approx(0.9)  # blind to the gap (0.2)


class FakeClock:
    """Seconds advance only when the test says: a training step costs 1, an evaluation 4."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def clocked(clock):
    """A scripted module on task 2 (accuracy 0.5 throughout) whose steps advance ``clock`` by
    1 s, and a forward_fn advancing it by 4 s once per evaluation."""
    module = scripted_module()
    step = module.training_step

    def timed_step(batch, batch_idx):
        clock.now += 1.0
        return step(batch, batch_idx)

    module.training_step = timed_step
    charged = set()

    def forward_fn(m, batch, task):
        if int(m.k) not in charged:  # one charge per evaluation, however many batches
            charged.add(int(m.k))
            clock.now += 4.0
        return m(batch[0]), batch[1]

    return module, forward_fn


def budgeted(clock, forward_fn):
    return ContinualEvaluation(
        scripted_sets((2,)), budget=0.25, clock=clock, forward_fn=forward_fn, verbose=False
    )


def test_budget_schedules_evaluations_deterministically_with_a_fake_clock(tmp_path):
    clock = FakeClock()
    module, forward_fn = clocked(clock)
    evaluation = budgeted(clock, forward_fn)
    t = trainer(max_steps=50, logger=tb_logger(tmp_path), callbacks=[evaluation])
    t.fit(module, one_batch_loader())
    logged = scalars(tmp_path)
    # after step 1 (4 s of evaluation for 1 s of training); then once training pays for the
    # evaluations so far and the next at 25%: (4 + 4)/0.25 = 32 s, after step 32; then every
    # 4/(0.25·1) = 16 steps: 48; and the fit's end, 50. Logged at Lightning's step, one less.
    assert [s for s, _ in logged["dynlens/continual/acc_task_2"]] == [0, 31, 47, 49]
    assert logged["dynlens/continual/overhead"] == [
        (0, 4.0),
        (31, 0.25),
        (47, 0.25),
        (49, pytest.approx(16 / 50)),  # the end-of-fit evaluation, made whatever the budget
    ]
    # paid back by a longer gap: (16 + 4)/0.25 = 80 s of training, after step 80, not 66
    assert evaluation.state_dict()["schedule"]["next_step"] == 80
    (category,) = custom_scalars_layout(tmp_path).category
    charts = {c.title: list(c.multiline.tag) for c in category.chart}
    assert charts["evaluation time ÷ training time"] == ["^dynlens/continual/overhead$"]


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_budget_schedule_survives_resume_from_a_mid_run_checkpoint(tmp_path):
    pl = lightning()
    clock = FakeClock()
    module, forward_fn = clocked(clock)
    whole = budgeted(clock, forward_fn)
    saver = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=20, save_top_k=-1, filename="{step}"
    )
    t = trainer(
        max_steps=50,
        logger=tb_logger(tmp_path / "whole"),
        callbacks=[whole, saver],
        enable_checkpointing=True,
    )
    t.fit(module, one_batch_loader())

    clock = FakeClock()
    module, forward_fn = clocked(clock)
    resumed = budgeted(clock, forward_fn)
    t = trainer(max_steps=50, logger=tb_logger(tmp_path / "resumed"), callbacks=[resumed])
    # saved after step 20: the 19 steps since the evaluation after step 1 were charged
    t.fit(module, one_batch_loader(), ckpt_path=tmp_path / "ckpt" / "step=20.ckpt")
    steps = [s for s, _ in scalars(tmp_path / "whole")["dynlens/continual/acc_task_2"]]
    assert steps == [0, 31, 47, 49]
    tail = [s for s, _ in scalars(tmp_path / "resumed")["dynlens/continual/acc_task_2"]]
    assert tail == [s for s in steps if s >= 20]
    assert resumed.metrics.state_dict() == whole.metrics.state_dict()
    assert resumed.state_dict()["schedule"] == whole.state_dict()["schedule"]


def test_resume_mid_task_continues_the_task_the_steps_and_the_subsets(tmp_path):
    def make():
        # random subsets smaller than the sets, so the generator state matters
        return ContinualEvaluation(scripted_sets(), subset_size=7, verbose=False)

    whole = make()
    run_tasks(whole, scripted_module())

    first = make()
    module = scripted_module()
    trainer(max_steps=STEPS, logger=False, callbacks=[first]).fit(module, one_batch_loader())
    t = trainer(max_steps=6, logger=False, callbacks=[first])
    t.fit(module, one_batch_loader())
    ckpt = tmp_path / "mid.ckpt"
    t.save_checkpoint(ckpt)

    resumed = make()
    module = scripted_module()
    t = trainer(max_steps=STEPS, logger=False, callbacks=[resumed])
    t.fit(module, one_batch_loader(), ckpt_path=ckpt)
    assert resumed.metrics.tasks == (0, 1)  # the checkpoint's task continued, no new task
    assert resumed.total_steps == whole.total_steps == 20
    assert resumed.metrics.state_dict() == whole.metrics.state_dict()
    assert torch.equal(resumed.generator.get_state(), whole.generator.get_state())


def test_state_dict_round_trip_and_older_checkpoints():
    evaluation = ContinualEvaluation(scripted_sets(), subset_size=5, verbose=False)
    run_tasks(evaluation, scripted_module())
    other = ContinualEvaluation(scripted_sets(), subset_size=5, verbose=False)
    other.load_state_dict(evaluation.state_dict())
    assert other.summary() == evaluation.summary() and other.events == evaluation.events
    assert other.total_steps == 20
    assert torch.equal(other.generator.get_state(), evaluation.generator.get_state())
    empty = ContinualEvaluation(scripted_sets(), verbose=False)
    empty.load_state_dict({})  # a checkpoint from before this callback existed
    assert empty.metrics.tasks == () and empty.total_steps == 0
    assert "schedule" not in evaluation.state_dict()  # every_n_steps: no schedule to keep
    budget = ContinualEvaluation(scripted_sets(), subset_size=5, budget=0.1, verbose=False)
    budget.load_state_dict(evaluation.state_dict())  # a checkpoint from before the budget
    assert budget.total_steps == 20 and budget.state_dict()["schedule"]["next_step"] == 0
    with pytest.raises(ConfigurationError, match="windows"):
        ContinualEvaluation(scripted_sets(), windows=(5,)).load_state_dict(evaluation.state_dict())


def test_state_key_identifies_the_configuration():
    sets = scripted_sets()
    key = ContinualEvaluation(sets).state_key
    assert key == ContinualEvaluation(scripted_sets()).state_key
    # the paper's every-step default keeps the key checkpoints have always had
    assert key == ContinualEvaluation(sets, every_n_steps=1).state_key
    assert key == (
        "ContinualEvaluation{'prefix': 'dynlens', 'tasks': [0, 1], 'every_n_steps': 1, "
        "'subset_size': 1000, 'subset': 'random', 'windows': [10, 100]}"
    )
    for kwargs in ({"every_n_steps": 2}, {"subset_size": 10}, {"windows": (5,)}, {"prefix": "x"}):
        assert ContinualEvaluation(sets, **kwargs).state_key != key
    budget = ContinualEvaluation(sets, budget=0.03).state_key
    assert budget != key and budget != ContinualEvaluation(sets, budget=0.05).state_key
    assert ContinualEvaluation(scripted_sets((0, 1, 2))).state_key != key


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(2), 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eval_sets": {}}, "`eval_sets` is empty"),
        ({"eval_sets": []}, "`eval_sets` is empty"),
        ({"eval_sets": "data"}, "mapping"),
        ({"eval_sets": {-1: TensorDataset(torch.zeros(1))}}, "non-negative int"),
        ({"eval_sets": {"a": TensorDataset(torch.zeros(1))}}, "non-negative int"),
        ({"eval_sets": {0: [1, 2]}}, "torch Dataset or DataLoader"),
        ({"eval_sets": {0: Stream()}}, "map-style dataset"),
        ({"eval_sets": {0: TensorDataset(torch.zeros(0))}}, r"`eval_sets\[0\]` is empty"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"subset_size": 0}, "subset_size"),
        ({"subset": "all"}, "'random'.*'fixed'"),
        ({"windows": ()}, "windows"),
        ({"metric": "accuracy"}, "`metric` to be callable"),
        ({"forward_fn": 3}, "`forward_fn` to be callable"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"gap_threshold": 0}, "gap_threshold"),
        ({"every_n_steps": 2, "budget": 0.1}, "either `every_n_steps` or `budget`"),
        ({"budget": 0.0}, r"budget.*\(0, 1\)"),
        ({"budget": 1.0}, r"budget.*\(0, 1\)"),
        ({"budget": True}, r"budget.*\(0, 1\)"),
        ({"budget": "3%"}, r"budget.*\(0, 1\)"),
        ({"clock": 3.0}, "clock"),
    ],
)
def test_bad_arguments_fail_at_construction_saying_what_to_do(kwargs, match):
    kwargs = {"eval_sets": scripted_sets(), **kwargs}
    with pytest.raises(ConfigurationError, match=match):
        ContinualEvaluation(**kwargs)


def test_a_sequence_of_sets_means_tasks_0_1_and_accuracy_counts():
    sets = list(scripted_sets().values())
    assert list(ContinualEvaluation(sets).eval_sets) == [0, 1]
    correct, total = accuracy_counts(torch.eye(3), torch.tensor([0, 2, 2]))
    assert (int(correct), total) == (2, 3)


def test_no_logger_still_fills_callback_metrics():
    evaluation = ContinualEvaluation(scripted_sets(), verbose=False)
    t = run_tasks(evaluation, scripted_module())
    assert t.callback_metrics["dynlens/continual/min_acc"].item() == pytest.approx(0.2)
    assert t.callback_metrics["dynlens/continual/acc_task_1"].item() == pytest.approx(1.0)
