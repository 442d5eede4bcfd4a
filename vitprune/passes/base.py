"""The pass protocol, the pass registry and the ``name:key=value`` spec parser.

A pass is a dataclass (its fields are its configuration, round-tripping through JSON) with
``__call__(gm, ctx) -> gm'``. Passes are pure: they never mutate the GraphModule they are
given in a way the caller can observe after the call returns a new one, and never touch the
user's model. What a pass did goes into ``ctx.record(...)`` and ends up in
``CompiledModule.report``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
from torch.fx import GraphModule

from ..errors import InvalidPassConfigError

PASS_REGISTRY: dict[str, type["Pass"]] = {}


def register_pass(name: str):
    """Class decorator: make a pass available by ``name`` to specs, the CLI and JSON configs."""

    def deco(cls):
        cls.name = name
        PASS_REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class PassContext:
    """What passes may use besides the graph.

    Attributes:
        example_inputs: 1-tuple with an image batch ``[B, 3, H, W]`` used to re-export graphs.
        calibration: optional calibration images ``[N, 3, H, W]`` (already transformed) for
            passes that need data, or None.
        progress: show progress bars for long work.
        records: per-pass dicts filled through :meth:`record`.
    """

    example_inputs: tuple
    calibration: Optional[torch.Tensor] = None
    progress: bool = True
    records: list = field(default_factory=list)

    def record(self, **info: Any) -> None:
        """Add ``info`` to the report entry of the pass that is running."""
        self.records[-1].update(info)


class Pass:
    """Base class of graph passes. Subclasses are dataclasses decorated with :func:`register_pass`."""

    name: ClassVar[str] = "pass"

    def __call__(self, gm: GraphModule, ctx: PassContext) -> GraphModule:  # pragma: no cover - interface
        raise NotImplementedError

    def validate(self) -> None:
        """Check the configuration before any graph is touched; raise InvalidPassConfigError."""

    def config(self) -> dict:
        """The configuration as a JSON-compatible dict, including the pass name."""
        return {"pass": self.name, **dataclasses.asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.config(), sort_keys=True)

    @staticmethod
    def from_config(cfg: dict) -> "Pass":
        """Rebuild a pass from :meth:`config` output (or parsed JSON).

        Raises:
            InvalidPassConfigError: unknown pass name or configuration key.
        """
        if not isinstance(cfg, dict):
            raise InvalidPassConfigError(f"a pass config must be a JSON object like {{\"pass\": \"tome\", ...}}, "
                                         f"got a {type(cfg).__name__}")
        cfg = dict(cfg)
        name = cfg.pop("pass", None)
        cls = _lookup(name)
        return _instantiate(cls, cfg)

    @classmethod
    def from_json(cls, text: str) -> "Pass":
        """:meth:`from_config` of a JSON text; InvalidPassConfigError if it is not valid JSON."""
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidPassConfigError(f"pass config is not valid JSON: {exc}") from None
        return Pass.from_config(cfg)


def _lookup(name: Optional[str]) -> type[Pass]:
    if name not in PASS_REGISTRY:
        raise InvalidPassConfigError(
            f"unknown pass '{name}'; available passes: {', '.join(sorted(PASS_REGISTRY))}"
        )
    return PASS_REGISTRY[name]


def _instantiate(cls: type[Pass], kwargs: dict) -> Pass:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise InvalidPassConfigError(
            f"pass '{cls.name}' has no option {', '.join(repr(u) for u in unknown)}; "
            f"valid options: {', '.join(sorted(names)) or '(none)'}"
        )
    p = cls(**kwargs)
    check_finite(p)
    p.validate()
    return p


def check_finite(p: Pass) -> None:
    """Refuse NaN and infinite values of every float option (and float list items) of a pass."""
    for f in dataclasses.fields(p):
        value = getattr(p, f.name)
        items = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise InvalidPassConfigError(f"pass '{p.name}': option {f.name}={value!r} must be a finite number")


def _convert(text: str, annotation) -> Any:
    """Convert one ``key=value`` string to the field's annotated type."""
    text = text.strip()
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if text.lower() in ("none", "null"):
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return _convert(text, a)
            except (ValueError, TypeError):
                continue
        raise ValueError(text)
    if annotation is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if annotation is int:
        return int(text)
    if annotation is float:
        return float(text)
    if annotation is str:
        return text
    if origin in (list, tuple) or annotation in (list, tuple):
        item = args[0] if args else float
        parts = [p for p in text.replace("/", ";").split(";") if p]
        return [_convert(p, item) for p in parts]
    return json.loads(text)


def parse_pass_spec(spec: str) -> Pass:
    """Parse a CLI pass spec ``name[:key=value[,key=value]]`` into a configured pass.

    List values use ``;`` or ``/`` between items (``keep=0.9;0.8;0.7``).

    Raises:
        InvalidPassConfigError: unknown pass name, unknown key, or a value of the wrong type.
    """
    name, _, rest = spec.partition(":")
    cls = _lookup(name.strip())
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise InvalidPassConfigError(f"pass spec '{spec}': '{item}' is not key=value")
        if key not in hints or key.startswith("_") or key == "name":
            _instantiate(cls, {key: None})  # raises the standard unknown-key message
        try:
            kwargs[key] = _convert(value, hints[key])
        except (ValueError, TypeError, json.JSONDecodeError):
            raise InvalidPassConfigError(
                f"pass '{name}': option {key}={value!r} is not a valid {getattr(hints[key], '__name__', hints[key])}"
            ) from None
    return _instantiate(cls, kwargs)
