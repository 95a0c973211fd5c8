"""
What to build and where: the adapter configuration, its validation, and which linears it targets.

`AdapterConfig` holds every hyper-parameter of every method (a method ignores the fields of the
others). It round-trips through JSON and is validated when it is built, so a bad value is a one-line
`ValueError` that names the train.py flag to change. train.py turns each field into a flag
(`t_init` -> `--t-init`, with the field's help text).

The functions below the class resolve the defaults that depend on the run (-1 = a fraction of
--steps, 0 = derived from --rank) in one place, so the methods (adapters.py), the memory estimator
(memory.py) and the validation agree on them.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields

import torch.nn as nn

METHOD_NAMES = ("lora", "adalora", "triadapt", "ctr", "cg")
LLAMA_LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# AdaLoRA's P, Q ~ N(0, 0.02²) (official code and peft); TriAdaptLoRA's new rows of A
SVD_INIT_STD = 0.02

BUDGET_SHAPES = ("cubic", "linear")
THRESHOLD_MODES = ("linear", "exponential", "fixed")
CTR_METRICS = ("kfac-diag", "kfac-full", "hessian")
CG_VARIANTS = ("no-shift", "shift")
CG_CURVATURES = ("kfac-full", "kfac-diag", "identity")
CG_MODES = ("auto", "dense", "sketch")
CG_KAPPA_SOURCES = ("measured", "predicted")
CG_FACTOR_TOKENS = ("labels", "all")
CG_DENSE_SVDS = ("exact", "randomized")
# fields older adapter files may hold that no longer change anything a saved adapter needs:
# cg_split only shaped CG-LoRA's initial factors (notes/cg_lora.md: no split helped)
# ctr_rho_warmup grew ρ over the first steps when ρ bounded a K-FAC prediction
RETIRED_FIELDS = ("cg_split", "ctr_rho_warmup")


def option(default, help_text: str):
    """A config field with a default and the help text of its train.py flag."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class AdapterConfig:
    """Everything needed to rebuild an adapter's structure.

    method:  one of METHOD_NAMES
    r:       rank per module (LoRA's r; AdaLoRA's default target rank; TriAdaptLoRA's reference
             rank r_ref)
    alpha:   LoRA α; the update is scaled by c = α / r (AdaLoRA: α / r₀; TriAdaptLoRA: α / r_ref)
    dropout: dropout on the adapter input only (the base path never sees dropout)
    targets: leaf names of the linears to adapt, e.g. ["q_proj", "v_proj"]

    Every later field has a default, a JSON type and a help text. The defaults leave LoRA unchanged.
    """

    method: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    # --- shared by the methods with a schedule (AdaLoRA, TriAdaptLoRA, CTR-LoRA) ---------------
    total_steps: int = option(0, "total optimizer steps T of the run, for the rank schedules "
                                 "(train.py sets it from --steps; 0 = not known yet)")
    orth_reg: float = option(0.1, "AdaLoRA/TriAdaptLoRA/CTR-LoRA: weight γ of the orthogonality "
                                  "penalty on the adapter factors (0 = off)")
    # --- AdaLoRA (SPEC §3); CTR-LoRA's budget uses these too ------------------------------------
    init_rank: int = option(0, "AdaLoRA/CTR-LoRA: initial rank r₀ of every module "
                               "(0 = 1.5 × the target rank, rounded up)")
    target_rank: int = option(0, "AdaLoRA/CTR-LoRA: final average rank; the budget is target "
                                 "rank × modules (0 = --rank)")
    t_init: int = option(-1, "AdaLoRA/CTR-LoRA: warm-up steps before the first rank allocation "
                             "(-1 = 10%% of --steps)")
    t_final: int = option(-1, "AdaLoRA/CTR-LoRA: final steps with the rank mask frozen "
                              "(-1 = 30%% of --steps)")
    delta_t: int = option(10, "AdaLoRA/CTR-LoRA: steps between two rank allocations")
    budget_schedule: str = option("cubic", "AdaLoRA/CTR-LoRA: how the budget falls from initial "
                                           "to target: cubic (the paper) or linear")
    beta1: float = option(0.85, "AdaLoRA: EMA factor β₁ of the smoothed sensitivity")
    beta2: float = option(0.85, "AdaLoRA: EMA factor β₂ of the uncertainty")
    # --- TriAdaptLoRA (SPEC §4) -----------------------------------------------------------------
    tri_init_rank: int = option(0, "TriAdaptLoRA: rank of every module before growth (0 = half "
                                   "of --rank, at least 1); --rank is the reference rank r_ref, "
                                   "the budget is r_ref × modules")
    tri_block: int = option(1, "TriAdaptLoRA: ranks a module gains per growth (block k)")
    tri_warmup: int = option(-1, "TriAdaptLoRA: step of the first growth event T_w "
                                 "(-1 = 10%% of --steps)")
    tri_interval: int = option(-1, "TriAdaptLoRA: steps between growth events "
                                   "(-1 = 10%% of --steps, at least 1)")
    tri_final: int = option(-1, "TriAdaptLoRA: last step with a growth event T_final "
                                "(-1 = 70%% of --steps)")
    tri_threshold: str = option("linear", "TriAdaptLoRA: how many modules grow per event: "
                                          "linear, exponential or fixed (--tri-top-k)")
    tri_top_k: int = option(1, "TriAdaptLoRA: modules grown per event with --tri-threshold fixed")
    tri_init_std: float = option(SVD_INIT_STD, "TriAdaptLoRA: std σ of new rows of A")
    # --- CTR-LoRA (SPEC §5) ---------------------------------------------------------------------
    ctr_metric: str = option("kfac-diag", "CTR-LoRA: curvature proxy of the trust region and "
                                          "utilities: kfac-diag (scales to 13B), kfac-full (small "
                                          "models) or hessian (Hutchinson)")
    ctr_schedule: bool = option(True, "CTR-LoRA: marginal-utility rank scheduling (off: every "
                                      "triplet stays active, an ablation)")
    ctr_trust_region: bool = option(True, "CTR-LoRA: shrink every step until its measured KL "
                                          "is at most --ctr-rho (off: an ablation)")
    ctr_rho: float = option(0.01, "CTR-LoRA: trust radius ρ: every applied step's measured "
                                  "KL(p_before ‖ p_after), averaged over the label tokens of the "
                                  "step's batch, is at most ρ nats")
    ctr_beta: float = option(0.95, "CTR-LoRA: EMA factor of the curvature statistics and of ∂L/∂λ")
    ctr_refresh: int = option(1, "CTR-LoRA: collect curvature statistics on every N-th step only "
                                 "(the others skip the statistics hooks' work)")
    ctr_probes: int = option(1, "CTR-LoRA: Hutchinson probes per refresh with --ctr-metric hessian")
    ctr_hysteresis: float = option(0.1, "CTR-LoRA: a masked triplet replaces an active one only if "
                                        "its utility is higher by this factor + 1")
    # --- CG-LoRA (SPEC §6) ----------------------------------------------------------------------
    cg_variant: str = option("no-shift", "CG-LoRA: no-shift (start one whitened step ahead; the "
                                         "paper's best) or shift (subtract the initial step: the "
                                         "function is unchanged at init)")
    cg_curvature: str = option("kfac-diag", "CG-LoRA: whitening: kfac-full (small models), "
                                            "kfac-diag, or identity (plain gradient SVD, the "
                                            "LoRA-GA/LoRA-One ablation)")
    cg_kappa0: float = option(0.3, "CG-LoRA: KL κ₀ (nats per label token) between the base and the "
                                   "initialized model; sets the step size η")
    cg_kappa_source: str = option("measured", "CG-LoRA: measured (η such that the measured "
                                              "KL(base ‖ init) on one calibration batch is κ₀) or "
                                              "predicted (the K-FAC prediction ½η²Σ‖[M]_r‖² = κ₀, "
                                              "which runs low)")
    cg_factor_tokens: str = option("labels", "CG-LoRA: tokens of the curvature factors S, Γ: "
                                             "labels (K-FAC's label tokens) or all (every position "
                                             "up to the last label of its sequence)")
    cg_batches: int = option(8, "CG-LoRA: calibration micro-batches for G, S, Γ")
    cg_damping: float = option(1e-3, "CG-LoRA: damping of S and Γ, relative to their mean diagonal")
    cg_mode: str = option("auto", "CG-LoRA: dense (per-layer G, SVD), sketch (one-pass randomized "
                                  "sketch, O((d_in + d_out)·r) memory per layer) or auto (sketch "
                                  "when dense G exceeds --cg-memory-cap-mb)")
    cg_memory_cap_mb: float = option(1024.0, "CG-LoRA: memory for dense gradients before auto "
                                             "mode switches to sketches")
    cg_dense_svd: str = option("exact", "CG-LoRA dense mode: exact (full SVD of each whitened "
                                        "gradient) or randomized (top-r with 4r columns and 4 "
                                        "power iterations, as LoRA-GA's code)")
    cg_oversample: int = option(10, "CG-LoRA: extra sketch columns beyond the rank")

    def __post_init__(self):
        if isinstance(self.targets, str):  # "q_proj,v_proj" from a command line
            self.targets = parse_targets(self.targets)
        hints = typing.get_type_hints(type(self))
        check_types({f.name: getattr(self, f.name) for f in fields(self)}, hints)
        for f in fields(self):
            if hints[f.name] is float:
                setattr(self, f.name, float(getattr(self, f.name)))  # JSON 16 -> 16.0
        if self.method not in METHOD_NAMES:
            raise ValueError(f"unknown adapter method {self.method!r}; "
                             f"known methods: {', '.join(METHOD_NAMES)}")
        if self.r < 1:
            raise ValueError(f"--rank must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"--alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"--targets is empty; give module names such as {LLAMA_LINEAR_NAMES}")
        if self.total_steps < 0:
            raise ValueError(f"--steps (total_steps) must be >= 0, got {self.total_steps}")
        if self.orth_reg < 0:
            raise ValueError(f"--orth-reg must be >= 0, got {self.orth_reg}")
        VALIDATORS.get(self.method, lambda cfg: None)(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AdapterConfig:
        if not isinstance(d, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(d).__name__}")
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        known = [f.name for f in fields(cls)]
        unknown = [k for k in d if k not in known]
        if unknown:
            raise ValueError(f"unknown adapter config key(s) {unknown}; known keys: "
                             f"{', '.join(known)}")
        # before __post_init__'s comma-string convenience
        check_types(d, typing.get_type_hints(cls))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> AdapterConfig:
        return cls.from_dict(json.loads(text))


# -----------------------------------------------------------------------------------------------
# Defaults that depend on the run, resolved in one place


def flag(name: str) -> str:
    """The train.py flag of a config field: t_init -> --t-init (messages name what the user
    typed)."""
    return "--" + name.replace("_", "-")


def steps_or_fraction(cfg: AdapterConfig, name: str, fraction: float, minimum: int = 0) -> int:
    """A step count: the field's value if >= 0, else (-1) round(fraction · total_steps)."""
    value = getattr(cfg, name)
    if value >= 0:
        return value
    if value != -1:
        raise ValueError(f"{flag(name)} must be >= 0 (or -1 for the default), got {value}")
    if cfg.total_steps < 1:
        raise ValueError(f"{flag(name)} -1 means a fraction of --steps, but total_steps is not "
                         f"set; pass total_steps (train.py sets it from --steps) or give "
                         f"{flag(name)}")
    return max(minimum, round(fraction * cfg.total_steps))


def svd_ranks(cfg: AdapterConfig) -> tuple[int, int]:
    """AdaLoRA/CTR-LoRA: (initial rank r₀, target rank) per module; target = --rank,
    r₀ = ⌈1.5 · target⌉ unless given."""
    for name in ("init_rank", "target_rank"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{flag(name)} must be >= 0 (0 = default), got {getattr(cfg, name)}")
    target = cfg.target_rank or cfg.r
    initial = cfg.init_rank or math.ceil(1.5 * target)
    if initial < target:
        raise ValueError(f"--target-rank {target} is larger than --init-rank {initial}: the budget "
                         f"only removes ranks; lower --target-rank or raise --init-rank")
    return initial, target


def svd_schedule_steps(cfg: AdapterConfig) -> tuple[int, int]:
    """AdaLoRA/CTR-LoRA: (t_init, t_final) with defaults 10 % and 30 % of --steps."""
    return steps_or_fraction(cfg, "t_init", 0.1), steps_or_fraction(cfg, "t_final", 0.3)


def check_budget_schedule(initial: int, target: int, total_steps: int, t_init: int, t_final: int,
                          delta_t: int, shape: str) -> None:
    """One-line errors, naming the flag, for a budget schedule that cannot run."""
    if delta_t < 1:
        raise ValueError(f"--delta-t must be >= 1, got {delta_t}")
    if shape not in BUDGET_SHAPES:
        raise ValueError(f"--budget-schedule must be one of {', '.join(BUDGET_SHAPES)}, "
                         f"got {shape!r}")
    if total_steps < 1:
        raise ValueError("the rank budget schedule needs the run's length: set total_steps "
                         "(train.py sets it from --steps)")
    if t_init < 0 or t_final < 0:
        raise ValueError(f"--t-init and --t-final must be >= 0, got {t_init} and {t_final}")
    if t_init + t_final >= total_steps:
        raise ValueError(f"--t-init {t_init} + --t-final {t_final} must be less than --steps "
                         f"{total_steps}: no step is left to allocate ranks; lower "
                         f"--t-init/--t-final or raise --steps")
    if target < 1:
        raise ValueError(f"the final rank budget must be > 0, got {target}; raise --target-rank")
    if target > initial:
        raise ValueError(f"the final rank budget {target} exceeds the initial budget {initial}: "
                         f"ranks are only removed; lower --target-rank or raise --init-rank")


def triadapt_init_rank(cfg: AdapterConfig) -> int:
    """Rank of every TriAdaptLoRA module before growth: --tri-init-rank, default
    max(1, r_ref // 2)."""
    init = cfg.tri_init_rank or max(1, cfg.r // 2)
    if cfg.tri_init_rank < 0 or init > cfg.r:
        raise ValueError(f"--tri-init-rank {cfg.tri_init_rank} must be in [1, --rank {cfg.r}] "
                         f"(0 = half of --rank): --rank is the reference rank, the budget is "
                         f"--rank × modules")
    return init


def triadapt_events(cfg: AdapterConfig) -> tuple[int, int, int]:
    """(T_w, interval, T_final) of the growth events, defaults 10 %, 10 %, 70 % of --steps."""
    warmup = steps_or_fraction(cfg, "tri_warmup", 0.1)
    interval = steps_or_fraction(cfg, "tri_interval", 0.1, minimum=1)
    final = steps_or_fraction(cfg, "tri_final", 0.7)
    if interval < 1:
        raise ValueError(f"--tri-interval must be >= 1, got {interval}")
    if final <= warmup:
        raise ValueError(f"--tri-final {final} must come after --tri-warmup {warmup}: no step is "
                         f"left for growth")
    if cfg.total_steps and final > cfg.total_steps:
        raise ValueError(f"--tri-final {final} is after the last step (--steps "
                         f"{cfg.total_steps}); lower it")
    return warmup, interval, final


# -----------------------------------------------------------------------------------------------
# Validation of each method's options


def _one_of(cfg: AdapterConfig, name: str, choices) -> None:
    if getattr(cfg, name) not in choices:
        raise ValueError(f"{flag(name)} must be one of {', '.join(choices)}, "
                         f"got {getattr(cfg, name)!r}")


def _at_least(cfg: AdapterConfig, minimum, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < minimum:
            raise ValueError(f"{flag(name)} must be >= {minimum}, got {getattr(cfg, name)}")


def _check_svd_budget(cfg: AdapterConfig) -> None:
    initial, target = svd_ranks(cfg)
    if cfg.total_steps > 0:
        check_budget_schedule(initial, target, cfg.total_steps, *svd_schedule_steps(cfg),
                              cfg.delta_t, cfg.budget_schedule)
    else:
        _at_least(cfg, 1, "delta_t")
        _one_of(cfg, "budget_schedule", BUDGET_SHAPES)


def _validate_adalora(cfg: AdapterConfig) -> None:
    for name in ("beta1", "beta2"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ValueError(f"{flag(name)} must be in (0, 1), got {getattr(cfg, name)}")
    _check_svd_budget(cfg)


def _validate_triadapt(cfg: AdapterConfig) -> None:
    triadapt_init_rank(cfg)
    _at_least(cfg, 1, "tri_block", "tri_top_k")
    _one_of(cfg, "tri_threshold", THRESHOLD_MODES)
    if cfg.tri_init_std <= 0:
        raise ValueError(f"--tri-init-std must be > 0, got {cfg.tri_init_std}")
    if cfg.total_steps > 0 or min(cfg.tri_warmup, cfg.tri_interval, cfg.tri_final) >= 0:
        triadapt_events(cfg)


def _validate_ctr(cfg: AdapterConfig) -> None:
    _one_of(cfg, "ctr_metric", CTR_METRICS)
    if cfg.ctr_rho <= 0:
        raise ValueError(f"--ctr-rho must be > 0 (a KL per step, nats), got {cfg.ctr_rho}")
    if not 0.0 <= cfg.ctr_beta < 1.0:
        raise ValueError(f"--ctr-beta must be in [0, 1), got {cfg.ctr_beta}")
    _at_least(cfg, 1, "ctr_refresh", "ctr_probes")
    _at_least(cfg, 0, "ctr_hysteresis")
    svd_ranks(cfg)
    if cfg.ctr_schedule:
        _check_svd_budget(cfg)


def _validate_cg(cfg: AdapterConfig) -> None:
    for name, choices in (("cg_variant", CG_VARIANTS), ("cg_curvature", CG_CURVATURES),
                          ("cg_mode", CG_MODES), ("cg_kappa_source", CG_KAPPA_SOURCES),
                          ("cg_factor_tokens", CG_FACTOR_TOKENS), ("cg_dense_svd", CG_DENSE_SVDS)):
        _one_of(cfg, name, choices)
    if cfg.cg_mode == "sketch" and cfg.cg_curvature == "kfac-full":
        raise ValueError("--cg-mode sketch keeps O((d_in + d_out)·r) memory per layer, which full "
                         "factors exceed: use --cg-curvature kfac-diag or identity with it")
    if cfg.cg_kappa0 <= 0:
        raise ValueError(f"--cg-kappa0 must be > 0, got {cfg.cg_kappa0}")
    _at_least(cfg, 1, "cg_batches")
    _at_least(cfg, 0, "cg_oversample", "cg_damping", "cg_memory_cap_mb")


VALIDATORS = {"adalora": _validate_adalora, "triadapt": _validate_triadapt, "ctr": _validate_ctr,
              "cg": _validate_cg}


# -----------------------------------------------------------------------------------------------
# JSON types


def check_types(values: dict, hints: dict) -> None:
    """A one-line ValueError naming the first key whose value does not match its type hint, or
    whose float value is not finite."""
    for key, value in values.items():
        if not has_type(value, hints[key]):
            tp = hints[key]
            name = getattr(tp, "__name__", None) if typing.get_origin(tp) is None else str(tp)
            raise ValueError(f"adapter config key {key!r} ({flag(key)}) must be {name}, "
                             f"got {type(value).__name__} {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag(key)} must be a finite number, got {value}")


def has_type(value, tp) -> bool:
    """Does a JSON value match a type hint (int, float, str, bool, list[X], dict[str, X],
    X | None)?"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(has_type(k, args[0]) and has_type(v, args[1])
                                               for k, v in value.items())
    if args:  # Union / Optional
        return any(has_type(value, a) for a in args)
    raise TypeError(f"AdapterConfig field type {tp} is not supported by the JSON validator")


# -----------------------------------------------------------------------------------------------
# Which linears a config adapts


def parse_targets(text: str) -> list[str]:
    """Split a comma list: "q_proj, v_proj" -> ["q_proj", "v_proj"]."""
    return [t.strip() for t in text.split(",") if t.strip()]


def matches_target(module_name: str, target: str) -> bool:
    """peft's rule: the full name equals the target or ends with '.' + target."""
    return module_name == target or module_name.endswith("." + target)


def targeted_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """{full name: nn.Linear} of every linear whose name matches one of `targets`, in model order.

    Each target must match at least one linear, else a ValueError lists the linear names there are.
    """
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for target in targets:
        if not any(matches_target(name, target) for name in linears):
            leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
            raise ValueError(f"target {target!r} matches no nn.Linear in the model; linear names "
                             f"are: {', '.join(leaf_names)}")
    return {name: m for name, m in linears.items() if any(matches_target(name, t) for t in targets)}
