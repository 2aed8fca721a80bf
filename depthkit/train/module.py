"""LightningModules: a thin wrapper around `DepthModel` for each kind of run.

- `DepthModule`: supervised training on labeled batches: the Depth Anything teacher (affine-invariant disparity,
  SSI losses) and metric fine-tuning (metric head, SiLog), chosen by the model's output space and the loss.
- `StudentModule`: labeled + unlabeled batches (1:2, Depth Anything V1) or unlabeled alone (V2), strong
  augmentation and CutMix on unlabeled images,
  targets from pseudo-label shards or a frozen teacher online, feature alignment to a frozen DINOv2.

Constructors take registry names, primitives and frozen dataclasses (never modules), so `save_hyperparameters`
lets a checkpoint rebuild its model without the YAML. Batches are those of `depthkit.data.stream` (uint8 images;
scaling and normalization happen here, on device).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from depthkit.data.cutmix import mix_like
from depthkit.losses import DepthLoss, DepthLossConfig, feature_alignment_loss, preset
from depthkit.models import create_encoder, create_model, list_models, load_checkpoint, load_model
from depthkit.models.checkpoint import locate_weights
from depthkit.spaces import AFFINE_DISPARITY, DISPARITY, METRIC_DEPTH
from depthkit.train.config import LossWeights, OptimConfig, RunRecord
from depthkit.train.loggers import CSVLogger, mark_run_folder

# Checkpoints keep these typed configs in their hyperparameters. They are plain frozen dataclasses: allowlisted, so
# that `torch.load(weights_only=True)` (torch's default, and how Lightning reads checkpoints unless told otherwise)
# opens depthkit checkpoints.
torch.serialization.add_safe_globals([DepthLossConfig, OptimConfig, LossWeights])


def logs_this_step(trainer) -> bool:
    """Whether this training step's on-step scalars reach the logger (every `log_every_n_steps`, Lightning's rule).

    Lightning writes on-step values only at those steps, yet each `self.log` call costs ~1.7 ms of bookkeeping
    (profiled on CPU: a metadata dataclass is deep-copied per call). A tiny model's step logs about eight values, so
    calling it every step cost ~10% of the step; the steps in between skip it and lose nothing.
    """
    connector = getattr(trainer, "_logger_connector", None)  # None outside a Trainer: `self.log` then warns as usual
    return connector is None or bool(trainer.fast_dev_run) or connector.should_update_logs


def scalar_terms(out: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The scalar terms of a loss dict worth logging (not the per-image maps, not the valid-pixel count)."""
    return {f"{prefix}{k}": v for k, v in out.items() if v.dim() == 0 and k != "num_valid"}


