"""The ``worm-fast`` command: search, compare, sweep, value-masking; and what backends
this machine has.

A run trains a CNN on an image dataset (``--dataset``, default MNIST), or fine-tunes a
pretrained transformer on a text task (``--task rt-polarity | sst2 | mrpc | rte``; the
embedded all-MiniLM-L6-v2 unless ``--model-path``). Results go to ``--out`` after every
epoch (results.json, epochs.csv, runs.csv, table.md) and, when the runs finish, the
figures; Ctrl-C keeps the finished epochs' results.

Bad input is refused before any training, with a ``worm-fast: …`` message and exit
status 2: every option's range, the device and backend, the output folder (one run
writes a folder at a time), and settings the model cannot satisfy (a representative
pattern that matches nothing). A run whose training diverges stops with status 1, its
results marked ``failed``.
"""

import argparse
import math
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from worm_fast import backends
from worm_fast.experiments import report
from worm_fast.experiments.config import (
    CNN_DEFAULTS,
    OPTIMIZERS,
    PRUNE_METHODS,
    TEXT_DEFAULTS,
    RunConfig,
)
from worm_fast.experiments.data import DATASETS, TEXT_TASKS, DatasetNotFoundError
from worm_fast.experiments.models import EMBEDDED_MODEL, MODELS, ModelNotFoundError
from worm_fast.experiments.pipeline import SetupError
from worm_fast.experiments.variants import (
    TABLE_I_TRUNCATIONS,
    compare_variants,
    run_variants,
    sweep_variants,
    value_masking_variants,
)
from worm_fast.files import FolderInUseError, exclusive_folder
from worm_fast.masks import SCOPES, TIES
from worm_fast.representative import PRESETS
from worm_fast.search import MODES, NonFiniteError


def _by_kind(key: str) -> str:
    """Help text naming a default that depends on the kind of run."""
    return f"default: {CNN_DEFAULTS[key]} for CNNs, {TEXT_DEFAULTS[key]} for text tasks"


def _subset_size(text: str) -> int | str:
    return text if text == "all" else int(text)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    data = parser.add_argument_group(
        "model and data",
        "CNNs train from scratch on an image dataset (--dataset); text tasks (--task) "
        f"fine-tune the embedded {EMBEDDED_MODEL} or a local checkpoint (--model-path)",
    )
    data.add_argument(
        "--model", choices=sorted(MODELS), help=f"CNN (default: {CNN_DEFAULTS['model']})"
    )
    data.add_argument(
        "--width",
        type=float,
        default=defaults.width,
        help="channel-width multiplier (smaller = faster)",
    )
    data.add_argument("--dataset", choices=DATASETS, help="image dataset (default: mnist)")
    data.add_argument(
        "--task",
        choices=list(TEXT_TASKS),
        help="text task: rt-polarity is embedded; sst2, mrpc and rte are GLUE's TSV files "
        "under --data-dir (DIR/SST-2/train.tsv, dev.tsv; DIR/MRPC/…; DIR/RTE/…)",
    )
    data.add_argument(
        "--model-path",
        help=f"text: a local Hugging Face checkpoint directory (default: {EMBEDDED_MODEL}, "
        "embedded), e.g. one holding bert-base-uncased",
    )
    data.add_argument("--data-dir", help="where on-disk datasets live (CIFAR-10, GLUE)")
    data.add_argument(
        "--train-subset",
        type=_subset_size,
        help="train on this many seeded samples, or 'all' (default: all; rt-polarity: "
        f"{TEXT_TASKS['rt-polarity'].default_train_subset})",
    )
    data.add_argument("--test-subset", type=int, help="evaluate on this many seeded samples")
    data.add_argument(
        "--max-length",
        type=int,
        default=defaults.max_length,
        help="text: tokens per sequence after truncation (default: %(default)s)",
    )
    training = parser.add_argument_group("training")
    training.add_argument(
        "--epochs",
        dest="max_epochs",
        type=int,
        help=f"maximum search epochs (N of Algorithm 1; {_by_kind('max_epochs')})",
    )
    training.add_argument("--retrain-epochs", type=int, help=_by_kind("retrain_epochs"))
    training.add_argument("--batch-size", type=int, help=_by_kind("batch_size"))
    training.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help=f"WormSGD or WormAdamW ({_by_kind('optimizer')})",
    )
    training.add_argument("--lr", type=float, help=f"held constant ({_by_kind('lr')})")
    training.add_argument("--momentum", type=float, default=defaults.momentum, help="SGD only")
    training.add_argument("--weight-decay", type=float, help=_by_kind("weight_decay"))
    training.add_argument("--seed", type=int, default=defaults.seed)
    training.add_argument("--device", default=defaults.device)
    training.add_argument("--backend", choices=("auto", *backends.NAMES), default="auto")
    search = parser.add_argument_group("search (Algorithm 1)")
    search.add_argument("--prune-ratio", type=float, default=defaults.prune_ratio)
    search.add_argument("--stop-distance", type=float, help=_by_kind("stop_distance"))
    search.add_argument("--window", type=int, help=_by_kind("window"))
    search.add_argument("--trigger-margin", type=float, help=_by_kind("trigger_margin"))
    search.add_argument("--truncation", type=float, default=defaults.truncation)
    search.add_argument("--scope", choices=SCOPES, default=defaults.scope)
    search.add_argument(
        "--ties",
        choices=TIES,
        default=defaults.ties,
        help="weights equal to the threshold: all pruned (early_bird, the original rule) or "
        "exactly the prune ratio pruned, by index (exact)",
    )
    search.add_argument(
        "--representative",
        nargs="+",
        metavar="PRESET_OR_PATTERN",
        help=f"a preset ({', '.join(PRESETS)}) or parameter-name patterns, e.g. "
        f"'*.query.weight' ({_by_kind('representative')})",
    )
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
    profile = commands.add_parser(
        "profile", help="one search → prune → retrain run with the full per-phase report"
    )
    _add_run_options(profile)
    profile.add_argument("--mode", choices=MODES, default="worm")
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
    value_masking = commands.add_parser(
        "value-masking",
        help="attention query/key vs query/key/value as representative layers (Table V)",
        description="Runs the search twice from identical starts: with the query and key "
        "projections as representative layers, and with value too (the paper's Table V; "
        "default task rt-polarity).",
    )
    _add_run_options(value_masking)
    value_masking.set_defaults(task="rt-polarity")
    value_masking.add_argument("--mode", choices=MODES, default="eb")
    value_masking.add_argument("--runs", type=int, default=1)
    commands.add_parser("backends", help="which kernel backends run here, and why not")
    return parser


