"""HotExpertInjectionCallback: a routing profile becomes a plan, the plan becomes adapters."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..adapters import (
    AdapterPlan,
    DynamicRankSpec,
    LoRISpec,
    adapter_state_dict,
    inject_adapters,
    is_injected,
    load_adapter,
    load_adapter_weights,
    remove_adapters,
    save_adapter,
    update_trainable_params,
)
from ..adapters.growth import grow_expert_adapters, move_optimizer_state
from ..adapters.io import (
    ADAPTER_FILE,
    PLAN_FILE,
    checkpoint_metadata_file,
    checkpoint_plan_states,
    load_checkpoint_metadata,
    write_adapter,
)
from ..adapters.liveness import check_liveness
from ..adapters.methods import MethodName, PlanSettings, method_defaults, resolve_method
from ..backbones import architecture_for
from ..kernels.dispatch import IMPLEMENTATIONS, ExpertKernel
from ..routing import AllExperts, HotExpertPolicy, RoutingProfile, policy_from_description
from ..sharding import full_tensors, is_sharded, shard_like
from .logging import log_scalars, log_text
from .protocol import PlanCompanion, backbone_of
from .routing_profiler import RoutingProfilerCallback


class HotExpertInjectionCallback(Callback):
    """Freezes the base and injects adapters where the plan says, before the optimizer is built.

    Fit: `method` (lora, hellora, attention_only, hellori, dr_lora, esft; see
    hellora_pl/adapters/methods.py) sets the defaults; `hot_experts` (a policy),
    `attention_modules`, `router`, `shared_experts` and `experts` override them. The routing
    profile (from a RoutingProfilerCallback in the trainer, or one made here with its
    defaults) and the policy choose each layer's adapted experts. hellori needs a
    LoRIMaskCallback and dr_lora a DynamicRankCallback in the trainer. Adapter tensors are kept
    in `adapter_dtype` (float32 by default, whatever the base's dtype). `adapter_path` starts
    from (or, for validate/test, evaluates) the adapters an earlier run saved.

    Checkpoints carry the plan and the adapter tensors in this callback's state, and the model
    state dict holds only the other trainable tensors (`checkpoint_adapters_only`) or everything
    but the adapters. Restoring one (resume, or validate/test with a checkpoint) injects the
    checkpoint's plan, replacing the fresh one if it differs, and loads its adapters before the
    optimizer is built, so Lightning restores the optimizer exactly.

    `plan.json` and `adapter.safetensors` are written under `output_dir` (default
    `<log dir>/hellora`) with every checkpoint and at the end of fit.

    `expert_kernel` picks the adapted expert path of fused experts: "auto" (Triton for CUDA
    tensors when Triton is installed, the torch reference otherwise), "triton" (an error where
    it cannot run) or "torch".

    `liveness` (on by default): on the first training batch of every fit, before the optimizer's
    first step, one probe forward and backward proves every adapter gets a gradient and changes the
    output, and that with B = 0 the model computes what its own eager experts path does
    (`hellora_pl.adapters.liveness`); a dead site stops the fit naming it. It runs under
    fast_dev_run too (a dry run is where a dead adapter should show) and on every rank of a
    distributed run. Switching it off warns.

    `reselect_every_n_steps` (0: off; an extension beyond the paper) answers routing drift: every
    that many optimizer steps, the plan's policy chooses hot experts again from the routing the
    RoutingProfilerCallback watched since the last re-selection (its `watch_every_n_steps` must be
    between 1 and this), and experts it chooses that have no adapter get one (A as at injection,
    B zero, so the output does not change); trained adapters keep their values bit for bit and
    their optimizer state, the new tensors join the optimizer in the old ones' places, and experts
    are never removed. The plan records each addition (`reselections`: step, layer, added
    experts), so plan.json, checkpoints and a resume carry the grown adapters: resuming injects the
    grown plan before the optimizer is built and its state loaded, which makes the resume exact.
    It lives here rather than on the profiler because this callback owns the plan, the adapters
    and their checkpointing. Methods whose expert set is fixed refuse it (see
    `RESELECTION_REFUSED`), and so do multi-process runs (DDP and FSDP register parameters once).
    """

    consumes_routing_profile = True  # RoutingProfilerCallback leaves profiling to this callback's setup

    def __init__(
        self,
        method: MethodName = "hellora",
        hot_experts: HotExpertPolicy | None = None,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        adapter_dtype: str = "float32",
        attention_modules: list[str] | None = None,
        router: bool | None = None,
        router_rank: int | None = None,
        shared_experts: bool | None = None,
        experts: bool | None = None,
        adapter_path: str | None = None,
        output_dir: str | None = None,
        overwrite: bool = False,
        checkpoint_adapters_only: bool = True,
        model_attribute: str = "model",
        expert_kernel: ExpertKernel = "auto",
        liveness: bool = True,
        reselect_every_n_steps: int = 0,
    ):
        if expert_kernel not in IMPLEMENTATIONS:
            raise ValueError(f"Unknown expert_kernel {expert_kernel!r}; choose one of {', '.join(IMPLEMENTATIONS)}.")
        check_injection_settings(rank, alpha, dropout, adapter_dtype, router_rank, adapter_path)
        check_reselection(reselect_every_n_steps, method, hot_experts, experts)
        self.reselect_every_n_steps = reselect_every_n_steps
        self._reselected_at: int | None = None  # global step of the last re-selection (accumulation: once)
        self.expert_kernel = expert_kernel
        self.method = method_defaults(method).name
        self.hot_experts = hot_experts if hot_experts is not None else method_defaults(method).policy()
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.adapter_dtype = adapter_dtype
        self.attention_modules = attention_modules
        self.router = router
        self.router_rank = router_rank
        self.shared_experts = shared_experts
        self.experts = experts
        self.adapter_path = adapter_path
        self.output_dir = output_dir
        self.overwrite = overwrite
        self.checkpoint_adapters_only = checkpoint_adapters_only
        self.model_attribute = model_attribute
        self.plan: AdapterPlan | None = None
        self._model = None  # the backbone the plan was injected into
        self.liveness = liveness
        self._liveness_pending = False  # set when a fit starts, cleared once the probe ran
        if not liveness:
            rank_zero_warn(
                "[hellora] liveness=false: the probe that proves every adapter trains is off, so an adapter the "
                "model's forward never reaches would stay frozen while counted as trainable. Keep it on unless "
                "a run of the same setup passed it."
            )

    # -- before the optimizer ------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # The model's state dict never holds the adapters (they travel in this callback's
        # state), so Lightning must load it non-strictly; on_load_checkpoint checks them.
        pl_module.strict_loading = False
        model = self._model = backbone_of(pl_module, self.model_attribute)
        if stage == "fit" and self.reselect_every_n_steps:
            self._check_reselection_run(trainer)
        if is_injected(model):
            return  # a second stage in the same process (fit, then test)
        saved = checkpoint_plan(trainer.ckpt_path, self.state_key)
        if saved is not None:  # restoring a checkpoint: its own plan, never a new routing profile
            self.plan = saved
            inject_adapters(model, saved, self.expert_kernel)
        elif self.adapter_path is not None:
            if stage == "fit" and not trainer.fast_dev_run:
                self._check_output_dir(trainer)
            self.plan = load_adapter(model, self.adapter_path, self.expert_kernel)
        elif stage == "fit":
            settings = self._check_before_profile(trainer, model)
            self.plan = self._make_plan(trainer, pl_module, model, settings)
            inject_adapters(model, self.plan, self.expert_kernel)
        else:
            rank_zero_warn(
                f"[hellora] {getattr(stage, 'value', stage)} has no checkpoint and no adapter_path: it evaluates the BASE model, without "
                "adapters. To evaluate a fine-tuned run, pass --ckpt_path <its checkpoint> (or set "
                "hellora.adapter_path to its hellora/ folder)."
            )
            return
        self._announce()

    def check_model(self, model) -> None:
        """The settings against the model (k against its number of experts), before any profiling."""
        method = method_defaults(self.method)
        if self.adapter_path is None and (method.experts if self.experts is None else self.experts):
            arch = architecture_for(model)
            self.hot_experts.check(arch.num_experts(model.config), arch.top_k(model.config))

    def _check_before_profile(self, trainer: Trainer, model) -> PlanSettings:
        """Every check the settings and the model allow, before any routing is profiled or anything written.

        Returns the plan settings, the companion callbacks' specs (LoRI, DR-LoRA) included.
        """
        self.check_model(model)
        if not trainer.fast_dev_run:
            self._check_output_dir(trainer)
        method = method_defaults(self.method)
        return resolve_method(
            self.method,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            dtype=self.adapter_dtype,
            hot_experts=self.hot_experts,
            attention_modules=self.attention_modules,
            router=self.router,
            router_rank=self.router_rank,
            shared_experts=self.shared_experts,
            experts=self.experts,
            lori=self._companion_spec(trainer, LoRISpec, "LoRIMaskCallback", method.lori),
            dynamic_rank=self._companion_spec(trainer, DynamicRankSpec, "DynamicRankCallback", method.dynamic_rank),
        )

    def _make_plan(self, trainer, pl_module, model, settings: PlanSettings) -> AdapterPlan:
        profiler = _find(trainer, RoutingProfilerCallback)
        profile = None
        if (settings.experts and settings.policy.needs_profile) or profiler is not None:
            if profiler is None:
                rank_zero_info("[hellora] no RoutingProfilerCallback in the trainer: profiling with its defaults")
                profiler = RoutingProfilerCallback(model_attribute=self.model_attribute)
            profile = profiler.ensure_profile(trainer, pl_module)
        return settings.build(model, profile)

    def _companion_spec(self, trainer: Trainer, spec_type: type, name: str, needed: bool):
        """The spec a method's companion callback gives the plan (LoRIMaskCallback: LoRISpec,
        DynamicRankCallback: DynamicRankSpec), or None; a missing or unused companion is an error."""
        found = [cb for cb in trainer.callbacks if isinstance(cb, PlanCompanion) and cb.spec_type is spec_type]
        if needed and not found:
            raise ValueError(
                f"Method {self.method!r} needs a {name} in the trainer's callbacks; add "
                f"`- class_path: hellora_pl.{name}` to trainer.callbacks in the config."
            )
        if found and not needed:
            raise ValueError(f"{name} is in the trainer's callbacks, but method {self.method!r} does not use it.")
        return found[0].plan_spec(self.rank) if found else None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if not state.get("plan"):
            raise ValueError(
                "This checkpoint holds no hellora plan: it was not written with HotExpertInjectionCallback, "
                "so its adapters cannot be restored. Start a new fit instead of resuming."
            )
        plan = AdapterPlan.from_dict(state["plan"])
        model = self._model = backbone_of(pl_module, self.model_attribute)
        if plan != self.plan:
            if is_sharded(model):
                raise ValueError(
                    "The checkpoint's plan differs from the one made for this run, and the model is already "
                    "sharded, so adapters cannot be swapped; resume with the same data and profiling settings."
                )
            if is_injected(model):
                rank_zero_info("[hellora] the checkpoint's plan replaces the one made for this run")
                remove_adapters(model)
            inject_adapters(model, plan, self.expert_kernel)
            self.plan = plan
            self._announce()
        load_adapter_weights(model, shard_like(state["adapters"], adapter_state_dict(model)))

    def _check_output_dir(self, trainer: Trainer) -> None:
        self.check_output_dir(trainer.log_dir or trainer.default_root_dir)

    def check_output_dir(self, log_dir) -> None:
        """Refuse to overwrite the plan an earlier run wrote (the CLI calls this before building the Trainer)."""
        existing = self.directory_for(log_dir) / PLAN_FILE
        if existing.exists() and not self.overwrite:
            raise FileExistsError(
                f"{existing} exists from an earlier run and would be overwritten. Log to a new directory "
                "(a new logger version or default_root_dir), resume that run with --ckpt_path, or set "
                "--hellora.overwrite true (HotExpertInjectionCallback(overwrite=True))."
            )

    def directory(self, trainer: Trainer) -> Path:
        return self.directory_for(trainer.log_dir or trainer.default_root_dir)

    def directory_for(self, log_dir) -> Path:
        """Where plan.json and adapter.safetensors go: `output_dir`, or `<log dir>/hellora`."""
        return Path(self.output_dir) if self.output_dir is not None else Path(log_dir) / "hellora"

    @property
    def model(self):
        """The backbone the plan was injected into (for companion callbacks)."""
        return self._model

    def _announce(self) -> None:
        plan = self.plan
        lines = [f"[hellora] method={plan.method} policy={plan.policy} rank={plan.rank} alpha={plan.alpha}"]
        if plan.lori is not None:
            lines.append(f"[hellora] LoRI: A frozen, B mask {plan.lori.to_dict()}")
        for layer in plan.layers:
            hot = layer.hot_experts if len(layer.hot_experts) < plan.num_experts else "all"
            ranks = f" ranks {layer.expert_ranks}" if layer.expert_ranks is not None else ""
            lines.append(f"[hellora]   layer {layer.layer}: adapted experts {hot}{ranks}")
        lines.append(f"[hellora] trainable parameters: {trainable_summary(plan)}")
        allocated = sum(p.numel() for p in self._model.parameters() if p.requires_grad)
        if allocated != plan.trainable_params:
            lines.append(
                f"[hellora]   {plan.trainable_params:,} act on the output now; {allocated:,} are allocated as "
                "trainable tensors (Lightning's summary counts these), the rest masked: "
                + (
                    "DR-LoRA's inactive rank slices, which grow into use"
                    if plan.dynamic_rank is not None
                    else "outside the mask"
                )
            )
        rank_zero_info("\n".join(lines))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.plan is None:
            return
        self._liveness_pending = self.liveness
        plan = self.plan
        log_scalars(
            trainer,
            {
                "hellora/trainable_params": plan.trainable_params,
                "hellora/lora_all_experts_params": plan.lora_all_experts_params,
            },
            step=trainer.global_step,
        )
        summary = "\n".join(f"    layer {layer.layer}: {layer.hot_experts}" for layer in plan.layers)
        log_text(
            trainer, "hellora/plan", f"method {plan.method}, policy {plan.policy}\n\n{summary}", trainer.global_step
        )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        self._maybe_reselect(trainer)
        self._run_liveness(trainer, batch)

    def _run_liveness(self, trainer: Trainer, batch) -> None:
        """The liveness probe, once per fit, on the first batch: before the optimizer's first step."""
        if not self._liveness_pending or self.plan is None:
            return
        self._liveness_pending = False
        profiler = _find(trainer, RoutingProfilerCallback)
        watch = getattr(profiler, "_watch", None)  # its routing counts are of training steps, not of the probe
        armed = watch is not None and watch.armed
        if watch is not None:
            watch.armed = False
        try:
            with trainer.precision_plugin.train_step_context():  # the training step's autocast
                report = check_liveness(self._model, batch, self.plan)
        finally:
            if watch is not None:
                watch.armed = armed
        rank_zero_info(f"[hellora] {report.summary()}")

    # -- re-selection (an extension beyond the paper) ----------------------------------------
    def _check_reselection_run(self, trainer: Trainer) -> None:
        """What re-selection needs from the trainer, before any profiling: a watch that feeds it, one process."""
        profiler = _find(trainer, RoutingProfilerCallback)
        check_reselection_watch(self.reselect_every_n_steps, None if profiler is None else profiler.watch_every_n_steps)
        if trainer.world_size > 1:
            raise ValueError(
                f"reselect_every_n_steps runs in one process only; this run has {trainer.world_size}. DDP and FSDP "
                "register the trainable parameters once, so adapters added later would not be synchronised. "
                "Train on one device, or set reselect_every_n_steps=0."
            )

    def _maybe_reselect(self, trainer: Trainer) -> None:
        """At the first batch after every `reselect_every_n_steps`-th optimizer step (before its forward).

        Not at that step's end: a checkpoint saved there (by any callback, in any order) then always
        holds the state before the re-selection, and a run resumed from it re-selects here from the
        same restored routing; `_reselected_at` (kept in checkpoints) makes it happen once per step.
        """
        step = trainer.global_step
        if not self.reselect_every_n_steps or self.plan is None or step == 0 or step == self._reselected_at:
            return
        if step % self.reselect_every_n_steps != 0:
            return
        self._reselected_at = step
        routing = _find(trainer, RoutingProfilerCallback).take_recent_routing()
        if routing is None or routing.tokens == 0:
            rank_zero_info(f"[hellora] re-selection at step {step}: no routing was watched since the last one")
            return
        self.reselect(trainer, routing, step)

    def reselect(self, trainer: Trainer, routing: RoutingProfile, step: int) -> dict[int, list[int]]:
        """Choose hot experts from `routing` with the plan's policy; add adapters on those without one.
        Returns the experts added per MoE layer."""
        plan = self.plan
        hot_now = self._plan_policy().select(routing)
        adapted = plan.hot_experts()
        added = {
            layer: sorted(set(now) - set(adapted[layer]))
            for layer, now in zip(routing.layers, hot_now)
            if adapted.get(layer) and set(now) - set(adapted[layer])
        }
        if not added:
            rank_zero_info(f"[hellora] re-selection at step {step}: every hot expert already has an adapter")
            return {}
        grown = grow_expert_adapters(self._model, added, seed=step)
        move_optimizer_state(trainer.optimizers, grown)
        for row, layer in enumerate(routing.layers):
            if layer in added:
                plan.add_hot_experts(layer, added[layer], step, hot_now[row], routing.tokens)
        update_trainable_params(self._model, plan)
        summary = "; ".join(f"layer {layer}: +{experts}" for layer, experts in added.items())
        rank_zero_info(
            f"[hellora] re-selection at step {step} ({routing.tokens} watched tokens): adapters added on {summary}; "
            f"trainable parameters now {trainable_summary(plan)}"
        )
        log_scalars(
            trainer,
            {
                "hellora/trainable_params": plan.trainable_params,
                "routing/drift/added_experts": float(sum(len(e) for e in added.values())),
            },
            step,
        )
        log_text(trainer, "hellora/reselection", f"step {step}: {summary}", step)
        return added

    def _plan_policy(self) -> HotExpertPolicy:
        """The plan's own policy (the plan may come from a checkpoint whose policy differs from `hot_experts`)."""
        if self.hot_experts.describe() == self.plan.policy:
            return self.hot_experts
        policy = policy_from_description(self.plan.policy)
        if policy is None:
            raise ValueError(
                f"reselect_every_n_steps needs the plan's hot-expert policy, but {self.plan.policy} cannot be "
                "rebuilt from plan.json; use a hellora_pl.routing policy, or one whose describe() gives its "
                "constructor's arguments."
            )
        return policy

    # -- saving --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.plan is None:
            return {}
        state = {"plan": self.plan.to_dict(), "adapters": self._adapter_copies()}
        if self._reselected_at is not None:
            state["reselected_at"] = self._reselected_at
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._reselected_at = state_dict.get("reselected_at")  # the plan and adapters: on_load_checkpoint

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.plan is None:
            return
        if is_sharded(self._model):
            # Lightning's sharded load asks the checkpoint for every key of the model, so a sharded
            # checkpoint keeps the whole state dict (each rank writes its own slice).
            self._save(trainer)
            return
        adapter_keys = {f"{self.model_attribute}.{name}" for name in adapter_state_dict(self._model)}
        trainable = {name for name, param in pl_module.named_parameters() if param.requires_grad}
        checkpoint["state_dict"] = {
            key: value
            for key, value in checkpoint["state_dict"].items()
            if key not in adapter_keys and (key in trainable or not self.checkpoint_adapters_only)
        }
        self._save(trainer)

    def _adapter_copies(self) -> dict:
        """Whole adapter tensors by their names in the backbone, on CPU (checkpoints hold copies).

        Gathers FSDP shards, so under a sharding strategy every rank must call it.
        """
        return full_tensors(adapter_state_dict(self._model))

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.plan is not None:
            self._save(trainer)

    def _save(self, trainer) -> None:
        if trainer.fast_dev_run:
            return  # a dry run writes nothing that a later run would trip over
        directory = self.directory(trainer)  # on every rank: trainer.log_dir broadcasts
        if not is_sharded(self._model):
            if trainer.is_global_zero:
                save_adapter(directory, self._model, self.plan)
            return
        tensors = self._adapter_copies()  # a collective: every rank gathers, rank 0 writes
        if trainer.is_global_zero:
            write_adapter(directory, tensors, self.plan)


