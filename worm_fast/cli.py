"""The ``worm-fast`` command: search, compare, sweep; and what backends this machine has.

Results go to ``--out`` after every epoch (results.json, epochs.csv, runs.csv, table.md)
and, when the runs finish, the figures; Ctrl-C keeps the finished epochs' results.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from worm_fast import backends, report
from worm_fast.data import DATASETS, DatasetNotFoundError
from worm_fast.experiments.pipeline import PRUNE_METHODS, RunConfig
from worm_fast.experiments.variants import (
    TABLE_I_TRUNCATIONS,
    compare_variants,
    run_variants,
    sweep_variants,
)
from worm_fast.masks import SCOPES
from worm_fast.models import MODELS
from worm_fast.search import MODES


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", choices=sorted(MODELS), default=defaults.model)
    data.add_argument(
        "--width",
        type=float,
        default=defaults.width,
        help="channel-width multiplier (smaller = faster)",
    )
    data.add_argument("--dataset", choices=DATASETS, default=defaults.dataset)
    data.add_argument("--data-dir", help="where on-disk datasets live (CIFAR-10)")
    data.add_argument("--train-subset", type=int, help="train on this many seeded samples")
    data.add_argument("--test-subset", type=int, help="evaluate on this many seeded samples")
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        dest="max_epochs",
        type=int,
        default=defaults.max_epochs,
        help="maximum search epochs (N of Algorithm 1)",
    )
    training.add_argument("--retrain-epochs", type=int, default=defaults.retrain_epochs)
    training.add_argument("--batch-size", type=int, default=defaults.batch_size)
    training.add_argument("--lr", type=float, default=defaults.lr)
    training.add_argument("--momentum", type=float, default=defaults.momentum)
    training.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    training.add_argument("--seed", type=int, default=defaults.seed)
    training.add_argument("--device", default=defaults.device)
    training.add_argument("--backend", choices=("auto", *backends.NAMES), default="auto")
    search = parser.add_argument_group("search (Algorithm 1)")
    search.add_argument("--prune-ratio", type=float, default=defaults.prune_ratio)
    search.add_argument("--stop-distance", type=float, default=defaults.stop_distance)
    search.add_argument("--window", type=int, default=defaults.window)
    search.add_argument("--trigger-margin", type=float, default=defaults.trigger_margin)
    search.add_argument("--truncation", type=float, default=defaults.truncation)
    search.add_argument("--scope", choices=SCOPES, default=defaults.scope)
    search.add_argument(
        "--prune",
        choices=PRUNE_METHODS,
        default=defaults.prune,
        help="apply the ticket as masks (the paper) or remove channels",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("runs/latest"), help="results directory")
    output.add_argument("--no-progress", action="store_true", help="no progress bars")
    output.add_argument("--no-plots", action="store_true")
    output.add_argument(
        "--carbon-intensity",
        type=float,
        help="grid g CO2eq/kWh: with --pue, emissions are reported",
    )
    output.add_argument("--pue", type=float, help="data-centre power usage effectiveness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worm-fast",
        description="Early-Bird lottery-ticket search with WORM gradient truncation.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    search = commands.add_parser("search", help="one search → prune → retrain run")
    _add_run_options(search)
    search.add_argument("--mode", choices=MODES, default="worm")
    compare = commands.add_parser("compare", help="EB Train vs WORM from identical starts")
    _add_run_options(compare)
    compare.add_argument("--runs", type=int, default=1, help="seeds to average over")
    compare.add_argument(
        "--with-truncate", action="store_true", help="also truncate from the first check"
    )
    sweep = commands.add_parser("sweep", help="truncation factors over the whole search (Table I)")
    _add_run_options(sweep)
    sweep.add_argument("--runs", type=int, default=1)
    sweep.add_argument("--truncations", type=float, nargs="+", default=list(TABLE_I_TRUNCATIONS))
    commands.add_parser("backends", help="which kernel backends run here, and why not")
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    return RunConfig(**{k: v for k, v in vars(args).items() if k in names and k != "mode"})


def _variants(args: argparse.Namespace) -> dict[str, dict]:
    if args.command == "search":
        return {args.mode: {"mode": args.mode}}
    if args.command == "compare":
        return compare_variants(with_truncate=args.with_truncate)
    return sweep_variants(args.truncations)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        for name, status in backends.available().items():
            print(f"{name:10s} {'yes' if status.available else 'no ':3s} {status.reason}")
        return 0
    try:
        config = _config(args)
    except ValueError as error:
        print(f"worm-fast: {error}", file=sys.stderr)
        return 2

    environment = report.environment()

    def save(document: dict) -> None:
        document["environment"] = environment
        report.write_results(args.out, document)

    try:
        document = run_variants(
            config, _variants(args), runs=getattr(args, "runs", 1), command=args.command,
            progress=not args.no_progress, on_update=save,
        )  # fmt: skip
    except DatasetNotFoundError as error:
        print(f"worm-fast: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: results of the finished epochs are in {args.out}/", file=sys.stderr)
        return 130
    save(document)
    if not args.no_plots:
        report.plot_mask_distances(document, args.out / "mask_distance.png")
        report.plot_losses(document, args.out / "loss.png")
    print(report.paper_table(document))
    print(report.profile_table(document))
    print(f"results: {args.out}/ (results.json, epochs.csv, runs.csv, phases.csv, table.md"
          + ("" if args.no_plots else ", mask_distance.png, loss.png") + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