def _config(args: argparse.Namespace) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in names and k != "mode"}
    representative = options.get("representative")
    if representative is not None and len(representative) == 1 and representative[0] in PRESETS:
        options["representative"] = representative[0]
    return RunConfig(**options)


def _variants(args: argparse.Namespace) -> dict[str, dict]:
    if args.command in ("search", "profile"):
        return {args.mode: {"mode": args.mode}}
    if args.command == "compare":
        return compare_variants(with_truncate=args.with_truncate)
    if args.command == "value-masking":
        return value_masking_variants(args.mode)
    return sweep_variants(args.truncations)


def _check_command_options(args: argparse.Namespace) -> None:
    """The options RunConfig does not hold: the number of runs, the swept factors."""
    runs = getattr(args, "runs", 1)
    if runs < 1:
        raise ValueError(f"--runs must be at least 1, got {runs}")
    for r in getattr(args, "truncations", ()):
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"--truncations must be in [0, 1], got {r}")


def _check_out(out: Path) -> None:
    """``out`` is (or can become) a folder this process can write files in."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise ValueError(f"--out {out} cannot hold the results: {error}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        for name, status in backends.available().items():
            print(f"{name:10s} {'yes' if status.available else 'no ':3s} {status.reason}")
        return 0
    try:
        config = _config(args)
        _check_command_options(args)
        _check_out(args.out)
    except ValueError as error:
        return _refuse(error)
    try:
        with exclusive_folder(args.out):
            return _run(args, config)
    except FolderInUseError as error:
        return _refuse(error)


def _refuse(error: Exception) -> int:
    print(f"worm-fast: {error}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace, config: RunConfig) -> int:
    environment = report.environment()

    def save(document: dict) -> None:
        document["environment"] = environment
        report.write_results(args.out, document)

    try:
        document = run_variants(
            config, _variants(args), runs=getattr(args, "runs", 1), command=args.command,
            progress=not args.no_progress, on_update=save,
        )  # fmt: skip
    except (DatasetNotFoundError, ModelNotFoundError, SetupError) as error:
        return _refuse(error)
    except NonFiniteError as error:
        print(f"worm-fast: run failed: {error}", file=sys.stderr)
        print(f"results so far, marked failed, are in {args.out}/", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted: results of the finished epochs are in {args.out}/", file=sys.stderr)
        return 130
    save(document)
    if not args.no_plots:
        report.plot_mask_distances(document, args.out / "mask_distance.png")
        report.plot_losses(document, args.out / "loss.png")
    print(report.paper_table(document))
    if args.command == "profile":
        print(report.full_profile(document["runs"][0]["profile"]))
    else:
        print(report.profile_table(document))
    print(f"results: {args.out}/ (results.json, epochs.csv, runs.csv, phases.csv, table.md"
          + ("" if args.no_plots else ", mask_distance.png, loss.png") + ")")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
