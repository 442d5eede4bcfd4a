"""The pass pipeline: one runner for :func:`vitprune.compile`, the sweep and the tests.

:func:`run_passes` runs passes in order. Each pass works on a private copy of the graph (see
:class:`vitprune.passes.base.Pass`), gets a fresh :class:`~vitprune.passes.base.PassContext`,
and its report entry is built here from what it recorded; the graph it returns is checked once
(``Graph.lint``); any failure is re-raised as one line naming the pass and the passes before it.

Pass lists are given as :class:`Pass` objects, spec strings (``"zero-tprune:target_gmacs=0.96"``),
config dicts (``Pass.config()``), names of :data:`PIPELINES`, or paths of JSON config files
(:func:`load_config`); :func:`resolve_passes` turns any mix of these into configured passes.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Optional, Sequence, Union

from torch.fx import GraphModule

from .errors import InvalidPassConfigError, PassError, VitpruneError, error_line
from .passes.base import Pass, PassContext, parse_pass_spec

#: Named pipelines, usable wherever a pass list is (``compile(passes="deit-s-fast")``,
#: ``--pass deit-s-fast``). Passes that calibrate take their images from ``compile(calibration=...)``
#: or the CLI's ``--calib``.
PIPELINES: dict[str, list[str]] = {
    # README's fastest SNP + token recipe on DeiT-S: SNP's released widths (rounded to multiples
    # of 16, the preset's default), then Zero-TPrune at -31 % of the SNP model's 2.04 GMACs
    # (measured: docs/results.md, "SNP speed").
    "deit-s-fast": ["snp:preset=deit-s", "zero-tprune:target_gmacs=1.41"],
}

PassLike = Union[Pass, str, dict]


def resolve_passes(items: Union[PassLike, Sequence[PassLike], None]) -> list[Pass]:
    """Configured, validated passes from any mix of pass objects, spec strings, config dicts,
    pipeline names and JSON config file paths (a single item may be given without a list).

    Raises:
        InvalidPassConfigError: an unknown pass or pipeline, a bad option, or an unreadable
            config file (one line each, before any graph is touched).
    """
    if items is None:
        return []
    if isinstance(items, (Pass, str, dict)):
        items = [items]
    out: list[Pass] = []
    for item in items:
        if isinstance(item, Pass):
            item.validate()
            out.append(item)
        elif isinstance(item, dict):
            out.append(Pass.from_config(item))
        elif isinstance(item, str):
            name = item.strip()
            if name in PIPELINES:
                out.extend(resolve_passes(PIPELINES[name]))
            elif name.endswith(".json"):
                out.extend(load_config(name))
            else:
                out.append(parse_pass_spec(name))
        else:
            raise InvalidPassConfigError(
                f"a pass must be a Pass, a spec string, a config dict, a pipeline name or a .json config path, "
                f"got {type(item).__name__}")
    return out


def load_config(path: str, model: Optional[str] = None) -> list[Pass]:
    """Read a pass list from a JSON file.

    Accepted forms: ``{"passes": [config, ...], ...}`` (artefact manifests, ``vitprune search``
    and ``vitprune sweep`` output; other keys are ignored), one pass config ``{"pass": ..., ...}``,
    or a list of configs.

    Args:
        path: the JSON file.
        model: if given and the file names a ``model``, the two must match.

    Raises:
        InvalidPassConfigError: missing file, malformed JSON, an unknown form, a bad pass config, or
            a file made for another model.
    """
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InvalidPassConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidPassConfigError(f"cannot read config file {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise InvalidPassConfigError(f"config file {path} is not valid JSON ({e.msg} at line {e.lineno}, "
                                     f"column {e.colno})") from None
    if isinstance(data, dict) and "passes" in data:
        made_for = data.get("model")
        if model is not None and made_for is not None and made_for != model:
            raise InvalidPassConfigError(
                f"config file {path} was made for model {made_for!r}, not {model!r}; use a config made for "
                f"this model")
        configs = data["passes"]
    elif isinstance(data, dict) and "pass" in data:
        configs = [data]
    else:
        configs = data
    if not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs):
        raise InvalidPassConfigError(
            f"config file {path} holds no pass list: expected {{\"passes\": [{{\"pass\": NAME, ...}}, ...]}}, "
            f"one pass config, or a list of them")
    return [Pass.from_config(c) for c in configs]


def save_config(path: str, passes: Iterable[PassLike], **extra) -> str:
    """Write ``{"passes": [config, ...], "spec": "...", **extra}`` to ``path`` (atomically), readable by
    :func:`load_config`, ``--config`` and ``--pass PATH.json``.

    Returns:
        ``path``.
    """
    from .files import write_text

    resolved = resolve_passes(list(passes))
    doc = {"passes": [p.config() for p in resolved], "spec": [p.spec() for p in resolved], **extra}
    return write_text(path, json.dumps(doc, indent=2, default=str) + "\n", "pass config")


def run_passes(gm: GraphModule, passes: Sequence[Pass], ctx: PassContext) -> tuple[GraphModule, list[dict]]:
    """Run ``passes`` in order on ``gm``, which is not changed.

    Args:
        gm: the captured graph.
        passes: configured passes (:func:`resolve_passes`).
        ctx: example inputs, calibration images and progress display shared by every pass; each pass
            gets a fresh copy (:meth:`PassContext.fresh`). With a display, each pass begins a stage
            of it, shown as ``pass i/n NAME``.

    Returns:
        the final graph and one report entry per pass: ``{"pass", "config", "seconds", **recorded}``.

    Raises:
        the pass's own :class:`VitpruneError` type, its message prefixed with the pass's name and the
        passes that ran before it; :class:`PassError` for any other exception.
    """
    entries: list[dict] = []
    for i, p in enumerate(passes):
        before = [q.name for q in passes[:i]]
        where = f"pass {p.name!r}" + (f" (after {', '.join(before)})" if before else "")
        pctx = ctx.fresh()
        if ctx.display is not None:
            ctx.display.begin(f"pass {i + 1}/{len(passes)} {p.name}")
        t0 = time.time()
        try:
            gm = p(gm, pctx)
            gm.graph.lint()
        except VitpruneError as e:
            raise type(e)(f"{where} failed: {e}") from None
        except Exception as e:  # a bug or an unsupported graph: one line, the cause chained
            raise PassError(f"{where} failed: {error_line(e)}") from e
        entries.append({"pass": p.name, "config": p.config(), **pctx.info, "seconds": round(time.time() - t0, 2)})
    return gm, entries


def describe(passes: Sequence[Pass]) -> str:
    """The spec strings of ``passes`` joined by spaces (``-`` when empty), for tables and logs."""
    return " ".join(p.spec() for p in passes) or "-"


__all__ = ["PIPELINES", "resolve_passes", "load_config", "save_config", "run_passes", "describe"]

