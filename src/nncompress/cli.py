"""The `nncompress` command: parses arguments, prints, sets exit codes; nothing else.

Exit codes: 0 success; 2 a user error (bad recipe, file, data, model spec), printed as one line
(`--debug` shows the traceback); 1 an internal error (a bug: please report it with --debug output).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

EPILOG = """examples:
  nncompress demo                      train the MNIST-1D reference CNN, compress it, print the report
  nncompress run examples/finetune.yaml --out runs/ft
  nncompress report runs/ft            print a finished run's report again
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
    run.add_argument("recipe", type=Path, help="recipe YAML file")
    _run_options(run)
    run.add_argument("--check", action="store_true", help="only validate the recipe, run nothing")

    rep = sub.add_parser("report", help="print the report of a finished run",
                         description="Print a run directory's report table (from report.json).")
    rep.add_argument("run_dir", type=Path, help="a run directory written by `nncompress run`")
    rep.add_argument("--json", action="store_true", help="print the JSON report instead of the table")

    sub.add_parser("list", help="list registered stage kinds, built-in models and data sets",
                   description="List what recipes can name: stage kinds, models, data sets.")
    return p


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None, help="run directory to create (default runs/NAME-TIME)")
    p.add_argument("--cache", type=Path, default=None,
                   help="cache folder for data and pretrained weights (default ~/.cache/nncompress "
                        "or $NNCOMPRESS_CACHE)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage log")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("nncompress: interrupted", file=sys.stderr)
        return 130
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
    if args.command == "report":
        return _report(args)
    from .recipe import demo_recipe_path, load_recipe, run_recipe
    path = demo_recipe_path() if args.command == "demo" else args.recipe
    if args.command == "demo" and args.show_recipe:
        print(path.read_text())
        return 0
    recipe = load_recipe(path)
    if args.command == "run" and args.check:
        print(f"{path}: valid ({len(recipe.stages)} stages: {', '.join(s.config.kind for s in recipe.stages) or 'none'})")
        return 0
    log = (lambda msg: None) if args.quiet else (lambda msg: print(f"[nncompress] {msg}", file=sys.stderr))
    result = run_recipe(recipe, args.out, cache_dir=args.cache, progress=not args.quiet, log=log)
    print(result.report.to_markdown())
    print(f"\nrun directory: {result.path}  (model: {result.path / 'model'}, plot: {result.path / 'pareto.png'})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from .core.errors import NNCompressError
    from .eval.report import Report
    path = args.run_dir / "report.json" if args.run_dir.is_dir() else args.run_dir
    if not path.is_file():
        raise NNCompressError(f"{args.run_dir}: no report.json; point at a run directory written by `nncompress run`")
    text = path.read_text()
    print(text if args.json else Report.from_json(text).to_markdown())
    return 0


def _list() -> int:
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
