"""What `dept-tune` searches: parameter names, ranges and the seed's grid, checked before any training.

A search space is parsed from `--search NAME=LOW:HIGH` (a range) or `--search NAME=V1,V2,...` (a list of values).
The learning rates are sampled log-uniformly; `r` (or `prefix_length`) is chosen among the (m, r) pairs that
spend exactly the parameter budget m·d + s·r + r·d of the recipe's own (m, r), so every trial trains as many
parameters as the recipe does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

LEARNING_RATES = ("learning_rate", "lora_embedding_lr")
# The ranges of the official runs: every released run and the README sweep use lr 3e-1 or 4e-1; A·B's rate is
# 1e-4 .. 5e-3 in the released runs (configs/nlp recipes) and up to 3e-1 in the README's LORA_LR grid.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "learning_rate": (3e-1, 4e-1),
    "lora_embedding_lr": (1e-4, 3e-1),
}
# The seed's bash grid (github.com/ZhengxiangShi/DePT README, scripts/sweep.sh): LORA_LR x lr.
SEED_GRID: dict[str, list[float]] = {
    "lora_embedding_lr": [5e-3, 3e-1, 5e-4],
    "learning_rate": [3e-1, 4e-1],
}
BUDGET_PARAMETERS = ("r", "prefix_length")
STEP_PARAMETERS = ("max_steps", "warmup_steps")
KNOWN_PARAMETERS = (*LEARNING_RATES, *BUDGET_PARAMETERS, *STEP_PARAMETERS)


class SearchSpaceError(ValueError):
    """A `--search` entry names an unknown parameter or gives an empty or malformed range."""


@dataclass(frozen=True)
class ParamSpec:
    """One searched parameter: a range `[low, high]` or a list of `choices`."""

    name: str
    low: float | None = None
    high: float | None = None
    choices: tuple[float, ...] | None = None

    @property
    def is_integer(self) -> bool:
        return self.name in (*BUDGET_PARAMETERS, *STEP_PARAMETERS)


@dataclass(frozen=True)
class Budget:
    """The fixed DePT parameter budget m·d + s·r + r·d, and the (m, r) pairs that spend exactly it."""

    prefix_length: int
    r: int
    max_length: int
    hidden_size: int

    @property
    def total(self) -> int:
        return self.prefix_length * self.hidden_size + self.r * (self.max_length + self.hidden_size)

    def pairs(self) -> list[tuple[int, int]]:
        """Every (m, r) with m >= 1, r >= 0 and m·d + r·(s + d) equal to the budget, by increasing r."""
        d, row = self.hidden_size, self.max_length + self.hidden_size
        return [((self.total - r * row) // d, r) for r in range(self.total // row + 1)
                if (self.total - r * row) % d == 0 and (self.total - r * row) // d >= 1]


def parse_search(entries: list[str] | None, sampler: str) -> dict[str, ParamSpec]:
    """`--search` entries -> specs by name. Without entries: the two learning rates over the official ranges
    (TPE and random), or the seed's grid (`sampler="grid"`)."""
    if not entries:
        if sampler == "grid":
            return {name: ParamSpec(name, choices=tuple(values)) for name, values in SEED_GRID.items()}
        return {name: ParamSpec(name, *DEFAULT_RANGES[name]) for name in LEARNING_RATES}
    specs: dict[str, ParamSpec] = {}
    for entry in entries:
        spec = _parse_entry(entry)
        if spec.name in specs:
            raise SearchSpaceError(f"--search names {spec.name!r} twice: give each parameter once.")
        specs[spec.name] = spec
    if set(BUDGET_PARAMETERS) <= set(specs):
        raise SearchSpaceError("--search r and --search prefix_length cannot both be given: at a fixed parameter "
                               "budget one decides the other. Search one of them.")
    if sampler == "grid":
        ranged = [name for name, spec in specs.items() if spec.choices is None]
        if ranged:
            raise SearchSpaceError(f"--sampler grid needs a list of values for every parameter, got a range for "
                                   f"{ranged}: write e.g. --search learning_rate=3e-1,4e-1.")
    return specs


