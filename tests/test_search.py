"""Multi-objective search: the space is validated with YAML paths, a search writes a front whose
recipes reproduce their figures under `nncompress run`, the study lives in real Optuna storage (it
resumes after SIGTERM, two worker processes share it), goals pick from the front (an unreachable one
names the closest point), and bad input is one line with exit code 2."""
import contextlib
import doctest
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

import nncompress
from nncompress.cli import main
from nncompress.core.errors import ConfigError
from nncompress.search import front, space, storage
from nncompress.search.front import Point, dominates, pareto_front, parse_goal
from nncompress.search.space import parse_search

SRC = Path(nncompress.__file__).parents[1]

RECIPE = textwrap.dedent("""\
    name: tiny-search
    model: {name: mlp, kwargs: {in_features: 64, hidden: [32]}, pretrain: {epochs: 3, lr: 0.01}}
    data: digits
    measure: {batch_sizes: [64], threads: 1, warmup: 1, repeats: 3, onnx: false}
    stages:
      - {kind: prune, ratio: 0.5}
      - {kind: finetune, epochs: 1, lr: 0.003}
      - kind: quantize
        weight: {format: {kind: int, bits: 8}}
    search:
      space:
        stages[0].ratio: [0.25, 0.5]
        stages[2].weight.format.bits: [4, 8]
      optional: ["stages[1]"]
      proxy: {epochs: 0}
      promote: 2
      baselines:
        - name: prune 0.5
          drop: ["stages[2]"]
        - name: int8
          drop: ["stages[0]", "stages[1]"]
    """)


@pytest.mark.parametrize("module", [front, space, storage])
def test_docstring_examples_run(module):
    assert doctest.testmod(module).failed == 0


# ------------------------------------------------------------------------------------------- the space

def raw_recipe(**search):
    raw = yaml.safe_load(RECIPE)
    raw["search"] = search
    return raw


@pytest.mark.parametrize("search, path, words", [
    ({"space": {"stages[0].ratio": [0.25, 1.5]}}, "search.space.stages[0].ratio[1]", "1.5 makes an invalid recipe"),
    ({"space": {"stages[5].ratio": [0.2]}}, "search.space.stages[5].ratio", "the recipe has 3 stages"),
    ({"space": {"layers[0].ratio": [0.2]}}, "search.space.layers[0].ratio", "starts with stages[i]"),
    ({"space": {"stages[0].ratio": []}}, "search.space.stages[0].ratio", "empty list"),
    ({"space": {"stages[0].ratio": {"low": 0.6, "high": 0.2}}}, "search.space.stages[0].ratio", "low must be below high"),
    ({"space": {"stages[0].ratio": {"low": 0.1, "hi": 0.2}}}, "search.space.stages[0].ratio.hi", "unknown field"),
    ({"space": {"stages[0].nope": [1]}}, "search.space.stages[0].nope[0]", "unknown field"),
    ({"space": {"stages[0]": [1]}}, "search.space.stages[0]", "search.optional"),
    ({"optional": ["stages[0].ratio"]}, "search.optional[0]", "name a whole stage"),
    ({"space": {}}, "search.space", "nothing to search"),
    ({"space": {"stages[0].ratio": [0.2]}, "sampler": "grid"}, "search.sampler", "tpe, nsga2"),
    ({"space": {"stages[0].ratio": [0.2]}, "proxy": {"epochs": -1}}, "search.proxy.epochs", ">= 0"),
    ({"space": {"stages[0].ratio": [0.2]}, "colour": 1}, "search.colour", "unknown field"),
    ({"space": {"stages[0].ratio": [0.2]}, "baselines": [{"name": "b", "set": {"stages[2].weight.format.bits": 99}}]},
     "search.baselines[0]", "'b' makes an invalid recipe"),
])
def test_space_mistakes_name_their_path(search, path, words):
    with pytest.raises(ConfigError) as e:
        parse_search(raw_recipe(**search))
    assert str(e.value).startswith(path + ":") and words in str(e.value), str(e.value)


