"""The support matrix: every MoE family of the installed transformers whose experts use its experts
interface, built tiny from its own config class and checked end to end.

A family is a transformers model folder whose modeling has `@use_experts_implementation`; it is
checked through its causal-LM model types (decoder-only, or a multimodal model's `*_text` decoder)
and its multimodal wrappers (the text decoder inside the wrapper). `check_family` gives each one
status "supported" (every check below passed), "refused" (hellora_pl refuses it by name, with the
reason), "failed" (a check failed: a bug, shown, never a row marked supported) or "not built" (its
tiny config does not build; the reason is shown).

The checks: routing is profiled (counts = tokens x top-k on every MoE layer); with `hellora` and
`lora` adapters B = 0 gives the base's logits (transformers' eager experts), random B gives the
logits of the merged oracle (`oracle.merged_copy`), and two SGD steps change adapter tensors only.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import model_type_to_module_name

from ..adapters import adapter_state_dict, inject_adapters
from ..adapters.experts import expert_adapter
from ..adapters.liveness import DeadAdapterError, check_liveness
from ..adapters.methods import resolve_method
from ..backbones import UnsupportedArchitectureError, architecture_for
from ..backbones.detect import NUM_EXPERTS_FIELDS
from ..backbones.tiny import tiny_config_for, tiny_wrapper_config
from ..kernels.layout import ExpertLayout
from ..routing import RoutingRecorder
from .oracle import merged_copy

ORACLE_TOLERANCE = 1e-5  # fp32, relative to max |logit|: adapted vs the merged oracle
BASE_TOLERANCE = 1e-6  # fp32, relative to max |logit|: B = 0 vs the base
METHODS = ("hellora", "lora")
RANK = 4

Kind = Literal["decoder", "multimodal"]
Status = Literal["supported", "refused", "failed", "not built"]

# transformers' auto mapping of multimodal wrappers -> the auto class that builds them (text-only input works).
_WRAPPER_MAPPINGS = {
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "AutoModelForImageTextToText",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES": "AutoModelForMultimodalLM",
}


@dataclass
class FamilyResult:
    """One model type's row of the matrix."""

    family: str  # the transformers model folder
    model_type: str
    kind: Kind
    status: Status
    reason: str = ""  # why refused / failed / not built
    layout: list[str] = field(default_factory=list)  # expert layout features beside the plain one
    mixers: list[str] = field(default_factory=list)  # attention-like module classes (several: hybrid)
    oracle_difference: dict[str, float] = field(default_factory=dict)  # method -> relative max difference
    base_difference: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


@functools.cache
def _experts_interface_folders() -> frozenset[str]:
    models = Path(transformers.__file__).parent / "models"
    return frozenset(
        p.parent.name for p in models.glob("*/modeling_*.py") if "@use_experts_implementation" in p.read_text()
    )


def is_wrapper(model_type: str) -> bool:
    """A multimodal wrapper: its config has a text_config (its MoE text decoder inside)."""
    return "text_config" in (getattr(CONFIG_MAPPING[model_type], "sub_configs", None) or {})


def _mapping_types(name: str) -> set[str]:
    return set(getattr(modeling_auto, name, {}) or {})


def _config_has_experts(model_type: str) -> bool:
    """The type's default config declares several routed experts (a field detection knows)."""
    try:
        config = CONFIG_MAPPING[model_type]().get_text_config()
    except Exception:  # configs whose defaults do not build, or with several text configs
        return False
    return any(isinstance(getattr(config, f, None), int) and getattr(config, f) > 1 for f in NUM_EXPERTS_FIELDS)


@functools.cache
def moe_families() -> tuple[tuple[str, str, Kind], ...]:
    """(family, model_type, kind) of every MoE model type of the installed transformers, sorted.

    A type is in when its modeling folder uses the experts interface, or when its default config
    declares several routed experts (families that reuse another folder's modules, and MoE families
    without the experts interface, whose refusal the matrix then shows). Decoders: causal-LM types
    that are not wrappers; multimodal: wrappers built by an auto class that runs text-only input."""
    folders = _experts_interface_folders()
    candidates = set(_mapping_types("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"))
    wrapper_types = set().union(*(_mapping_types(m) for m in _WRAPPER_MAPPINGS))
    found = set()
    for model_type in candidates | wrapper_types:
        if model_type not in CONFIG_MAPPING:
            continue
        kind = "multimodal" if is_wrapper(model_type) else "decoder"
        if kind == "multimodal" and model_type not in wrapper_types:
            continue  # a wrapper only in the causal-LM mapping: built through its wrapper auto class or not at all
        folder = model_type_to_module_name(model_type)
        if folder in folders or _config_has_experts(model_type):
            found.add((folder, model_type, kind))
    return tuple(sorted(found))


