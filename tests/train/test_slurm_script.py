"""`tools/slurm_train.sh` under a fake `srun`: the command a (re)queued job runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _srun_command(tmp_path: Path) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path / "srun.txt"}\n')
    (bin_dir / "srun").chmod(0o755)
    slurm = {"SLURM_JOB_NAME": "dk", "SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8"}
    env = {**os.environ, **slurm, "SLURM_CPUS_PER_TASK": "12", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env["RUN_DIR"] = str(tmp_path / "run")
    subprocess.run(["bash", str(REPO / "tools/slurm_train.sh"), "recipe.yaml"], env=env, check=True, timeout=30)
    return (tmp_path / "srun.txt").read_text().splitlines()


def test_a_requeued_job_resumes_the_newest_checkpoint_of_its_run(tmp_path):
    first = _srun_command(tmp_path)
    assert first[:3] == ["--cpus-per-task", "12", "--kill-on-bad-exit=1"]  # srun no longer inherits the CPUs
    assert "--ckpt_path" not in first  # nothing to resume: a fresh run
    assert first[first.index("--trainer.num_nodes") + 1] == "2" and first[first.index("--trainer.devices") + 1] == "8"
    # A run that saved last.ckpt but was never preempted (a node failure, a manual requeue) resumes too.
    last = tmp_path / "run/lightning_logs/version_0/checkpoints/last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    again = _srun_command(tmp_path)
    assert again[again.index("--ckpt_path") + 1] == "last"  # the newest of last.ckpt and preempted.ckpt