def test_points_become_the_recipes_they_stand_for():
    spec = parse_search(raw_recipe(space={"stages[0].ratio": {"low": 0.1, "high": 0.3},
                                          "stages[2].weight.format.bits": [4, 8],
                                          "stages[2].weight.granularity": ["per_tensor", {"kind": "per_group", "size": 16}]},
                                   optional=["stages[1]"], proxy={"epochs": 0}))
    r = spec.recipe({"stages[1]": True, "stages[0].ratio": 0.2, "stages[2].weight.format.bits": 4,
                     "stages[2].weight.granularity": {"kind": "per_group", "size": 16}})
    assert [s.config.kind for s in r.stages] == ["prune", "finetune", "quantize"]
    assert r.stages[0].config.ratio == 0.2 and r.stages[2].config.weight.format.bits == 4
    assert r.stages[2].config.weight.granularity.size == 16
    assert spec.proxy(r).stages[1].config.epochs == 0 and r.stages[1].config.epochs == 1
    dropped = spec.recipe({"stages[1]": False, "stages[0].ratio": 0.2})
    assert [s.config.kind for s in dropped.stages] == ["prune", "quantize"]
    assert spec.recipe({}).to_dict() == spec.as_written().to_dict()  # no values: the recipe as written
    # without declared baselines, each listed value of the space is one (the others as written)
    assert [b.name for b in spec.baselines] == [
        "stages[2].weight.format.bits=4", "stages[2].weight.format.bits=8",
        "stages[2].weight.granularity=per_tensor", 'stages[2].weight.granularity={"kind": "per_group", "size": 16}']


def test_run_check_validates_the_search_section(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(RECIPE)
    assert main(["run", str(good), "--check"]) == 0
    assert "search section valid (3 dimensions, 2 baselines)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("[0.25, 0.5]", "[0.25, 2]"))
    assert main(["run", str(bad), "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("nncompress: error: search.space.stages[0].ratio[1]: 2 makes an invalid recipe") and "\n" not in err


# ------------------------------------------------------------------------------------- fronts and goals

def test_pareto_front_matches_brute_force():
    rng = random.Random(0)
    pts = [Point(str(i), rng.choice([0.8, 0.9, 0.95]), rng.choice([0.5, 1.0]), 1.0, rng.choice([10, 20, 30]))
           for i in range(40)]
    got = {p.label for p in pareto_front(pts)}
    # brute force: not dominated; of several equal points the first
    want = {p.label for i, p in enumerate(pts) if not any(dominates(q, p) for q in pts)
            and not any(q.costs() == p.costs() for q in pts[:i])}
    assert got == want and got
    for a, b in itertools.product(pareto_front(pts), repeat=2):
        assert not dominates(a, b)


@pytest.mark.parametrize("kw, message", [
    ({"target_latency": "fast"}, "--target-latency: cannot read 'fast'"),
    ({"target_latency": "0.5x"}, "--target-latency: a factor must be > 1"),
    ({"target_size": "big"}, "--target-size: cannot read 'big'"),
    ({"target_size": "10 furlongs"}, "--target-size: unknown unit 'furlongs'"),
    ({"max_drop": "0.01", "target_size": "4x"}, "--target-size: give one goal"),
])
def test_goal_mistakes(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_goal(**kw)


# --------------------------------------------------------------------------------------- a real search

def cli(*args, cwd=None, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "nncompress.cli", *map(str, args)], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})}, **kw)


def trials_of(db: Path, name: str = "tiny-search"):
    import optuna
    store = optuna.storages.RDBStorage(f"sqlite:///{db}")
    names = [s.study_name for s in optuna.get_all_study_summaries(store) if s.study_name.startswith(name)
             and not s.study_name.endswith("-full")]
    assert len(names) <= 1, names
    return optuna.load_study(study_name=names[0], storage=store).get_trials(deepcopy=False) if names else []


def completed(db: Path) -> int:
    """Completed trials in a study file another process is writing: read-only, plain sqlite (opening it
    through Optuna would try to create or migrate the schema under the writer's feet)."""
    import sqlite3
    if not db.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return con.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or locked for a moment
        return 0


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("search")
    recipe = folder / "tiny.yaml"
    recipe.write_text(RECIPE)
    cache = tmp_path_factory.getbasetemp() / "nncompress-cache"
    code = main(["search", str(recipe), "--trials", "4", "--out", str(folder / "out"), "--cache", str(cache), "--quiet"])
    assert code == 0
    return folder, recipe, cache, json.loads((folder / "out" / "report.json").read_text())


