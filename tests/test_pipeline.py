"""The pass pipeline: passes never change the graph they are given, keep no state between calls,
report what they did through the runner, and fail with one line naming the pass; configs and
named pipelines resolve to the same passes everywhere."""

import json

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitprune
from vitprune.errors import InvalidPassConfigError, PassError
from vitprune.ir import capture
from vitprune.passes.base import Pass, PassContext, parse_pass_spec
from vitprune.pipeline import PIPELINES, load_config, resolve_passes, run_passes, save_config

# every registered pass, in configurations that exercise its main paths on a 4-block ViT
SPECS = [
    "explicit-attention",
    "zero-tprune:prune_blocks=0;2,keep=0.75;0.5",
    "zero-tprune:prune_blocks=1,keep=0.6,mode=prune",
    "zero-tprune:prune_blocks=1,keep=0.6,importance=cls",
    "zero-tprune:prune_blocks=1,keep=0.6,importance=random",
    "tome:r=3",
    "snp:ratio=0.25,augment=none,token_weight=none",
    "head-prune:heads=1",
    "snp-tokens:target_gmacs=0.0022,augment=none,token_weight=none",
    "snp-tokens:target_gmacs=0.0022,augment=none,token_weight=none,tokens=tome",
]


def tiny_vit(depth=4, img=64, dim=48, heads=3):
    torch.manual_seed(0)
    return VisionTransformer(img_size=img, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads,
                             num_classes=10).eval()


@pytest.fixture(scope="module")
def graph():
    x = torch.randn(2, 3, 64, 64)
    return capture(tiny_vit(), (x,)), x


def test_every_pass_is_covered():
    assert {s.partition(":")[0] for s in SPECS} == set(vitprune.passes.PASS_REGISTRY)


@pytest.mark.parametrize("spec", SPECS)
def test_pass_leaves_its_input_graph_unchanged_and_keeps_no_state(spec, graph):
    gm, x = graph
    code = gm.code
    params = {k: v.clone() for k, v in gm.state_dict().items()}
    with torch.no_grad():
        before = gm(x)
    p = parse_pass_spec(spec)
    ctx = PassContext(example_inputs=(x,), calibration=torch.randn(4, 3, 64, 64))
    first = p(gm, ctx)
    assert gm.code == code
    assert all(torch.equal(v, params[k]) for k, v in gm.state_dict().items())
    with torch.no_grad():
        assert torch.equal(gm(x), before)
        out1 = first(x)
    second = p(gm, ctx.fresh())                        # same config, same input: same result
    with torch.no_grad():
        assert torch.equal(second(x), out1)
    assert second.code == first.code


def test_runner_builds_report_entries_and_names_the_failing_pass(graph):
    gm, x = graph
    passes = resolve_passes(["explicit-attention", "zero-tprune:prune_blocks=1,keep=0.5"])
    ctx = PassContext(example_inputs=(x,))
    out, entries = run_passes(gm, passes, ctx)
    assert [e["pass"] for e in entries] == ["explicit-attention", "zero-tprune"]
    assert entries[0]["blocks_rewritten"] == [0, 1, 2, 3] and entries[1]["tokens_per_layer"] == [9]
    assert entries[1]["config"] == passes[1].config() and entries[1]["seconds"] >= 0
    assert ctx.info == {}                              # the shared context is not written to
    bad = resolve_passes(["explicit-attention", "zero-tprune:prune_blocks=7,keep=0.5"])
    with pytest.raises(InvalidPassConfigError,
                       match=r"^pass 'zero-tprune' \(after explicit-attention\) failed: zero-tprune: prune_blocks \[7\]"):
        run_passes(gm, bad, ctx)


def test_unexpected_error_becomes_one_line_pass_error(graph):
    gm, x = graph

    class Broken(Pass):
        name = "broken"

        def rewrite(self, gm, ctx):
            raise RuntimeError("shape mismatch deep inside")

    with pytest.raises(PassError, match=r"^pass 'broken' failed: RuntimeError: shape mismatch deep inside$"):
        run_passes(gm, [Broken()], PassContext(example_inputs=(x,)))


@pytest.mark.parametrize("spec", SPECS + ["zero-tprune:target_gmacs=0.96,iters=10;5;1", "tome:r=1;2;0,prop_attn=false",
                                          "snp:preset=deit-s,round_to=1"])
def test_spec_string_round_trips(spec):
    p = parse_pass_spec(spec)
    assert parse_pass_spec(p.spec()) == p
    assert Pass.from_config(json.loads(p.to_json())) == p


def test_config_file_round_trip_and_forms(tmp_path):
    passes = ["snp:ratio=0.1", "zero-tprune:target_gmacs=0.8"]
    path = save_config(str(tmp_path / "best.json"), passes, model="deit_tiny_patch16_224")
    doc = json.loads(open(path).read())
    assert doc["spec"] == ["snp:ratio=0.1", "zero-tprune:target_gmacs=0.8"]
    assert load_config(path) == resolve_passes(passes) == resolve_passes(path)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(parse_pass_spec("tome:r=4").config()))
    assert load_config(str(one)) == [parse_pass_spec("tome:r=4")]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([parse_pass_spec("tome:r=4").config()]))
    assert load_config(str(listed)) == [parse_pass_spec("tome:r=4")]


@pytest.mark.parametrize("content,msg", [
    ("{not json", r"is not valid JSON \(.* at line 1"),
    ("[1, 2]", r"holds no pass list"),
    ('{"passes": [{"pass": "nope"}]}', r"unknown pass 'nope'"),
    ('{"model": "vit_small_patch16_224", "passes": []}', r"made for model 'vit_small_patch16_224', not 'deit_tiny"),
])
def test_bad_config_files_give_one_line(tmp_path, content, msg):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(InvalidPassConfigError, match=msg):
        load_config(str(path), model="deit_tiny_patch16_224")
    with pytest.raises(InvalidPassConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.json"))


def test_named_pipeline_expands_wherever_a_pass_list_is():
    assert resolve_passes("deit-s-fast") == resolve_passes(PIPELINES["deit-s-fast"])
    assert resolve_passes(["explicit-attention", "deit-s-fast"])[1:] == resolve_passes(PIPELINES["deit-s-fast"])


def test_literal_choices_checked_for_every_pass():
    with pytest.raises(InvalidPassConfigError, match=r"^zero-tprune: mode='fuse' is not one of prune, merge$"):
        parse_pass_spec("zero-tprune:keep=0.5,mode=fuse")
