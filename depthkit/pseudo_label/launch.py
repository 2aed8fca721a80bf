"""Launching a pseudo-labeling job on one or many processes, GPUs and nodes, with plain torch.

Where ranks come from, in this order:

1. **A launcher made one process per device**: `torchrun` (or anything that sets `RANK` / `WORLD_SIZE` /
   `LOCAL_RANK`, or an initialized `torch.distributed`), or an `srun` step of several tasks (`SLURM_PROCID` /
   `SLURM_LOCALID` / `SLURM_STEP_NUM_TASKS`, which only srun sets: a batch script's own environment names the
   allocation's tasks, not processes that run). This process is one rank; `--devices` / `--num-nodes`, when
   given, must agree with the world size (or, under srun, name one task per node: case 2).
2. **Otherwise depthkit spawns** `devices` processes on this node (torch.multiprocessing, "spawn"), ranks
   `node_rank * devices + local_rank`. With `num_nodes > 1` the node rank comes from `--node-rank`, else the
   `NODE_RANK`, `GROUP_RANK` or `SLURM_NODEID` environment (start the command once per node, e.g. `srun
   --ntasks-per-node=1`). On CPU, `devices` is the number of processes, each with cores / devices threads.

Ranks need no communication: each labels its own shards (`job.label_shards`) and rewrites the index. Before
spawning, the launcher checks the inputs, loads and hashes the teacher and checks it against the output, so user
errors come out once, before any work; after the ranks end it rewrites the index one last time.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import asdict, dataclass, field

import torch

from depthkit.devices import torch_device, uses_cuda
from depthkit.pseudo_label.index import IndexWriter, read_index
from depthkit.pseudo_label.job import PseudoLabelConfig, RankSummary, label_shards, prepare


@dataclass(frozen=True)
class Launch:
    """How this process takes part: as one rank ("run"), or as the parent of `devices` ranks ("spawn")."""

    mode: str
    world_size: int
    rank: int = 0
    local_rank: int = 0
    devices: int = 1
    node_rank: int = 0


@dataclass
class JobSummary:
    """The ranks' summaries (those this process ran or spawned) and the output's index afterwards."""

    ranks: list[RankSummary]
    index: dict = field(default_factory=dict)

    @property
    def num_labeled(self) -> int:
        return sum(r.num_labeled for r in self.ranks)

    @property
    def num_skipped(self) -> int:
        return sum(r.num_skipped for r in self.ranks)

    @property
    def num_failed(self) -> int:
        return sum(r.num_failed for r in self.ranks)

    @property
    def num_shards_labeled(self) -> int:
        return sum(r.num_shards_labeled for r in self.ranks)

    @property
    def num_shards_skipped(self) -> int:
        return sum(r.num_shards_skipped for r in self.ranks)

    @property
    def seconds(self) -> float:
        return max((r.seconds for r in self.ranks), default=0.0)


def resolve_launch(devices: int | None = None, num_nodes: int = 1, node_rank: int | None = None) -> Launch:
    """Decide how this process runs (see the module docstring)."""
    if devices is not None and devices < 1:
        raise ValueError(f"--devices must be >= 1, got {devices}")
    if num_nodes < 1:
        raise ValueError(f"--num-nodes must be >= 1, got {num_nodes}")
    env = os.environ
    launched = "RANK" in env and "WORLD_SIZE" in env
    if launched or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        from depthkit.data.stream import topology

        rank, world_size = topology()
        expected = (devices or 1) * num_nodes
        if (devices is not None or num_nodes > 1) and expected != world_size:
            raise ValueError(
                f"the launcher started {world_size} process(es), but --devices x --num-nodes = {expected}; "
                "leave them out under torchrun or make them agree"
            )
        return Launch("run", world_size, rank=rank, local_rank=int(env.get("LOCAL_RANK", 0)))
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0"))
    if step_tasks > 1 and "SLURM_PROCID" in env:
        expected = (devices or 1) * num_nodes if devices is not None or num_nodes > 1 else step_tasks
        if expected == step_tasks:  # one task per device
            return Launch("run", expected, rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)))
        if step_tasks != num_nodes:  # nor one task per node, which spawns its devices (below)
            raise ValueError(
                f"srun started {step_tasks} tasks, but --devices x --num-nodes = {expected}: run one task per "
                f"device, or one per node with --num-nodes {step_tasks}"
            )
    devices = devices or 1
    if num_nodes > 1 and node_rank is None:
        for name in ("NODE_RANK", "GROUP_RANK", "SLURM_NODEID"):
            if name in env:
                node_rank = int(env[name])
                break
        else:
            raise ValueError(
                f"--num-nodes {num_nodes}: this node's rank is unknown; pass --node-rank or set NODE_RANK "
                "(or launch one process per device with torchrun / srun)"
            )
    node_rank = node_rank or 0
    if not 0 <= node_rank < num_nodes:
        raise ValueError(f"node rank {node_rank} is outside --num-nodes {num_nodes}")
    world_size = devices * num_nodes
    if devices == 1:
        return Launch("run", world_size, rank=node_rank, node_rank=node_rank)
    return Launch("spawn", world_size, rank=node_rank * devices, devices=devices, node_rank=node_rank)


def run_pseudo_label(
    config: PseudoLabelConfig,
    *,
    devices: int | None = None,
    num_nodes: int = 1,
    node_rank: int | None = None,
    on_shard_done=None,
) -> JobSummary:
    """Run a pseudo-labeling job: this process's rank, or `devices` spawned ranks.

    Args:
        config: The job.
        devices: Processes (GPUs, or CPU processes) per node; None: 1, or what the launcher started.
        num_nodes: Nodes in the job.
        node_rank: This node's rank (default from the environment).
        on_shard_done: Called with each finished shard's record (in-process ranks only).

    Returns:
        The summaries of the ranks run here, and the output's index.
    """
    launch = resolve_launch(devices, num_nodes, node_rank)
    if launch.mode == "run":
        summary = label_shards(
            config,
            rank=launch.rank,
            world_size=launch.world_size,
            local_rank=launch.local_rank,
            on_shard_done=on_shard_done,
        )
        return JobSummary([summary], read_index(config.output))

    # Check everything once, before spawning (the ranks repeat the cheap checks and reuse the hash).
    if uses_cuda(config.device):
        if torch.cuda.device_count() < launch.devices:
            raise ValueError(f"--devices {launch.devices}, but {torch.cuda.device_count()} GPU(s) are visible")
    plan, teacher, _, _ = prepare(config, device=torch_device(config.device))  # the teacher stays on the CPU
    sha256 = teacher.sha256
    del teacher
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    ranks = torch.multiprocessing.spawn(
        _spawned_rank,
        args=(config, launch, sha256, results),
        nprocs=launch.devices,
        join=False,
        start_method="spawn",
    )
    try:
        while not ranks.join():
            pass
    except KeyboardInterrupt:
        stop_ranks(ranks.processes)
        raise
    summaries = []
    while not results.empty():
        summaries.append(RankSummary(**results.get()))
    summaries.sort(key=lambda s: s.rank)
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    index = IndexWriter(plan.out_dir, plan.names).refresh(force=True)
    return JobSummary(summaries, index)


def stop_ranks(processes, grace_s: float = 2.0, timeout_s: float = 60.0) -> None:
    """Stop spawned ranks after the launcher's Ctrl-C. A terminal's Ctrl-C reaches the ranks too (one process
    group), and each stops as a single process does; a SIGINT sent to the launcher alone does not, so after
    `grace_s` the ranks still running get one. Any left after `timeout_s` are killed."""
    deadline = time.monotonic() + grace_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    running = [p for p in processes if p.is_alive()]
    for process in running:
        os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout_s
    for process in running:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _spawned_rank(local_rank: int, config: PseudoLabelConfig, launch: Launch, sha256: str, results) -> None:
    if not uses_cuda(config.device):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.devices))
    summary = label_shards(
        config,
        rank=launch.node_rank * launch.devices + local_rank,
        world_size=launch.world_size,
        local_rank=local_rank,
        teacher_sha256=sha256,
    )
    results.put(asdict(summary))
