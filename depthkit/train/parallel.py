"""Fully sharded data parallel (FSDP2) for depthkit runs: `strategy: depthkit.train.FSDP2Strategy`.

Every process holds a 1/world-size shard of each parameter, gradient and optimizer state (a DTensor, sharded on
dim 0) and gathers a unit's full weights only while that unit runs (with `hybrid_shard: true`, 1/GPUs-per-node,
the shards replicated across nodes). Units: each transformer block, the DPT head, then each network of the module
(the model, the student's frozen encoder, an online teacher) as a root for what is left (embeddings, final norm).
Gradients are averaged over all processes, as with DDP.

Why torch's `fully_shard` (through Lightning's `ModelParallelStrategy`) and not Lightning's `FSDPStrategy`:
- `FSDPStrategy` wraps torch's FSDP1, whose flat parameters mix frozen and trainable weights badly (the student
  holds both) and which needs a CUDA device, so it cannot be tested on CPU. `fully_shard` keeps every parameter as
  it is (same names, so checkpoints keep their keys), shards frozen networks too, and runs on CPU with gloo: the
  tests train with it.
- `ModelParallelStrategy` alone splits nodes from GPUs (data-parallel over nodes, tensor-parallel within one).
  depthkit has no tensor parallelism: this strategy shards over every process.

In a trainer config: `strategy: fsdp2` (registered by importing `depthkit.train`), or with options
`strategy: {class_path: depthkit.train.FSDP2Strategy, init_args: {reshard_after_forward: false}}`.

Precision: `precision: bf16-mixed` autocasts as with DDP; the sharded weights stay fp32 and are gathered in fp32.
`param_dtype: bf16` gathers them in bf16 instead (half the all-gather traffic, bf16 compute) and reduces gradients
in fp32; the head's prediction layer (`DPTHead.prediction_layer`) stays an fp32 unit, so the prediction is fp32
as under autocast. The optimizer still steps the fp32 shards.

Checkpoints: by default one file with the full state, gathered on rank 0 (what `predict`, `export`, `eval` and
resuming read). `save_distributed_checkpoint: true` writes a folder of per-rank shards instead (no gather on
rank 0); it resumes a run, and `python -m torch.distributed.checkpoint.format_utils dcp_to_torch DIR out.pt` makes
the one file the other commands read.
"""

from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn
from torch.distributed.constants import default_pg_timeout

# Methods called instead of `forward` on a sharded network: FSDP2 must gather its weights for them too.
FORWARD_METHODS = ("forward_with_features", "forward_patch_tokens")


