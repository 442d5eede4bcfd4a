"""One progress display for a whole compile (vitprune/progress.py): one bar naming each stage and
the running pass's step, SNP's per-block detail nested inside it and moving it, nothing left on the
terminal after compile returns or raises, and no output at all with progress=False."""

from dataclasses import dataclass

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer
from tqdm import tqdm

import vitprune
from vitprune.backends import BACKENDS
from vitprune.passes.base import Pass, PassContext
from vitprune.progress import CompileProgress, Detail

X = torch.randn(1, 3, 32, 32)
CAL = torch.randn(4, 3, 32, 32)
PASSES = ["snp:ratio=0.25,augment=none", "tome:r=2"]   # snp: Fisher scores (token_weight=fisher), 2 blocks


def tiny_vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()


def _cleared(err: str) -> bool:
    """True when the last thing written to the terminal line is blank (tqdm's leave=False clear)."""
    return err.endswith("\r") and err.split("\r")[-2].strip() == ""


def test_compile_shows_every_stage_and_step_on_one_bar_and_leaves_nothing(capsys):
    vitprune.compile(tiny_vit(), PASSES, example_inputs=X, calibration=CAL, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    for text in ["capture", "pass 1/2 snp", "pass 1/2 snp: fisher scores", "pass 1/2 snp: block 1/2",
                 "pass 1/2 snp: block 2/2", "pass 2/2 tome", "lower torch", "lower torch: parity check",
                 "snp: "]:                                   # the last: SNP's nested bar
        assert text in err, text
    assert "fisher scores:" not in err                       # no separate Fisher bar any more
    assert err.index("capture") < err.index("pass 1/2 snp") < err.index("pass 2/2 tome") < err.index("lower torch")
    assert not tqdm._instances and _cleared(err)


def test_progress_false_prints_nothing(capsys):
    vitprune.compile(tiny_vit(), PASSES, example_inputs=X, calibration=CAL, progress=False)
    assert capsys.readouterr() == ("", "")


@dataclass
class _Failing(Pass):
    """Opens a nested bar and fails inside it."""

    name = "failing"

    def rewrite(self, gm, ctx):
        with ctx.detail("failing") as d:
            d.plan(2)
            d.advance(1)
            raise RuntimeError("boom")


def test_bars_are_cleared_when_compile_raises(capsys):
    with pytest.raises(vitprune.errors.PassError, match="pass 'failing'.*boom"):
        vitprune.compile(tiny_vit(), [_Failing()], example_inputs=X, progress=True)
    err = capsys.readouterr().err
    assert "pass 1/1 failing" in err and "failing: " in err
    assert not tqdm._instances and _cleared(err)


def test_backends_with_a_progress_option_follow_compile(monkeypatch):
    seen = []

    class Recording:
        def lower(self, gm, example_inputs, progress=True):
            seen.append(progress)
            return gm

    monkeypatch.setitem(BACKENDS, "recording", Recording)
    for progress in (False, True):
        vitprune.compile(tiny_vit(), [], backend="recording", example_inputs=X, progress=progress, check_parity=False)
    assert seen == [False, True]


def test_nested_fraction_moves_the_outer_bar(capsys):
    with CompileProgress(3) as p:
        p.begin("capture")
        assert p.done == 0
        p.begin("pass 1/1 snp")
        assert p.done == 1
        d = p.detail("snp")
        d.plan(10)
        d.advance(4)
        assert p.done == pytest.approx(1.4) and p._bar.n == pytest.approx(1.4)
        d.plan(10)                                          # more work announced: never moves back
        assert p.done == pytest.approx(1.4)
        d.advance(12)
        assert p.done == pytest.approx(1.8) and p._bar.n == pytest.approx(1.8)
        d.advance(100)
        assert p.done == pytest.approx(2.0)                 # clamped to the stage
        p.begin("lower torch")
        assert p.done == 2 and d._bar is None               # the stage's nested bar is closed
        p.step("parity check")
    err = capsys.readouterr().err
    assert "pass 1/1 snp" in err and "lower torch: parity check" in err
    assert not tqdm._instances and _cleared(err)


def test_disabled_display_tracks_but_writes_nothing(capsys):
    with CompileProgress(2, enabled=False) as p:
        p.begin("capture")
        p.begin("pass 1/1 snp")
        d = p.detail("snp")
        d.plan(4)
        d.advance(1)
        p.step("block 1/2")
        assert p.done == pytest.approx(1.25)
    assert capsys.readouterr() == ("", "")


def test_context_without_display_is_a_no_op_and_fresh_shares_the_display(capsys):
    ctx = PassContext(example_inputs=(X,))
    ctx.step("fisher scores")
    with ctx.detail("snp") as d:
        d.plan(2)
        d.advance(1)
    assert isinstance(d, Detail) and capsys.readouterr() == ("", "")
    display = CompileProgress(1, enabled=False)
    shared = PassContext(example_inputs=(X,), display=display)
    assert shared.fresh().display is display