def on_host(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached scalar tensors copied to the host in one transfer: one wait for the device, not one per value."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()]).cpu()
    return dict(zip(values, stacked.unbind(), strict=True))


def targets_in_space(batch: dict, output_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's targets in the model's output space: `(target_BHW, valid_BHW)`.

    Relative models train on disparity, per sample: metric depth becomes 1 / depth on valid pixels; disparity and
    affine disparity pass through. So one batch may mix them, as Depth Anything V1's teacher data does (HRWSI
    gives uncalibrated disparity, the other sets depth); the per-image scale-and-shift alignment makes the spaces
    comparable. Metric models need metric depth targets.

    A batch's `sky` mask (from the shards' `KEY.sky.png`) makes its pixels that have no label valid at disparity 0,
    the farthest, as Depth Anything V1 trains its teacher (labeled pixels keep their label; LiheYoung/Depth-Anything
    #206). Metric models leave sky unlabeled: no depth stands for it.
    """
    target_BHW, valid_BHW = _converted_targets(batch, output_space)
    if output_space != METRIC_DEPTH and "sky" in batch:
        sky_BHW = batch["sky"] & ~valid_BHW
        return target_BHW.masked_fill(sky_BHW, 0.0), valid_BHW | sky_BHW
    return target_BHW, valid_BHW


def _converted_targets(batch: dict, output_space: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`targets_in_space` without the sky: each sample's target converted to the model's space."""
    target_BHW, valid_BHW = batch["target"], batch["valid"]
    # A pseudo-labeled sample's target is the teacher's: its space is in meta["pseudo"], whatever the image's
    # own metadata says (an unlabeled image converted from an RGB-D source may still name that source's space).
    spaces = [m["pseudo"]["output_space"] if "pseudo" in m else m.get("output_space") for m in batch["meta"]]
    if output_space == METRIC_DEPTH:
        if set(spaces) != {METRIC_DEPTH}:
            raise ValueError(
                f"a metric model needs metric_depth targets, the batch has {sorted(map(str, set(spaces)))}"
            )
        return target_BHW, valid_BHW
    unknown = sorted({str(s) for s in spaces} - {METRIC_DEPTH, DISPARITY, AFFINE_DISPARITY})
    if unknown:
        keys = [k for k, s in zip(batch.get("key", [None] * len(spaces)), spaces, strict=True) if str(s) in unknown]
        raise ValueError(f"unknown target space {unknown[0]!r} (sample {keys[0]!r})")
    is_depth = [s == METRIC_DEPTH for s in spaces]
    if not any(is_depth):
        return target_BHW, valid_BHW
    depth_valid_BHW = valid_BHW & (target_BHW > 0)
    inverse_BHW = torch.where(depth_valid_BHW, 1.0 / target_BHW.clamp_min(1e-6), torch.zeros_like(target_BHW))
    if all(is_depth):
        return inverse_BHW, depth_valid_BHW
    # A mixed batch: picked per sample by Python index (views), not by a flag tensor copied to the device each step.
    pick = range(len(is_depth))
    return (
        torch.stack([inverse_BHW[i] if is_depth[i] else target_BHW[i] for i in pick]),
        torch.stack([depth_valid_BHW[i] if is_depth[i] else valid_BHW[i] for i in pick]),
    )


def load_encoder_weights(model, checkpoint_path: str) -> None:
    """Initialise `model.encoder` from DINOv2 (or any encoder) weights, as Depth Anything students start. The
    encoder is built as the model's is, `model_overrides` included (register tokens, say): the registered name's
    plain encoder refused a DINOv2-reg file as "unexpected keys", blaming the file."""
    config = model.encoder.config
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    encoder = create_encoder(model.meta.name, checkpoint_path=checkpoint_path, **fields)
    model.encoder.load_state_dict(encoder.state_dict(), strict=True)


class DepthModule(L.LightningModule):
    """Supervised depth training: teacher (relative) or metric fine-tuning.

    Args:
        model: Registry name (`depthkit.models.list_models()`), e.g. "dav2_vitl", "dav2_metric_vits", "test_dav2".
        pretrained: Start from the official Depth Anything weights in the local checkpoint folder.
        checkpoint_path: Start from this checkpoint instead (official, depthkit or transformers layout, or a
            `depthkit fit` checkpoint, whatever config it was trained with, as long as the tensors fit).
        encoder_checkpoint: Initialise only the encoder, from DINOv2 weights (the Depth Anything recipe) or the
            encoder of a Depth Anything checkpoint (the official metric fine-tuning starts so). Weights paths that
            are relative and missing are also looked for by file name in `$DEPTHKIT_HOME/checkpoints`.
        model_overrides: Config fields of the model to change (e.g. `{"max_depth": 80.0}`).
        loss: The loss on labeled images (`depthkit.losses.DepthLossConfig`; presets in `configs/loss/`).
        optim: Optimizer and schedule.
        compile: Wrap the model in `torch.compile`.
        grad_checkpointing: Recompute each encoder block in the backward instead of keeping its activations
            (timm's `set_grad_checkpointing`): less memory for large models and crops, about a third more compute.
        panel_every_n_steps: Keep a sample for the image-panel callback every N steps (0: never); a student keeps
            one of its labeled and one of its pseudo-labeled images.
    """

    def __init__(
        self,
        model: str = "test_dav2",
        *,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        encoder_checkpoint: str | None = None,
        model_overrides: dict | None = None,
        loss: DepthLossConfig = preset("dav2"),
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        grad_checkpointing: bool = False,
        panel_every_n_steps: int = 200,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.run_id = uuid.uuid4().hex  # a resumed run takes its checkpoint's (`on_load_checkpoint`)
        # typed; self.hparams holds what the CLI saw. From Python, a dict of fields (or a loss preset's name) will do.
        self.loss_config, self.optim_config = typed(loss, DepthLossConfig, "loss"), typed(optim, OptimConfig, "optim")
        loss = self.loss_config
        if model not in list_models():
            raise ValueError(f"model.model: unknown model {model!r}; registered: {', '.join(list_models())}")
        self.model = create_model(model, pretrained=pretrained and checkpoint_path is None, **(model_overrides or {}))
        if checkpoint_path is not None:  # a start, not this model's own weights: another config's are fine
            load_checkpoint(self.model, locate_weights(checkpoint_path, "model.checkpoint_path"), check_config=False)
        if encoder_checkpoint:
            load_encoder_weights(self.model, locate_weights(encoder_checkpoint, "model.encoder_checkpoint"))
        self.model.encoder.set_grad_checkpointing(grad_checkpointing)
        space = self.model.meta.output_space
        if (loss.objective == "silog") != (space == METRIC_DEPTH):
            raise ValueError(
                f"loss objective {loss.objective!r} does not fit model {model!r} ({space}): metric models train "
                "with objective 'silog', relative models with 'ssi'"
            )
        self.loss_fn = DepthLoss(loss)
        self.compile_model, self.panel_every_n_steps = compile, panel_every_n_steps
        self.panels: dict[str, dict] = {}  # panel name -> the latest sample kept for `ImagePanels`
        self.eval_rows: list[dict] = []  # this validation's (or test's) per-image metrics
        self._panel_steps: dict[str, int] = {}  # panel name -> the step of its last sample
        self.schedule_steps: int | None = None  # the optimizer steps the learning-rate schedule spans (once fitting)

    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and data is not None and "unlabeled" in data.hparams:  # a `DepthDataModule`
            teacher = getattr(self, "teacher", None) is not None
            hp = data.hparams
            check_module_data(type(self), hp.labeled, hp.unlabeled, hp.pseudo_labels, teacher=teacher)

    def configure_model(self) -> None:
        # Lightning calls this before every fit / validate / test: compile once. Replacing `forward` on the instance
        # keeps the state_dict keys (no `_orig_mod.` prefix), so checkpoints load into uncompiled models.
        if self.compile_model and "forward" not in vars(self.model):
            self.model.forward = torch.compile(self.model.forward)

    # -- forward ---------------------------------------------------------------------------------------------

    def predict_uint8(self, image_B3HW: torch.Tensor, *, model=None, with_features: bool = False):
        """Run a model on a uint8 batch: scale to [0, 1], normalize with the model's metadata, forward."""
        model = self.model if model is None else model
        image_BCHW = model.normalize(to_unit(image_B3HW, model))
        return model.forward_with_features(image_BCHW) if with_features else model(image_BCHW)

    def forward(self, image_B3HW: torch.Tensor) -> torch.Tensor:
        return self.predict_uint8(image_B3HW)

    # -- steps -----------------------------------------------------------------------------------------------

    def labeled_loss(self, batch: dict) -> tuple[dict, torch.Tensor]:
        space = self.model.meta.output_space
        target_BHW, valid_BHW = targets_in_space(batch, space)
        if space == METRIC_DEPTH:  # as the official metric fine-tuning: depths the head can output, from 1 mm up
            valid_BHW = valid_BHW & (target_BHW >= MIN_METRIC_DEPTH) & (target_BHW <= self.model.meta.max_depth)
        pred_BHW = self.predict_uint8(batch["image"])
        return self.loss_fn(pred_BHW, target_BHW, valid_BHW), pred_BHW

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled = batch["labeled"] if "labeled" in batch else batch
        out, pred_BHW = self.labeled_loss(labeled)
        self.log_terms("train", out, batch_size=labeled["image"].shape[0])
        self.keep_panel(labeled, pred_BHW)
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict) -> None:
        out, pred_BHW = self.labeled_loss(batch)
        self.log_terms(stage, out, batch_size=batch["image"].shape[0])
        rows = aligned_image_metrics(pred_BHW, batch, self.model.meta)
        if rows:
            self.eval_rows.extend(rows)  # the epoch end logs them as a table, and empties the list
            means = {f"{stage}/{k}": v for k, v in mean_metrics(rows).items()}
            # Weighted by the images scored, not the batch: the epoch value is then the mean over images.
            self.log_dict(means, batch_size=len(rows), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_table("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_table("test")

    def _log_eval_table(self, stage: str) -> None:
        """The evaluation's per-image metrics as a table, to loggers that take tables (W&B). Every rank evaluates all
        the images (`DepthDataModule`), so rank 0's rows are all of them."""
        rows, self.eval_rows = self.eval_rows, []
        if not rows or self._trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        columns = ["key", *EVAL_METRICS]
        for logger in self.trainer.loggers:
            if hasattr(logger, "log_table"):
                data = [[row[c] for c in columns] for row in rows]
                logger.log_table(key=f"{stage}/per_image", columns=columns, data=data, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # `--ckpt_path` checks that it resumes the same kind of run, and says when the schedule's length changes.
        # A resumed fit continues the run's W&B run and CSV folder (the first of each kind among the loggers).
        loggers = self._trainer.loggers if self._trainer is not None else []
        wandb = next((str(lg.version) for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
        csv = next((str(Path(lg.log_dir).resolve()) for lg in loggers if isinstance(lg, CSVLogger)), None)
        record = RunRecord(
            module=type(self).__name__,
            schedule_steps=self.schedule_steps,
            wandb_run_id=wandb,
            log_dir=csv,
            run_id=self.run_id,
        )
        checkpoint["depthkit"] = record.to_dict()
        if csv is not None and self.trainer.is_global_zero:
            mark_run_folder(csv, self.run_id, self.trainer.global_step)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.run_id = RunRecord.of(checkpoint).run_id or self.run_id  # a resume continues the run

    def log_terms(self, stage: str, out: dict, *, batch_size: int, prefix: str = "") -> None:
        """Log every scalar term of a loss dict as `<stage>/<prefix><term>`; the total also on the progress bar."""
        self.log_scalars(stage, scalar_terms(out, prefix), batch_size=batch_size)

    def log_scalars(self, stage: str, values: dict[str, torch.Tensor], *, batch_size: int) -> None:
        """Log scalar tensors as `<stage>/<name>`; the one named "loss" also on the progress bar.

        Training values are logged only at logging steps (`logs_this_step`), and from the host (`on_host`): Lightning
        reads the progress-bar value with `.item()` after every step, the last logged one included, and on a GPU
        each such read waits for the step's kernels, so the host could not prepare the next batch meanwhile.
        """
        if stage == "train":
            if not logs_this_step(self._trainer):
                return
            values = on_host(values)
            for name in [n for n in values if n.endswith("loss_partner")]:
                # No image mixed: the partner regions have no loss. A logged 0 pulled their curve down, and a key left
                # out is sent again with its last value (Lightning keeps an epoch's keys): NaN, a gap in the curve.
                if values.get(name.removesuffix("loss_partner") + "mixed_fraction", 1) == 0:
                    values[name] = torch.tensor(float("nan"))
        for name, value in values.items():
            # Every rank sees the same validation data (see DepthDataModule.val_dataloader), so the epoch-end sync
            # of validation values changes nothing; it makes checkpoint monitors provably agree across ranks.
            self.log(
                f"{stage}/{name}",
                value.detach(),
                batch_size=batch_size,
                prog_bar=name == "loss",
                sync_dist=stage != "train",
            )

    def keep_panel(
        self, batch: dict, pred_BHW: torch.Tensor, targets: tuple | None = None, name: str = "train"
    ) -> None:
        """Keep the first sample of a batch as panel `name` for `ImagePanels`, every `panel_every_n_steps` steps;
        `targets` (target, valid) when they are not the batch's own labels (a student's pseudo-labels)."""
        if self._trainer is not None and not self._trainer.is_global_zero:  # only rank 0 logs them: no copies
            return
        step = self.global_step
        if self.panel_every_n_steps and step % self.panel_every_n_steps == 0 and self._panel_steps.get(name) != step:
            self._panel_steps[name] = step  # the first micro-batch of the step only (gradient accumulation)
            target_BHW, valid_BHW = targets or targets_in_space(batch, self.model.meta.output_space)
            self.panels[name] = {
                "image": batch["image"][0].detach().cpu(),
                "target": target_BHW[0].detach().float().cpu(),
                "valid": valid_BHW[0].detach().cpu(),
                "pred": pred_BHW[0].detach().float().cpu(),
                "space": self.model.meta.output_space,
                "step": step,
                "target_name": "pseudo-label" if targets is not None else "target",
            }

    # -- optimization ----------------------------------------------------------------------------------------

    def configure_optimizers(self):
        cfg = self.optim_config
        groups = [
            {
                "params": [p for p in self.model.encoder.parameters() if p.requires_grad],
                "lr": cfg.encoder_lr,
                "name": "encoder",
            },
            {
                "params": [p for p in self.model.head.parameters() if p.requires_grad],
                "lr": cfg.decoder_lr,
                "name": "decoder",
            },
        ]
        optimizer = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
        total = schedule_length(self.trainer.max_steps, lambda: self.trainer.estimated_stepping_batches, cfg.schedule)
        self.schedule_steps = total
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cfg.lr_factor(step, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class StudentModule(DepthModule):
    """The Depth Anything student: labeled + pseudo-labeled images, CutMix, feature alignment.

    Per step, with a labeled batch and an unlabeled batch (1:2 by default, set in the data module), or an
    unlabeled batch alone (Depth Anything V2's students: the data module has no `labeled`):
    - labeled: `loss` on the (weakly augmented) labeled images, when there are any;
    - unlabeled: the student sees the strongly augmented, CutMix-ed image; the target is the pseudo-label of the
      clean image (from pseudo-label shards, or from the frozen `teacher` online), mixed with the same CutMix
      mask; `unlabeled_loss` is computed per CutMix region and averaged by area;
    - feature alignment: 1 - cosine between the student's final encoder tokens and a frozen copy of the encoder
      it started from (DINOv2), per patch, ignoring patches above `feature_tolerance`;
    - total: `loss_weights` over the terms the step has (normalized: their mean, as Depth Anything V1).

    Args (beyond `DepthModule`'s):
        unlabeled_loss: The loss on pseudo-labels (Depth Anything V2: trimmed, `dav2_pseudo`).
        teacher: Registry name of an online teacher; None reads targets from pseudo-label shards.
        teacher_checkpoint: Weights of the online teacher.
        feature_tolerance: Patches with cosine similarity above this are ignored (0.85: the V1 paper's margin
            alpha = 0.15 on 1 - cos). Both networks see the student's input: the strong-augmented, CutMix-ed image.
        loss_weights: How labeled, unlabeled and feature terms combine.
    """

    def __init__(
        self,
        model: str = "test_dav2",
        *,
        pretrained: bool = False,
        checkpoint_path: str | None = None,
        encoder_checkpoint: str | None = None,
        model_overrides: dict | None = None,
        loss: DepthLossConfig = preset("dav2"),
        unlabeled_loss: DepthLossConfig = preset("dav2_pseudo"),
        teacher: str | None = None,
        teacher_checkpoint: str | None = None,
        feature_tolerance: float = 0.85,
        loss_weights: LossWeights = LossWeights(),
        optim: OptimConfig = OptimConfig(),
        compile: bool = False,
        grad_checkpointing: bool = False,
        panel_every_n_steps: int = 200,
    ):
        super().__init__(
            model,
            pretrained=pretrained,
            checkpoint_path=checkpoint_path,
            encoder_checkpoint=encoder_checkpoint,
            model_overrides=model_overrides,
            loss=loss,
            optim=optim,
            compile=compile,
            grad_checkpointing=grad_checkpointing,
            panel_every_n_steps=panel_every_n_steps,
        )
        self.save_hyperparameters()
        if self.model.meta.output_space == METRIC_DEPTH:
            raise ValueError(f"the student trains relative depth; {model!r} is a metric model")
        self.unlabeled_config = typed(unlabeled_loss, DepthLossConfig, "unlabeled_loss")
        self.weights = typed(loss_weights, LossWeights, "loss_weights")
        self.feature_tolerance = feature_tolerance
        self.unlabeled_loss_fn = DepthLoss(self.unlabeled_config)
        # The frozen DINOv2 target is the encoder the student starts from (`encoder_checkpoint`): a copy, kept out
        # of checkpoints (it is rebuilt from the same weights) and always in eval mode.
        self.frozen_encoder = copy.deepcopy(self.model.encoder).requires_grad_(False).eval()
        self.frozen_encoder.set_grad_checkpointing(False)  # no backward through it: nothing to recompute
        self.teacher = _online_teacher(teacher, teacher_checkpoint)
        # The frozen networks are rebuilt from their own weights: they stay out of the state dict (so checkpoints
        # hold the student alone) and their keys are not expected back. Hooks, not on_save/on_load_checkpoint, so
        # that every path agrees, FSDP2's gathered state dicts and strict loads included.
        self.register_state_dict_post_hook(_drop_frozen_keys)
        self.register_load_state_dict_post_hook(_allow_missing_frozen_keys)

    def train(self, mode: bool = True):
        super().train(mode)
        self.frozen_encoder.eval()  # frozen networks stay in eval mode for the whole run
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode at the start of training; the frozen networks are, by
        # design. Only their exact count is silenced, so a module left in eval mode by mistake still warns.
        frozen = sum(len(list(net.modules())) for net in (self.frozen_encoder, self.teacher) if net is not None)
        warnings.filterwarnings("ignore", rf"Found {frozen} module\(s\) in eval mode", PossibleUserWarning)

    def unlabeled_targets(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-labels of the clean images: from the shards, or from the online teacher."""
        if self.teacher is not None:
            with torch.no_grad():
                target_BHW = self.predict_uint8(batch["image"], model=self.teacher).float()
            return target_BHW, torch.ones_like(target_BHW, dtype=torch.bool)
        if "target" not in batch:
            raise ValueError("unlabeled batches carry no pseudo-labels: set data.pseudo_labels or model.teacher")
        return targets_in_space(batch, AFFINE_DISPARITY)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labeled, unlabeled = batch.get("labeled"), batch["unlabeled"]  # no labeled batch: pseudo-labels alone (V2)
        w = self.weights
        terms, values = {}, {}  # term name -> (weight, loss), in the order they are summed
        if labeled is not None:
            out_l, pred_l_BHW = self.labeled_loss(labeled)
            terms["labeled"] = (w.labeled, out_l["loss"])
            values |= scalar_terms(out_l, "labeled/")

        u = self.unlabeled_loss(unlabeled)
        terms["unlabeled"] = (w.unlabeled, u.out["loss"])
        values |= scalar_terms(u.out, "unlabeled/")
        if w.feature > 0:
            terms["feature"] = (w.feature, self.feature_loss(u.image_B3HW, u.tokens_BND)["loss"])
        total = sum(weight * loss for weight, loss in terms.values())
        if w.normalize:  # over the terms this run has: the mean of them, as Depth Anything V1
            total = total / sum(weight for weight, _ in terms.values())
        if labeled is not None:
            self.keep_panel(labeled, pred_l_BHW)
        self.keep_panel({"image": u.image_B3HW}, u.pred_BHW, (u.target_BHW, u.valid_BHW), name="train_unlabeled")
        n = u.image_B3HW.shape[0] + (labeled["image"].shape[0] if labeled is not None else 0)
        values |= {f"term/{k}": loss for k, (_, loss) in terms.items()} | {"loss": total}
        self.log_scalars("train", values, batch_size=n)
        return total

    def unlabeled_loss(self, unlabeled: dict) -> UnlabeledStep:
        """The student on the (strongly augmented, CutMixed) unlabeled images against the clean images' labels,
        mixed the same way; the loss per CutMix region."""
        target_BHW, valid_BHW = self.unlabeled_targets(unlabeled)
        mask_BHW, index_B = unlabeled.get("cutmix_mask"), unlabeled.get("cutmix_index")
        if mask_BHW is not None:
            target_BHW = mix_like(target_BHW, mask_BHW, index_B)
            valid_BHW = mix_like(valid_BHW, mask_BHW, index_B)
        image_B3HW = unlabeled.get("image_strong", unlabeled["image"])
        pred_BHW, tokens_BND = self.predict_uint8(image_B3HW, with_features=True)
        out = self.unlabeled_loss_fn(pred_BHW, target_BHW, valid_BHW, mask_BHW)
        return UnlabeledStep(out, image_B3HW, pred_BHW, tokens_BND, target_BHW, valid_BHW)

    def feature_loss(self, image_B3HW: torch.Tensor, tokens_BND: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature alignment of the student's patch tokens to the frozen DINOv2's on the same images."""
        with torch.no_grad():
            image_BCHW = self.model.normalize(to_unit(image_B3HW, self.frozen_encoder))
            frozen_BND = self.frozen_encoder.forward_patch_tokens(image_BCHW)
        return feature_alignment_loss(
            tokens_BND, frozen_BND, tolerance=self.feature_tolerance, impl=self.loss_config.impl
        )


class UnlabeledStep(NamedTuple):
    """`StudentModule.unlabeled_loss`: the loss dict, the images the student saw, its prediction and patch tokens,
    and the (mixed) targets it was scored against."""

    out: dict[str, torch.Tensor]
    image_B3HW: torch.Tensor
    pred_BHW: torch.Tensor
    tokens_BND: torch.Tensor
    target_BHW: torch.Tensor
    valid_BHW: torch.Tensor


def _online_teacher(teacher: str | None, teacher_checkpoint) -> torch.nn.Module | None:
    """The frozen online teacher `model.teacher` names, built as its checkpoint says it was trained (without one,
    random weights: tests); None without a teacher (the pseudo-labels come from shards)."""
    if teacher is None:
        if teacher_checkpoint:
            raise ValueError("teacher_checkpoint needs teacher= (the teacher's registry name)")
        return None
    if teacher_checkpoint:
        teacher_checkpoint = locate_weights(teacher_checkpoint, "model.teacher_checkpoint")
    if teacher not in list_models():
        raise ValueError(f"model.teacher: unknown model {teacher!r}; registered: {', '.join(list_models())}")
    model = load_model(teacher, teacher_checkpoint, pretrained=False).requires_grad_(False)
    if model.meta.output_space == METRIC_DEPTH:
        raise ValueError(f"teacher {teacher!r} is metric; pseudo-labels are affine-invariant disparity")
    return model


FROZEN_NETWORKS = ("frozen_encoder", "teacher")
MIN_METRIC_DEPTH = 1e-3
"""Metres: metric fine-tuning trains on targets in [MIN_METRIC_DEPTH, max_depth] (the official `train.py` mask)."""


def typed(value, config_type: type, name: str):
    """A module's config argument as its frozen dataclass: as given, from a dict of its fields, or (a loss) from a
    preset's name.

    Raises:
        ValueError: anything else, naming the argument.
    """
    if isinstance(value, config_type):
        return value
    if isinstance(value, dict):
        return config_type(**value)
    if isinstance(value, str) and config_type is DepthLossConfig:
        return preset(value)
    raise ValueError(f"{name}: expected a {config_type.__name__} (or a dict of its fields), got {type(value).__name__}")


def check_module_data(module: type, labeled, unlabeled, pseudo_labels, *, teacher: bool) -> None:
    """Refuse a fit whose data do not suit its module class: a student without unlabeled images or their targets,
    a supervised module without labeled images or given unlabeled ones it would read and never use. A student may
    go without labeled images (Depth Anything V2's train on pseudo-labels alone). `depthkit fit` checks the
    configuration before building anything; `DepthModule.setup` checks its data module."""
    kind, student = module.__name__, issubclass(module, StudentModule)
    if not student and labeled is None:
        raise ValueError(f"depthkit fit needs data.labeled (labeled shards) for {kind}")
    if student:
        if unlabeled is None:
            raise ValueError(f"the student ({kind}) trains on unlabeled images too: set data.unlabeled")
        if pseudo_labels is None and not teacher:
            raise ValueError(
                "the student's unlabeled images need targets: set data.pseudo_labels (pseudo-label shards) or "
                "model.teacher (a frozen teacher labels them online)"
            )
    elif unlabeled is not None:
        raise ValueError(
            f"{kind} trains on labeled images only, but data.unlabeled is set (a student, StudentModule, uses it): "
            "remove it"
        )


def schedule_length(max_steps: int | None, estimate: Callable[[], float], schedule: str) -> int:
    """The optimizer steps the learning-rate schedule spans: `trainer.max_steps`, else Lightning's estimate from
    the epochs (`estimate`, read only then). A decaying schedule refuses a run of unknown length: a streamed
    dataset has no epoch length, and the schedule would silently stay at its peak."""
    if max_steps is not None and max_steps > 0:
        return int(max_steps)
    estimated_steps = float(estimate())
    if math.isfinite(estimated_steps) and estimated_steps > 0:
        return int(estimated_steps)
    if schedule == "constant":
        return 0
    raise ValueError(
        f"model.optim.schedule {schedule!r} needs the run's length in optimizer steps: set trainer.max_steps "
        "(the training stream has no known epoch length, so trainer.max_epochs does not give one)"
    )


def to_unit(image_B3HW: torch.Tensor, network: torch.nn.Module) -> torch.Tensor:
    """A uint8 batch scaled to [0, 1], in the dtype of the network's weights: float32 under mixed precision, the
    weights' own under a "-true" precision (which casts the weights, not the batch)."""
    if image_B3HW.dtype != torch.uint8:  # a float batch would be divided by 255 twice, silently
        raise ValueError(f"expected a uint8 image batch (0-255), as the data module makes, got {image_B3HW.dtype}")
    dtype = next(p.dtype for p in network.parameters() if p.is_floating_point())
    return image_B3HW.to(dtype) / 255.0


def _drop_frozen_keys(module, state_dict, prefix, local_metadata) -> None:
    frozen = tuple(f"{prefix}{name}." for name in FROZEN_NETWORKS)
    for key in [k for k in state_dict if k.startswith(frozen)]:
        del state_dict[key]


def _allow_missing_frozen_keys(module, incompatible_keys) -> None:
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if k.split(".", 1)[0] not in FROZEN_NETWORKS]  # the root module's keys


def aligned_metrics(pred_BHW: torch.Tensor, batch: dict, meta) -> dict[str, float]:
    """Mean AbsRel and delta1 over a batch of metric-depth targets (see `aligned_image_metrics`); {} without any."""
    rows = aligned_image_metrics(pred_BHW, batch, meta)
    return mean_metrics(rows) if rows else {}


EVAL_METRICS = ("abs_rel", "delta1")


def mean_metrics(rows: list[dict]) -> dict[str, float]:
    """The mean of each of `EVAL_METRICS` over per-image rows (`aligned_image_metrics`)."""
    import numpy as np

    return {k: float(np.mean([row[k] for row in rows])) for k in EVAL_METRICS}


def aligned_image_metrics(pred_BHW: torch.Tensor, batch: dict, meta) -> list[dict]:
    """Per image of a batch with a metric-depth target: its key, AbsRel and delta1 after the evaluation protocol's
    alignment. Relative predictions: per-image least squares in disparity space (`depthkit.eval`), depth capped at
    `FAR_DEPTH_CAP`; metric ones: none, and ground truth only within the model's range (`MIN_METRIC_DEPTH` to its
    `max_depth`, as Depth Anything V2's metric `train.py` validates). Targets that are not metric depth, and images
    with under `MIN_SCORED_PIXELS` such pixels (as `depthkit eval` and that `train.py`), are left out. No cap comes
    from the ground truth itself: each image's own largest depth hid every over-estimate beyond it.

    Args:
        meta: The model's `ModelMeta` (its output space and, for metric models, `max_depth`).
    """
    from depthkit.eval.alignment import FAR_DEPTH_CAP
    from depthkit.eval.scoring import score_image

    metric = meta.output_space == METRIC_DEPTH
    min_depth, max_depth = (MIN_METRIC_DEPTH, meta.max_depth) if metric else (1e-3, FAR_DEPTH_CAP)
    rows = []
    for b, sample_meta in enumerate(batch["meta"]):
        if sample_meta.get("output_space") != METRIC_DEPTH:
            continue
        score = score_image(
            pred_BHW[b].detach().float().cpu().numpy(),
            batch["target"][b].detach().float().cpu().numpy(),
            batch["valid"][b].detach().cpu().numpy(),
            alignment="none" if metric else "lsq_disparity",
            output_space=meta.output_space,
            min_depth=min_depth,
            max_depth=max_depth,
        )
        if score.metrics is not None:
            rows.append({"key": batch["key"][b], **{k: float(score.metrics[k]) for k in EVAL_METRICS}})
    return rows
