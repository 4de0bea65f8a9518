"""``dynlens report``: read TensorBoard event files after the fact and summarise the runs.

The report reads what the monitors logged — it never imports the callbacks — and summarises it
with the same pure functions the callbacks use, so a report and the live panels cannot disagree::

    dynlens report runs/                      # rich tables: an overview, then one per monitor
    dynlens report runs/a runs/b --json summary.json --plot figures/

Pipeline: :func:`~dynlens.report.reader.find_runs` (directories holding event files) →
:func:`~dynlens.report.reader.read_run` (every scalar point, text event and histogram; protobuf
parsing only) → :func:`~dynlens.report.summary.summarise_run` (one summariser per monitor family,
in the :data:`~dynlens.report.registry.FAMILIES` registry, which finds them in
:mod:`dynlens.report.families`; how one is written: :mod:`dynlens.report.family`) →
:mod:`~dynlens.report.render` (rich tables) and :mod:`~dynlens.report.plots` (PNG figures, needs
``pip install "dynlens[plot]"``).

JSON schema (``--json FILE``, version 1)
----------------------------------------
One object; every float is a plain JSON number, and a value that cannot be known (a step never
reached, a quantity not logged, a NaN) is ``null``. Steps are the logged steps (Lightning's
logging step, the x-axis of the charts); accuracies and shares are fractions in [0, 1]::

    {
      "schema": "dynlens.report",
      "version": 1,                   # bumped when a field changes meaning or is removed
      "options": {"prefix": "dynlens", "threshold": 0.99, "grokking_delay": 1000,
                  "onset_threshold": 0.5},
      "runs": [ {
          "name": "wd/version_0",     # path relative to the LOGDIR given, as TensorBoard names it
          "path": "runs/demo/wd/version_0",
          "files": 1, "tags": 14, "points": 1230,      # event files, scalar tags, scalar points
          "first_step": 0, "last_step": 2400,          # null when the run has no scalar
          "notes": ["<path>: ..."],   # problems found (corrupt records, NaN values, ...)
          "families": {"grokking": {...}, "collapse": {...}}   # only the families logged
      } ],
      "problems": ["<path>: no event files ..."]     # paths given that yielded no run
    }

Families (new fields may be added within a version; readers should ignore unknown keys):

``grokking`` — :func:`dynlens.grokking.detect_grokking` on ``grokking/train_acc`` and
``grokking/val_acc`` at the steps where both were logged: ``evaluations`` (number of such steps),
``threshold``, ``memorized_step``, ``generalized_step``, ``delay`` (generalised − memorised),
``kind`` (``comprehension``, ``grokking``, ``memorization``, ``confusion``),
``transition_steps`` (10% → 90% of the validation rise), ``final_train_acc``, ``final_val_acc``,
``final_weight_norm``.

``collapse`` — Softmax Collapse: ``measurements``, ``onset_step`` (the monitor's onset event, else
the first step with ``sc_fraction`` above ``onset_threshold``), ``onset_source`` (``"event"``,
``"sc_fraction"`` or null), ``peak_sc_fraction`` and its ``peak_step``, ``final_sc_fraction``,
``peak_zero_loss_fraction``, ``final_headroom_median``, ``final_headroom_min`` (threshold minus
the top-vs-runner-up logit gap; negative once collapsed), ``threshold`` and ``dtype`` (the
precision whose :func:`~dynlens.collapse.collapse_threshold` it is), ``final_nlm_cosine``,
``remedy_step`` (step of the remedy switch event, or null).

``hessian`` — stability ratios as ``HessianMonitor`` logs them (1 = at the threshold):
``measurements``, ``peak_eos_ratio``, ``final_eos_ratio``, ``share_eos_ratio_at_least_1``
(λ_max over its threshold: η·λ_max/2 for gradient descent), ``peak_trace_ratio``,
``final_trace_ratio``, ``share_trace_ratio_at_least_1`` (η·tr(H)/2), ``peak_precond_ratio``,
``final_precond_ratio`` (Adam's preconditioned sharpness), ``final_lambda_max``, ``final_trace``,
``final_lr``.

``hessian_blocks`` — ``HessianMonitor(blocks=...)``: ``step`` (the last step the blocks were
measured at) and ``blocks``, a list, largest share first, of ``{"block", "trace", "share"}``: the
block's name, its trace tr(H_bb) (``trace/<block>``) and its share of tr(H)
(``trace_share/<block>``) at that step, as logged.

``hessian_spectrum`` — ``HessianMonitor(density=True)``: ``measurements`` (steps with top
eigenvalues logged), ``histograms`` (``spectrum`` histograms read), ``first_step`` and
``last_step`` of the measurements, ``first_top_eigenvalues`` and ``final_top_eigenvalues``
(``spectrum_top/1`` … at those steps, λ_1 ≥ λ_2 ≥ …, as logged). ``--plot`` draws the density
from the first and last histograms.

``logits`` — ``LogitGrowthMonitor``: ``measurements``, ``peak_attention_logit`` (largest
``attn_max``), ``peak_attention_step``, ``peak_attention_layer`` (the ``attn_max/<layer>`` with
the largest peak), ``final_attention_logit``, ``peak_max_abs`` and ``final_max_abs`` (largest
|output logit|), ``growth_rate`` (e-folds of ``max_abs`` per 1000 steps over the whole run,
:func:`dynlens.logits.log_growth_rate`), ``final_growth_rate`` (the monitor's last windowed
value), ``first_logz_mean``, ``final_logz_mean``, ``logz_drift`` (final − first mean log Z) and
``max_abs_logz_mean`` (largest |mean log Z|).

``optimizer`` — ``OptimizerMonitor``: ``measurements``, ``grad_norm_min``, ``grad_norm_median``
and ``grad_norm_max`` (over the measured steps, NaN left out), ``update_to_weight_median``,
``largest_update_block`` and ``largest_update_to_weight`` (the ``update_to_weight/<block>`` with
the largest median: the block that moves fastest against its size), ``spikes`` and
``first_spike_step`` (its ``loss_spike`` and ``gradient_spike`` events) and ``eps_share_final``
(the last ``adam/eps_share``).

``continual`` — :class:`dynlens.continual.ContinualMetrics` replayed on the logged
``continual/acc_task_<t>`` curves (tasks start where ``continual/task`` first names them):
``evaluations``, ``tasks`` (ids in training order), ``acc``, ``min_acc``, ``wc_acc``, ``wf`` and
``wp`` (``{"<window>": value}``), ``worst_gap_task``, ``worst_gap``, ``worst_gap_recovery``, and
``per_task`` (``{"<task>": {"final_acc", "gap", "recovery", "recovery_steps"}}``; gap and recovery
are null for the task being trained).

``warning`` — ``EarlyWarningMonitor``'s warnings, read by their reasons (``warn_<event>``, and
``<event>`` when the event happened): ``warnings``, a list in step order of ``{"event",
"warned_step", "expected_step", "happened_step", "lead"}`` — the event (``collapse``,
``divergence``, ``attention``), the step the warning was raised at, the step the event was
expected at (the warned step + the ``<event>/steps_to`` logged at it, rounded up; read back as
float32, so one step early when that sum lay within float32 rounding above an integer), the step
the event happened at (its first occurrence at or after the warning, else the last before it;
null if it never happened) and ``lead`` (happened − warned, null if it never happened), with a
row too for every event that happened and that no warning's row names (``warned_step``,
``expected_step`` and ``lead`` null: it came unwarned); and ``happened`` (``{"<event>": step}``
for every event that happened, warned or not).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .family import Family, Options
from .reader import RunData, find_runs, read_run
from .registry import FAMILIES
from .summary import RunSummary, summarise_run

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "Options",
    "Report",
    "RunSummary",
    "build_report",
]

SCHEMA = "dynlens.report"
SCHEMA_VERSION = 1


@dataclass
class Report:
    """Summaries of every run found, the problems met, and the data read (for plots).

    Render it with rich (``console.print(report)``: see :mod:`dynlens.report.render`); serialise
    it with :meth:`to_json`.
    """

    runs: list[RunSummary]
    problems: list[str]
    options: Options = field(default_factory=Options)
    data: list[RunData] = field(default_factory=list, repr=False)
    families: Mapping[str, Family] = field(default_factory=lambda: FAMILIES, repr=False)

    @property
    def readable(self) -> bool:
        """True when anything at all could be read (the CLI exits non-zero otherwise)."""
        return any(r.readable for r in self.runs)

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON values, in the schema of the module docstring."""
        return {
            "schema": SCHEMA,
            "version": SCHEMA_VERSION,
            "options": asdict(self.options),
            "runs": [asdict(r) for r in self.runs],
            "problems": list(self.problems),
        }

    def __rich_console__(self, console: Console, options: Any) -> Any:
        from .render import render_report

        yield from render_report(self)


def build_report(
    paths: Sequence[str | os.PathLike[str]],
    options: Options | None = None,
    *,
    console: Console | None = None,
    families: Mapping[str, Family] | None = None,
) -> Report:
    """Find, read and summarise every run under ``paths``.

    With a ``console`` that is a terminal, a progress bar shows the runs being read and is
    removed when done; into a pipe or file nothing is drawn. Never raises for bad content:
    problems become :attr:`Report.problems` (paths without runs) or run notes.
    """
    options = options or Options()
    families = FAMILIES if families is None else families
    found, problems = find_runs(paths)
    runs: list[RunSummary] = []
    data: list[RunData] = []
    if console is not None and not console.is_terminal:
        console = None  # rich would still end a non-terminal live display with a blank line
    progress: Any = (
        Progress(
            TextColumn("reading runs"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[run]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        if console is not None
        else nullcontext()
    )
    with progress:
        task = progress.add_task("read", total=len(found), run="") if console else None
        for name, directory in found:
            if console is not None:
                progress.update(task, run=name)
            run = read_run(directory, name)
            data.append(run)
            runs.append(summarise_run(run, options, families))
            if console is not None:
                progress.advance(task)
    return Report(runs=runs, problems=problems, options=options, data=data, families=families)