def test_search_writes_front_baselines_and_plot(searched):
    folder, _, _, report = searched
    out = folder / "out"
    assert sorted(p.name for p in out.iterdir()) == ["front", "pareto.png", "report.json", "report.md"]
    assert (folder / "out.study.db").is_file()  # the study, beside the output: a rerun resumes it
    assert report["counts"]["trials"] == 4 and report["counts"]["baselines"] == 2
    assert {b["label"] for b in report["baselines"]} == {"prune 0.5", "int8"}
    files = sorted(p.name for p in (out / "front").iterdir())
    assert files == [f"{i + 1:03d}.yaml" for i in range(len(report["front"]))] and files
    labels = [p["label"] for p in report["points"]]
    for p in report["front"]:  # the front is the non-dominated subset of the fully measured points
        assert p["label"] in labels
        assert not any(q["quality"] >= p["quality"] and q["latency"] <= p["latency"] and q["bytes"] <= p["bytes"]
                       and (q["quality"], q["latency"], q["bytes"]) != (p["quality"], p["latency"], p["bytes"])
                       for q in report["points"])
    md = (out / "report.md").read_text()
    assert "## Pareto front" in md and "| prune 0.5 |" in md and "front/001.yaml" in md
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_front_recipe_runs_and_reproduces_its_figures(searched, tmp_path):
    folder, _, cache, report = searched
    point = report["front"][-1]
    path = folder / "out" / "front" / report["front_files"][point["label"]]
    assert "search" not in yaml.safe_load(path.read_text())
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--cache", str(cache), "--quiet"]) == 0
    final = json.loads((tmp_path / "run" / "report.json").read_text())["stages"][-1]
    # the same recipe, seeded the same way: the same model, so the same accuracy and the same bytes
    assert final["quality"] == point["quality"] and final["file_bytes"] == point["bytes"]


def test_goals_reread_the_study_and_name_the_closest_point(searched, capsys):
    folder, recipe, cache, report = searched
    args = ["search", str(recipe), "--trials", "4", "--out", str(folder / "out"), "--cache", str(cache), "--quiet"]
    assert main(args + ["--target-size", "1000x"]) == 0  # unreachable: said so, closest point named, exit 0
    out = capsys.readouterr().out
    again = json.loads((folder / "out" / "report.json").read_text())
    assert again["counts"] == report["counts"]  # the same study: nothing measured twice
    smallest = min(again["front"], key=lambda p: p["bytes"])
    assert again["goal"]["met"] is False and again["goal"]["closest"] == smallest["label"]
    assert "goal (target size 1000x): NOT met: no point reaches target size 1000x; closest: " + smallest["label"] in out
    assert f"closest: {smallest['label']} -> " in out
    assert main(args + ["--max-drop", "1"]) == 0  # every point is within a drop of 1: smallest and fastest
    picks = dict(json.loads((folder / "out" / "report.json").read_text())["goal"]["picks"])
    assert picks["smallest"] == smallest["label"]
    assert picks["fastest"] == min(again["front"], key=lambda p: p["latency"])["label"]


@pytest.mark.parametrize("url, words", [("nosuchdb://x/y", "nosuchdb"),
                                         ("sqlite:///{tmp}/a-file/s.db", "File exists")])  # its folder cannot be made
