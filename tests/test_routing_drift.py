"""Routing drift during fine-tuning (an extension beyond the paper): the profiler's watch measures it
and warns; the injection callback's re-selection adds adapters on newly hot experts, leaving the
trained ones alone, and a run resumed across a re-selection ends exactly where an uninterrupted one does.

The data (`TwoTokens`) uses two token ids only, so routing is concentrated on a few experts per
layer, as a real task's is; a random-token batch of a tiny random model spreads its load almost
evenly, where a hot set is noise. Routing is made to shift mid-run by `ShiftRouting`: from a given
optimizer step on, each MoE layer's router rows of its planned hot experts swap places with those
of its coldest experts, so the tokens the adapters were placed for go to experts without adapters.
"""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from conftest import RandomTokens, tiny_olmoe
from hellora_pl import HelloraModule, HotExpertInjectionCallback, RoutingProfilerCallback
from hellora_pl.adapters import AdapterPlan, adapter_state_dict, build_plan, inject_adapters, layer_expert_adapter
from hellora_pl.adapters.growth import grow_expert_adapters, move_optimizer_state
from hellora_pl.backbones import architecture_for
from hellora_pl.backbones.tiny import tiny_backbone_config
from hellora_pl.datamodules import EpochShuffleSampler, ResumableDataLoader
from hellora_pl.routing import (
    AllExperts,
    CoveragePerLayer,
    FractionPerLayer,
    RoutingProfile,
    RoutingRecorder,
    TopKPerLayer,
    policy_from_description,
    routing_drift,
)

RANK = 4


class Metrics(Logger):
    """Keeps every logged scalar: {name: {step: value}}."""

    def __init__(self):
        super().__init__()
        self.values: dict[str, dict[int, float]] = {}

    @property
    def name(self):
        return "metrics"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.values.setdefault(key, {})[step] = float(value)

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class TwoTokens(RandomTokens):
    """RandomTokens' batches, of token ids 5 and 9 only: routing concentrated on a few experts. Its
    loader resumes inside an epoch (the runs here resume mid-epoch)."""

    def __init__(self, num_batches=8, batch_size=4, length=12):
        super().__init__(num_batches, batch_size, length)
        generator = torch.Generator().manual_seed(0)
        for example in self.examples:
            ids = torch.tensor([5, 9])[torch.randint(2, (length,), generator=generator)]
            example["input_ids"] = ids
            example["labels"] = torch.where(example["labels"] == -100, -100, ids)

    def train_dataloader(self):
        return ResumableDataLoader(
            self.examples,
            sampler=EpochShuffleSampler(len(self.examples)),
            batch_size=self.batch_size,
            epoch_fn=self._current_epoch,
        )


def injection_of(trainer) -> HotExpertInjectionCallback:
    return next(cb for cb in trainer.callbacks if isinstance(cb, HotExpertInjectionCallback))


class ShiftRouting(Callback):
    """From optimizer step `at` on, swap each MoE layer's router rows of its planned hot experts with
    its coldest experts' (by the plan's profile counts). The frozen base is not in checkpoints, so a
    resumed run re-applies the swap; give it the uninterrupted run's `swaps` to get the same one."""

    def __init__(self, at: int, swaps: dict[int, list[tuple[int, int]]] | None = None):
        self.at = at
        self.swaps = swaps
        self.applied = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.applied or trainer.global_step < self.at:
            return
        self.applied = True
        model = pl_module.model
        if self.swaps is None:
            self.swaps = {}
            for entry in injection_of(trainer).plan.layers:
                coldest = sorted(range(len(entry.counts)), key=lambda e: (entry.counts[e], e))
                cold = [e for e in coldest if e not in entry.hot_experts]
                self.swaps[entry.layer] = list(zip(entry.hot_experts, cold))
        for moe in architecture_for(model).moe_layers(model):
            router = moe.router
            weight = router.parametrizations.weight.original if hasattr(router, "parametrizations") else router.weight
            with torch.no_grad():
                for hot, cold in self.swaps[moe.index]:
                    weight[[hot, cold]] = weight[[cold, hot]]


