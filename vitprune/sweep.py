"""``vitprune sweep``: the measured accuracy-vs-latency frontier of one model on the user's images and device.

An Optuna study (multi-objective TPE, Ozaki et al. 2020/2022; ``constant_liar`` for parallel workers)
searches pass pipelines and keeps, per trial, two objectives measured in this run:

* held-out top-1 (%) on images that are never the calibration images (maximised);
* the batch-1 latency ratio to the unpruned model on the chosen backend (minimised), measured
  side by side with the unpruned model inside the trial (alternating calls, median of repeats).

When every planned trial has finished, the trials on either Pareto front are timed again side by
side with the unpruned model, with ``retime`` times as many call pairs (:func:`retime_front`; models
this process still holds are re-timed as built, the others are rebuilt):
a trial's few pairs at the throughput batch can catch a load change that the front then rewards.
The report, the plot, the pick and ``best.json`` use those times; each trial keeps its own in
``trial_*`` keys.

Recorded with each trial (user attributes): agreement with the unpruned model and KL(unpruned ||
pruned), GMACs, latency (ms, batch 1) and throughput (img/s at ``batch_size``) of both models, the
pass configs and their spec string.

Search space (one parameter set per method; :func:`suggest_passes`): the method and composition
(``zero-tprune``, ``tome``, ``snp``, ``snp+zero-tprune``: SNP first, then token pruning on the
narrower model), the GMACs budget (``target_gmacs`` as a fraction of the unpruned GMACs), the
Zero-TPrune schedule (pruning blocks, keep profile: one uniform keep rate, or per-layer weights
scaled to the budget, and the S/I split ``rs_ratio``; sampled before the budget, which then stays
above what the schedule can reach, :data:`FLOOR_MARGIN`), SNP's budget, allocation and calibration
images. The study is stored in an Optuna storage: by default a journal file under the output folder
(rerunning resumes; a finished study adds no trials), or any Optuna storage URL shared by many
workers. Trials are planned up front as a queue of waiting trials, and a worker takes one with an
atomic state change, so many workers together run exactly the planned number.

The same Zero-TPrune schedule space is what ``vitprune search`` (:mod:`vitprune.search`) searches
at a fixed budget: one search in the project.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .errors import InvalidPassConfigError, SweepError, VitpruneError

METHODS = ("zero-tprune", "tome", "snp", "snp+zero-tprune")
STUDY_NAME = "vitprune-sweep"
#: GMACs budgets searched, as fractions of the unpruned model's GMACs (docs/decisions.md ("The sweep")).
TOKEN_FRACS = {"zero-tprune": (0.40, 0.95), "tome": (0.45, 0.95), "snp": (0.60, 0.95), "snp+zero-tprune": (0.35, 0.90)}
#: the plain ``target_gmacs`` point of each method (default schedule, marked in the plot).
PLAIN_FRAC = {"zero-tprune": 0.70, "tome": 0.70, "snp": 0.85, "snp+zero-tprune": 0.65}
#: SNP options fixed in the sweep to keep a trial affordable (docs/decisions.md ("The sweep")).
SNP_FIXED = {"augment": "none", "token_weight": "none"}
SNP_CALIB_CHOICES = (32, 64)
PICK_RULES = ("max-drop=PT", "latency<=MSms", "speedup>=X")


# --------------------------------------------------------------------------- search space
def zero_tprune_layouts(depth: int) -> dict[str, list[int]]:
    """Candidate pruning-block layouts (0-based blocks after which a pruning layer sits), by name:
    ``every-other`` (the pass's default), ``three`` (the presets' three layers), ``dense`` (every block
    from a quarter of the depth to the third-to-last), ``two``; layouts equal to an earlier one dropped."""
    from .passes.tokens.zero_tprune import default_prune_blocks

    cand = {"every-other": default_prune_blocks(depth), "three": default_prune_blocks(depth, 3),
            "dense": list(range(depth // 4, max(depth - 2, depth // 4 + 1))), "two": default_prune_blocks(depth, 2)}
    out: dict[str, list[int]] = {}
    for name, blocks in cand.items():
        if blocks and blocks not in out.values():
            out[name] = blocks
    return out


def _weighted_maker(fixed: dict, weights: Sequence[float], blocks: list[int], info, gm, sites):
    """``(make, s_max)``: ``make(s)`` is the Zero-TPrune pass (None when it removes nothing) and its
    analytic GMACs for per-layer removal counts ``round(s · w_i · M)`` (``w`` normalised to sum 1, ``M``
    non-prefix tokens, each count capped to leave one token); ``s_max = 1 / min(w)`` front-loads the
    removal until the smallest-weight layer alone would take ``M``: the cheapest schedule these weights give."""
    from .passes.tokens.zero_tprune import ZeroTPrune

    w = np.asarray(weights, dtype=float)
    w = w / w.sum()
    m0 = info.tokens - info.prefix

    def make(s):
        m, counts = m0, []
        for wi in w:
            c = max(min(int(round(s * wi * m0)), m - 1), 0)
            counts.append(c)
            m -= c
        keep = [(b, c) for b, c in zip(blocks, counts) if c > 0]
        if not keep:
            return None, info.dense_gmacs
        p = ZeroTPrune(prune_blocks=[b for b, _ in keep], counts=[c for _, c in keep], **fixed)
        p.validate()
        return p, p.plan(gm, sites, info)[1]

    return make, 1.0 / float(w.min())


def weighted_schedule(fixed: dict, weights: Sequence[float], blocks: list[int], info, gm, sites, target: float):
    """Zero-TPrune with per-layer removal counts ``round(s · w_i · M)`` (``w`` normalised to sum 1, ``M``
    non-prefix tokens; each count capped to leave one token) over ``blocks``, the scale ``s`` in
    ``[0, 1 / min(w)]`` bisected so that the analytic GMACs is the largest not above ``target`` (within
    1 %); ALGORITHMS.md §1d ("per-layer removal counts scaled to the FLOPs budget, ±1 %"). Returns None
    when the budget is out of reach for these weights."""
    from .ir.cost import bisect_budget

    make, s_max = _weighted_maker(fixed, weights, blocks, info, gm, sites)
    if make(s_max)[1] > target * 1.01:
        return None
    _, hi = bisect_budget(lambda s: make(s)[1], 0.0, s_max, target, iters=30, increasing=False)
    p, g = make(hi)
    return p if p is not None and abs(g - target) <= 0.01 * target else None


@dataclass
class Schedule:
    """A sampled Zero-TPrune schedule without its budget: pruning ``blocks``, keep ``profile``
    (``uniform`` | ``weighted``), per-layer ``weights`` (``weighted`` only) and ``rs_ratio``."""

    blocks: list[int]
    profile: str
    rs_ratio: float
    weights: Optional[list[float]] = None

    def floor_gmacs(self, info, gm, sites, fixed: Optional[dict] = None) -> float:
        """The lowest analytic GMACs per image this schedule reaches on the model: one patch token kept
        at each layer (uniform; :meth:`ZeroTPrune.reachable_gmacs`), or the weights' cheapest scale
        (weighted; :func:`weighted_schedule`).

        Raises:
            InvalidPassConfigError: a pruning block outside the model.
        """
        from .passes.tokens.zero_tprune import ZeroTPrune

        fixed = {**(fixed or {}), "rs_ratio": self.rs_ratio}
        if self.profile == "uniform":
            return ZeroTPrune(prune_blocks=list(self.blocks), **fixed).reachable_gmacs(gm, sites, info)[0]
        make, s_max = _weighted_maker(fixed, self.weights, self.blocks, info, gm, sites)
        return make(s_max)[1]

    def build(self, target: float, info, gm, sites, fixed: Optional[dict] = None):
        """The Zero-TPrune pass of this schedule at ``target`` GMACs per image.

        Raises:
            InvalidPassConfigError: the budget is out of reach for this schedule.
        """
        from .passes.tokens.zero_tprune import ZeroTPrune

        fixed = {**(fixed or {}), "rs_ratio": self.rs_ratio}
        if self.profile == "uniform":
            p = ZeroTPrune(prune_blocks=list(self.blocks), target_gmacs=_g(target), **fixed)
            p.validate()
            p.plan(gm, sites, info)                          # budget checks now, before any graph work
            return p
        p = weighted_schedule(fixed, self.weights, self.blocks, info, gm, sites, target)
        if p is None:
            raise InvalidPassConfigError(f"zero-tprune: {target:.3f} GMACs out of reach for blocks {self.blocks} "
                                         f"with weights {np.round(self.weights, 2).tolist()}")
        return p


def suggest_schedule(trial, layouts: dict[str, list[int]], prefix: str = "zt_") -> Schedule:
    """The trial's Zero-TPrune schedule: layout (a name of ``layouts``), keep profile (``uniform``: one
    keep rate solved by the pass; ``weighted``: per-layer weights in [0.05, 1] scaled to the budget by
    :func:`weighted_schedule`) and ``rs_ratio`` (0.3..1.0, step 0.1)."""
    name = trial.suggest_categorical(prefix + "layout", list(layouts))
    blocks = list(layouts[name])
    profile = trial.suggest_categorical(prefix + "profile", ["uniform", "weighted"])
    rs = round(trial.suggest_float(prefix + "rs_ratio", 0.3, 1.0, step=0.1), 2)
    weights = None
    if profile == "weighted":
        weights = [trial.suggest_float(f"{prefix}w{i}", 0.05, 1.0) for i in range(len(blocks))]
    return Schedule(blocks, profile, rs, weights)


def suggest_zero_tprune(trial, target: float, info, gm, sites, layouts: dict[str, list[int]], prefix: str = "zt_",
                        fixed: Optional[dict] = None):
    """A Zero-TPrune pass for a fixed ``target`` GMACs from the trial's schedule (:func:`suggest_schedule`);
    ``fixed``: other ZeroTPrune options kept as given.

    Raises:
        InvalidPassConfigError: the budget is out of reach for the sampled schedule.
    """
    return suggest_schedule(trial, layouts, prefix).build(target, info, gm, sites, fixed)


#: a sampled budget stays this far above its schedule's floor (at the floor one patch token is left).
FLOOR_MARGIN = 1.05


def suggest_snp(trial, target: float) -> "Any":
    """An SNP pass for ``target`` GMACs: allocation (``uniform`` | ``fisher``) and calibration images
    (32 | 64) from the trial; ``augment=none``, ``token_weight=none`` fixed (:data:`SNP_FIXED`)."""
    from .passes.snp.snp import SNP

    alloc = trial.suggest_categorical("snp_allocation", ["uniform", "fisher"])
    n = trial.suggest_categorical("snp_calib_images", list(SNP_CALIB_CHOICES))
    p = SNP(target_gmacs=_g(target), allocation=alloc, calib_images=int(n), **SNP_FIXED)
    p.validate()
    return p


def suggest_passes(trial, methods: Sequence[str], graph, calibration_size: int) -> list:
    """The pass list of one trial (see the module docstring for the space).

    Args:
        graph: :class:`Graph` of the unpruned model (captured once).
        calibration_size: calibration images available (SNP's choices are capped to it).
    """
    from .passes.tokens.tome import ToMe

    method = trial.suggest_categorical("method", list(methods))
    dense = graph.info.dense_gmacs
    lo, hi = TOKEN_FRACS[method]
    key = {"zero-tprune": "zt_frac", "tome": "tome_frac", "snp": "snp_frac", "snp+zero-tprune": "combo_frac"}[method]
    if method == "zero-tprune":
        # the schedule first, then a budget it can reach: the lower bound moves with the schedule's floor
        sched = suggest_schedule(trial, graph.layouts)
        floor = FLOOR_MARGIN * sched.floor_gmacs(graph.info, graph.gm, graph.sites) / dense
        if floor >= hi:
            raise InvalidPassConfigError(f"zero-tprune: blocks {sched.blocks} ({sched.profile}) reach no lower "
                                         f"than {floor / FLOOR_MARGIN:.1%} of the unpruned GMACs; the sweep "
                                         f"searches budgets below {hi:.0%}")
        frac = trial.suggest_float(key, max(lo, floor), hi)
        return [sched.build(frac * dense, graph.info, graph.gm, graph.sites)]
    frac = trial.suggest_float(key, lo, hi)
    if method == "tome":
        p = ToMe(target_gmacs=_g(frac * dense))
        p.validate()
        return [p]
    if method == "snp":
        return [_cap_calib(suggest_snp(trial, frac * dense), calibration_size)]
    share = trial.suggest_float("combo_snp_share", 0.2, 0.8)      # part of the GMACs cut SNP makes
    snp = _cap_calib(suggest_snp(trial, dense * (1 - share * (1 - frac))), calibration_size)
    from .passes.tokens.zero_tprune import ZeroTPrune

    zt_name = trial.suggest_categorical("zt_layout", list(graph.layouts))
    rs = round(trial.suggest_float("zt_rs_ratio", 0.3, 1.0, step=0.1), 2)
    zt = ZeroTPrune(prune_blocks=list(graph.layouts[zt_name]), target_gmacs=_g(frac * dense), rs_ratio=rs)
    zt.validate()
    return [snp, zt]


def _g(gmacs: float) -> float:
    """A budget with 5 significant digits (readable specs; 0.002 % of the budget)."""
    return float(f"{gmacs:.5g}")


def _cap_calib(p, n: int):
    if p.calib_images > n:
        p.calib_images = n
    return p


def plain_params(methods: Sequence[str], layouts: dict[str, list[int]]) -> list[dict]:
    """Fixed parameters of each method's plain ``target_gmacs`` point (default schedule), enqueued first."""
    first = next(iter(layouts))
    zt = {"zt_layout": first, "zt_profile": "uniform", "zt_rs_ratio": 0.7}
    snp = {"snp_allocation": "uniform", "snp_calib_images": max(SNP_CALIB_CHOICES)}
    out = []
    for m in methods:
        if m == "zero-tprune":
            out.append({"method": m, "zt_frac": PLAIN_FRAC[m], **zt})
        elif m == "tome":
            out.append({"method": m, "tome_frac": PLAIN_FRAC[m]})
        elif m == "snp":
            out.append({"method": m, "snp_frac": PLAIN_FRAC[m], **snp})
        else:
            out.append({"method": m, "combo_frac": PLAIN_FRAC[m], "combo_snp_share": 0.5, "zt_layout": first,
                        "zt_rs_ratio": 0.7, **snp})
    return out


def spec_of(passes: Sequence) -> str:
    """The pass list as ``--pass`` spec strings (fields that differ from the defaults), space-separated."""
    import dataclasses

    specs = []
    for p in passes:
        kv = []
        for f in dataclasses.fields(p):
            v = getattr(p, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            if v != default:
                kv.append(f"{f.name}=" + (";".join(map(str, v)) if isinstance(v, list) else str(v)))
        specs.append(p.name + (":" + ",".join(kv) if kv else ""))
    return " ".join(specs)


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """Calibration and held-out images (file paths), disjoint."""

    calibration: list[str]
    heldout: list[str]
    how: str


def split_images(data: str, calib: Optional[str], calib_images: int, limit: Optional[int], seed: int = 0) -> Split:
    """Choose the calibration and held-out images.

    Without ``calib``: a seeded permutation of ``data``'s labelled images, the first ``calib_images`` are
    calibration, the rest held-out (file order). With ``calib``: its first ``calib_images`` images; every
    image of ``data`` that is not one of them (same real path) is held-out. ``limit``: the first ``limit``
    held-out images.

    Raises:
        DataError: no images, or fewer held-out images than ``limit``.
    """
    from .data import ImageFolder
    from .errors import DataError

    if calib_images < 1:
        raise DataError(f"--calib-images {calib_images} must be >= 1")
    files = [p for p, _ in ImageFolder(data, transform=None).samples]
    if calib:
        cal = [p for p, _ in ImageFolder(calib, transform=None, limit=calib_images).samples]
        real = {os.path.realpath(p) for p in cal}
        held = [p for p in files if os.path.realpath(p) not in real]
        how = f"calibration: the first {len(cal)} images of {calib}; held-out: the images of {data} not among them"
    else:
        if len(files) <= calib_images:
            raise DataError(f"{data} has {len(files)} labelled images, not more than --calib-images {calib_images}: "
                            "no held-out images left; give fewer calibration images or --calib DIR")
        order = np.random.default_rng(seed).permutation(len(files))
        cal = sorted(files[i] for i in order[:calib_images])
        held = sorted(files[i] for i in order[calib_images:])
        how = (f"{len(files)} images of {data}: {len(cal)} calibration images drawn by a seeded permutation "
               f"(seed {seed}), the other {len(held)} held-out")
    if not held:
        raise DataError(f"no held-out images: every image of {data} is a calibration image")
    if limit is not None:
        if limit > len(held):
            raise DataError(f"--limit {limit} held-out images asked, but {data} has only {len(held)} that are not "
                            f"calibration images; lower --limit or add images")
        held = held[:limit]
        how += f"; the first {limit} held-out images used"
    return Split(cal, held, how)


def fingerprint_files(files: Sequence[str]) -> str:
    """SHA-256 (16 hex) over the names and sizes of ``files``."""
    h = hashlib.sha256()
    for p in sorted(files):
        h.update(f"{os.path.basename(p)}:{os.path.getsize(p)}\n".encode())
    return h.hexdigest()[:16]


def fingerprint_weights(path: Optional[str]) -> str:
    """SHA-256 (16 hex) of a weights file, ``random-init`` without one."""
    if path is None:
        return "random-init"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- measurement
@dataclass
class Graph:
    """The unpruned model captured once: graph, attention sites, Zero-TPrune's model info, layouts."""

    gm: Any
    sites: list
    info: Any
    layouts: dict


def kl_and_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """``(agreement %, KL)`` of ``logits`` against ``ref_logits`` (both ``[N, classes]``)."""
    from .eval.metrics import kl_divergence

    agree = 100.0 * float((logits.argmax(-1) == ref_logits.argmax(-1)).float().mean())
    return agree, kl_divergence(ref_logits, logits)


def side_by_side(base: Callable, fn: Callable, x: torch.Tensor, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median seconds per call of ``base(x)`` and ``fn(x)`` over ``repeats`` rounds that call both
    (:func:`vitprune.eval.speed.interleaved`: the order flips every round, so both see the same load)."""
    from .eval.speed import interleaved

    times = interleaved({"base": base, "fn": fn}, x, repeats, warmup, progress=False)
    return statistics.median(times["base"]), statistics.median(times["fn"])


# --------------------------------------------------------------------------- storage and study
def open_storage(url: Optional[str], out: str):
    """The Optuna storage: a journal file ``out/study.journal`` by default; a URL with ``://`` (PostgreSQL,
    MySQL, SQLite) through SQLAlchemy; any other string is a journal file path.

    Raises:
        SweepError: the storage cannot be opened or reached (the URL, password hidden, is named).
    """
    import optuna

    if url is None or "://" not in url:
        path = url or os.path.join(out, "study.journal")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            backend = optuna.storages.journal.JournalFileBackend(path)
            return optuna.storages.JournalStorage(backend)
        except Exception as exc:
            raise SweepError(f"cannot open the journal storage {path}: {_first_line(exc)}") from None
    for attempt in range(3):                 # workers starting together race to create the tables: retry
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except Exception as exc:
            err = exc
            time.sleep(1.0 + attempt)
    raise SweepError(f"cannot reach the storage {_hide_password(url)}: {_first_line(err)}") from None


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def open_study(storage, name: str, attrs: dict, trials: int, worker: bool, plain: list[dict], seed: Optional[int],
               wait_s: float = 300.0):
    """Create or join the study ``name``; the creator records ``attrs`` (model/data/backend fingerprints) and
    plans ``trials`` trials (``plain`` first). A joiner checks ``attrs``; without ``worker`` it extends the
    plan to ``trials`` if that is more.

    Raises:
        SweepError: the stored study was made with another model, data set, backend or search space.
    """
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=10,
                                         multivariate=False)
    try:
        study = optuna.create_study(storage=storage, study_name=name, sampler=sampler,
                                    directions=["maximize", "minimize"])
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    if created:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        for i in range(trials):
            if i < len(plain):
                study.enqueue_trial(plain[i], user_attrs={"plain": True})
            else:
                study.enqueue_trial({})
        study.set_user_attr("ready", True)
        return study
    t0 = time.time()
    while not study.user_attrs.get("ready"):
        if time.time() - t0 > wait_s:
            raise SweepError(f"study {name!r} exists but was never made ready (its creator stopped early?); "
                             "delete it or use another --storage")
        time.sleep(0.5)
    stored = study.user_attrs
    for k, v in attrs.items():
        if stored.get(k) != v:
            raise SweepError(f"the stored study {name!r} was made with {k} {stored.get(k)!r}, this run has {v!r}; "
                             "refusing to mix them: use another --out/--storage, or the same inputs")
    missing = trials - planned_trials(study)
    if not worker and missing > 0:
        for _ in range(missing):
            study.enqueue_trial({})
    return study


def planned_trials(study) -> int:
    """Trials planned in the study: all but the ones interrupted by Ctrl-C (each was replaced)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if not t.user_attrs.get("interrupted"))


def reclaim_stale_trials(study) -> int:
    """Trials left running by a process of this host that no longer exists (killed): recorded as failed and
    ``interrupted``, each replaced by a waiting trial with the same fixed parameters. Returns how many."""
    import socket

    from optuna.trial import TrialState

    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
        if host != socket.gethostname() or not pid.isdigit() or _alive(int(pid)):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.system_attrs.get("fixed_params", {}),
                            user_attrs={"plain": True} if t.user_attrs.get("plain") else None)
        n += 1
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_waiting_trial(study):
    """Atomically move one waiting trial to running (as ``Study.ask`` does) and return it, or None when the
    queue is empty; plain points first (a re-queued one too), then in trial order. Never creates a trial:
    the plan fixes how many there are."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for t in sorted(waiting, key=lambda t: (not t.user_attrs.get("plain"), t.number)):
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, t._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


# --------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    """What :func:`sweep` wrote and found."""

    out: str
    study: Any
    records: list
    front: list
    base: dict
    best: Optional[dict]
    pick_message: str
    failed: list
    ran: int


def sweep(model_name: str, data: str, out: str, weights: Optional[str] = None, calib: Optional[str] = None,
          calib_images: int = 64, backend: str = "onnx", target: Optional[str] = None,
          tracker: Optional[str] = None, device_key: Optional[str] = None, batch_size: int = 32,
          methods: Sequence[str] = METHODS, trials: int = 40, storage: Optional[str] = None,
          worker: bool = False, pick: str = "max-drop=1.0", limit: Optional[int] = None,
          threads: Optional[int] = None, seed: int = 0, latency_repeats: int = 15, batch_repeats: int = 3,
          retime: int = 4, study_name: str = STUDY_NAME, progress: bool = True) -> SweepResult:
    """Measure the accuracy-vs-latency frontier of ``model_name`` and write it to ``out``.

    Args:
        model_name, weights: timm model name and safetensors weights (:func:`vitprune.models.load_model`).
        data: labelled image folder; calibration and held-out images are split from it
            (:func:`split_images`) unless ``calib`` names a calibration folder.
        calib_images: calibration images (SNP's least-squares recovery and statistics).
        backend, target: where latency is measured (``torch`` | ``onnx`` | ``tvm``; TVM target).
        tracker, device_key: measure on a remote device over TVM RPC (needs :mod:`vitprune.devices`).
        batch_size: batch of the throughput measurement (img/s) and of the held-out evaluation.
        methods: subset of :data:`METHODS`.
        trials: trials the study has when this call returns: a larger number than planned extends the plan,
            a smaller one stops early (the rest stay planned); a finished study adds none. Workers run
            until the plan is done.
        storage: Optuna storage URL or journal file; default ``out/study.journal``.
        worker: join a study others plan: run waiting trials, never extend the plan.
        pick: rule for ``best.json`` (:func:`pick_best`).
        limit: use only the first ``limit`` held-out images.
        threads: CPU threads of the backend (default: torch's).
        latency_repeats, batch_repeats: timed call pairs per trial at batch 1 / at ``batch_size``.
        retime: once the plan is done (and not as a ``worker``), re-time the front trials with ``retime``
            times as many pairs (:func:`retime_front`; stored in the study, so done once); 0: keep the
            trials' own times. The models of this process's trials stay built while they are on a front
            (memory: one front's worth of models) and are re-timed as built; the others are rebuilt.

    Returns:
        a :class:`SweepResult`; ``out`` holds ``frontier.png``, ``frontier.json``, ``report.md`` and, when a
        trial meets ``pick``, ``best.json`` (``{"passes": [pass configs], "model", "spec", "metrics", ...}``).

    Raises:
        SweepError: bad methods or pick rule, unreachable storage, a study made with other inputs,
            ``vitprune.devices`` missing with ``tracker``; DataError: no images, too few held-out images.
        KeyboardInterrupt: after recording the running trial as interrupted (finished trials stay).
    """
    import optuna
    from tqdm.auto import tqdm

    from . import compile as vp_compile
    from .backends import get_backend
    from .data import ImageFolder, load_images, make_loader
    from .eval.metrics import evaluate
    from .ir.capture import capture
    from .ir.match import find_attention_sites
    from .models import eval_transform, load_model
    from .ir.cost import ViTDims

    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SweepError(f"unknown method(s) {bad or '(none)'}; choose from {', '.join(METHODS)}")
    parse_pick(pick)
    if trials < 1:
        raise SweepError(f"--trials {trials} must be >= 1")
    if retime < 0:
        raise SweepError(f"--retime {retime} must be >= 0 (0: keep each trial's own times)")
    options: dict = {}
    if backend == "tvm":
        options["target"] = target or "cpu"
    elif backend == "onnx":
        # the two models take turns on the same cores: idle threads must sleep, not spin (docs/decisions.md)
        options.update(threads=threads or torch.get_num_threads(), spin=False)
    elif target:
        raise SweepError(f"--target applies to --backend tvm only, got --backend {backend}")
    if tracker or device_key:
        from . import devices

        options["device"] = devices.from_flags(tracker, device_key, backend)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if threads:
        torch.set_num_threads(threads)

    model = load_model(model_name, weights)
    transform = eval_transform(model)
    split = split_images(data, calib, calib_images, limit, seed=seed)
    cal_root = calib or data
    calibration = load_images(cal_root, transform, files=split.calibration)
    if not len(calibration):
        raise SweepError(f"none of the {len(split.calibration)} calibration images of {cal_root} could be read")
    held_ds = ImageFolder(data, transform, files=split.heldout)
    heldout = _Batches(make_loader(held_ds, batch_size=batch_size), held_ds)
    if not sum(len(y) for _, y, _ in heldout):
        raise SweepError(f"none of the {len(split.heldout)} held-out images of {data} could be read")
    c, h, w = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    x1, xb = torch.randn(1, c, h, w), torch.randn(batch_size, c, h, w)
    example = (torch.zeros(batch_size, c, h, w),)
    gm = capture(model, example)
    sites = find_attention_sites(gm)
    info = ViTDims.from_graph(gm, sites, (c, h, w))
    graph = Graph(gm, sites, info, zero_tprune_layouts(info.depth))

    attrs = {"model": f"{model_name} weights {fingerprint_weights(weights)}",
             "data": f"{os.path.abspath(data)} held-out {fingerprint_files(split.heldout)} "
                     f"calibration {fingerprint_files(split.calibration)}",
             "backend": f"{backend} target={options.get('target')} batch={batch_size} "
                        f"threads={options.get('threads', threads)}{' spin=off' if options.get('spin') is False else ''} device={tracker or 'local'}:{device_key or ''}",
             "space": f"methods={','.join(methods)} fracs={json.dumps({m: TOKEN_FRACS[m] for m in methods})} "
                      f"snp={json.dumps(SNP_FIXED)}"}
    os.makedirs(out, exist_ok=True)
    store = open_storage(storage, out)          # an unreachable storage is named before any work

    def lower(compiled):
        """(module at ``batch_size``, module at batch 1) for the backend."""
        if backend == "tvm":
            return compiled, get_backend("tvm").lower(compiled.graph_module, (torch.zeros(1, c, h, w),), **options)
        return compiled, compiled

    def predict(fn, bar=None) -> tuple[dict, torch.Tensor]:
        logits = []

        def rec(x):
            y = fn(x)
            logits.append(y.float())
            if bar is not None:
                bar.update(1)
            return y

        res = evaluate(rec, heldout, progress=False)
        return res, torch.cat(logits)

    base_c = vp_compile(model, [], backend=backend, example_inputs=example, progress=False,
                        check_parity=_parity(backend, options), **options)
    base_b, base_1 = lower(base_c)
    # the study is made once the unpruned model lowers: a backend that cannot take the model leaves none
    study = open_study(store, study_name, attrs, trials, worker,
                       plain_params(methods, graph.layouts), seed=None if worker else seed)
    base_res, base_logits = predict(base_b)
    base = {"top1": base_res["top1"], "images": base_res["images"], "gmacs": base_c.report.gmacs_after}

    # the built models of this process's trials that are on a front (memory: a front's worth of models):
    # re-timing reuses them instead of building them again (a rebuild is most of a re-timing's time)
    built: dict[int, tuple] = {}

    def objective(trial) -> tuple[float, float]:
        bar = tqdm(total=len(heldout) + 2, desc=f"trial {trial.number}", leave=False, disable=not progress)
        try:
            t0 = time.time()
            passes = suggest_passes(trial, methods, graph, len(calibration))
            trial.set_user_attr("spec", spec_of(passes))
            trial.set_user_attr("passes", [p.config() for p in passes])
            bar.set_postfix_str(spec_of(passes)[:60])
            compiled = vp_compile(model, passes, backend=backend, example_inputs=example, calibration=calibration,
                                  progress=False, check_parity=_parity(backend, options), **options)
            mod_b, mod_1 = lower(compiled)
            bar.update(1)
            res, logits = predict(mod_b, bar)
            agree, kl = kl_and_agreement(base_logits, logits)
            times = time_pair(mod_1, mod_b, latency_repeats, batch_repeats)
            if retime and not worker:                # only this kind of run re-times at the end
                built[trial.number] = (mod_b, mod_1)
            bar.update(1)
        finally:
            bar.close()
        rec = {"base_top1": base["top1"], "gmacs": compiled.report.gmacs_after, "top1": res["top1"], "agreement": agree, "kl": kl,
               "images": res["images"], **times, "seconds": time.time() - t0}
        for k, v in rec.items():
            trial.set_user_attr(k, v)
        return res["top1"], times["latency_ratio"]

    def time_pair(mod_1, mod_b, n1: int, nb: int) -> dict:
        """Latency at batch 1 and throughput at ``batch_size`` of a pruned model and the unpruned one,
        side by side (``n1`` / ``nb`` call pairs), with their ratios."""
        b1, t1 = side_by_side(base_1, mod_1, x1, n1)
        bb, tb = side_by_side(base_b, mod_b, xb, nb)
        return {"latency_ms": 1000 * t1, "base_latency_ms": 1000 * b1, "latency_ratio": t1 / b1,
                "img_s": batch_size / tb, "base_img_s": batch_size / bb, "batch_ratio": tb / bb}

    def keep_front_models() -> None:
        if not built:
            return
        on_front = on_either_front(trial_records(study, retimes=False))
        for n in [n for n in built if n not in on_front]:
            del built[n]

    def retime_one(rec: dict) -> dict:
        from .passes.base import Pass

        mods = built.pop(rec["number"], None)
        if mods is None:
            mods = lower(vp_compile(model, [Pass.from_config(c) for c in rec["passes"]], backend=backend,
                                    example_inputs=example, calibration=calibration, progress=False,
                                    check_parity=_parity(backend, options), **options))
        mod_b, mod_1 = mods
        return time_pair(mod_1, mod_b, retime * latency_repeats, retime * batch_repeats)

    import socket

    reclaim_stale_trials(study)
    ran = 0
    goal = planned_trials(study) if worker else min(trials, planned_trials(study))
    bar = tqdm(total=goal, initial=_finished(study), desc="sweep trials", disable=not progress)
    while _finished(study) < goal:
        trial = take_waiting_trial(study)
        if trial is None:
            break
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            values = objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            fixed = study._storage.get_trial(trial._trial_id).system_attrs.get("fixed_params", {})
            study.enqueue_trial(fixed, user_attrs={"plain": True} if trial.user_attrs.get("plain") else None)
            bar.close()
            if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
                write_outputs(study, out, base, split, pick, model_name, backend, batch_size, ran)
            raise
        except (VitpruneError, RuntimeError, ValueError, TypeError, MemoryError, OSError) as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {_first_line(exc)}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, list(values))
        keep_front_models()
        ran += 1
        bar.update(1)
    bar.close()
    if retime and not worker and _finished(study) >= planned_trials(study):
        retime_study(study, retime_one, progress)
    return write_outputs(study, out, base, split, pick, model_name, backend, batch_size, ran)


class _Batches(list):
    """Preloaded ``(images, labels, n_unreadable)`` batches, iterable like the loader they came from."""

    def __init__(self, loader, dataset):
        super().__init__(loader)
        self.dataset = dataset


def _finished(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state.is_finished() and not t.user_attrs.get("interrupted"))


def _parity(backend: str, options: dict):
    return not (backend == "tvm" and options.get("target", "cpu") != "cpu")


# --------------------------------------------------------------------------- re-timing the front
TIMES = ("latency_ms", "base_latency_ms", "latency_ratio", "img_s", "base_img_s", "batch_ratio")


def with_retimes(records: list[dict], retimed: dict) -> list[dict]:
    """``records`` with the times of re-timed trials (``retimed``: trial number (str) -> times, or
    ``{"error": ...}``) in place of the trial's own, which move to ``trial_<key>``; ``retimed`` is True
    for those."""
    out = []
    for r in records:
        t = retimed.get(str(r["number"]))
        if t is not None and "error" not in t:
            r = {**r, **{f"trial_{k}": r[k] for k in TIMES}, **{k: t[k] for k in TIMES}, "retimed": True}
        elif t is not None:
            r = {**r, "retime_error": t["error"]}
        out.append(r)
    return out


def retime_front(records: list[dict], measure: Callable[[dict], dict], retimed: Optional[dict] = None,
                 on_retimed: Optional[Callable[[dict], None]] = None) -> dict:
    """Re-time the trials on either Pareto front (top-1 against the batch-1 latency ratio and against the
    batch time ratio) until both fronts hold only re-timed trials.

    A trial that a re-timing moves may let another, never re-timed trial onto a front, so this repeats
    on the fronts of the updated times; each trial is measured at most once, so it ends after at most
    ``len(records)`` measurements.

    Args:
        records: finished trials (:func:`trial_records`), with their own times (:data:`TIMES`).
        measure: ``record -> times`` (the :data:`TIMES` keys); a :class:`VitpruneError`, ``RuntimeError``
            or ``OSError`` is recorded as ``{"error": message}`` and the trial keeps its own times.
        retimed: trial number (str) -> times of earlier re-timings (kept, not measured again).
        on_retimed: called with the whole mapping after each measurement (to store it).

    Returns:
        the mapping ``retimed`` extended with the trials measured here.
    """
    retimed = dict(retimed or {})
    while True:
        todo = {n: r for n, r in on_either_front(with_retimes(records, retimed)).items() if str(n) not in retimed}
        if not todo:
            return retimed
        for n, r in sorted(todo.items()):
            try:
                retimed[str(n)] = {k: float(v) for k, v in measure(r).items() if k in TIMES}
            except (VitpruneError, RuntimeError, OSError) as exc:
                retimed[str(n)] = {"error": f"{type(exc).__name__}: {_first_line(exc)}"}
            if on_retimed is not None:
                on_retimed(retimed)


def retime_study(study, measure: Callable[[dict], dict], progress: bool = True) -> dict:
    """:func:`retime_front` on a study's finished trials, the result stored in the study's user attribute
    ``retimed`` after each trial (a resumed run measures only what is missing), with a progress bar."""
    from tqdm.auto import tqdm

    bar = tqdm(desc="re-timing the front", unit="trial", disable=not progress)

    def store(m):
        study.set_user_attr("retimed", m)
        bar.update(1)

    try:
        return retime_front(trial_records(study, retimes=False), measure, study.user_attrs.get("retimed", {}), store)
    finally:
        bar.close()


# --------------------------------------------------------------------------- results
def trial_records(study, retimes: bool = True) -> list[dict]:
    """One dict per finished trial: number, state, method, plain, values and user attributes (with
    ``retimes``, the times of re-timed trials replaced: :func:`with_retimes`)."""
    recs = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished() or t.user_attrs.get("interrupted"):
            continue
        r = {"number": t.number, "state": t.state.name, "method": t.params.get("method"), "params": dict(t.params),
             **{k: v for k, v in t.user_attrs.items()}}
        r["plain"] = bool(r.get("plain"))
        recs.append(r)
    return with_retimes(recs, study.user_attrs.get("retimed", {})) if retimes else recs


def _params_text(params: dict) -> str:
    """A failed trial's sampled parameters, ``name=value`` joined by commas (it failed before it had passes)."""
    return ",".join(f"{k}={round(v, 5) if isinstance(v, float) else v}" for k, v in params.items())


def pareto_front(records: list[dict], x: str = "latency_ratio", y: str = "top1") -> list[dict]:
    """Records not dominated in (max ``y``, min ``x``), sorted by ``x``."""
    ok = [r for r in records if r.get("state") == "COMPLETE"]
    front = [r for r in ok if not any(o[y] >= r[y] and o[x] <= r[x] and (o[y] > r[y] or o[x] < r[x]) for o in ok)]
    return sorted(front, key=lambda r: (r[x], -r[y]))


def on_either_front(records: list[dict]) -> dict[int, dict]:
    """Trial number -> record of the completed records on the batch-1 front or the batch-throughput
    front (:func:`pareto_front` with ``x="latency_ratio"`` and ``x="batch_ratio"``)."""
    return {r["number"]: r for x in ("latency_ratio", "batch_ratio") for r in pareto_front(records, x=x)}


def parse_pick(rule: str) -> tuple[str, float]:
    """``max-drop=PT`` | ``latency<=MSms`` | ``speedup>=X`` -> (kind, value).

    Raises:
        SweepError: any other rule.
    """
    m = re.fullmatch(r"\s*(max-drop)\s*=\s*([0-9.]+)\s*|\s*(latency)\s*<=\s*([0-9.]+)\s*ms\s*|\s*(speedup)\s*>=\s*([0-9.]+)\s*",
                     rule or "")
    if not m:
        raise SweepError(f"--pick {rule!r} is not a rule; use one of {', '.join(PICK_RULES)} "
                         "(e.g. max-drop=1.0, latency<=12ms, speedup>=1.5)")
    groups = [g for g in m.groups() if g is not None]
    try:
        return groups[0], float(groups[1])
    except ValueError:
        raise SweepError(f"--pick {rule!r}: {groups[1]!r} is not a number") from None


def pick_best(front: list[dict], base_top1: float, rule: str) -> tuple[Optional[dict], str]:
    """The front trial that ``rule`` picks, with a one-line message; (None, message naming the closest trial)
    when none meets it. ``max-drop=PT``: the lowest batch-1 latency with top-1 >= unpruned - PT;
    ``latency<=MSms``: the highest top-1 at batch-1 latency <= MS; ``speedup>=X``: the highest top-1 at
    batch-1 speedup (unpruned / trial latency) >= X."""
    kind, v = parse_pick(rule)
    if not front:
        return None, "no completed trial"

    def drop(r):
        return base_top1 - r["top1"]

    if kind == "max-drop":
        ok = [r for r in front if drop(r) <= v + 1e-9]
        best = min(ok, key=lambda r: r["latency_ratio"]) if ok else None
        closest = min(front, key=drop)
        miss = f"drop {drop(closest):.2f} pt"
    elif kind == "latency":
        ok = [r for r in front if r["latency_ms"] <= v]
        best = max(ok, key=lambda r: r["top1"]) if ok else None
        closest = min(front, key=lambda r: r["latency_ms"])
        miss = f"latency {closest['latency_ms']:.2f} ms"
    else:
        ok = [r for r in front if 1 / r["latency_ratio"] >= v]
        best = max(ok, key=lambda r: r["top1"]) if ok else None
        closest = min(front, key=lambda r: r["latency_ratio"])
        miss = f"speedup {1 / closest['latency_ratio']:.2f}x"
    if best is not None:
        return best, (f"--pick {rule}: trial {best['number']} ({best['spec']}): top-1 {best['top1']:.1f} % "
                      f"(drop {drop(best):.2f} pt), {1 / best['latency_ratio']:.2f}x at batch 1")
    return None, (f"no trial meets --pick {rule}; the closest is trial {closest['number']} ({closest['spec']}, "
                  f"{miss}, top-1 {closest['top1']:.1f} %)")


def write_outputs(study, out: str, base: dict, split: Split, pick: str, model_name: str, backend: str,
                  batch_size: int, ran: int) -> SweepResult:
    """Write ``frontier.json``, ``frontier.png``, ``report.md`` and (when ``pick`` is met) ``best.json``
    atomically; an old ``best.json`` is removed when the rule is no longer met."""
    from optuna.trial import TrialState

    recs = trial_records(study)
    done = [r for r in recs if r["state"] == "COMPLETE"]
    failed = [r for r in recs if r["state"] == "FAIL"]
    running = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)))
    base = {**base, "latency_ms": _median([r["base_latency_ms"] for r in done]),
            "img_s": _median([r["base_img_s"] for r in done])}
    front = pareto_front(done)
    front_batch = pareto_front(done, x="batch_ratio")
    best, msg = pick_best(front, base["top1"], pick)
    doc = {"model": model_name, "backend": backend, "batch_size": batch_size, "study": study.user_attrs,
           "split": split.how, "calibration_images": [os.path.basename(p) for p in split.calibration],
           "heldout_images": [os.path.basename(p) for p in split.heldout], "base": base,
           "front": [r["number"] for r in front], "front_batch": [r["number"] for r in front_batch],
           "pick": pick, "pick_result": msg, "best": best["number"] if best else None,
           "unfinished": running, "trials": recs}
    _atomic_write(os.path.join(out, "frontier.json"), json.dumps(doc, indent=1, default=str))
    plot_frontier(done, front, front_batch, base, os.path.join(out, "frontier.png"),
                  f"{model_name} on {backend}, {base['images']} held-out images")
    best_path = os.path.join(out, "best.json")
    best_doc = None
    if best is not None:
        best_doc = {"passes": best["passes"], "model": model_name, "spec": best["spec"], "trial": best["number"],
                    "pick": pick, "backend": backend, "batch_size": batch_size,
                    "metrics": {k: best[k] for k in ("gmacs", "top1", "agreement", "kl", "latency_ms", "img_s",
                                                     "latency_ratio", "batch_ratio", "images")},
                    "base": base}
        _atomic_write(best_path, json.dumps(best_doc, indent=2))
    elif os.path.exists(best_path):
        os.remove(best_path)
    _atomic_write(os.path.join(out, "report.md"), report_markdown(front, front_batch, failed, base, split, msg,
                                                                  model_name, backend, batch_size, len(done), running))
    return SweepResult(out, study, recs, front, base, best_doc, msg, failed, ran)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def report_markdown(front, front_batch, failed, base, split, pick_msg, model_name, backend, batch_size, n_done,
                    unfinished) -> str:
    """``report.md``: the split, the unpruned model, the front tables (batch 1 and batch ``batch_size``), the
    pick, failed trials."""
    from .cli import format_table

    def speedup(r, key):
        own = f" ({1 / r['trial_' + key]:.2f}x)" if r.get("retimed") else ""
        return f"{1 / r[key]:.2f}x{own}"

    def rows(rs):
        return [[r["number"], f"`{r['spec']}`", f"{r['gmacs']:.3f}", f"{r['top1']:.1f}", f"{base['top1'] - r['top1']:.1f}",
                 f"{r['agreement']:.1f}", f"{r['kl']:.4f}", f"{r['latency_ms']:.2f}", speedup(r, "latency_ratio"),
                 f"{r['img_s']:.1f}", speedup(r, "batch_ratio")] for r in rs]

    n_re = sum(1 for r in front + front_batch if r.get("retimed"))
    retimed_note = (" The front trials were re-timed after the last trial side by side with the "
                    "unpruned model with more call pairs; their speed-ups are those, with the trial's own in "
                    "parentheses." if n_re else "")

    cols = ["trial", "passes", "GMACs", "top-1 %", "drop pt", "agreement %", "KL", "latency ms (b1)",
            "speedup b1", f"img/s (b{batch_size})", f"speedup b{batch_size}"]
    lines = [f"# vitprune sweep: {model_name} on {backend}", "",
             f"Images: {split.how}. Top-1, agreement and KL are on the {base['images']} held-out images; "
             "calibration images are used only by the passes.", "",
             f"Unpruned: {base['gmacs']:.3f} GMACs, top-1 {base['top1']:.1f} %, {base['latency_ms']:.2f} ms at batch 1, "
             f"{base['img_s']:.1f} img/s at batch {batch_size} (medians over the trials; every ratio is measured "
             "side by side with the unpruned model inside its trial)." + retimed_note, "",
             f"{n_done} completed trials, {len(failed)} failed" + (f", {unfinished} not finished" if unfinished else "")
             + ".", "", f"Pick: {pick_msg}", "",
             "## Pareto front (top-1 vs batch-1 latency)", "", format_table(cols, rows(front)), "",
             f"## Pareto front (top-1 vs batch-{batch_size} throughput)", "", format_table(cols, rows(front_batch)), ""]
    if failed:
        lines += ["## Failed trials", "", format_table(["trial", "passes (or sampled parameters)", "error"],
                                                       [[r["number"], f"`{r.get('spec') or _params_text(r['params'])}`", r.get("error", "")]
                                                        for r in failed]), ""]
    return "\n".join(lines)