def check_injection_settings(rank, alpha, dropout, adapter_dtype, router_rank, adapter_path) -> None:
    """The callback's own arguments, checked when it is built (before any model work)."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}; LoRA needs rank >= 1 (8-64 are common).")
    if router_rank is not None and (not isinstance(router_rank, int) or router_rank < 1):
        raise ValueError(f"router_rank must be a positive integer or null (= rank), got {router_rank!r}.")
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}; LoRA scales its update by alpha / rank.")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if adapter_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"adapter_dtype must be float32, bfloat16 or float16, got {adapter_dtype!r}.")
    if adapter_path is not None:
        folder = Path(adapter_path)
        missing = [name for name in (PLAN_FILE, ADAPTER_FILE) if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"adapter_path {str(adapter_path)!r} has no {' or '.join(missing)}; give the hellora/ folder "
                "a fit wrote (it holds plan.json and adapter.safetensors)."
            )


# Methods whose expert set is fixed, and why re-selection does not apply to them.
RESELECTION_REFUSED = {
    "lora": "it adapts every expert already",
    "dr_lora": "it adapts every expert already, with ranks grown within a budget set by the adapted experts",
    "attention_only": "it has no expert adapters",
    "esft": "ESFT's experts are fixed from the task's routing before training (that choice is the method), "
    "and each would cost a full-rank delta",
    "hellori": "LoRI's sparse B mask is chosen over all adapters at once, so a new expert would have no mask "
    "(or change everyone's)",
}


def check_reselection(every: int, method: str, hot_experts: HotExpertPolicy | None, experts: bool | None) -> None:
    """reselect_every_n_steps against the method and policy, when the callback is built."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(
            f"reselect_every_n_steps must be an integer >= 0 (0: off), got {every!r}; e.g. 200 re-selects hot "
            "experts every 200 optimizer steps."
        )
    if every == 0:
        return
    name = method_defaults(method).name
    if name in RESELECTION_REFUSED:
        raise ValueError(
            f"reselect_every_n_steps does not apply to method {name!r}: {RESELECTION_REFUSED[name]}. "
            "Use method 'hellora', or reselect_every_n_steps=0."
        )
    if experts is False:
        raise ValueError("reselect_every_n_steps needs expert adapters, but experts=false; set it to 0.")
    if isinstance(hot_experts, AllExperts):
        raise ValueError(
            "reselect_every_n_steps does not apply to hot_experts=AllExperts: every expert is adapted already. "
            "Choose TopKPerLayer, FractionPerLayer or CoveragePerLayer, or set reselect_every_n_steps=0."
        )


