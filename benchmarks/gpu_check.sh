#!/usr/bin/env bash
# One pass of the checks that need a GPU, for a lent one-GPU machine (H100/H200) where python3
# already has torch, pytorch-lightning, lightning, tensorboard and rich and nothing can be installed.
#
#   benchmarks/gpu_check.sh          # run from anywhere; about 9 minutes at most
#   benchmarks/gpu_check.sh --cpu    # only the monitor smoke check, on the CPU, 5 steps
#
# 1. nvidia-smi summary; torch, CUDA and Lightning versions.
# 2. Smoke check of all five monitors on CUDA: a tiny attention classifier, 20 steps under
#    precision "bf16-mixed" and "32", then under strategy "fsdp" (one device) where
#    HessianMonitor must refuse at set-up; every dynlens metric family must reach
#    trainer.callback_metrics with finite values, and no monitor may disable itself.
# 3. benchmarks/scale.py at GPT-2 small (124M parameters, sequence 1,024): each product route's
#    time and peak memory against a training step, and the monitors at their defaults.
# 4. The benchmarks that can run on CUDA: hessian_routes.py (--device cuda), collapse.py,
#    logits.py, overhead.py and early_warning.py --overhead (--accelerator gpu), continual.py
#    (--device cuda). hessian.py has no device option and report_read.py measures file reading:
#    skipped, with a note.
# 5. The callback and conformance tests (not slow), when pytest is installed.
#
# Each step runs under `timeout`, clamped so the whole script ends within GPU_CHECK_SECONDS (560).
# A failing step does not stop the others; failures are listed at the end and the exit status is 1.
# With $OUT set, everything printed is also written to $OUT/gpu_check.log.
set -u

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
DEADLINE=${GPU_CHECK_SECONDS:-560}
CPU_ONLY=0
[[ "${1:-}" == "--cpu" ]] && CPU_ONLY=1

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

FAILED=()

# run_step NAME CAP_SECONDS COMMAND...: run COMMAND under a timeout of at most CAP_SECONDS.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    ((left < cap)) && cap=$left
    echo
    echo "=== $name"
    if ((cap < 15)); then
        echo "--- $name: not run, only ${left}s left of ${DEADLINE}s"
        FAILED+=("$name (not run: out of time)")
        return
    fi
    local start=$SECONDS rc
    timeout --kill-after=10 "$cap" "$@"
    rc=$?
    echo "--- $name: exit $rc after $((SECONDS - start))s (limit ${cap}s)"
    if ((rc == 124 || rc == 137)); then
        FAILED+=("$name (timed out after ${cap}s)")
    elif ((rc != 0)); then
        FAILED+=("$name (exit $rc)")
    fi
}

SMOKE=$(mktemp --suffix=.py)
trap 'rm -f "$SMOKE"' EXIT
cat >"$SMOKE" <<'PY'
"""All five dynlens monitors on a tiny attention classifier: finite metrics, none disabled."""

import argparse
import math
import sys
import tempfile
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dynlens import (
    ConfigurationError,
    ContinualEvaluation,
    GrokkingMonitor,
    HessianMonitor,
    LogitGrowthMonitor,
    SoftmaxCollapseMonitor,
)

CLASSES, LENGTH, WIDTH, HEADS, SAMPLES, VAL_EVERY = 16, 8, 32, 2, 256, 5