def plot_frontier(done: list[dict], front: list[dict], front_batch: list[dict], base: dict, path: str, title: str):
    """``frontier.png``: held-out top-1 against the latency ratio at batch 1 (left) and the time ratio at
    the throughput batch (right); every trial by method, the Pareto front as a line, each method's plain
    ``target_gmacs`` point ringed, the unpruned model at ratio 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for ax, key, fr, label in ((axes[0], "latency_ratio", front, "latency ratio at batch 1"),
                               (axes[1], "batch_ratio", front_batch, "time per image ratio at the throughput batch")):
        for m in METHODS:
            pts = [r for r in done if r["method"] == m]
            if pts:
                ax.scatter([r[key] for r in pts], [r["top1"] for r in pts], s=22, c=colors[m], alpha=0.7, label=m)
        plain = [r for r in done if r["plain"]]
        if plain:
            ax.scatter([r[key] for r in plain], [r["top1"] for r in plain], s=140, facecolors="none",
                       edgecolors=[colors[r["method"]] for r in plain], linewidths=2,
                       label="plain target_gmacs point")
        if fr:
            ax.plot([r[key] for r in fr], [r["top1"] for r in fr], "k-", lw=1.2, alpha=0.8)
            ax.scatter([r[key] for r in fr], [r["top1"] for r in fr], s=46, facecolors="none", edgecolors="k",
                       label="Pareto front")
        ax.scatter([1.0], [base["top1"]], marker="X", s=120, c="k", label="unpruned")
        ax.axhline(base["top1"] - 1.0, color="grey", ls=":", lw=1)
        ax.set_xlabel(label + " (pruned / unpruned, lower is faster)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out top-1 %")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(title + " (dotted: 1 pt below unpruned)")
    fig.tight_layout()
    tmp = path + f".tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)

