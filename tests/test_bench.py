"""The benchmark's CPU mode runs in the suite, so the script cannot rot; its pass counts are checked exactly."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import benchmark  # noqa: E402


def test_cpu_mode_runs_every_workflow_and_counts_unet_passes(tmp_path):
    out = tmp_path / "bench.md"
    steps = 2
    results = {r.name: r for r in benchmark.run(["--mode", "cpu", "--runs", "1", "--warmup", "0", "--steps",
                                                  str(steps), "--out", str(out)])}
    base = results["plain KSampler (baseline)"]
    assert (base.forwards, base.rows, base.backwards) == (steps, 2 * steps, 0)  # cond + uncond batched
    ddim = results["DDIM inversion"]
    assert (ddim.forwards, ddim.rows) == (2 * steps, steps + 2 * steps)  # cond-only inversion + CFG reconstruction
    p2p = results["P2P edit (replace + local blend)"]
    assert (p2p.forwards, p2p.rows, p2p.backwards) == (steps, 4 * steps, 0)  # both branches in one batch
    null = results["null-text inversion"]
    assert steps <= null.backwards <= 10 * steps  # at most 10 Adam iterations per step
    assert null.forwards == steps + 2 * steps + null.backwards  # inversion + (cond + final) per step + iterations
    text = out.read_text()
    assert "| DDIM inversion |" in text and "CPU time / KSampler" in text