def fit(root, steps, callbacks, ckpt_path=None, seed=0):
    """A tiny OLMoE HELLoRA fit on CPU; returns the module and the logged scalars."""
    pl.seed_everything(seed)
    metrics = Metrics()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=[TensorBoardLogger(root, name="run", version=0), metrics],
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        deterministic=True,
    )
    module = HelloraModule(tiny_backbone_config("olmoe"), learning_rate=1e-2, warmup=0, lr_schedule="constant")
    trainer.fit(module, datamodule=TwoTokens(), ckpt_path=ckpt_path)
    return module, metrics.values


def hellora(**kwargs):
    return HotExpertInjectionCallback(rank=RANK, alpha=2 * RANK, overwrite=True, **kwargs)


# -- the drift figures --------------------------------------------------------------------------


def test_drift_figures_of_a_known_routing():
    counts = torch.tensor([[50, 30, 10, 10], [5, 5, 40, 50]])
    profile = RoutingProfile([1, 3], counts, counts.double(), tokens=50, top_k=2)
    drift = routing_drift(profile, {1: [0, 1], 3: [0, 2]}, TopKPerLayer())
    first, second = drift.layers
    assert (first.hot_now, first.adapted_share, first.overlap, first.jaccard) == ([0, 1], 0.8, 1.0, 1.0)
    assert (second.hot_now, second.adapted_share, second.overlap) == ([2, 3], 0.45, 0.5)
    assert second.jaccard == pytest.approx(1 / 3) and second.newly_hot == [3]
    assert drift.adapted_share == pytest.approx((80 + 45) / 200)
    assert drift.overlap == 0.75 and drift.jaccard == pytest.approx(3 / 5)
    assert [e.layer for e in drift.below(0.6)] == [3]
    metrics = drift.metrics()
    assert metrics["routing/drift/layer_3/newly_hot"] == 1.0 and metrics["routing/drift/overlap"] == 0.75
    # A layer without adapted experts is not measured.
    assert [e.layer for e in routing_drift(profile, {1: [0], 3: []}, TopKPerLayer()).layers] == [1]


@pytest.mark.parametrize(
    "policy", [TopKPerLayer(), TopKPerLayer(3), FractionPerLayer(0.5), CoveragePerLayer(0.3, "gate_mass"), AllExperts()]
)
def test_plan_policies_are_rebuilt_from_their_description(policy):
    rebuilt = policy_from_description(policy.describe())
    assert type(rebuilt) is type(policy) and rebuilt.describe() == policy.describe()
    assert policy_from_description({"name": "mine", "x": 1}) is None


# -- (1) a routing shift is seen, logged and warned about ----------------------------------------


