"""Search spaces for Ray Tune sweeps, Ray-free: parse and validate against the config (`sweep.py` converts them
for Tune).

A space maps dotted config keys to domains, written as text on the command line or in a file:

    optim.lr=loguniform(1e-5,1e-3)      log-uniform float in [low, high)
    loss.weights.consistency_l1=uniform(0.01,0.3)
    model.mla.hidden=choice(32,64,128)  one of the values (numbers, true/false, strings)
    train.batch_size=grid(64,128)       every value, in every combination with the other grid keys
    quniform(low,high,q), randint(low,high)   (randint: integers in [low, high))

Each stage's default space is in the stage table (`Stage.search_space`): the adapter size of the method it trains
(MLA acquirer hidden size or DASD core size), the learning rate, and the stage's own secondary loss weights. A
space file (JSON or YAML mapping key -> spec, a list meaning `choice`) and `--space key=spec` override it per key,
in that order; `key=fixed` drops a default key (the config value is then used).

Every value a domain can produce must be valid config: `validate_space` resolves the stage's config with each
domain's extremes (each option of a choice/grid; the bounds of a range) through the same validation every job
uses, so a space that can sample hidden size 0, a negative weight or an unknown key fails before any cluster work,
naming the key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ccr_ray.config import ConfigError, check_key

KINDS = {"uniform": 2, "loguniform": 2, "quniform": 3, "randint": 2, "choice": None, "grid": None}
DROP = "fixed"  # `--space key=fixed`: drop a default key
_CALL = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.S)


class SpaceError(ValueError):
    """A search space is malformed or can produce an invalid config; the message names the key."""


@dataclass(frozen=True)
class Domain:
    kind: str
    args: tuple

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(json.dumps(a) for a in self.args)})"

    @property
    def log(self) -> bool:
        return self.kind == "loguniform"

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    def extremes(self) -> list[Any]:
        """The values whose validity implies every sample's: each option, or a range's bounds."""
        if self.categorical:
            return list(self.args)
        low, high = self.args[0], self.args[1]
        if self.kind == "randint":
            return [low, high - 1]
        return [low, high]

    def grid_size(self) -> int:
        return len(self.args) if self.kind == "grid" else 1


def _parse_value(token: str) -> Any:
    token = token.strip()
    try:
        return json.loads(token)
    except json.JSONDecodeError:
        return token.strip("'\"")  # a bare word: a string option


def parse_domain(key: str, spec: Any) -> Domain:
    """Text (`loguniform(1e-5,1e-3)`), a list (a choice) or a single value (a choice of one)."""
    if isinstance(spec, (list, tuple)):
        kind, args = "choice", tuple(spec)
    elif isinstance(spec, str):
        match = _CALL.match(spec)
        if not match:
            raise SpaceError(f"--space {key}: {spec!r} is not a domain; write e.g. loguniform(1e-5,1e-3) or "
                             f"choice(32,64,128) (kinds: {', '.join(KINDS)})")
        kind = match.group(1)
        inner = match.group(2).strip()
        args = tuple(_parse_value(t) for t in inner.split(",")) if inner else ()
    else:
        kind, args = "choice", (spec,)
    if kind not in KINDS:
        raise SpaceError(f"--space {key}: unknown domain {kind!r} (kinds: {', '.join(KINDS)})")
    arity = KINDS[kind]
    if arity is None:
        if not args:
            raise SpaceError(f"--space {key}: {kind}() needs at least one value")
        return Domain(kind, args)
    if len(args) != arity or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise SpaceError(f"--space {key}: {kind} takes {arity} numbers, got {spec!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise SpaceError(f"--space {key}: {kind} needs low < high, got {spec!r}")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"--space {key}: loguniform needs low > 0, got {spec!r}")
    if kind == "randint" and not (float(low).is_integer() and float(high).is_integer()):
        raise SpaceError(f"--space {key}: randint takes integers, got {spec!r}")
    if kind == "randint":
        args = (int(low), int(high))
    return Domain(kind, args)


def parse_space_items(items: list[str]) -> dict[str, Domain | None]:
    """`key=spec` strings (None = drop the key)."""
    out: dict[str, Domain | None] = {}
    for item in items:
        if "=" not in item:
            raise SpaceError(f"--space {item!r}: expected key=spec, e.g. optim.lr=loguniform(1e-5,1e-3)")
        key, spec = (s.strip() for s in item.split("=", 1))
        if not key:
            raise SpaceError(f"--space {item!r}: empty key")
        out[key] = None if spec == DROP else parse_domain(key, spec)
    return out


def load_space_file(path: str) -> dict[str, Domain | None]:
    file = Path(path)
    if not file.is_file():
        raise SpaceError(f"--space-file: no such file {file}")
    text = file.read_text()
    try:
        if file.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse error is the file's fault
        raise SpaceError(f"--space-file {file}: cannot parse: {err}") from None
    if not isinstance(data, Mapping):
        raise SpaceError(f"--space-file {file}: expected a mapping of config key -> domain")
    return {str(k): None if v == DROP else parse_domain(str(k), v) for k, v in data.items()}


def resolve_space(defaults: Mapping[str, str], file: str | None = None, items: list[str] | None = None
                  ) -> dict[str, Domain]:
    """The stage's default space, overridden per key by the file, then by `--space` items."""
    space: dict[str, Domain | None] = {k: parse_domain(k, v) for k, v in defaults.items()}
    if file:
        space.update(load_space_file(file))
    space.update(parse_space_items(items or []))
    resolved = {k: d for k, d in space.items() if d is not None}
    if not resolved:
        raise SpaceError("--space: the search space is empty (the stage has no default space and none was given)")
    return resolved


def validate_space(space: Mapping[str, Domain], resolve) -> None:
    """`resolve(trial_values)` builds and validates one trial's config (`resolve_config(..., trial=...)`). The
    config without trial values first (its errors are the config's or `--set`'s, raised as they are), then every
    key by name, then each key's extremes on their own (an error is that key's), then with the other keys at their
    first extreme (an error of the combination)."""
    resolve({})
    for key in space:
        try:
            check_key(key)
        except ConfigError as err:
            raise SpaceError(f"--space {err}") from None
    for key, domain in space.items():
        for value in domain.extremes():
            _check_value(resolve, {key: value}, key, domain, value)
    base = {k: d.extremes()[0] for k, d in space.items()}
    for key, domain in space.items():
        for value in domain.extremes():
            _check_value(resolve, {**base, key: value}, key, domain, value)


def _check_value(resolve, values: dict, key: str, domain: Domain, value) -> None:
    try:
        resolve(values)
    except ConfigError as err:
        others = "" if len(values) == 1 else f" (with {', '.join(f'{k}={v!r}' for k, v in values.items() if k != key)})"
        raise SpaceError(f"--space {key}={domain}: the value {value!r}{others} gives an invalid config: {err}") from None


def count_trials(space: Mapping[str, Domain], num_samples: int) -> int:
    """Tune repeats the grid (the product of the grid sizes) num_samples times."""
    return num_samples * math.prod(d.grid_size() for d in space.values())
