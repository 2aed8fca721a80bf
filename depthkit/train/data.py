"""`DepthDataModule`: labeled (+ unlabeled / pseudo-labeled) shard streams for Lightning.

Every path is checked when the module is built, so a wrong shard path fails before any training starts. The
stream positions (`StreamState`) go into checkpoints through `state_dict`, so a resumed run continues the data
where it stopped (see `docs/data.md`, "Resume").
"""

from __future__ import annotations

import hashlib

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn

from depthkit.data.shards import folder_index, is_local, label_shard_url, shard_file_name, shard_paths
from depthkit.data.stream import ShardStream, StreamState, batch_parts, make_loader, merge_stream_states
from depthkit.data.transforms import SampleTransform, TransformConfig
from depthkit.train.callbacks import ignore_preemption_signals


def _loader(stream: ShardStream, num_workers: int, *, pin_memory: bool = False):
    """A loader whose workers leave the preemption signals to the main process (`Preemption` saves, then exits)."""
    return make_loader(stream, num_workers=num_workers, pin_memory=pin_memory, worker_init_fn=ignore_preemption_signals)


STAGE_DATA = {"fit": ("labeled", "unlabeled", "val"), "validate": ("val",), "test": ("test",)}
"""The shards each stage reads: only those must exist (`depthkit test` runs where the training data is not)."""


def check_stage_data(stage: str, data) -> None:
    """Resolve the shards `stage` reads from `data` (the data module's arguments, a mapping): a missing option or
    shard is an error naming the option. `depthkit fit | validate | test` call it before building the model and
    the trainer; `DepthDataModule.setup` again, for Python users.

    Raises:
        ValueError: the stage's own data option is not set, or a shard folder is a killed writer's part
            (`shard_paths`).
        FileNotFoundError: a shard (or a pseudo-label shard of an unlabeled one) does not exist.
    """
    required = {"fit": "labeled", "validate": "val", "test": "test"}.get(stage)
    if stage == "fit" and data.get("labeled") is None and data.get("unlabeled") is not None:
        required = None  # a student on pseudo-labels alone (`check_module_data`)
    if required is not None and data.get(required) is None:
        raise ValueError(f"depthkit {stage} needs data.{required} (labeled shards)")
    for name in STAGE_DATA.get(stage, ()):
        if data.get(name) is not None:
            try:
                shard_paths(data[name])
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"data.{name}: {err}") from None
    if stage == "fit" and data.get("pseudo_labels"):
        kind = folder_index(data["pseudo_labels"]).get("kind") if is_local(str(data["pseudo_labels"])) else None
        if kind not in (None, "pseudo"):
            raise ValueError(
                f"data.pseudo_labels: {data['pseudo_labels']} holds {kind} shards (its index.json), not "
                "pseudo-labels: give the --output folder of `depthkit pseudo-label`"
            )
        for url in shard_paths(data["unlabeled"]):
            label = label_shard_url(data["pseudo_labels"], url)
            if is_local(label):
                try:
                    shard_paths(label)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        f"data.pseudo_labels: no pseudo-label shard {label} for image shard {url}"
                    ) from None


def _shards_digest(urls: list[str]) -> str:
    """A short digest of a stream's shard list, saved with its position: the file names in order, not their folder
    (the same shards staged elsewhere, given relative or through another mount, are the same data)."""
    return hashlib.sha256("\n".join(map(shard_file_name, urls)).encode()).hexdigest()[:16]