def test_a_routing_shift_mid_run_lowers_the_logged_share_and_warns_once_per_layer(tmp_path):
    shift = ShiftRouting(at=3)
    profiler = RoutingProfilerCallback(num_batches=4, watch_every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, values = fit(tmp_path, 6, [profiler, hellora(router=False), shift])
    drift_warnings = [str(w.message) for w in caught if "routing drift" in str(w.message)]
    share = values["routing/drift/adapted_share"]
    overlap = {layer: values[f"routing/drift/layer_{layer}/overlap"] for layer in (0, 1)}
    # Logged at every watched step (steps are counted after the step's update: 1..6); the shift acts from the 4th.
    assert sorted(share) == [1, 2, 3, 4, 5, 6]
    before, after = [share[s] for s in (1, 2, 3)], [share[s] for s in (4, 5, 6)]
    assert min(before) > max(after) + 0.2, (before, after)
    assert all(overlap[layer][s] >= 0.5 for layer in (0, 1) for s in (1, 2, 3))
    assert all(overlap[layer][s] == 0.0 for layer in (0, 1) for s in (4, 5, 6))
    assert values["routing/drift/layer_0/newly_hot"][4] == 2.0  # top-2 routing: both hot experts moved
    # One warning per layer, at the first step after the shift, naming the figures and the fix.
    assert len(drift_warnings) == 1, drift_warnings
    (message,) = drift_warnings
    assert "at step 4" in message and "MoE layers 0, 1" in message and "overlap 0.00" in message
    assert "reselect_every_n_steps" in message and "drift_warn_below=0.5" in message
    assert profiler.state_dict()["drift_warned"] == [0, 1]
    assert injection_of_plan(module).reselections == []  # watching changes nothing


def injection_of_plan(module) -> AdapterPlan:
    from hellora_pl.adapters.inject import injected_plan

    return injected_plan(module.model)


# -- (2) and (3): re-selection, and an exact resume across it ------------------------------------

RESELECT = 3  # re-selections before the batches with global step 3 and 6
STEPS = 8


class Snapshots(Callback):
    """The adapter tensors and the optimizer's moments at each batch start (listed before and after the
    injection callback, it sees them just before and just after a re-selection)."""

    def __init__(self):
        self.seen: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        model = pl_module.model
        optimizer = trainer.optimizers[0]
        experts = {}
        for moe in architecture_for(model).moe_layers(model):
            adapter = layer_expert_adapter(moe)
            for factor in ("lora_A", "lora_B"):
                for name, param in getattr(adapter, factor).items():
                    state = optimizer.state.get(param, {})
                    experts[(moe.index, factor, name)] = {
                        "hot": adapter.hot_experts.tolist(),
                        "value": param.detach().clone(),
                        "exp_avg": state["exp_avg"].clone() if "exp_avg" in state else None,
                        "in_optimizer": any(p is param for group in optimizer.param_groups for p in group["params"]),
                    }
        self.seen[trainer.global_step] = experts


def reselecting_callbacks(shift, *extra):
    profiler = RoutingProfilerCallback(num_batches=4, watch_every_n_steps=1, drift_warn_below=None)
    return [profiler, *extra[:1], hellora(reselect_every_n_steps=RESELECT), shift, *extra[1:]]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted fit of STEPS with routing shifted from step 1, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("straight")
    before, after, shift = Snapshots(), Snapshots(), ShiftRouting(at=1)
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    callbacks = reselecting_callbacks(shift, before, after, checkpoints)
    module, values = fit(root, STEPS, callbacks)
    return {"root": root, "module": module, "values": values, "before": before, "after": after, "shift": shift,
            "plan": injection_of_plan(module)}  # fmt: skip


def test_reselection_adds_adapters_on_newly_hot_experts_and_keeps_the_trained_ones(straight):
    plan = straight["plan"]
    first = [r for r in plan.reselections if r["step"] == RESELECT]
    assert {r["layer"] for r in first} == {0, 1}  # every layer's hot experts moved
    swaps = straight["shift"].swaps
    for record in first:
        planned = {hot for hot, _ in swaps[record["layer"]]}  # the hot experts before the shift
        swapped_in = {cold for _, cold in swaps[record["layer"]]}
        assert set(record["added"]) == set(record["hot_now"]) - planned  # what the policy chose, less the adapted
        assert set(record["added"]) & swapped_in  # where the shift sent the tokens
    # The adapted share fell to nothing with the shift, and came back once the new experts had adapters.
    share = straight["values"]["routing/drift/adapted_share"]
    assert max(share[2], share[3]) < 0.1 and min(share[s] for s in range(4, STEPS + 1)) > 0.4, share
    assert plan.format_version == 3 and AdapterPlan.from_dict(plan.to_dict()) == plan
    assert straight["values"]["routing/drift/added_experts"][RESELECT] == 4.0

    before, after = straight["before"].seen[RESELECT], straight["after"].seen[RESELECT]
    for key, old in before.items():
        new = after[key]
        slots = [new["hot"].index(e) for e in old["hot"]]
        assert len(new["hot"]) > len(old["hot"])
        # The trained slots: bit for bit, values and Adam moments; the new tensor is the one optimized.
        assert torch.equal(new["value"][slots], old["value"])
        assert torch.equal(new["exp_avg"][slots], old["exp_avg"])
        assert new["in_optimizer"] and old["in_optimizer"]
        fresh = [s for s in range(len(new["hot"])) if s not in slots]
        assert torch.count_nonzero(new["exp_avg"][fresh]) == 0
        if key[1] == "lora_B":
            assert torch.count_nonzero(new["value"][fresh]) == 0  # new B starts at zero: the output is unchanged
    # The new experts train: by the end their B moved away from zero.
    model = straight["module"].model
    for record in first:
        adapter = layer_expert_adapter(architecture_for(model).moe_layers(model)[record["layer"]])
        slots = adapter.slot_of_expert[record["added"]]
        assert all(torch.count_nonzero(b[slots]) > 0 for b in adapter.lora_B.values())
    # plan.json at the end carries the re-selections, and the trainable count grew with the experts.
    saved = AdapterPlan.read(straight["root"] / "run" / "version_0" / "hellora" / "plan.json")
    assert saved == plan and saved.trainable_params > 0
    trainable = sum(p.numel() for p in straight["module"].parameters() if p.requires_grad)
    assert trainable == plan.trainable_params


@pytest.mark.parametrize(
    "checkpoint",
    [
        "step=3.ckpt",  # saved before the re-selection at step 3: the resumed run re-selects from the restored routing
        "step=4.ckpt",  # after it, with the routing towards the next re-selection (step 6) partly watched
    ],
)
def test_resume_across_a_reselection_is_exact(straight, tmp_path, checkpoint):
    shift = ShiftRouting(at=1, swaps=straight["shift"].swaps)  # the frozen base's shift is not in checkpoints
    module, values = fit(
        tmp_path, STEPS, reselecting_callbacks(shift), ckpt_path=straight["root"] / "ckpt" / checkpoint, seed=1
    )
    done = int(checkpoint.split("=")[1].split(".")[0])
    assert injection_of_plan(module) == straight["plan"]  # the same re-selections, at the same steps
    # Exactly: one process, the same threads and batches, so the resumed run repeats the same float operations.
    got, want = adapter_state_dict(module.model), adapter_state_dict(straight["module"].model)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)
    losses, straight_losses = values["train/loss"], straight["values"]["train/loss"]
    assert sorted(losses) == [s for s in sorted(straight_losses) if s >= done]  # keyed by the step before the update
    assert all(losses[s] == straight_losses[s] for s in losses)


