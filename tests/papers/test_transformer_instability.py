"""Wortsman et al. 2023 on the CPU, through examples/transformer_instability.py (shortened):
attention logits grow at a high learning rate, qk-layernorm bounds them, z-loss pins log Z."""

import importlib.util
from pathlib import Path

import pytest

from tests.helpers import scalars

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "transformer_instability.py"
STEPS = 150


def load_example():
    spec = importlib.util.spec_from_file_location("transformer_instability", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_attention_logits_grow_unless_qk_layernorm_and_z_loss_pins_log_z(tmp_path, capsys):
    monitors = load_example().main(max_steps=STEPS, logdir=str(tmp_path))
    logged = {
        variant: scalars(tmp_path / "transformer_instability" / variant) for variant in monitors
    }

    # every variant: attention measured every 10 steps in both blocks, by module name, and logged
    # at the last step of each of Lightning's logging intervals (log_every_n_steps=10)
    baseline = logged["baseline"]["dynlens/logits/attn_max"]
    assert [s for s, _ in baseline] == list(range(9, STEPS, 10))
    assert monitors["baseline"].layers == ["blocks.0.attn", "blocks.1.attn"]

    # at lr 0.03 the max attention logit grows more than 10x within the run (measured: 1.6 -> 300+
    # by step 30)...
    first, peak = baseline[0][1], max(v for _, v in baseline)
    assert first < 5 and peak > 10 * first
    # ...while qk-layernorm keeps it bounded (measured: below 5)
    qk = [v for _, v in logged["qk_layernorm"]["dynlens/logits/attn_max"]]
    assert max(qk) < 20

    # z-loss pulls the softmax normaliser log Z to near 0; without it it sits above log 64 = 4.2
    logz = {v: logged[v]["dynlens/logits/logz_mean"][-1][1] for v in monitors}
    assert logz["baseline"] > 4 and abs(logz["z_loss"]) < 1.5

    out = capsys.readouterr().out
    assert f"TensorBoard logs in {tmp_path / 'transformer_instability' / 'baseline'}" in out
