"""The timing helpers' protocol (who is called, how often, in which order); never their speed."""

import torch

from vitprune.eval.speed import interleaved


def test_interleaved_warms_up_then_alternates_the_order_each_round():
    calls = []
    fns = {k: (lambda x, k=k: calls.append(k)) for k in ("a", "b", "c")}
    times = interleaved(fns, torch.zeros(1, 3), repeats=3, warmup=2, progress=False)
    assert calls == list("aabbcc") + list("abc") + list("cba") + list("abc")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert all(t >= 0 for v in times.values() for t in v)
