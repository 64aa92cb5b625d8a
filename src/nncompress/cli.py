"""The `nncompress` command: parses arguments, prints, sets exit codes; nothing else.

Exit codes: 0 success (for `search`, also when a stated goal is not met: the report says so and names
the closest point found); 2 a user error (bad recipe, file, data, model spec), printed as one line
(`--debug` shows the traceback); 1 an internal error (a bug: please report it with --debug output);
130 / 143 stopped by SIGINT (Ctrl-C) / SIGTERM (128 + the signal's number, as shells report it).
Both signals stop a run the same clean way: one line on stderr, no half-written file, the completed
stages kept for `nncompress run --resume OUT`.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Iterator

EPILOG = """examples:
  nncompress demo                      train the MNIST-1D reference CNN, compress it, print the report
  nncompress run examples/finetune.yaml --out runs/ft
  nncompress run --resume runs/ft      continue a run stopped by Ctrl-C or SIGTERM
  nncompress report runs/ft            print a finished run's report again
  nncompress export runs/lm/model --out lm-hf   the model as a Hugging Face folder transformers loads
  nncompress sensitivity examples/finetune.yaml --unit channel --out sens --target 0.5 --threshold 0.01
  nncompress search examples/search_digits.yaml --trials 20 --out runs/s --max-drop 0.01
                                       multi-objective search; rerun the same command to resume
  nncompress list                      the registered stage kinds, models and data sets
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nncompress", description="Compress PyTorch models with measured "
                                "accuracy, size on disk and latency.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the built-in demo recipe on the MNIST-1D reference CNN",
                          description="Train (or load from cache) the MNIST-1D reference CNN, run the "
                          "built-in recipe over it and print the report table.")
    _run_options(demo)
    demo.add_argument("--show-recipe", action="store_true", help="print the demo recipe (YAML) and exit")

    run = sub.add_parser("run", help="run a recipe file", description="Validate the whole recipe, then "
                         "run its stages, measuring after each; writes a run directory.")
    run.add_argument("recipe", type=Path, nargs="?", help="recipe YAML file (optional with --resume: "
                     "the interrupted run's own recipe is used)")
    _run_options(run)
    run.add_argument("--resume", type=Path, default=None, metavar="OUT",
                     help="continue the interrupted run that was to finish as OUT, from its last completed stage")
    run.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    run.add_argument("--check", action="store_true", help="only validate the recipe, its model and data names "
                     "and --out; build and run nothing")

    rep = sub.add_parser("report", help="print the report of a finished run",
                         description="Print a run directory's report table (from report.json).")
    rep.add_argument("run_dir", type=Path, help="a run directory written by `nncompress run`")
    rep.add_argument("--json", action="store_true", help="print the JSON report instead of the table")

    exp = sub.add_parser("export", help="write a saved model in a format another tool loads",
                         description="Write a model saved by nncompress (a run's model/ folder, or any folder "
                                     "nncompress.save wrote) as a Hugging Face folder (save_pretrained layout) that "
                                     "transformers loads alone; checked by reloading it with transformers and "
                                     "comparing outputs. A model the format cannot express is an error, never a "
                                     "folder with wrong weights.")
    exp.add_argument("model_dir", type=Path, help="a folder written by nncompress.save (e.g. RUN/model)")
    exp.add_argument("--format", choices=["hf", "compressed-tensors", "sentence-transformers", "onnx-nbits"],
                     default="hf",
                     help="hf: transformers' save_pretrained layout (float weights); compressed-tensors: the same "
                          "with integer weight-only layers packed (transformers loads it with the compressed-tensors "
                          "package); sentence-transformers: a folder SentenceTransformer(path) loads (sentence "
                          "encoders such as hf:minilm); onnx-nbits: an ONNX file (--out FILE.onnx) whose 4/8-bit "
                          "weight-only Linears are MatMulNBits nodes ONNX Runtime runs")
    exp.add_argument("--out", type=Path, required=True, help="the folder to write (must not exist)")
    exp.add_argument("--trust-code", action="store_true",
                     help="allow the saved manifest to import the module:factory it names (only for folders you trust)")

    sens = sub.add_parser("sensitivity", help="per-layer / per-channel-group pruning sensitivity of a recipe's model",
                          description="Build (and pretrain, or load from the cache) the recipe's model and data, "
                          "prune one unit at a time at a sweep of ratios, and write sensitivity.csv and "
                          "sensitivity.png into --out. With --target, print per-unit ratios as YAML overrides.")
    sens.add_argument("recipe", type=Path, help="recipe YAML file (its model and data are used; stages are not run)")
    sens.add_argument("--unit", default="element", help="element (each layer's weights) or channel "
                      "(each coupled channel group); default element")
    sens.add_argument("--out", type=Path, required=True, help="folder to create for sensitivity.csv and .png")
    sens.add_argument("--max-batches", type=int, default=None, help="evaluate on the first N test batches only")
    sens.add_argument("--target", type=float, default=None, help="overall sparsity to derive per-unit ratios for")
    sens.add_argument("--threshold", type=float, default=0.01,
                      help="tolerated drop in quality per unit for --target (default 0.01)")
    sens.add_argument("--cache", type=Path, default=None, help="cache folder for data and pretrained weights")
    sens.add_argument("--quiet", action="store_true", help="no progress bars or log")
    sens.add_argument("--trust-code", action="store_true", help=TRUST_HELP)

    _search_parser(sub)

    sub.add_parser("list", help="list registered stage kinds, built-in models and data sets",
                   description="List what recipes can name: stage kinds, models, data sets.")
    return p


