"""The throughput and data-wait monitor; image panels; a preempted run as W&B records it."""

import math

import torch


def test_throughput_leaves_out_the_step_after_a_validation_or_a_save():
    """Validation and checkpoint time read as data wait: the step after each validation showed 96% waiting."""
    import time
    from types import SimpleNamespace

    from depthkit.train.callbacks import ThroughputMonitor

    trainer = SimpleNamespace(
        world_size=1, fast_dev_run=False, _logger_connector=SimpleNamespace(should_update_logs=False)
    )
    batch = {"unlabeled": {"image": torch.zeros(3, 3, 2, 2)}}  # a V2 student's step: no labeled part
    monitor = ThroughputMonitor()

    def step(before=None):
        if before:
            before()
            time.sleep(0.05)
        monitor.on_train_batch_start(trainer, None, batch, 0)
        monitor.on_train_batch_end(trainer, None, None, batch, 0)

    step()  # start-up: left out
    step()
    assert monitor._window[0] == 3
    step(lambda: monitor.on_validation_start(trainer, None))
    step(lambda: monitor.on_save_checkpoint(trainer, None, {}))
    assert monitor._window[0] == 3 and monitor._window[1] < 0.05  # the 0.05 s waits are not in the window
    step()
    assert monitor._window[0] == 6


def test_a_preempted_run_is_marked_so_in_wandb():
    from types import SimpleNamespace

    from depthkit.train.callbacks import mark_preempted

    calls = []
    run = SimpleNamespace(
        mark_preempting=lambda: calls.append("preempting"), finish=lambda exit_code: calls.append(exit_code)
    )
    csv = SimpleNamespace(experiment=SimpleNamespace(log_metrics=lambda *a: None))
    mark_preempted([csv, SimpleNamespace(experiment=run)], 143)
    assert calls == ["preempting", 143]


def test_a_panel_is_kept_once_per_optimizer_step():
    """With gradient accumulation each micro-batch of a panel step kept one, and W&B got several panels a step."""
    from depthkit.train import DepthModule

    module = DepthModule("test_dav2", panel_every_n_steps=1)
    batch = {"image": torch.zeros(2, 3, 14, 14, dtype=torch.uint8), "target": torch.ones(2, 14, 14)}
    batch |= {"valid": torch.ones(2, 14, 14, dtype=torch.bool), "meta": [{"output_space": "affine_disparity"}] * 2}
    module.keep_panel(batch, torch.ones(2, 14, 14))
    assert module.panels["train"]["step"] == 0
    module.panels = {}  # ImagePanels logged it
    module.keep_panel(batch, torch.ones(2, 14, 14))  # the next micro-batch of the same step
    assert module.panels == {}


def test_panel_tiles_share_the_targets_colour_scale():
    """Each tile was scaled by its own percentiles: a metric prediction twice too far looked like its target."""
    import numpy as np

    from depthkit.train.callbacks import panel_image

    target = torch.linspace(1.0, 5.0, 16 * 16).reshape(16, 16)
    panel = {
        "image": torch.zeros(3, 16, 16, dtype=torch.uint8),
        "target": target,
        "valid": torch.ones(16, 16, dtype=torch.bool),
    }
    panel |= {"space": "metric_depth", "step": 0}
    exact, far = (panel_image({**panel, "pred": k * target}) for k in (1.0, 2.0))
    w = 16
    assert np.array_equal(exact[:, w : 2 * w], exact[:, 2 * w : 3 * w])  # a perfect prediction: the target's colours
    assert not np.array_equal(far[:, w : 2 * w], far[:, 2 * w : 3 * w])
    assert far[:, 3 * w :].mean() > exact[:, 3 * w :].mean()  # the error tile shows the error


def test_the_partner_regions_loss_is_not_logged_when_no_image_is_mixed(monkeypatch):
    """CutMix mixes each image with p=0.5: a step that mixed none has no partner-region loss, and logging 0 for it
    pulled the `loss_partner` curve towards 0. It is logged as NaN (a gap): a key left out is sent again with its
    last value, since Lightning keeps an epoch's keys."""
    import depthkit.train.module as module_lib
    from depthkit.train import DepthModule

    module = DepthModule("test_dav2")
    logged = {}
    monkeypatch.setattr(module_lib, "logs_this_step", lambda trainer: True)
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, float(value)))
    for mixed in (0.0, 0.25):
        logged.clear()
        values = {"unlabeled/loss_own": torch.tensor(0.5), "unlabeled/loss_partner": torch.tensor(0.0)}
        module.log_scalars("train", values | {"unlabeled/mixed_fraction": torch.tensor(mixed)}, batch_size=2)
        assert (
            logged["train/unlabeled/loss_partner"] == 0.0
            if mixed
            else math.isnan(logged["train/unlabeled/loss_partner"])
        )
        assert logged["train/unlabeled/loss_own"] == 0.5 and logged["train/unlabeled/mixed_fraction"] == mixed