def test_bad_storage_is_one_line_naming_it(tmp_path, capsys, url, words):
    (tmp_path / "a-file").write_text("not a folder")
    url = url.format(tmp=tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["search", str(recipe), "--trials", "2", "--out", str(tmp_path / "o"), "--storage", url]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nncompress: error: --storage {url}: cannot open it") and words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("stages, words", [
    ("[{kind: prune, ratio: 0.5}]", "prune.targets: no prunable channel group"),
    ("[{kind: quantize, targets: {types: [Conv2d]}}]", "quantize: no Linear/Conv layer among the targets"),
])
def test_nothing_to_compress_says_which(tmp_path, capsys, stages, words):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: mlp, kwargs: {{in_features: 64, hidden: []}}}}\ndata: digits\n"
                      f"stages: {stages}\nsearch: {{optional: [\"stages[0]\"]}}\n")
    assert main(["search", str(recipe), "--trials", "2", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the recipe as written fails on model 'mlp'" in err and words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # subprocesses / transformers loads: seconds each (CI runs the slow tier)
def test_interrupted_search_resumes_from_its_storage(searched, tmp_path):
    _, _, cache, _ = searched
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    out, db = tmp_path / "out", tmp_path / "out.study.db"
    proc = cli("search", recipe, "--trials", "6", "--out", out, "--cache", cache, "--quiet")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # stop it once two trials are stored
        if completed(db) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a hang (seen once in ~8 CI runs): fail with every thread's stack
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2)
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the search did not stop within 60 s of SIGTERM; its stacks:\n{err[-6000:]}")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM: after" in err and "rerun the same command to resume" in err
    assert not out.exists()  # nothing half-written: the output appears when the search ends
    before = {t.number: t.values for t in trials_of(db) if t.state.name == "COMPLETE"}
    assert 2 <= len(before) < 6
    assert main(["search", str(recipe), "--trials", "6", "--out", str(out), "--cache", str(cache), "--quiet"]) == 0
    after = trials_of(db)
    done = {t.number: t.values for t in after if t.state.name == "COMPLETE"}
    assert len(done) == 6 and all(done[n] == v for n, v in before.items())  # kept, continued to 6
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in after)
    # the trial the signal stopped (if one was running) failed as interrupted, not as an error: it was retried
    assert all("error" not in t.user_attrs for t in after if t.state.name == "FAIL")


@pytest.mark.slow  # two fresh interpreters importing torch side by side: ~10 s on 2 shared cores
def test_two_worker_processes_share_one_study(searched, tmp_path):
    _, _, cache, _ = searched
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE)
    db = tmp_path / "shared.db"
    procs = [cli("search", recipe, "--trials", "4", "--out", tmp_path / f"w{i}", "--cache", cache, "--quiet",
                 "--storage", f"sqlite:///{db}") for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    trials = trials_of(db)
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) in (4, 5)  # the study's budget, not each worker's (a last race may add one)
    assert len({t.number for t in trials}) == len(trials)
    reports = [json.loads((tmp_path / f"w{i}" / "report.json").read_text()) for i in range(2)]
    assert reports[0]["study"] == reports[1]["study"]
    # each baseline measured once in the shared queue, whichever worker took it
    assert reports[1]["counts"]["baselines"] == 2


def test_latency_in_onnxruntime_times_each_candidate_beside_the_uncompressed_export(searched, tmp_path):
    _, _, cache, _ = searched
    recipe = tmp_path / "ort.yaml"
    recipe.write_text(RECIPE.replace("search:\n", "search:\n  runtime: onnxruntime\n"))
    assert main(["search", str(recipe), "--trials", "2", "--out", str(tmp_path / "out"), "--cache", str(cache),
                 "--quiet"]) == 0
    measured = [t.user_attrs["objectives"] for t in trials_of(tmp_path / "out.study.db")
                if "objectives" in t.user_attrs]
    assert measured
    for obj in measured:  # the objective is the ONNX Runtime ratio, not torch's
        m = obj["metrics"]
        ort = next(lat for lat in m["latencies"] if lat["runtime"] == "onnxruntime" and lat["batch"] == 64)
        ref = next(lat for lat in m["reference"] if lat["runtime"] == "onnxruntime" and lat["batch"] == 64)
        assert obj["latency_ms"] == ort["median_ms"] and obj["latency"] == pytest.approx(ort["median_ms"] / ref["median_ms"])
    assert "Latency: ONNX Runtime" in (tmp_path / "out" / "report.md").read_text()
    bad = RECIPE.replace("search:\n", "search:\n  runtime: tensorrt\n")
    with pytest.raises(ConfigError, match="search.runtime: must be one of torch, onnxruntime"):
        parse_search(yaml.safe_load(bad))