def _search_parser(sub: argparse._SubParsersAction) -> None:
    srch = sub.add_parser("search", help="multi-objective search over a recipe's search space (Optuna)",
                          description="Search the space a recipe's `search:` section declares: each trial is a "
                          "concrete recipe measured for quality (test split), torch latency (interleaved with the "
                          "uncompressed model) and bytes on disk; cheap proxies first, the full recipe for the "
                          "promising. Writes OUT/report.md, report.json, pareto.png and front/NNN.yaml (runnable "
                          "recipes). The study lives in --storage: rerun the same command to resume; several "
                          "processes or machines may share one storage.")
    srch.add_argument("recipe", type=Path, help="recipe YAML file with a search: section")
    srch.add_argument("--trials", type=int, required=True, help="rung-1 trials of the whole study (a rerun continues to N)")
    srch.add_argument("--out", type=Path, default=None, help="output folder (default runs/NAME-search)")
    srch.add_argument("--storage", default=None, metavar="URL", help="Optuna storage: a database URL "
                      "(sqlite:///s.db, postgresql://...) or a .db / .log file (default: OUT.study.db beside --out)")
    goal = srch.add_mutually_exclusive_group()
    goal.add_argument("--max-drop", default=None, metavar="X", help="the smallest and the fastest point within X of "
                      "the baseline's quality (quality units: 0.01 = 1 point of accuracy; for perplexity, a rise of X)")
    goal.add_argument("--target-latency", default=None, metavar="T",
                      help="the best quality at most this latency: 5ms, or 2x (twice as fast as the baseline)")
    goal.add_argument("--target-size", default=None, metavar="S",
                      help="the best quality at most this size on disk: 50kB, 120000, or 4x (a quarter of the baseline)")
    srch.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default 1)")
    srch.add_argument("--cache", type=Path, default=None, help="cache folder for data and pretrained weights")
    srch.add_argument("--quiet", action="store_true", help="no progress bars or log")
    srch.add_argument("--trust-code", action="store_true", help=TRUST_HELP)