def check_reselection_watch(every: int, watch: int | None) -> None:
    """Re-selection reads the routing the profiler watches: `watch` (its watch_every_n_steps; None
    without a RoutingProfilerCallback) must be in 1..`every` (the CLI checks this before loading a model)."""
    if every and not (watch is not None and 1 <= watch <= every):
        found = "there is none" if watch is None else f"its watch_every_n_steps is {watch}"
        raise ValueError(
            f"reselect_every_n_steps={every} chooses experts from the routing a RoutingProfilerCallback watches "
            f"during training, but {found}; set RoutingProfilerCallback(watch_every_n_steps=...) "
            f"(--profiler.watch_every_n_steps) to a value in 1..{every}."
        )


def checkpoint_plan(ckpt_path, state_key: str) -> AdapterPlan | None:
    """The plan a checkpoint carries in HotExpertInjectionCallback's state (None without a checkpoint).

    Read on its own, before Lightning restores anything, so a restored run injects this plan
    instead of profiling routing again. Reads a file checkpoint or a sharded folder's metadata.
    """
    if ckpt_path is None:
        return None
    if not checkpoint_metadata_file(ckpt_path).is_file():
        return None  # a remote URL or an unusual layout: Lightning's restore reports it, then on_load_checkpoint
    state = checkpoint_plan_states(load_checkpoint_metadata(ckpt_path, mmap=True)).get(state_key)
    if state is None:
        raise ValueError(
            f"{ckpt_path} holds no hellora plan: it was not written with HotExpertInjectionCallback, so its "
            "adapters cannot be restored. Start a new fit instead of resuming."
        )
    return AdapterPlan.from_dict(state["plan"])


def trainable_summary(plan: AdapterPlan) -> str:
    share = plan.trainable_params / max(plan.lora_all_experts_params, 1)
    return (
        f"{plan.trainable_params:,} ({100 * share:.1f}% of LoRA on every expert at rank {plan.rank}: "
        f"{plan.lora_all_experts_params:,})"
    )


def _find(trainer: Trainer, kind: type):
    found = [cb for cb in trainer.callbacks if isinstance(cb, kind)]
    return found[0] if found else None


def injection_callback(trainer: Trainer) -> HotExpertInjectionCallback:
    """The trainer's HotExpertInjectionCallback (companion callbacks read its plan and model)."""
    found = _find(trainer, HotExpertInjectionCallback)
    if found is None:
        raise ValueError("This callback needs a HotExpertInjectionCallback in the trainer's callbacks.")
    return found