# -- growth on its own: both expert layouts -------------------------------------------------------


@pytest.mark.parametrize("family", ["olmoe", "deepseek_moe"])
def test_growth_keeps_the_output_and_the_trained_slots(family, token_batch):
    from hellora_pl.loading import load_backbone

    torch.manual_seed(0)
    model = load_backbone(tiny_backbone_config(family))
    arch = architecture_for(model)
    layers = [moe.index for moe in arch.moe_layers(model)]
    counts = torch.arange(arch.num_experts(model.config)).repeat(len(layers), 1)
    profile = RoutingProfile(layers, counts, counts.double(), tokens=10, top_k=arch.top_k(model.config))
    plan = build_plan(model, TopKPerLayer(), profile, rank=2, alpha=4.0)
    inject_adapters(model, plan, "torch")
    with torch.no_grad():  # a trained adapter: B away from zero
        for name, tensor in adapter_state_dict(model).items():
            if "lora_B" in name:
                tensor.normal_()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = {"input_ids": token_batch["input_ids"] % model.config.vocab_size}
    model(**inputs).logits.sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    with RoutingRecorder(model) as recorder, torch.no_grad():
        recorder.armed = True
        expected = model(**inputs).logits
    hot = plan.layers[0].hot_experts
    routed = recorder.counts[0].clone()
    routed[hot] = -1
    new_expert = int(routed.argmax())  # a cold expert this batch routes to, so it gets a gradient
    old = {k: v.detach().clone() for k, v in layer_expert_adapter(arch.moe_layers(model)[0]).lora_A.items()}

    grown = grow_expert_adapters(model, {layers[0]: [new_expert]}, seed=7)
    move_optimizer_state([optimizer], grown)
    adapter = layer_expert_adapter(arch.moe_layers(model)[0])
    assert adapter.hot_experts.tolist() == sorted([new_expert, *hot])
    assert all(torch.equal(adapter.lora_A[k][adapter.slot_of_expert[hot]], v) for k, v in old.items())
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)  # new B = 0: same output
    params = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in params] == [id(p) for p in optimizer.param_groups[0]["params"]]  # the model's order
    model(**inputs).logits.sum().backward()
    optimizer.step()  # the grown tensors train
    assert torch.count_nonzero(adapter.lora_B[adapter.projections[0]][adapter.slot_of_expert[new_expert]]) > 0


# -- (4) bad options are refused ------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, reason",
    [
        ("lora", "adapts every expert already"),
        ("dr_lora", "adapts every expert already"),
        ("esft", "ESFT's experts are fixed"),
        ("hellori", "LoRI's sparse B mask"),
        ("attention_only", "no expert adapters"),
    ],
)
def test_methods_with_a_fixed_expert_set_refuse_reselection(method, reason):
    with pytest.raises(ValueError, match=rf"does not apply to method '{method}': .*{reason}.*Use method 'hellora'"):
        HotExpertInjectionCallback(method=method, reselect_every_n_steps=10)