TRUST_HELP = ("let a `saved:` model whose manifest names a `module:factory` import it (importing runs that "
              "module's code: only for folders you trust)")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="run directory to create (default runs/NAME-TIME)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder for data and pretrained weights (default ~/.cache/nncompress "
                        "or $NNCOMPRESS_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage log")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(signal, "SIGUSR1") and argv is None:  # `kill -USR1 <pid>` prints every thread's stack (a hung run)
        import faulthandler
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    if args.debug:
        os.environ["NNCOMPRESS_DEBUG"] = "1"  # libraries' own logs too (core.logs keeps them quiet otherwise)
    with _signals_interrupt() as received:
        try:
            return _dispatch(args)
        except KeyboardInterrupt as e:
            if args.debug:
                traceback.print_exc()
            signum = received[0] if received else signal.SIGINT
            detail = f": {e}" if str(e) else ""  # a stopped run says what it kept and how to resume
            print(f"nncompress: interrupted by {signal.Signals(signum).name}{detail}", file=sys.stderr)
            return 128 + signum
        except Exception as e:  # noqa: BLE001 - the one place errors become exit codes
            from .core.errors import NNCompressError
            if args.debug:
                traceback.print_exc()
            if isinstance(e, NNCompressError):
                print(f"nncompress: error: {e}", file=sys.stderr)
                return 2
            print(f"nncompress: internal error: {type(e).__name__}: {e} (rerun with --debug and report it)",
                  file=sys.stderr)
            return 1


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """Make SIGTERM (and SIGINT) raise KeyboardInterrupt in the main thread, so a run stopped by a
    job scheduler cleans up exactly as one stopped by Ctrl-C; yields the signals received.

    Repeats of the signal while that clean-up runs are ignored, so it completes; a handler someone
    else set (SIG_IGN under nohup, an embedding application's) is left alone; the previous handlers
    are restored on exit.
    """
    from .core.interrupts import interrupt_now

    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)
        if len(received) == 1 and interrupt_now():  # else raised when the write under way ends
            raise KeyboardInterrupt

    ours = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {}
    try:
        for signum, default in ours.items():
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals are not ours to handle
        pass
    try:
        yield received
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _dispatch(args: argparse.Namespace) -> int:
    if args.version:
        from . import __version__
        print(__version__)
        return 0
    if args.command is None:
        build_parser().print_help()
        return 0
    if args.command == "list":
        return _list()
    from .core import distributed
    if distributed.launched() > 1 and args.command not in ("run", "demo"):
        from .core.errors import NNCompressError
        raise NNCompressError(f"`nncompress {args.command}` runs in one process; only `run` (and `demo`) train "
                              "data-parallel under torchrun: launch it without torchrun")
    if args.command == "report":
        return _report(args)
    if args.command == "sensitivity":
        return _sensitivity(args)
    if args.command == "export":
        return _export(args)
    if args.command == "search":
        return _search(args)
    from .recipe import demo_recipe_path, run_recipe
    if args.command == "demo" and args.show_recipe:
        print(demo_recipe_path().read_text())
        return 0
    resume = args.resume if args.command == "run" else None
    path, recipe = _recipe_of(args, resume)
    out = resume or args.out
    if args.command == "run" and args.check:
        from .recipe import check_sources
        from .recipe.runner import check_out_dir
        check_sources(recipe, args.trust_code)
        if out is not None:
            check_out_dir(out)
        if recipe.search is not None:
            from .search import load_search
            spec = load_search(path)
            print(f"{path}: search section valid ({len(spec.dimensions)} dimensions, {len(spec.baselines)} baselines)")
        print(f"{path}: valid ({len(recipe.stages)} stages: {', '.join(s.config.kind for s in recipe.stages) or 'none'})")
        return 0
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[nncompress] {msg}", file=sys.stderr))
    try:
        result = run_recipe(recipe, out, cache_dir=args.cache, progress=not args.quiet, log=log,
                            resume=resume is not None, trust_code=getattr(args, "trust_code", False))
    finally:
        distributed.shutdown()
    if distributed.launched() > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # torchrun: rank 0 prints the report
    print(result.report.to_markdown())
    print(f"\nrun directory: {result.path}  (model: {result.path / 'model'}, plot: {result.path / 'pareto.png'})")
    return 0