class Tiny(pl.LightningModule):
    """Embedding, one self-attention layer (F.scaled_dot_product_attention), mean pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        q, k, v = self.qkv(h).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return self.head((h + attended).mean(1))

    def _evaluate(self, batch, stage: str):
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_acc", (logits.argmax(-1) == y).float().mean())
        return F.cross_entropy(logits, y), logits

    def training_step(self, batch, batch_idx):
        loss, logits = self._evaluate(batch, "train")
        return {"loss": loss, "logits": logits.detach()}

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def dataset(seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CLASSES, (SAMPLES, LENGTH), generator=g)
    return TensorDataset(x, x.sum(1) % CLASSES)


def check(accelerator: str, precision: str, steps: int, strategy: str = "auto") -> list[str]:
    """Train once; the problems found (empty: all good). Under FSDP, HessianMonitor must refuse
    at set-up and the other monitors must work."""
    torch.manual_seed(0)
    train, val = dataset(0), dataset(1)
    monitors = [
        SoftmaxCollapseMonitor(every_n_steps=1, verbose=False),
        LogitGrowthMonitor(every_n_steps=1, attention_every_n_steps=1, verbose=False),
        GrokkingMonitor(verbose=False),
        ContinualEvaluation({0: val}, verbose=False),
    ]
    hessian = HessianMonitor(every_n_steps=1, num_probes=4, verbose=False)
    if strategy == "fsdp":
        problems = []
        try:
            pl.Trainer(accelerator=accelerator, devices=1, strategy=strategy, max_steps=1,
                       callbacks=[hessian], logger=False, enable_progress_bar=False,
                       enable_model_summary=False).fit(Tiny(), DataLoader(train, batch_size=64))
            problems.append("HessianMonitor did not refuse FSDP")
        except ConfigurationError as err:
            print(f"  HessianMonitor refused FSDP: {err}")
    else:
        problems = []
        monitors.append(hessian)
    with tempfile.TemporaryDirectory() as logdir, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = pl.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=precision,
            strategy=strategy,
            max_steps=steps,
            check_val_every_n_epoch=VAL_EVERY,  # full batch: one epoch is one step
            num_sanity_val_steps=0,
            logger=TensorBoardLogger(logdir, name="smoke"),
            callbacks=monitors,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(
            Tiny(),
            DataLoader(train, batch_size=SAMPLES),
            DataLoader(val, batch_size=SAMPLES),
        )
    for w in caught:
        if "dynlens" in str(w.message) or type(w.message).__module__.startswith("dynlens"):
            print(f"  warning: {type(w.message).__name__}: {w.message}")
    for monitor in monitors:
        if monitor.disabled_reason is not None:
            problems.append(f"{type(monitor).__name__} disabled itself: {monitor.disabled_reason}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dynlens/")}
    required = {"logits": "attn_max", "hessian": "lambda_max", "continual": "acc"}
    if strategy == "fsdp":
        del required["hessian"]
    for monitor in monitors:
        family = f"dynlens/{monitor.name}/"
        values = {k[len(family) :]: v for k, v in metrics.items() if k.startswith(family)}
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())[:6])
        print(f"  {family}: {len(values)} values ({shown}{', ...' if len(values) > 6 else ''})")
        if not values:
            problems.append(f"{family} logged nothing")
        if bad:
            problems.append(f"{family} logged non-finite {bad}")
        if monitor.name in required and required[monitor.name] not in values:
            problems.append(f"{family}{required[monitor.name]} missing")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (to test this check)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    accelerator = "cpu" if args.cpu else "gpu"
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("CUDA is not available (pass --cpu to run this check on the CPU)")
    failed = False
    runs = [("bf16-mixed", "auto"), ("32", "auto")]
    if not args.cpu:  # Lightning's FSDP needs a GPU; one device still runs its wrapping
        runs.append(("32", "fsdp"))
    for precision, strategy in runs:
        print(f"{accelerator}, precision {precision}, strategy {strategy}, {args.steps} steps:")
        problems = check(accelerator, precision, args.steps, strategy)
        for problem in problems:
            print(f"  FAIL: {problem}")
        print("  ok" if not problems else f"  {len(problems)} problem(s)")
        failed |= bool(problems)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
PY

if ((CPU_ONLY)); then
    run_step "monitor smoke check (CPU)" 300 "$PYTHON" "$SMOKE" --cpu --steps 5
else
    echo "=== machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm \
        --format=csv || FAILED+=("nvidia-smi")
    "$PYTHON" - <<'PY' || FAILED+=("versions")
import platform
import torch, pytorch_lightning, dynlens
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, pytorch-lightning {pytorch_lightning.__version__}")
try:
    import lightning
    print(f"lightning {lightning.__version__}")
except ImportError:
    print("lightning: not installed")
print(f"dynlens from {dynlens.__file__}; {torch.get_num_threads()} CPU threads")
if torch.cuda.is_available():
    print(f"cuda device: {torch.cuda.get_device_name(0)}, capability "
          f"{torch.cuda.get_device_capability(0)}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("CUDA NOT AVAILABLE")
PY

    run_step "monitor smoke check (CUDA)" 120 "$PYTHON" "$SMOKE"
    run_step "benchmarks/scale.py --device cuda --size gpt2-small --parts routes" 200 \
        "$PYTHON" benchmarks/scale.py --device cuda --size gpt2-small --parts routes --routes \
        double_backward batched_double_backward vmap_forward_over_reverse finite_difference \
        curvlinops
    run_step "benchmarks/scale.py --device cuda --size gpt2-small --parts monitors" 120 \
        "$PYTHON" benchmarks/scale.py --device cuda --size gpt2-small --parts monitors \
        --models gpt2 llama --configs hessian --fit-steps 30
    run_step "benchmarks/hessian_routes.py --device cuda" 60 \
        "$PYTHON" benchmarks/hessian_routes.py --device cuda
    run_step "benchmarks/collapse.py --accelerator gpu" 60 \
        "$PYTHON" benchmarks/collapse.py --accelerator gpu --repeats 3
    run_step "benchmarks/logits.py --accelerator gpu" 60 \
        "$PYTHON" benchmarks/logits.py --accelerator gpu --repeats 3
    run_step "benchmarks/overhead.py --accelerator gpu" 120 \
        "$PYTHON" benchmarks/overhead.py --accelerator gpu --repeats 3 --long-steps 2000 \
        --long-repeats 1
    run_step "benchmarks/early_warning.py --overhead 2 --paired --accelerator gpu" 90 \
        "$PYTHON" benchmarks/early_warning.py --overhead 2 --overhead-steps 1000 --paired \
        --accelerator gpu
    if "$PYTHON" -c "import sklearn" 2>/dev/null; then
        run_step "benchmarks/continual.py --device cuda" 60 \
            "$PYTHON" benchmarks/continual.py --device cuda
    else
        echo
        echo "=== benchmarks/continual.py: skipped, scikit-learn is missing (its digits workload needs it)"
    fi
    echo
    echo "=== not run on CUDA: hessian.py has no device option (its (a) is hessian_routes.py above);"
    echo "    report_read.py times reading event files, not the GPU"

    if "$PYTHON" -c "import pytest" 2>/dev/null; then
        ignore=()
        if ! "$PYTHON" -c "import hypothesis" 2>/dev/null; then
            echo
            echo "hypothesis is missing: leaving out the test files that import it"
            for f in $(grep -l "hypothesis" tests/callbacks/*.py tests/test_conformance.py); do
                ignore+=("--ignore=$f")
            done
        fi
        "$PYTHON" -c "import sklearn" 2>/dev/null ||
            echo "scikit-learn is missing: tests that use SplitDigits will fail for that reason"
        run_step "pytest tests/callbacks tests/test_conformance.py -m 'not slow'" 150 \
            "$PYTHON" -m pytest -q -p no:cacheprovider -m "not slow" "${ignore[@]}" \
            tests/callbacks tests/test_conformance.py
    else
        echo
        echo "=== pytest: skipped, pytest is not installed for $PYTHON"
    fi
fi

echo
echo "=== done in ${SECONDS}s"
if ((${#FAILED[@]})); then
    printf 'FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all steps passed"
