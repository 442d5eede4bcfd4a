"""The progress display of one :func:`vitprune.compile`: one tqdm bar over its stages, with the
fine-grained work of the running stage as a nested bar below it.

A compile's stages are, in order: ``capture``, one per pass (``pass 2/3 snp``, begun by
:func:`vitprune.pipeline.run_passes`), and ``lower <backend>``. The outer bar counts stages; it
shows the running stage and its current step (``pass 1/3 snp: block 2/2``), the time elapsed
and tqdm's estimate of the time left (stages still to do over the rate so far, so a rough one:
stages differ in length). From a compile of ``snp``, ``head-prune`` and ``tome`` to ``onnx``::

    pass 1/3 snp: block 2/2  34%|███▍      | 00:02<00:05
    snp:  69%|██████▉   | 00:01<00:00

A pass reaches the display through its :class:`~vitprune.passes.base.PassContext`
(``ctx.step(...)``, ``ctx.detail(...)``); the nested bar (:class:`Detail`) counts the pass's own
work units and moves the outer bar by the fraction done, so the time left moves during a long
pass. Bars are written to ``sys.stderr`` and cleared when closed (``leave=False``): nothing is left
on the terminal after the compile returns or raises. A disabled display writes nothing.
"""

from __future__ import annotations

from typing import Optional

OUTER_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
DETAIL_FORMAT = "{l_bar}{bar}| {elapsed}<{remaining}"


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(leave=False, **kwargs)


class CompileProgress:
    """One compile's progress: ``stages`` stages begun in turn by :meth:`begin`.

    Use it as a context manager (or call :meth:`close`) so the bars are cleared whatever happens.
    The position is tracked whether or not it is ``enabled``; only the bars depend on it.

    Args:
        stages: the number of stages the compile will run (``begin`` past it extends the total).
        enabled: draw the bars; False writes nothing at all.
    """

    def __init__(self, stages: int, enabled: bool = True):
        self.stages = max(int(stages), 1)
        self.enabled = bool(enabled)
        self.index = -1            # the running stage, 0-based; -1 before the first
        self.fraction = 0.0        # how much of the running stage is done, 0 .. 1
        self.label = ""
        self.current_step = ""
        self._detail: Optional[Detail] = None
        self._bar = _tqdm(total=self.stages, desc="compile", bar_format=OUTER_FORMAT) if self.enabled else None

    @property
    def done(self) -> float:
        """Stages done, counting the fraction done of the running one (0 .. ``stages``)."""
        return self.index + self.fraction if self.index >= 0 else 0.0

    def begin(self, label: str) -> None:
        """End the running stage (closing its nested bar) and begin the next one, shown as ``label``."""
        self._close_detail()
        self.index += 1
        self.stages = max(self.stages, self.index + 1)
        self.fraction, self.label, self.current_step = 0.0, label, ""
        if self._bar is not None:
            self._bar.total = self.stages
            self._bar.set_description_str(self.label, refresh=False)
            self._move()
            self._bar.refresh()

    def step(self, text: str) -> None:
        """Show ``text`` as the running stage's current step (``"fisher scores"``, ``"block 5/12"``)."""
        self.current_step = text
        if self._bar is not None:
            self._show()

    def detail(self, desc: str) -> "Detail":
        """A nested bar titled ``desc`` for the running stage's work (replacing any still open);
        its fraction done moves this display within the stage."""
        self._close_detail()
        self._detail = Detail(self, desc)
        return self._detail

    def advance(self, fraction: float) -> None:
        """Set the fraction done of the running stage (clamped to 0 .. 1; never moves back)."""
        self.fraction = max(self.fraction, min(max(float(fraction), 0.0), 1.0))
        if self._bar is not None:
            self._move()

    def close(self) -> None:
        """Clear the nested and the outer bar (idempotent)."""
        self._close_detail()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "CompileProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _move(self) -> None:
        delta = self.done - self._bar.n
        if delta > 0:
            self._bar.update(delta)         # tqdm throttles the redraw (mininterval)

    def _show(self) -> None:
        text = f"{self.label}: {self.current_step}" if self.current_step else self.label
        self._bar.set_description_str(text, refresh=True)

    def _close_detail(self) -> None:
        if self._detail is not None:
            self._detail.close()
            self._detail = None

    def _nested_position(self) -> int:
        return abs(getattr(self._bar, "pos", 0)) + 1


class Detail:
    """The nested bar of one stage's work, in the caller's own units (SNP: block-batches).

    :meth:`plan` announces work, :meth:`advance` does it; each advance sets the owner's fraction
    of the running stage to ``done / planned``. Without an owner (a pass run outside
    :func:`vitprune.compile`) every method does nothing.

    Args:
        owner: the display it belongs to, or None.
        desc: the bar's title (the pass's name).
    """

    def __init__(self, owner: Optional[CompileProgress], desc: str):
        self.owner = owner
        self.planned = 0.0
        self.completed = 0.0
        self._bar = None
        if owner is not None and owner._bar is not None:
            self._bar = _tqdm(total=0, desc=desc, position=owner._nested_position(), bar_format=DETAIL_FORMAT)

    def plan(self, units: float) -> None:
        """Announce ``units`` more work."""
        self.planned += units
        if self._bar is not None:
            self._bar.total += units
            self._bar.refresh()

    def advance(self, units: float) -> None:
        """Record ``units`` of work done."""
        self.completed += units
        if self._bar is not None:
            self._bar.update(units)
        if self.owner is not None and self.planned > 0:
            self.owner.advance(self.completed / self.planned)

    def close(self) -> None:
        """Clear the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Detail":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["CompileProgress", "Detail"]
