"""The routing heatmap figure (labels, colour bar, title, hot boxes), how it reaches the loggers, and
the routing profiler's one-line report."""

from __future__ import annotations

import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from matplotlib.patches import Rectangle
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import TINY_OLMOE, RandomTokens, make_trainer, tiny_olmoe
from hellora_pl import BackboneConfig, HelloraModule
from hellora_pl.callbacks import RoutingProfilerCallback
from hellora_pl.callbacks.logging import log_figure
from hellora_pl.routing import RoutingProfile
from hellora_pl.routing.heatmap import routing_heatmap


def profile_of(layers, num_experts, seed=0):
    counts = torch.randint(0, 100, (len(layers), num_experts), generator=torch.Generator().manual_seed(seed))
    return RoutingProfile(layers=list(layers), counts=counts, gate_mass=counts.double(), tokens=321, top_k=2)


def tick_texts(labels):
    return [label.get_text() for label in labels]


def test_figure_labels_moe_layers_experts_colour_bar_and_hot_boxes():
    # DeepSeek-like: decoder layer 0 is dense, so rows are the MoE layers 1, 2, 3.
    profile = profile_of([1, 2, 3], 16)
    figure = routing_heatmap(profile, {1: [0, 3], 2: [], 3: [15]}, title="routing/profile")
    axes, colorbar_axes = figure.axes  # the heatmap and its colour bar, nothing else
    assert axes.get_xlabel() == "expert"
    assert axes.get_ylabel() == "decoder layer (MoE layers only)"
    assert tick_texts(axes.get_yticklabels()) == ["1", "2", "3"]
    assert tick_texts(axes.get_xticklabels()) == [str(e) for e in range(16)]
    title = axes.get_title()
    assert title.startswith("routing/profile: share of routed (token, expert) selections per layer")
    assert "321 tokens, top-2 of 16 experts" in title and "1/E = 0.0625" in title and "boxed = adapted" in title
    assert colorbar_axes.get_ylabel() == "share of the layer's selections"
    assert tick_texts(colorbar_axes.get_yticklabels())[:2] == ["0", "1/E"]
    # The cells hold each layer's shares (rows sum to 1); white (the middle of RdBu_r) is 1/E.
    (image,) = axes.get_images()
    torch.testing.assert_close(torch.as_tensor(image.get_array().data), profile.load(), rtol=0, atol=1e-12)
    assert image.norm(1 / 16) == pytest.approx(0.5, abs=1e-12)
    # One box per adapted (row, expert) cell, centred on it.
    boxes = [patch for patch in axes.patches if isinstance(patch, Rectangle)]
    assert sorted((box.get_x() + 0.5, box.get_y() + 0.5) for box in boxes) == [(0, 0), (3, 0), (15, 2)]


def test_many_experts_keep_every_label_up_to_64_then_thin_out():
    axes = routing_heatmap(profile_of(range(4), 64)).axes[0]
    assert tick_texts(axes.get_xticklabels()) == [str(e) for e in range(64)]
    assert "boxed" not in axes.get_title()  # nothing adapted, nothing said about boxes
    axes = routing_heatmap(profile_of(range(4), 160)).axes[0]
    assert tick_texts(axes.get_xticklabels()) == [str(e) for e in range(0, 160, 3)]


def test_hot_experts_the_profile_lacks_are_refused():
    profile = profile_of([1, 2], 8)
    with pytest.raises(ValueError, match=r"layer 0, which is not a MoE layer .*\[1, 2\]"):
        routing_heatmap(profile, {0: [1]})
    with pytest.raises(ValueError, match="Adapted expert 8 of layer 2 is outside the profile's 8 experts"):
        routing_heatmap(profile, {2: [8]})
    with pytest.raises(ValueError, match="empty"):
        routing_heatmap(profile_of([], 8))


class TinyModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_olmoe()


def test_profiler_logs_the_figure_to_tensorboard(tmp_path):
    trainer = pl.Trainer(logger=TensorBoardLogger(tmp_path, name="tb"), accelerator="cpu", enable_progress_bar=False)
    profile = profile_of([0, 1], 8)
    RoutingProfilerCallback()._log_routing(trainer, TinyModule(), profile, "routing/profile", 0)
    trainer.logger.experiment.flush()
    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    (logged,) = events.Images("routing/profile/heatmap")
    width, height = routing_heatmap(profile, title="routing/profile").canvas.get_width_height()
    assert (logged.width, logged.height) == (width, height)  # the labelled figure, not a bare pixel map
    assert "routing/profile/layer_0/entropy" in events.Tags()["scalars"]


def test_other_loggers_skip_the_figure_without_building_it(tmp_path):
    trainer = pl.Trainer(logger=CSVLogger(tmp_path), accelerator="cpu", enable_progress_bar=False)
    built = []
    log_figure(trainer, "routing/profile/heatmap", lambda: built.append(1), 0)
    assert built == []
    RoutingProfilerCallback()._log_routing(trainer, TinyModule(), profile_of([0, 1], 8), "routing/train", 3)


def test_profile_report_says_one_moe_layer_in_the_singular(tmp_path, caplog):
    module = HelloraModule(BackboneConfig(model_type="olmoe", config={**TINY_OLMOE, "num_hidden_layers": 1}))
    caplog.set_level(logging.INFO)
    make_trainer(tmp_path, 1, [RoutingProfilerCallback(num_batches=1)]).fit(module, datamodule=RandomTokens(1))
    (report,) = [record.getMessage() for record in caplog.records if "routing profile:" in record.getMessage()]
    assert " 1 MoE layer x 8 experts " in report