class DepthDataModule(L.LightningDataModule):
    """Training and validation data from WebDataset shards.

    Each stage needs only its own shards (`STAGE_DATA`); they are resolved in `setup` (`check_stage_data`).

    Args:
        labeled: Labeled shards (folder, glob, brace pattern, URL, or a list); `depthkit fit` needs them, except
            for a student on pseudo-labels alone (Depth Anything V2's students).
        unlabeled: Unlabeled image shards for the student; None trains on labeled data only.
        pseudo_labels: Folder of pseudo-label shards for `unlabeled` (same file names); None means the student's
            online teacher labels them.
        val: Labeled shards for validation (centre crops, no augmentation); None skips validation.
        test: Labeled shards for `depthkit test` (as `val`).
        batch_size: Labeled images per step and device (without `labeled`: unlabeled images).
        ratio: Labeled:unlabeled images per step (Depth Anything V1: 1:2); the unlabeled batch is
            `batch_size * ratio[1] / ratio[0]`. Not used without `labeled`.
        crop_size: Training crop, a multiple of 14 (Depth Anything: 518).
        val_crop_size: Validation centre crop; default `crop_size`.
        num_workers: DataLoader workers per stream and device.
        shuffle_buffer: Samples in each worker's shuffle buffer.
        resampled: Sweep the shards without end, each sweep a new order (step-based training; set `trainer.max_steps`).
        strong_augment: Colour jitter, greyscale and blur on the student's unlabeled images (Depth Anything V1). The
            V2 authors found them unnecessary for its ViT-S/B students of the ViT-G teacher (Depth-Anything-V2#207);
            False keeps CutMix alone.
        cutmix_p: CutMix probability per unlabeled sample (Depth Anything: 0.5).
        global_batch_size: The images per optimizer step, over all devices, that the recipe's schedule assumes
            (labeled images; unlabeled ones without `labeled`), e.g. 64 for V2's teacher: 8 per GPU on 8 GPUs. A
            run whose `batch_size x devices x accumulate_grad_batches` differs warns at the start, naming the
            setting that restores it. None checks nothing.
        seed: Seeds shard order, shuffling, augmentation and CutMix.
        on_error: "raise" at a bad sample, or "skip" and count it (logged as `data/skipped`).
    """

    def __init__(
        self,
        labeled: str | list[str] | None = None,
        *,
        unlabeled: str | list[str] | None = None,
        pseudo_labels: str | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        batch_size: int = 4,
        ratio: tuple[int, int] = (1, 2),
        crop_size: int = 518,
        val_crop_size: int | None = None,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        strong_augment: bool = True,
        cutmix_p: float = 0.5,
        global_batch_size: int | None = None,
        seed: int = 0,
        on_error: str = "raise",
    ):
        super().__init__()
        self.save_hyperparameters()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(ratio) != 2 or min(ratio) <= 0:
            raise ValueError(f"data.ratio must be two positive numbers (labeled:unlabeled), got {ratio}")
        if pseudo_labels and not unlabeled:
            raise ValueError("data.pseudo_labels needs data.unlabeled (the images they label)")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"data.on_error={on_error!r}; expected 'raise' or 'skip'")
        if unlabeled and labeled is None:  # pseudo-labels alone: the whole batch is unlabeled
            ratio = (ratio[0], ratio[0])
        if unlabeled and (batch_size * ratio[1]) % ratio[0]:
            per_step = batch_size * ratio[1] / ratio[0]
            raise ValueError(
                f"data.ratio {list(ratio)} with data.batch_size {batch_size} gives {per_step:g} unlabeled images a "
                f"step: make batch_size x {ratio[1]} a multiple of {ratio[0]}"
            )
        self.unlabeled_batch_size = batch_size * ratio[1] // ratio[0]
        self.transform = TransformConfig(crop_size=crop_size)
        self.states = {"labeled": StreamState(), "unlabeled": StreamState()}
        self._shards: dict[str, str] = {}  # the training streams' shard lists, as digests (`_shards_digest`)
        self._resume: dict = {}
        self._train_built = False  # train_dataloader ran (a later call is a reload)

    def setup(self, stage: str) -> None:
        """Resolve the shards this stage reads (`check_stage_data`; `depthkit` did so before building anything)."""
        check_stage_data(str(getattr(stage, "value", stage)), self.hparams)  # Lightning passes a TrainerFn

    # -- streams ---------------------------------------------------------------------------------------------

    def _on_cuda(self) -> bool:
        """Training batches go to a CUDA device: then the loaders pin them, and Lightning's copy to the device is
        asynchronous (from pageable memory the driver stages the copy, and the host may wait for the device)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _topology(self) -> tuple[int | None, int | None]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (None, None)

    def _stream(
        self, name: str, spec, *, kind: str, batch_size: int, transform: TransformConfig, reload: bool = False, **kw
    ):
        hp = self.hparams
        rank, world_size = self._topology()
        resume = None if reload else self._resume.get(name)
        if resume and resume.get("total_workers"):
            self._check_resume_topology(name, resume["total_workers"], world_size or 1)
        stream = ShardStream(
            spec,
            kind=kind,
            batch_size=batch_size,
            transform=SampleTransform(transform, seed=hp.seed),
            shuffle_buffer=hp.shuffle_buffer,
            seed=hp.seed,
            on_error=hp.on_error,
            rank=rank,
            world_size=world_size,
            resume=resume,
            **kw,
        )
        if reload:  # `reload_dataloaders_every_n_epochs`: Lightning's epoch, not the resumed one (nor 0)
            stream.set_epoch(self.trainer.current_epoch)
        self._shards[name] = _shards_digest(stream.urls)
        if resume and "shards" not in resume and kw.get("resampled"):
            rank_zero_warn(
                f"data.{name}: the checkpoint's position was saved by a depthkit that drew shards with replacement; "
                "this one sweeps them, so the resumed run reads another order than the saved run would have (its "
                "position is replayed along the new one)"
            )
        elif resume and resume.get("shards") not in (None, self._shards[name]):
            rank_zero_warn(
                f"data.{name}: the checkpoint's position was saved over other shards ({len(stream.urls)} now): it "
                "counts samples per loader worker, so here it skips samples of the new shards, not the ones it "
                "had read (a run that adds shards: start from the checkpoint's weights with model.checkpoint_path)"
            )
        workers = (world_size or 1) * max(hp.num_workers, 1)
        if kw.get("resampled") and len(stream.urls) < workers and not reload:
            rank_zero_warn(
                f"data.{name}: {len(stream.urls)} shard(s) for {workers} loader workers (processes x "
                "data.num_workers): workers read the same shard at once, and a step's batch may repeat images; "
                "write more, smaller shards (--shard-size), or use fewer workers"
            )
        return stream

    def _check_resume_topology(self, name: str, saved: int, world_size: int) -> None:
        """A stream resumes exactly when its global loader workers (world size x workers) are as many as when the
        checkpoint was saved; said here, in the main process, before any worker starts (a worker's error came
        after start-up and named no setting)."""
        workers = max(self.hparams.num_workers, 1)
        if saved == world_size * workers:
            return
        fix = f"--data.num_workers {saved // world_size}" if saved % world_size == 0 else f"{saved} processes"
        raise ValueError(
            f"the checkpoint's {name} data stream ran on {saved} global loader workers (processes x "
            f"data.num_workers), this run on {world_size} x {workers}: its position is a count per worker and cannot "
            f"be carried over; resume with {fix} (any split of {saved} carries it over), or start a new run from the "
            "checkpoint's weights (model.checkpoint_path)"
        )

    def train_dataloader(self):
        hp = self.hparams
        pin = self._on_cuda()
        loaders = {}
        reload, self._train_built = self._train_built, True
        world_size = self._topology()[1] or 1
        if not reload:
            self._check_global_batch(world_size)
        if not hp.resampled and world_size > 1:
            rank_zero_warn(
                f"data.resampled false on {world_size} ranks: a rank whose shards hold fewer samples ends its epoch "
                "first, and the ranks' collectives then mismatch (validation, checkpoints at epoch end) or wait for "
                "ever (the last epoch); give the ranks equal samples, or set data.resampled true with "
                "trainer.max_steps (every recipe does)"
            )
        if hp.labeled is not None:
            labeled = self._stream(
                "labeled",
                hp.labeled,
                kind="labeled",
                batch_size=hp.batch_size,
                transform=self.transform,
                resampled=hp.resampled,
                reload=reload,
            )
            loaders["labeled"] = _loader(labeled, hp.num_workers, pin_memory=pin)
        if hp.unlabeled is None:
            return loaders["labeled"]
        # Without photometric augmentation nor CutMix the student's input is the plain crop: no second copy of it
        # (`image_strong`) to stack, pin and move; the student falls back on `image`.
        perturbed = hp.strong_augment or hp.cutmix_p > 0
        strong = TransformConfig(crop_size=hp.crop_size, strong=perturbed, photometric=hp.strong_augment)
        unlabeled = self._stream(
            "unlabeled",
            hp.unlabeled,
            kind="pseudo" if hp.pseudo_labels else "unlabeled",
            labels=hp.pseudo_labels,
            batch_size=self.unlabeled_batch_size,
            transform=strong,
            resampled=hp.resampled,
            cutmix_p=hp.cutmix_p,
            reload=reload,
        )
        loaders["unlabeled"] = _loader(unlabeled, hp.num_workers, pin_memory=pin)
        return CombinedLoader(loaders, mode="min_size")

    def _check_global_batch(self, world_size: int) -> None:
        expected = self.hparams.global_batch_size
        trainer = getattr(self, "trainer", None)
        if expected is None or trainer is None:
            return
        accumulate = trainer.accumulate_grad_batches
        per_step = self.hparams.batch_size * world_size
        if per_step * accumulate == expected:
            return
        fixes = []
        if expected % (world_size * accumulate) == 0:
            fixes.append(f"data.batch_size {expected // (world_size * accumulate)}")
        if expected % per_step == 0:
            fixes.append(f"trainer.accumulate_grad_batches {expected // per_step}")
        rank_zero_warn(
            f"the recipe assumes {expected} images per optimizer step (data.global_batch_size); this run takes "
            f"{per_step * accumulate} (data.batch_size {self.hparams.batch_size} x {world_size} device(s) x "
            f"accumulate_grad_batches {accumulate}): the schedule's length in images and the learning rate's "
            f"tuning differ. {'Set ' + ' or '.join(fixes) + ' to match' if fixes else 'No whole setting matches'}, "
            "or data.global_batch_size null to silence this"
        )

    def val_dataloader(self):
        return [] if self.hparams.val is None else self._eval_loader(self.hparams.val)

    def test_dataloader(self):
        return self._eval_loader(self.hparams.test)

    def _eval_loader(self, spec):
        hp = self.hparams
        transform = TransformConfig(crop_size=hp.val_crop_size or hp.crop_size, random_crop=False, hflip=False)
        # Every rank validates on all validation shards: validation sets are small, and ranks with unequal
        # (or no) shards would stall the synchronized metric reduction.
        stream = ShardStream(
            spec,
            kind="labeled",
            batch_size=hp.batch_size,
            drop_last=False,
            rank=0,
            world_size=1,
            transform=SampleTransform(transform, seed=hp.seed),
            on_error=hp.on_error,
            advance_epoch=False,  # each validation sees the images in the same order (panels, tables)
        )
        return _loader(stream, min(hp.num_workers, 1))

    # -- position --------------------------------------------------------------------------------------------

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            for name, part in batch_parts(batch).items():
                self.states[name].update(part)
        return batch

    @property
    def num_skipped(self) -> int:
        return sum(state.num_skipped for state in self.states.values())

    def state_dict(self) -> dict:
        """The streams' positions, joined over ranks (called on every rank when a checkpoint is saved)."""
        own = {name: state.state_dict() for name, state in self.states.items()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # The epoch's last batch is taken (Lightning knows: it fetches one ahead), and a resume starts the next
            # epoch: the streams start it too, rather than with an empty rest of this one.
            own = {name: StreamState(epoch=state["epoch"] + 1).state_dict() for name, state in own.items()}
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, own)
            own = {name: merge_stream_states([ranks[name] for ranks in everyone]) for name in own}
        return {name: {**state, "shards": self._shards.get(name)} for name, state in own.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = {name: dict(s) for name, s in state_dict.items() if s.get("consumed") or s.get("epoch")}
        for name, state in state_dict.items():
            if name in self.states:
                self.states[name].load_state_dict(state)