def shard_networks(module: nn.Module, mesh, *, reshard_after_forward: bool = True, param_dtype: str = "fp32") -> None:
    """Apply `fully_shard` to every network held by `module` (a LightningModule).

    A network is a direct child with parameters. Its transformer blocks and DPT head become units first, then the
    network itself. With `param_dtype="bf16"`, units gather bf16 weights, except each head's prediction layer (fp32).
    Networks already sharded are left alone (Lightning sets a module up again for each `fit` / `validate`).
    """
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from depthkit.models.dpt_head import DPTHead

    # fp32: no policy (weights as stored, no casts, autocast alone decides the compute dtype, as with DDP).
    bf16 = param_dtype == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)  # casts its input to fp32
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward, **({"mp_policy": policy} if bf16 else {})}

    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:
        raise ValueError(f"FSDP2Strategy shards child networks; {type(module).__name__} holds parameters {own}")
    for child in module.children():
        if isinstance(child, FSDPModule) or next(child.parameters(), None) is None:
            continue
        for sub in child.modules():
            if bf16 and isinstance(sub, DPTHead):
                fully_shard(sub.prediction_layer, **{**kw, "mp_policy": fp32})
            if isinstance(sub, (Block, DPTHead)):
                fully_shard(sub, **kw)
        fully_shard(child, **kw)
        for method in FORWARD_METHODS:
            if callable(getattr(child, method, None)):
                register_fsdp_forward_method(child, method)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over all processes of all nodes (see the module docstring).

    Args:
        reshard_after_forward: Free each unit's gathered weights after its forward and gather them again for the
            backward (least memory, ZeRO-3). False keeps them until the backward (ZeRO-2: less communication).
        hybrid_shard: Shard within each node and replicate across nodes (HSDP): the per-block gathers stay on the
            node's fast links and only the gradient all-reduce crosses nodes; memory per GPU is that of one node's
            sharding. Off: shard over every process of every node.
        param_dtype: "bf16" gathers weights in bf16 (see the module docstring); "fp32" (default) as stored.
        save_distributed_checkpoint: Write per-rank shards (a folder) instead of one full checkpoint file.
        process_group_backend: "nccl" on CUDA, "gloo" on CPU by default.
        timeout: Collective timeout.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        reshard_after_forward: bool = True,
        hybrid_shard: bool = False,
        param_dtype: str = "fp32",
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        if param_dtype not in ("fp32", "bf16"):
            raise ValueError(f"FSDP2Strategy param_dtype={param_dtype!r}; expected 'fp32' or 'bf16'")
        self.reshard_after_forward, self.hybrid_shard = reshard_after_forward, hybrid_shard
        self.param_dtype = param_dtype

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # the world: every process holds a shard
        super().setup_environment()

    def setup(self, trainer) -> None:
        mesh = self.device_mesh["data_parallel"]
        if self.hybrid_shard and self.num_nodes > 1:
            from torch.distributed.device_mesh import init_device_mesh

            # Global rank = node * processes + local rank: a mesh row is a node. A 2-D mesh makes fully_shard HSDP.
            shape, names = (self.num_nodes, self.num_processes), ("replicate", "shard")
            mesh = init_device_mesh(self.root_device.type, shape, mesh_dim_names=names)
        shard_networks(
            self.lightning_module, mesh, reshard_after_forward=self.reshard_after_forward, param_dtype=self.param_dtype
        )
        super().setup(trainer)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        """Resume; strict about the keys of the module's state dict rather than its parameter list.

        Lightning's full-file path checks every parameter, so it would demand the networks a module keeps out of
        its state dict (the student's frozen encoder and teacher, rebuilt from their own weights). The sharded
        path already goes through `state_dict()` / `load_state_dict()`, which know about them.
        """
        module = self.lightning_module
        path = Path(self.broadcast(checkpoint_path))
        if not module.strict_loading or not path.is_file():
            return self._load_named_optimizer_state(path, weights_only)
        saved = set(torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)["state_dict"])
        expected = set(module.state_dict())
        missing, unexpected = sorted(expected - saved), sorted(saved - expected)
        if missing or unexpected:
            raise KeyError(f"{path}: keys missing {missing[:5]}, unexpected {unexpected[:5]} (of {len(saved)})")
        module.strict_loading = False  # checked above; the frozen networks keep the weights they were built with
        try:
            return self._load_named_optimizer_state(path, weights_only)
        finally:
            module.strict_loading = True

    def _load_named_optimizer_state(self, path: Path, weights_only: bool | None) -> dict:
        with _optimizer_state_by_name(self.optimizers):
            return super().load_checkpoint(path, weights_only=weights_only)


@contextmanager
def _optimizer_state_by_name(optimizers):
    """Resume a DDP (or one-device) checkpoint under FSDP2: its optimizer state is keyed by position in the
    optimizer's parameter groups, and Lightning renames those positions after the module's `named_parameters()`,
    frozen parameters included, which depthkit's groups leave out (the encoder's mask token, unused DPT layers,
    the student's frozen networks): every moment from the first frozen parameter on landed on the wrong parameter,
    or failed on a shape. Here such positions are named after the optimizer's own groups; FSDP2's own files keep
    Lightning's renaming."""
    from lightning.fabric.strategies import model_parallel

    lightning_rekey = model_parallel._rekey_optimizer_state_if_needed
    if len(optimizers) != 1:  # depthkit's modules have one optimizer; which one a state is for is not passed
        yield
        return

    def rekey(optimizer_state: dict, module: nn.Module) -> dict:
        # torch's own state dict (DDP, one device) numbers the parameters 0, 1, ... through the groups in order;
        # Lightning's FSDP2 files number them by position in module.parameters() (frozen ones counted, so with
        # gaps), which its own renaming expects. Where both read the same (no gap, same order) they agree.
        positions = [i for group in optimizer_state["param_groups"] for i in group["params"]]
        sizes = [len(group["params"]) for group in optimizer_state["param_groups"]]
        native = positions == list(range(len(positions)))
        if not native or sizes != [len(group["params"]) for group in optimizers[0].param_groups]:
            return lightning_rekey(optimizer_state, module)
        names = {id(p): name for name, p in module.named_parameters()}
        order = [names[id(p)] for group in optimizers[0].param_groups for p in group["params"]]
        state = {order[i]: value for i, value in optimizer_state["state"].items()}
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]]
        return {"state": state, "param_groups": groups}

    model_parallel._rekey_optimizer_state_if_needed = rekey
    try:
        yield
    finally:
        model_parallel._rekey_optimizer_state_if_needed = lightning_rekey


# `strategy: fsdp2` in YAML or `--trainer.strategy fsdp2`; depthkit's meaning wins should Lightning add the name.
StrategyRegistry.register("fsdp2", FSDP2Strategy, description=FSDP2Strategy.__doc__.splitlines()[0], override=True)