def _auto_class(model_type: str) -> str:
    """The auto class that builds `model_type` with a language-model head: the causal-LM one first."""
    mappings = {"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM", **_WRAPPER_MAPPINGS}
    return next(auto for mapping, auto in mappings.items() if model_type in _mapping_types(mapping))


MAX_TINY_PARAMETERS = 60_000_000  # a "tiny" model above this kept a tower at full size: not built


def build_tiny(model_type: str, kind: Kind, seed: int = 0) -> torch.nn.Module:
    """The family's tiny model in fp32, eval mode (decoder: causal LM; multimodal: the wrapper).

    Built on the meta device first: a config that is not tiny (a tower the tiny config could not
    shrink) is refused with its size instead of filling memory."""
    config = tiny_config_for(model_type) if kind == "decoder" else tiny_wrapper_config(model_type)
    auto = getattr(transformers, _auto_class(model_type))
    with torch.device("meta"):
        meta_model = auto.from_config(config)
    if type(meta_model).forward is torch.nn.Module.forward:  # e.g. Qwen3-Omni's thinker + talker: generate() only
        raise ValueError(f"{type(meta_model).__name__} has no forward (generate only): there is no loss to fine-tune; "
                         "load its text-generating part (a causal-LM or thinker class) instead")  # fmt: skip
    size = sum(p.numel() for p in meta_model.parameters())
    if size > MAX_TINY_PARAMETERS:
        raise ValueError(f"the tiny config builds {size / 1e6:.0f}M parameters (a tower kept at full size)")
    torch.manual_seed(seed)
    return auto.from_config(config, dtype=torch.float32).eval()


def token_batch(config, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.get_text_config().vocab_size, (batch, length), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _CheckFailed(AssertionError):
    pass


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _CheckFailed(message)


def check_family(model_type: str, kind: Kind | None = None, family: str | None = None) -> FamilyResult:
    """Build, detect, profile, adapt and train one model type; never raises for a family's failure."""
    kind = kind or ("multimodal" if is_wrapper(model_type) else "decoder")
    result = FamilyResult(family or model_type_to_module_name(model_type), model_type, kind, "supported")
    started = time.perf_counter()
    try:
        base = build_tiny(model_type, kind)
        with torch.no_grad():  # the unadapted model's own forward, before hellora_pl touches it
            base(**token_batch(base.config))
    except Exception as error:  # a tiny config transformers' validators or its own forward refuse
        result.status, result.reason = "not built", _first_line(error)
        return result
    check_built(base, result)
    result.seconds = time.perf_counter() - started
    return result


def check_built(base: torch.nn.Module, result: FamilyResult | None = None) -> FamilyResult:
    """Detect, profile, adapt and train an already built fp32 model (the checks of `check_family`)."""
    if result is None:
        model_type = base.config.model_type
        kind = "multimodal" if is_wrapper(model_type) else "decoder"
        result = FamilyResult(model_type_to_module_name(model_type), model_type, kind, "supported")
    try:
        arch = architecture_for(base)
    except UnsupportedArchitectureError as refused:
        result.status, result.reason = "refused", refused.detection or str(refused).splitlines()[0]
        return result
    moe_layers = arch.moe_layers(base)
    result.layout = sorted({d for moe in moe_layers for d in _layout_differences(moe.experts)})
    mixers = (arch.attention_module(layer) for layer in arch.decoder_layers(base))
    result.mixers = sorted({type(mixer).__name__ for mixer in mixers if mixer is not None})
    try:
        _check(base, arch, moe_layers, result)
    except _CheckFailed as failed:
        result.status, result.reason = "failed", str(failed)
    except Exception as error:  # hellora_pl raised on a model it detected: a failure, shown
        result.status, result.reason = "failed", _first_line(error)
    return result


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:200]


def _layout_differences(experts) -> list[str]:
    try:
        return ExpertLayout.of(experts).differences()
    except (NotImplementedError, AttributeError):  # ModuleList experts have no layout flags
        return []


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max()))