def test_bad_drift_options_are_refused(tmp_path):
    with pytest.raises(ValueError, match="hot_experts=AllExperts: every expert is adapted already"):
        HotExpertInjectionCallback(hot_experts=AllExperts(), reselect_every_n_steps=10)
    with pytest.raises(ValueError, match="needs expert adapters, but experts=false"):
        HotExpertInjectionCallback(experts=False, reselect_every_n_steps=10)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="reselect_every_n_steps must be an integer >= 0"):
            HotExpertInjectionCallback(reselect_every_n_steps=bad)
    with pytest.raises(ValueError, match=r"drift_warn_below is an overlap .* in \[0, 1\]"):
        RoutingProfilerCallback(drift_warn_below=1.5)
    with pytest.raises(ValueError, match="watch_every_n_steps must be an integer >= 0"):
        RoutingProfilerCallback(watch_every_n_steps=-2)

    # Re-selection without a watch that feeds it: refused in setup, before routing is profiled.
    for watch, found in ((0, "its watch_every_n_steps is 0"), (5, "its watch_every_n_steps is 5")):
        profiler = RoutingProfilerCallback(num_batches=1, watch_every_n_steps=watch)
        with pytest.raises(ValueError, match=rf"reselect_every_n_steps=4 chooses .*but {found}.*in 1\.\.4"):
            fit(tmp_path, 2, [profiler, hellora(reselect_every_n_steps=4)])
        assert profiler.profile is None
    with pytest.raises(ValueError, match="but there is none"):
        fit(tmp_path, 2, [hellora(reselect_every_n_steps=4)])


def test_the_plan_refuses_bad_additions_and_old_readers_refuse_grown_plans():
    model = tiny_olmoe()
    counts = torch.arange(8).repeat(2, 1)
    plan = build_plan(model, TopKPerLayer(), RoutingProfile([0, 1], counts, counts.double(), 10, 2), rank=2, alpha=4.0)
    assert "reselections" not in plan.to_dict() and plan.format_version == 2  # plans without re-selection: as before
    with pytest.raises(ValueError, match=r"must be new \(adapted: \[6, 7\]\)"):
        plan.add_hot_experts(0, [7], step=5, hot_now=[7], tokens=3)
    with pytest.raises(ValueError, match="within 0..7"):
        plan.add_hot_experts(0, [8], step=5, hot_now=[8], tokens=3)
    plan.add_hot_experts(0, [2], step=5, hot_now=[2, 7], tokens=3)
    assert plan.layers[0].hot_experts == [2, 6, 7] and plan.format_version == 3
    newer = {**plan.to_dict(), "format_version": 4}
    with pytest.raises(ValueError, match="format version 4, newer"):
        AdapterPlan.from_dict(newer)


def test_an_optimizer_with_state_of_another_shape_is_refused(token_batch):
    model = tiny_olmoe()
    counts = torch.arange(8).repeat(2, 1)
    plan = build_plan(model, TopKPerLayer(), RoutingProfile([0, 1], counts, counts.double(), 10, 2), rank=2, alpha=4.0)
    inject_adapters(model, plan, "torch")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.1)
    for param in params:
        optimizer.state[param] = {"row_factor": torch.zeros(param.shape[0], 1, 1)}  # a factored optimizer's
    grown = grow_expert_adapters(model, {0: [0]}, seed=0)
    with pytest.raises(ValueError, match="re-selection carries per-element and scalar state only"):
        move_optimizer_state([optimizer], grown)
    with pytest.raises(ValueError, match="No optimizer holds"):
        move_optimizer_state([], grow_expert_adapters(model, {1: [0]}, seed=0))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hellora.reselect_every_n_steps", "4"], "but its watch_every_n_steps is 50; set"),
        (
            ["--hellora.method", "esft", "--hellora.reselect_every_n_steps", "50"],
            "does not apply to method 'esft'",
        ),
    ],
)
def test_the_cli_refuses_reselection_settings_before_any_model_work(args, message, capfd, tmp_path, monkeypatch):
    from conftest import REPO
    from hellora_pl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs" / "quickstart.yaml"), *args])
    out, err = capfd.readouterr()
    assert exit_info.value.code == 2 and message in out + err and "Traceback" not in out + err
    assert not list(tmp_path.iterdir())  # nothing written
