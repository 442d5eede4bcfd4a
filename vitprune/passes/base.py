"""The pass protocol, the pass registry and the ``name:key=value`` spec parser.

A pass is a dataclass (its fields are its configuration, round-tripping through JSON) that
implements ``rewrite(gm, ctx) -> gm'``. Calling a pass (``pass_(gm, ctx)``) runs ``rewrite`` on a
private copy of ``gm``: the caller's graph is never changed, and a pass keeps no state between
calls. What a pass did goes into ``ctx.record(...)``; :func:`vitprune.pipeline.run_passes` gives
every pass a fresh context and turns what it recorded into the pass's report entry.

Option choices are ``Literal[...]`` fields: the spec parser and :meth:`Pass.from_config` check
them for every pass (one message naming the valid choices), so a pass's ``validate`` only checks
ranges and combinations.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import torch
from torch.fx import GraphModule

from ..errors import InvalidPassConfigError
from ..progress import CompileProgress, Detail

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
        display: the compile's progress display (:class:`vitprune.progress.CompileProgress`), shared by
            every pass of one compile; None (a pass run by hand) shows nothing. Passes use it through
            :meth:`step` and :meth:`detail`, which do nothing without one.
        transform: the model's image transform (PIL -> ``[3, H, W]``, :func:`vitprune.data.eval_transform`)
            for passes that load images themselves (``calib=DIR``); None when the model is not known.
        info: what the running pass recorded (:meth:`record`); one context per pass run.
    """

    example_inputs: tuple
    calibration: Optional[torch.Tensor] = None
    display: Optional[CompileProgress] = None
    transform: Optional[Callable] = None
    info: dict = field(default_factory=dict)

    def record(self, **info: Any) -> None:
        """Add ``info`` (JSON-friendly values) to the report entry of the pass that is running."""
        self.info.update(info)

    def step(self, text: str) -> None:
        """Show ``text`` as the running pass's current step (``"fisher scores"``, ``"block 5/12"``)."""
        if self.display is not None:
            self.display.step(text)

    def detail(self, desc: str) -> Detail:
        """The nested bar (titled ``desc``) of the running pass's work; close it when done (``with``).
        Its fraction done moves the compile's bar; without a :attr:`display` it does nothing."""
        return self.display.detail(desc) if self.display is not None else Detail(None, desc)

    def fresh(self) -> "PassContext":
        """A context with the same inputs and display and an empty :attr:`info`, for the next pass."""
        return dataclasses.replace(self, info={})


class Pass:
    """Base class of graph passes. Subclasses are dataclasses decorated with :func:`register_pass`."""

    name: ClassVar[str] = "pass"

    def __call__(self, gm: GraphModule, ctx: PassContext) -> GraphModule:
        """Run the pass on a copy of ``gm`` (which stays as it was) and return the new graph."""
        return self.rewrite(copy.deepcopy(gm), ctx)

    def rewrite(self, gm: GraphModule, ctx: PassContext) -> GraphModule:  # pragma: no cover - interface
        """Rewrite ``gm``, which the pass owns (a private copy), and return the result."""
        raise NotImplementedError

    def validate(self) -> None:
        """Check the configuration before any graph is touched; raise InvalidPassConfigError.

        The base class refuses NaN and infinite float options and checks every ``Literal[...]`` field
        against its choices; subclasses call ``super().validate()`` first, then check ranges and
        combinations.
        """
        check_finite(self)
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            check_choice(self.name, f.name, getattr(self, f.name), hints.get(f.name))

    def config(self) -> dict:
        """The configuration as a JSON-compatible dict, including the pass name."""
        return {"pass": self.name, **dataclasses.asdict(self)}

    def spec(self) -> str:
        """The spec string of this configuration (options that differ from their defaults), which
        :func:`parse_pass_spec` reads back to an equal pass: ``"zero-tprune:target_gmacs=0.96"``."""
        items = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if value == default:
                continue
            if value is None:
                text = "none"
            elif isinstance(value, (list, tuple)):
                text = ";".join(str(v) for v in value)
            elif isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, (int, float, str)):
                text = str(value)
            else:
                text = json.dumps(value)
            items.append(f"{f.name}={text}")
        return self.name + (":" + ",".join(items) if items else "")

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
    # options a pass no longer has, still accepted (and ignored) at the value they always had
    retired = getattr(cls, "retired_options", {})
    kwargs = {k: v for k, v in kwargs.items() if not (k in retired and k not in names and v == retired[k])}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        _no_option(cls, unknown)
    p = cls(**kwargs)
    p.validate()
    return p


def literal_choices(annotation) -> Optional[tuple]:
    """The allowed values of a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation, else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:
        for a in typing.get_args(annotation):
            if typing.get_origin(a) is typing.Literal:
                return typing.get_args(a)
    return None


def check_choice(pass_name: str, key: str, value: Any, annotation) -> None:
    """Refuse a value outside a ``Literal`` field's choices.

    Raises:
        InvalidPassConfigError: naming the pass, the option, the value and the valid choices.
    """
    choices = literal_choices(annotation)
    if choices is None or value is None or value in choices:
        return
    raise InvalidPassConfigError(
        f"{pass_name}: {key}={value!r} is not one of {', '.join(str(c) for c in choices)}")


def _no_option(cls: type[Pass], unknown: list) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    raise InvalidPassConfigError(
        f"pass '{cls.name}' has no option {', '.join(repr(u) for u in unknown)}; "
        f"valid options: {', '.join(sorted(names)) or '(none)'}"
    )


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
    if origin is typing.Literal:
        return text
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
            _no_option(cls, [key])
        try:
            kwargs[key] = _convert(value, hints[key])
        except (ValueError, TypeError, json.JSONDecodeError):
            raise InvalidPassConfigError(
                f"pass '{name}': option {key}={value!r} is not a valid {getattr(hints[key], '__name__', hints[key])}"
            ) from None
    return _instantiate(cls, kwargs)