def _parse_entry(entry: str) -> ParamSpec:
    name, equals, values = entry.partition("=")
    name = name.strip()
    if name not in KNOWN_PARAMETERS:
        raise SearchSpaceError(f"--search {entry!r}: unknown parameter {name!r}. The searchable parameters are "
                               f"{', '.join(KNOWN_PARAMETERS)}.")
    if not equals:
        if name in DEFAULT_RANGES:
            return ParamSpec(name, *DEFAULT_RANGES[name])
        if name in BUDGET_PARAMETERS:
            return ParamSpec(name)  # every (m, r) pair of the budget
        raise SearchSpaceError(f"--search {name} needs a range: write {name}=LOW:HIGH or {name}=V1,V2,...")
    integer = name in (*BUDGET_PARAMETERS, *STEP_PARAMETERS)
    try:
        if ":" in values:
            low_text, high_text = values.split(":")
            low, high = _number(low_text, integer), _number(high_text, integer)
            spec = ParamSpec(name, low, high)
        else:
            choices = tuple(_number(value, integer) for value in values.split(","))
            if len(set(choices)) != len(choices):
                raise SearchSpaceError(f"--search {entry!r} lists a value twice.")
            spec = ParamSpec(name, choices=choices)
    except ValueError as error:
        if isinstance(error, SearchSpaceError):
            raise
        kind = "integers" if integer else "numbers"
        raise SearchSpaceError(f"--search {entry!r}: {kind} expected, as {name}=LOW:HIGH or {name}=V1,V2,...") from None
    _check_values(entry, spec)
    return spec


def _number(text: str, integer: bool) -> float:
    return int(text) if integer else float(text)


def _check_values(entry: str, spec: ParamSpec) -> None:
    values = spec.choices if spec.choices is not None else (spec.low, spec.high)
    if spec.choices is None and not spec.low < spec.high:
        raise SearchSpaceError(f"--search {entry!r} is an empty range: LOW must be below HIGH.")
    if spec.name in LEARNING_RATES and min(values) <= 0:
        raise SearchSpaceError(f"--search {entry!r}: learning rates are searched log-uniformly, so they must be > 0.")
    minimum = 1 if spec.name in ("max_steps", "prefix_length") else 0
    if spec.is_integer and min(values) < minimum:
        raise SearchSpaceError(f"--search {entry!r}: {spec.name} must be >= {minimum}.")


def budget_choices(spec: ParamSpec, budget: Budget) -> list[tuple[int, int]]:
    """The (m, r) pairs of the budget whose searched value (m or r) lies in `spec`; an error if there are none."""
    index = 0 if spec.name == "prefix_length" else 1
    pairs = budget.pairs()
    if spec.choices is not None:
        chosen = [pair for pair in pairs if pair[index] in spec.choices]
        missing = sorted(set(spec.choices) - {pair[index] for pair in chosen})
        if missing:
            raise SearchSpaceError(
                f"--search {spec.name}: {missing} spend no (m, r) pair of the budget m·d + s·r + r·d = {budget.total} "
                f"(d={budget.hidden_size}, s={budget.max_length}). Pairs that do: {pairs}."
            )
    else:
        low = spec.low if spec.low is not None else (1 if spec.name == "r" else 0)  # r = 0 is PT: ask for it
        high = spec.high if spec.high is not None else float("inf")
        chosen = [pair for pair in pairs if low <= pair[index] <= high]
    if len(chosen) < 2:
        raise SearchSpaceError(
            f"--search {spec.name}: the range holds {len(chosen)} (m, r) pair(s) at the budget m·d + s·r + r·d = "
            f"{budget.total} (d={budget.hidden_size}, s={budget.max_length}); there is nothing to search. Pairs: "
            f"{pairs}."
        )
    return chosen


def grid_points(specs: dict[str, ParamSpec]) -> list[dict[str, float]]:
    """Every combination of the specs' choices, the first spec's values outermost (sweep.sh's loop order)."""
    points: list[dict[str, float]] = [{}]
    for name, spec in specs.items():
        points = [{**point, name: value} for point in points for value in spec.choices]
    return points


def suggest(trial: optuna.Trial, specs: dict[str, ParamSpec], budget_pairs: list[tuple[int, int]] | None) -> dict:
    """The trial's values of the searched parameters, as the pipeline's flags (`prefix_length` follows `r`)."""
    values: dict = {}
    for name, spec in specs.items():
        if name in BUDGET_PARAMETERS:
            index = 0 if name == "prefix_length" else 1
            value = trial.suggest_categorical(name, sorted({pair[index] for pair in budget_pairs}))
            values["prefix_length"], values["r"] = next(pair for pair in budget_pairs if pair[index] == value)
            continue
        low = spec.low if spec.choices is None else min(spec.choices)
        high = spec.high if spec.choices is None else max(spec.choices)
        if spec.choices is not None and len(spec.choices) == 1:
            values[name] = trial.suggest_categorical(name, list(spec.choices))
        elif spec.is_integer:
            values[name] = trial.suggest_int(name, int(low), int(high), log=name == "max_steps" and low > 0)
        else:
            values[name] = trial.suggest_float(name, low, high, log=True)
    return values
