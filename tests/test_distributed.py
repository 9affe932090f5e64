"""Two processes on CPU (gloo) through torchrun: the Trainer's DDP keeps gates, multipliers and weights identical."""

import json
import os
import subprocess
import sys

import torch

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_prune_script.py")


def _run(cmd: list[str], tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")


def test_two_process_pruning_keeps_ranks_identical(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir()
    one.mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
          SCRIPT, str(two), "4"], tmp_path)
    _run([sys.executable, SCRIPT, str(one), "8"], tmp_path)  # same global batch in one process
    rank0 = json.loads((two / "state_rank0.json").read_text())
    rank1 = json.loads((two / "state_rank1.json").read_text())
    single = json.loads((one / "state_rank0.json").read_text())
    for key in rank0:  # all-reduced gradients + identical updates: bit-identical on both ranks
        assert torch.equal(torch.tensor(rank0[key]), torch.tensor(rank1[key])), key
    # Against one process with the same global batch the runs are close but not equal: ITC and the ITM hard
    # negatives are computed per rank on the local batch of 4 instead of over all 8 pairs. Tolerance: 0.02 in
    # expected sparsity after 4 steps (observed ~0.001), λ within 0.05 (observed ~0.01).
    assert abs(rank0["expected_sparsity"] - single["expected_sparsity"]) < 0.02
    assert (torch.tensor(rank0["lambdas.global"]) - torch.tensor(single["lambdas.global"])).abs().max() < 0.05