def _check(base, arch, moe_layers, result: FamilyResult) -> None:
    tokens = token_batch(base.config)
    _require(bool(moe_layers), "no MoE layer found")
    with RoutingRecorder(base) as recorder, _experts_used(moe_layers) as used, torch.no_grad():
        recorder.armed = True
        base(**tokens)
    profile = recorder.profile()
    expected = [tokens["input_ids"].numel() * arch.top_k(base.config)] * len(moe_layers)
    totals = profile.counts.sum(dim=1).tolist()
    _require(totals == expected, f"profile counts {totals} != tokens x top-k {expected}")
    model_counts = torch.stack([used.pop(id(moe.experts)) for moe in moe_layers]).to(profile.counts)
    _require(torch.equal(profile.counts, model_counts), "profile counts differ from the experts the model ran")

    base_eager = copy.deepcopy(base)
    base_eager.set_experts_implementation("eager")
    with torch.no_grad():
        base_logits = base_eager(**tokens).logits
    for method in METHODS:
        model = copy.deepcopy(base)
        plan = resolve_method(method, rank=RANK, alpha=8.0).build(model, profile)
        inject_adapters(model, plan, expert_kernel="torch")
        with torch.no_grad():
            difference = result.base_difference[method] = _relative(model(**tokens).logits, base_logits)
        _require(difference <= BASE_TOLERANCE, f"{method}: B = 0 differs from the base by {difference:.3g}")
        try:  # every adapter tensor gets a gradient, every site changes the output (restores everything)
            check_liveness(model, tokens)
        except DeadAdapterError as dead:
            raise _CheckFailed(f"{method}: {dead}") from None
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for name, tensor in adapter_state_dict(model).items():
                if "lora_B" in name:
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            adapted_logits = model(**tokens).logits
            oracle_logits = merged_copy(base, model)(**tokens).logits
        _require(_relative(adapted_logits, base_logits) > 1e-3, f"{method}: the adapters change nothing")
        difference = result.oracle_difference[method] = _relative(adapted_logits, oracle_logits)
        _require(difference <= ORACLE_TOLERANCE, f"{method}: adapted vs the merged oracle differ by {difference:.3g}")
        _check_cold_experts(arch.moe_layers(model), arch.moe_layers(base_eager), method)
    _check_training(model, tokens)


def _check_cold_experts(adapted_layers, eager_layers, method: str) -> None:
    """Rows routed only to experts without an adapter give exactly the base experts' output (transformers'
    eager experts), with every hot expert's B nonzero."""
    generator = torch.Generator().manual_seed(3)
    for adapted, eager in zip(adapted_layers, eager_layers, strict=True):
        adapter = expert_adapter(adapted.experts)
        cold = [] if adapter is None else (adapter.slot_of_expert < 0).nonzero().flatten().tolist()
        if not cold:
            continue
        hidden = ExpertLayout.of(eager.experts).hidden
        x = torch.randn(len(cold), hidden, generator=generator)
        index = torch.tensor(cold).unsqueeze(1)  # each row to one cold expert, weight 1
        weights = torch.ones(len(cold), 1)
        with torch.no_grad():
            difference = _relative(adapted.experts(x, index, weights), eager.experts(x, index, weights))
        _require(difference <= BASE_TOLERANCE, f"{method}: layer {adapted.index}'s cold experts changed by {difference:.3g}")


@contextlib.contextmanager
def _experts_used(moe_layers):
    """Per experts module, how often the forward inside the block sends a token to each expert, counted
    from the `top_k_index` the experts receive (not through the profiler's hooks)."""
    used: dict[int, torch.Tensor] = {}

    def count(module, args, kwargs):
        index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
        used[id(module)] = torch.bincount(index.reshape(-1), minlength=ExpertLayout.of(module).num_experts)

    handles = [moe.experts.register_forward_pre_hook(count, with_kwargs=True) for moe in moe_layers]
    try:
        yield used
    finally:
        for handle in handles:
            handle.remove()


def _check_training(model, tokens) -> None:
    """Two SGD steps (on the last method's model) change adapter tensors, and only those."""
    model.train()
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**tokens, labels=tokens["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, t in model.state_dict().items() if not torch.equal(before[name], t)}
    _require(bool(changed), "two training steps changed nothing")
    frozen_changed = sorted(name for name in changed if "lora_" not in name)
    _require(not frozen_changed, f"training changed non-adapter tensors: {frozen_changed[:5]}")
