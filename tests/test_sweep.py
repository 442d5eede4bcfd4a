"""vitprune sweep: the front, the pick rules, the image split, storage and resuming, and workers
sharing one study (journal file and PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from vitprune.errors import DataError, SweepError
from vitprune.sweep import (open_storage, open_study, pareto_front, parse_pick, pick_best, planned_trials,
                            split_images, take_waiting_trial)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
WEIGHTS = os.path.join(SHARED, "models", "deit_tiny_patch16_224.safetensors")
DATA = os.path.join(SHARED, "data", "imagenet-sample")
needs_real = pytest.mark.skipif(not (os.path.isfile(WEIGHTS) and os.path.isdir(DATA)),
                                reason="needs ../shared/models/deit_tiny_patch16_224.safetensors and ../shared/data/imagenet-sample")


def dominated(r, others):
    return any(o["top1"] >= r["top1"] and o["latency_ratio"] <= r["latency_ratio"]
               and (o["top1"] > r["top1"] or o["latency_ratio"] < r["latency_ratio"]) for o in others)


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    recs = [{"number": i, "state": "COMPLETE", "top1": float(rng.integers(60, 80)),
             "latency_ratio": float(rng.uniform(0.4, 1.1))} for i in range(60)]
    recs.append({"number": 99, "state": "FAIL"})
    front = pareto_front(recs)
    done = recs[:-1]
    brute = {r["number"] for r in done if not dominated(r, done)}
    assert {r["number"] for r in front} == brute
    assert [r["latency_ratio"] for r in front] == sorted(r["latency_ratio"] for r in front)


def _rec(n, top1, ratio, ms):
    return {"number": n, "state": "COMPLETE", "top1": top1, "latency_ratio": ratio, "latency_ms": ms, "spec": f"t{n}"}


def test_pick_rules_and_closest_trial():
    front = [_rec(0, 70.0, 0.5, 5.0), _rec(1, 76.5, 0.7, 7.0), _rec(2, 78.0, 0.9, 9.0)]
    best, _ = pick_best(front, 78.0, "max-drop=1.5")
    assert best["number"] == 1                                  # fastest within 1.5 pt of 78
    best, _ = pick_best(front, 78.0, "latency<=8ms")
    assert best["number"] == 1                                  # most accurate under 8 ms
    best, _ = pick_best(front, 78.0, "speedup>=1.9")
    assert best["number"] == 0                                  # 1 / 0.5 = 2x
    best, msg = pick_best(front, 78.0, "latency<=2ms")
    assert best is None and "closest is trial 0" in msg and "5.00 ms" in msg
    with pytest.raises(SweepError, match="not a rule"):
        parse_pick("fastest")


@needs_real
def test_split_is_disjoint_and_checks_the_held_out_count(tmp_path):
    s = split_images(DATA, None, 64, None)
    assert len(s.calibration) == 64 and len(s.heldout) == 436
    assert not set(s.calibration) & set(s.heldout)
    assert len(split_images(DATA, None, 64, 100).heldout) == 100
    with pytest.raises(DataError, match="only 436"):
        split_images(DATA, None, 64, 437)
    # a calibration folder that is the data folder itself: its images never count as held-out
    s2 = split_images(DATA, DATA, 10, None)
    assert len(s2.heldout) == 490 and not set(map(os.path.realpath, s2.calibration)) & set(map(os.path.realpath, s2.heldout))
    (tmp_path / "synsets.txt").write_text("n01440764\n")
    with pytest.raises(DataError, match="no labelled images"):
        split_images(str(tmp_path), None, 4, None)


def test_unreachable_storage_is_named():
    url = "postgresql+psycopg2://user:secret@127.0.0.1:1/nodb"
    pytest.importorskip("psycopg2")
    with pytest.raises(SweepError, match=r"cannot reach the storage postgresql\+psycopg2://user:\*\*\*@127.0.0.1:1/nodb"):
        open_storage(url, "/tmp")


def test_study_with_other_inputs_is_refused_and_plan_is_exact(tmp_path):
    st = open_storage(None, str(tmp_path))
    attrs = {"model": "deit_tiny weights aaaa", "data": "x"}
    study = open_study(st, "s", attrs, 3, False, [{"method": "tome", "tome_frac": 0.7}], seed=0)
    assert planned_trials(study) == 3
    with pytest.raises(SweepError, match="deit_tiny weights aaaa.*deit_small weights bbbb"):
        open_study(st, "s", {**attrs, "model": "deit_small weights bbbb"}, 3, False, [], seed=0)
    again = open_study(st, "s", attrs, 3, False, [], seed=0)     # same inputs: joins, plans nothing more
    assert planned_trials(again) == 3
    taken = [take_waiting_trial(again) for _ in range(4)]
    assert [t is None for t in taken] == [False, False, False, True]   # never more than planned
    assert again.trials[0].user_attrs.get("plain") is True


# --------------------------------------------------------------------------- real DeiT-T, real images
@needs_real
@pytest.mark.slow
def test_short_sweep_on_real_deit_tiny(tmp_path):
    import vitprune
    from vitprune.data import ImageFolder, make_loader
    from vitprune.eval.metrics import evaluate
    from vitprune.models import eval_transform, load_model
    from vitprune.passes.base import Pass

    out = str(tmp_path / "sw")
    kw = dict(weights=WEIGHTS, backend="torch", methods=["zero-tprune", "tome"], trials=3, limit=24, calib_images=8,
              batch_size=8, latency_repeats=3, batch_repeats=2, progress=False, pick="max-drop=100")
    res = vitprune.sweep("deit_tiny_patch16_224", DATA, out, **kw)
    assert res.ran == 3 and not res.failed
    done = [r for r in res.records if r["state"] == "COMPLETE"]
    assert {r["plain"] for r in done} == {True, False}            # each method's plain point, then a sampled one
    # the front is exactly the non-dominated completed trials
    assert {r["number"] for r in res.front} == {r["number"] for r in done if not dominated(r, done)}
    for r in done:   # every ratio comes from the unpruned model timed inside the same trial
        assert r["latency_ratio"] == pytest.approx(r["latency_ms"] / r["base_latency_ms"])
        assert r["batch_ratio"] == pytest.approx(r["base_img_s"] / r["img_s"])
    assert len({r["base_latency_ms"] for r in done}) == len(done)
    for name in ("frontier.png", "frontier.json", "report.md", "best.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    doc = json.load(open(os.path.join(out, "frontier.json")))
    assert not set(doc["calibration_images"]) & set(doc["heldout_images"]) and len(doc["heldout_images"]) == 24
    # best.json reloads through vitprune.compile and reproduces its top-1 on the held-out images
    best = json.load(open(os.path.join(out, "best.json")))
    model = load_model("deit_tiny_patch16_224", WEIGHTS)
    compiled = vitprune.compile(model, [Pass.from_config(c) for c in best["passes"]],
                                example_inputs=torch.zeros(8, 3, 224, 224), progress=False)
    ds = ImageFolder(DATA, eval_transform(model))
    held = set(doc["heldout_images"])
    ds.samples = [s for s in ds.samples if os.path.basename(s[0]) in held]
    top1 = evaluate(compiled, make_loader(ds, 8), progress=False)["top1"]
    assert top1 == pytest.approx(best["metrics"]["top1"])
    assert best["metrics"]["gmacs"] == pytest.approx(compiled.report.gmacs_after)
    # resuming a finished study adds no trials; other held-out images are refused, naming both
    res2 = vitprune.sweep("deit_tiny_patch16_224", DATA, out, **kw)
    assert res2.ran == 0 and len(res2.records) == 3
    with pytest.raises(SweepError, match="held-out .* this run has"):
        vitprune.sweep("deit_tiny_patch16_224", DATA, out, **{**kw, "limit": 20})


# --------------------------------------------------------------------------- workers sharing a study
def _run_workers(storage: str, out: str, trials: int, n: int = 2) -> list[subprocess.CompletedProcess]:
    cmd = [sys.executable, "-m", "vitprune", "sweep", "--model", "test_vit", "--data", DATA, "--backend", "torch",
           "--methods", "zero-tprune,tome", "--trials", str(trials), "--limit", "8", "--calib-images", "4",
           "--batch-size", "4", "--threads", "1", "--storage", storage, "--worker", "--no-progress",
           "--pick", "max-drop=100", "--out", out]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    done = []
    for p in procs:
        so, se = p.communicate(timeout=900)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, so, se))
    return done


def _check_study(storage_obj, trials: int):
    import optuna

    study = optuna.load_study(study_name="vitprune-sweep", storage=storage_obj)
    ts = study.get_trials(deepcopy=False)
    assert len(ts) == trials                                      # none lost, none extra
    # each trial finished: measured, or failed with its reason recorded (a sampled schedule can be out of
    # reach of the budget on the tiny test model); none left running or waiting
    done = optuna.trial.TrialState.COMPLETE
    assert all(t.state == done or (t.state == optuna.trial.TrialState.FAIL and t.user_attrs.get("error"))
               for t in ts), [(t.number, t.state, t.user_attrs.get("error")) for t in ts]
    assert any(t.state == done for t in ts)
    assert sorted(t.number for t in ts) == list(range(trials))    # each trial done once
    return study


@needs_real
@pytest.mark.slow
def test_two_workers_share_a_journal_file(tmp_path):
    journal = str(tmp_path / "shared.journal")
    runs = _run_workers(journal, str(tmp_path / "out"), trials=4)
    for r in runs:
        assert r.returncode in (0, 1), r.stderr[-2000:]
    _check_study(open_storage(journal, str(tmp_path)), 4)


def _postgres(tmp_path):
    """Start a PostgreSQL server on a unix socket under tmp_path (as user postgres when root); its URL and
    a stop function, or pytest.skip with the reason."""
    pytest.importorskip("psycopg2", reason="PostgreSQL test needs psycopg2-binary (pip install -e '.[test]')")
    bindir = next((d for d in ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")
                   if os.path.isfile(os.path.join(d, "initdb"))), None)
    if bindir is None and shutil.which("initdb"):
        bindir = os.path.dirname(shutil.which("initdb"))
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    import pathlib
    import tempfile

    base = pathlib.Path(tempfile.mkdtemp(prefix="vitprune-pg-"))   # outside pytest's root-only tmp tree
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix = []
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
        prefix = [runuser, "-u", "postgres", "--"]
        os.chmod(base, 0o755)
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    try:
        subprocess.run(prefix + [f"{bindir}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True, timeout=120)
        subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                                 f"-k {sock} -c listen_addresses='' -c max_connections=50", "start"],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {getattr(exc, 'stderr', b'') or exc}")

    def stop():
        subprocess.run(prefix + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)

    subprocess.run(prefix + [f"{bindir}/createdb", "-h", str(sock), "-U", "postgres", "sweep"], capture_output=True)
    return f"postgresql+psycopg2://postgres@/sweep?host={sock}", stop


@needs_real
@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path):
    url, stop = _postgres(tmp_path)
    try:
        t0 = time.time()
        runs = _run_workers(url, str(tmp_path / "out"), trials=4)
        for r in runs:
            assert r.returncode in (0, 1), r.stderr[-2000:]
        _check_study(open_storage(url, str(tmp_path)), 4)
        assert time.time() - t0 < 900
    finally:
        stop()


def test_trial_of_a_killed_worker_is_requeued(tmp_path):
    """Ctrl-C / kill: finished trials stay, the running one is recorded as interrupted and planned again."""
    import socket

    from optuna.trial import TrialState
    from vitprune.sweep import reclaim_stale_trials

    st = open_storage(None, str(tmp_path))
    study = open_study(st, "s", {"model": "m"}, 2, False, [{"method": "tome", "tome_frac": 0.7}], seed=0)
    done, dead = take_waiting_trial(study), take_waiting_trial(study)
    done.suggest_categorical("method", ["tome"])
    study.tell(done, [70.0, 0.8])
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()                                                      # a pid that no longer runs
    dead.set_user_attr("worker", f"{socket.gethostname()}:{p.pid}")
    assert reclaim_stale_trials(study) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.WAITING]
    assert study.trials[1].user_attrs["interrupted"] and planned_trials(study) == 2
    assert reclaim_stale_trials(study) == 0



def test_requeued_plain_point_runs_before_sampled_ones(tmp_path):
    import socket

    from vitprune.sweep import reclaim_stale_trials

    study = open_study(open_storage(None, str(tmp_path)), "s", {"model": "m"}, 3, False,
                       [{"method": "tome", "tome_frac": 0.7}], seed=0)
    plain = take_waiting_trial(study)
    assert plain.number == 0
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    plain.set_user_attr("worker", f"{socket.gethostname()}:{p.pid}")
    reclaim_stale_trials(study)
    nxt = take_waiting_trial(study)
    assert nxt.number == 3 and nxt.user_attrs.get("plain") is True
    assert study.trials[3].system_attrs["fixed_params"] == {"method": "tome", "tome_frac": 0.7}