def _recipe_of(args: argparse.Namespace, resume: Path | None):
    """`(path, recipe)` to run: the demo's, the file given, or (`--resume` alone) the interrupted run's."""
    from .core.errors import ConfigError
    from .recipe import demo_recipe_path, load_recipe
    from .recipe.runner import interrupted_recipe, partial_dir
    if args.command == "demo":
        return demo_recipe_path(), load_recipe(demo_recipe_path())
    if resume is not None and args.out is not None:
        raise ConfigError("--out", "give either --out (a new run) or --resume (continue one), not both")
    if args.recipe is not None:
        return args.recipe, load_recipe(args.recipe)
    if resume is None:
        raise ConfigError("run", "give a recipe file, or --resume OUT to continue an interrupted run")
    return partial_dir(resume) / "recipe.yaml", interrupted_recipe(resume)


def _sensitivity(args: argparse.Namespace) -> int:
    import warnings

    from .analysis.sensitivity import sensitivity
    from .core.errors import ConfigError, NNCompressError
    from .export.atomic import atomic_dir
    from .recipe import load_recipe
    from .recipe.runner import default_cache_dir, prepare, seed_everything

    if args.unit not in ("element", "channel"):  # checked before any training
        raise ConfigError("--unit", f"must be 'element' or 'channel', got {args.unit!r}")
    if args.target is not None and not 0.0 <= args.target < 1.0:
        raise ConfigError("--target", f"must be in [0, 1), got {args.target}")
    if args.threshold < 0:
        raise ConfigError("--threshold", f"must be >= 0, got {args.threshold}")
    if args.out.exists():
        raise NNCompressError(f"{args.out}: output folder already exists; choose another --out or remove it")
    recipe = load_recipe(args.recipe)
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[nncompress] {msg}", file=sys.stderr))
    seed_everything(recipe.seed)
    model, data = prepare(recipe, args.cache or default_cache_dir(), not args.quiet, log, args.trust_code)
    log(f"{args.unit} sensitivity of {recipe.model.name} on {recipe.data.name}")
    result = sensitivity(model, data, unit=args.unit, max_batches=args.max_batches,
                         device=recipe.measure.device)
    with atomic_dir(args.out) as tmp:
        result.to_csv(tmp / "sensitivity.csv")
        result.plot_png(tmp / "sensitivity.png")
    print(result)
    if args.target is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ratios = result.ratios_for(args.target, args.threshold)
        for w in caught:
            print(f"nncompress: warning: {w.message}", file=sys.stderr)
        what = ("paste into a prune stage (ratio: 0.0)" if args.unit == "channel"
                else "per-layer sparsities (module name: fraction of weights to zero)")
        print(f"\n# {args.unit} ratios for {args.target:g} overall sparsity, drop <= {args.threshold:g} per unit "
              f"(reached {result.overall_sparsity(ratios):.3f}); {what}")
        print("overrides:")
        for unit, r in ratios.items():
            print(f"  {_yaml_key(unit)}: {r:g}")
    print(f"\nwritten: {args.out / 'sensitivity.csv'}, {args.out / 'sensitivity.png'}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search import load_search, parse_goal, run_search
    from .search.report import front_files

    goal = parse_goal(args.max_drop, args.target_latency, args.target_size)  # checked before any work
    spec = load_search(args.recipe)
    out = args.out or Path("runs") / f"{spec.name}-search"
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[nncompress] {msg}", file=sys.stderr))
    result = run_search(spec, args.trials, out, storage=args.storage, goal=goal, workers=args.workers,
                        cache_dir=args.cache, progress=not args.quiet, log=log, trust_code=args.trust_code)
    files = front_files(result)
    c = result.counts
    print(f"{c['trials']} trials ({c['distinct']} distinct points, {c['failed']} failed), {c['promoted']} promoted to "
          f"the full recipe, {c['baselines']} baselines; Pareto front: {len(result.front)} points "
          f"(dominating {result.dominated} of {len(result.baselines)} baselines)")
    for role, label in result.verdict.picks:
        print(f"{role}: {label} -> {out / 'front' / files[label]}")
    if result.verdict.closest is not None and result.verdict.closest.label in files:
        print(f"closest: {result.verdict.closest.label} -> {out / 'front' / files[result.verdict.closest.label]}")
    print(f"goal ({result.verdict.goal.describe()}): {result.verdict.message}")
    print(f"\nsearch directory: {out}  (report.md, pareto.png, front/NNN.yaml: run one with `nncompress run`)")
    return 0


def _yaml_key(name: str) -> str:
    """A module name as a YAML key, quoted unless plain (`0` or `0.1` would read as numbers).

    >>> _yaml_key("features.conv1"), _yaml_key("0")
    ('features.conv1', '"0"')
    """
    plain = name[:1].isalpha() and name.replace(".", "").replace("_", "").isalnum()
    return name if plain else f'"{name}"'


def _export(args: argparse.Namespace) -> int:
    from .core import model_source
    from .export.hf import save_compressed_tensors, save_hf, save_sentence_transformers
    from .saving import load
    from .zoo.hf import load_hf_tokenizer
    model = load(args.model_dir, trust_code=args.trust_code)
    if args.format == "onnx-nbits":
        from .export.hf import token_inputs
        from .export.onnx_nbits import export_nbits_onnx
        from .zoo.models import example_input
        if args.out.exists():
            from .core.errors import NNCompressError
            raise NNCompressError(f"{args.out} exists; choose another --out")
        hf = hasattr(model, "model") and hasattr(getattr(model, "model"), "config")
        inputs = token_inputs(model) if hf else example_input(model, batch=2)
        print(f"wrote {export_nbits_onnx(model, inputs, args.out)} (run in ONNX Runtime: same outputs)")
        return 0
    if args.format in ("hf", "compressed-tensors"):
        save = save_hf if args.format == "hf" else save_compressed_tensors
        print(f"wrote {save(model, args.out)} (reloaded by transformers: same outputs)")
        return 0
    base = str(model_source(model).get("name", ""))
    if not base.startswith("hf:"):
        from .core.errors import NNCompressError
        raise NNCompressError(f"{args.model_dir}: built from {base!r}, not a Hugging Face encoder (hf:...); "
                              "the sentence-transformers format needs its tokenizer")
    folder = save_sentence_transformers(model, args.out, load_hf_tokenizer(base[3:]))
    print(f"wrote {folder} (loaded by SentenceTransformer: same embeddings)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .core.errors import NNCompressError
    from .eval.report import Report
    from .recipe.runner import interrupted_note
    path = args.run_dir / "report.json" if args.run_dir.is_dir() else args.run_dir
    note = interrupted_note(args.run_dir)
    if note is not None and not path.is_file():
        raise NNCompressError(note)
    if not path.is_file():
        raise NNCompressError(f"{args.run_dir}: no report.json; point at a run directory written by `nncompress run`")
    text = path.read_text()
    print(text if args.json else Report.from_json(text).to_markdown())
    return 0


def _list() -> int:
    from . import zoo  # noqa: F401  (importing it registers the built-in models and data)
    from .core import lookup, names
    print("stage kinds:")
    for n in names("transform"):
        print(f"  {n:<20} {lookup(n).doc}")
    for space, title in (("model", "built-in models"), ("data", "built-in data")):
        print(f"{title}: {', '.join(names(space))}")
    print("also: model `module:factory`, `hf:minilm`, `hf:/path/to/folder`; data `module:factory`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
