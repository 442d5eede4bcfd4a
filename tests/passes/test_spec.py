"""Pass specs and JSON configs."""

import pytest

from vitprune.errors import InvalidPassConfigError
from vitprune.passes import ExplicitAttention, Pass, parse_pass_spec


def test_spec_parses_lists():
    p = parse_pass_spec("explicit-attention:blocks=1;3")
    assert isinstance(p, ExplicitAttention) and p.blocks == [1, 3]


def test_json_round_trip():
    p = ExplicitAttention(blocks=[2])
    q = Pass.from_json(p.to_json())
    assert q == p and q.config() == {"pass": "explicit-attention", "blocks": [2]}


@pytest.mark.parametrize("spec,msg", [
    ("no-such-pass", "unknown pass 'no-such-pass'; available passes: .*explicit-attention"),
    ("explicit-attention:colour=red", "has no option 'colour'; valid options: blocks"),
    ("explicit-attention:blocks", "is not key=value"),
    ("explicit-attention:blocks=x", "blocks='x' is not a valid"),
    ("explicit-attention:blocks=-1", "non-negative"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(InvalidPassConfigError, match=msg):
        parse_pass_spec(spec)
