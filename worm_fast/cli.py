"""The ``worm-fast`` command: search, compare, sweep, value-masking; WORM-RL's ``rl
record`` and ``rl train``; ``merge``, one experiment's seeds run in several processes;
and what backends this machine has.

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

Under ``torchrun --nproc-per-node N`` (``search``, ``profile``, ``compare``, ``sweep``,
``value-masking``) every rank runs the command on its part of the data, training in
DistributedDataParallel (:mod:`worm_fast.experiments.parallel`); the ranks first check
that they were given the same options, and rank 0 alone holds ``--out``, writes the
results, draws progress bars and prints the tables. Errors are printed by every rank that
meets them, and every collective times out (``--collective-timeout``), so one failing
rank cannot leave the others waiting for ever.
"""

import argparse
import json
import math
import os
import sys
from contextlib import ExitStack
from dataclasses import fields, replace
from pathlib import Path

from worm_fast import backends
from worm_fast._checks import ADAMW_TRUNCATE
from worm_fast.experiments import report
from worm_fast.experiments.config import (
    CNN_DEFAULTS,
    COMMON_DEFAULTS,
    LR_SCHEDULES,
    OPTIMIZERS,
    PRUNE_METHODS,
    TEXT_DEFAULTS,
    RunConfig,
)
from worm_fast.experiments.data import DATASETS, TEXT_TASKS, DatasetNotFoundError
from worm_fast.experiments.merge import load_document, merge_documents
from worm_fast.experiments.models import EMBEDDED_MODEL, MODELS, ModelNotFoundError
from worm_fast.experiments.parallel import DEFAULT_TIMEOUT_SECONDS, SINGLE_PROCESS, DataParallel
from worm_fast.experiments.pipeline import SetupError
from worm_fast.experiments.presets import RUN_PRESETS
from worm_fast.experiments.variants import (
    TABLE_I_TRUNCATIONS,
    check_variants,
    compare_variants,
    run_variants,
    sweep_variants,
    value_masking_variants,
)
from worm_fast.files import FolderInUseError, atomic_write_text, exclusive_folder
from worm_fast.masks import SCOPES, TIES
from worm_fast.representative import PRESETS
from worm_fast.rl.observation import ObservationLayout
from worm_fast.rl.policy import DEFAULT_STOP_PENALTY, DEFAULT_TIMESTEPS, PolicyError
from worm_fast.rl.session import DEFAULT_REWARD_STEPS, DEFAULT_VALIDATION_FRACTION
from worm_fast.search import FIRST_CHECKS, MODES, NonFiniteError


def _by_kind(key: str) -> str:
    """Help text naming a default that depends on the kind of run."""
    return f"default: {CNN_DEFAULTS[key]} for CNNs, {TEXT_DEFAULTS[key]} for text tasks"


def _subset_size(text: str) -> int | str:
    return text if text == "all" else int(text)


def _common(key: str) -> str:
    return f"default: {COMMON_DEFAULTS[key]}"


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    defaults = RunConfig()
    parser.add_argument(
        "--preset",
        choices=list(RUN_PRESETS),
        help="the paper's settings for a run, each sourced; options given explicitly "
        "override them. "
        + " ".join(
            f"{name}: {preset.describe()}.".replace("%", "%%")
            for name, preset in RUN_PRESETS.items()
        ),
    )
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
        help=f"text: tokens per sequence after truncation ({_common('max_length')})",
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
    training.add_argument("--lr", type=float, help=_by_kind("lr"))
    training.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="the learning rate held constant, or decayed linearly to 0 over each phase's "
        f"steps (search: --epochs, retraining: --retrain-epochs) ({_common('lr_schedule')})",
    )
    training.add_argument("--momentum", type=float, help=f"SGD only ({_common('momentum')})")
    training.add_argument(
        "--adamw-truncate",
        choices=ADAMW_TRUNCATE,
        default=defaults.adamw_truncate,
        help="adamw: truncation scales the Adam update of pruned weights (update, "
        "worm_fast's default) or their raw gradient (gradient, the paper's rule) "
        "(default: %(default)s)",
    )
    training.add_argument("--weight-decay", type=float, help=_by_kind("weight_decay"))
    training.add_argument("--seed", type=int, default=defaults.seed)
    training.add_argument("--device", default=defaults.device)
    training.add_argument("--backend", choices=("auto", *backends.NAMES), default="auto")
    search = parser.add_argument_group("search (Algorithm 1)")
    search.add_argument("--prune-ratio", type=float, help=_common("prune_ratio"))
    search.add_argument("--stop-distance", type=float, help=_by_kind("stop_distance"))
    search.add_argument("--window", type=int, help=_by_kind("window"))
    search.add_argument("--trigger-margin", type=float, help=_by_kind("trigger_margin"))
    search.add_argument("--truncation", type=float, help=_common("truncation"))
    search.add_argument(
        "--first-check",
        choices=FIRST_CHECKS,
        help="when the first mask is taken: after the first trained epoch (epoch), or on "
        "the untrained initialization, as the Early-Bird code does (init; the window is "
        f"full one epoch sooner); epochs count trained epochs either way "
        f"({_common('first_check')}; the presets: init)",
    )
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
    proposal = parser.add_argument_group(
        "WORM-gradient and WORM-RL (--mode gradient | rl)",
        "gradient adds (distance-weight + duration-weight x checks) x the soft mask's "
        "distance to the window's masks to the loss; rl stops when a trained policy says so",
    )
    proposal.add_argument("--distance-weight", type=float, default=defaults.distance_weight,
                          help="λ_d (default: %(default)s)")  # fmt: skip
    proposal.add_argument("--duration-weight", type=float, default=defaults.duration_weight,
                          help="λ_T, added per check run (default: %(default)s)")  # fmt: skip
    proposal.add_argument(
        "--temperature", type=float, default=defaults.temperature,
        help="soft-mask width in units of the spread of |w|, > 0 (default: %(default)s)",
    )  # fmt: skip
    proposal.add_argument("--policy", help="rl: a policy file written by `worm-fast rl train`")
    search.add_argument(
        "--prune",
        choices=PRUNE_METHODS,
        default=defaults.prune,
        help="apply the ticket as masks (the paper), remove channels, or not at all (none: "
        "the dense baseline on the same budget)",
    )
    search.add_argument(
        "--restore-target",
        metavar="relative:F|absolute:A",
        help="restoration epochs are counted until the test accuracy reaches F x the "
        "pre-pruned accuracy (relative:0.9) or A %% (absolute:90, what the paper's "
        f"Tables II/III fit); both 90 %% counts are in every runs.csv "
        f"({_common('restore_target')})",
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
    ranks = parser.add_argument_group(
        "under torchrun",
        "`torchrun --nproc-per-node N -m worm_fast.cli ...` runs N data-parallel ranks "
        "(DistributedDataParallel; gloo on the CPU, NCCL with --device cuda, one GPU per "
        "rank): --batch-size is the global batch, split evenly over the ranks; rank 0 "
        "writes the results",
    )
    ranks.add_argument(
        "--collective-timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
        help="how long a rank waits for the others at a collective before it fails "
        "(default: %(default)s)",
    )  # fmt: skip


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
    compare = commands.add_parser(
        "compare",
        help="search modes (EB Train, WORM, WORM-gradient, WORM-RL) from identical starts",
    )
    _add_run_options(compare)
    compare.add_argument("--runs", type=int, default=1, help="seeds to average over")
    compare.add_argument(
        "--modes", type=_modes, default=("eb", "worm"),
        help=f"comma-separated modes to compare, of {','.join(MODES)} (default: eb,worm)",
    )  # fmt: skip
    compare.add_argument(
        "--with-truncate", action="store_true", help="also truncate from the first check"
    )
    compare.add_argument(
        "--with-dense",
        action="store_true",
        help="also the dense baseline (Table IV): EB Train's search sets the budget, "
        "nothing is pruned, the same retraining follows",
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
    _add_rl_commands(commands)
    merge = commands.add_parser(
        "merge",
        help="join result folders holding different seeds of one experiment",
        description="Joins the results of one experiment whose seeds were run by several "
        "commands (`compare --seed 0 --runs 3` and `--seed 3 --runs 2`, otherwise equal "
        "options) into one folder: every file and table that a single run over all the "
        "seeds writes. Folders that differ in anything but the seed are refused.",
    )
    merge.add_argument("folders", type=Path, nargs="+", help="result folders to join")
    merge.add_argument("--out", type=Path, required=True, help="the joined results' folder")
    merge.add_argument("--no-plots", action="store_true")
    commands.add_parser("backends", help="which kernel backends run here, and why not")
    return parser


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(mode.strip() for mode in text.split(",") if mode.strip())
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"unknown modes {unknown}; choose from {','.join(MODES)}")
    return modes


def _add_rl_commands(commands) -> None:
    rl = commands.add_parser(
        "rl", help="WORM-RL: record search trajectories, train a stopping policy (DQN)"
    )
    steps = rl.add_subparsers(dest="rl_command", required=True)
    record = steps.add_parser(
        "record",
        help="run searches to their last epoch, measuring every check's ticket",
        description="For each seed, trains the search for all its epochs (never stopping) on "
        "the training data minus a validation split, and after every check measures the "
        "validation accuracy of the pruned candidate after a short retraining; writes "
        "OUT/trajectory-seed<N>.json. Use seeds you will not evaluate on.",
    )
    _add_run_options(record)
    record.set_defaults(out=Path("runs/rl-trajectories"))
    record.add_argument("--runs", type=int, default=1, help="seeds to record (--seed, +1, …)")
    record.add_argument(
        "--reward-steps", type=int, default=DEFAULT_REWARD_STEPS,
        help="retraining steps before a ticket is scored (default: %(default)s)",
    )  # fmt: skip
    record.add_argument(
        "--validation-fraction", type=float, default=DEFAULT_VALIDATION_FRACTION,
        help="share of the training data held out to score tickets (default: %(default)s)",
    )  # fmt: skip
    train = steps.add_parser(
        "train",
        help="train a DQN stopping policy on recorded trajectories; evaluate on held-out seeds",
    )
    train.add_argument("--trajectories", type=Path, required=True,
                       help="the directory `worm-fast rl record` wrote")  # fmt: skip
    train.add_argument(
        "--holdout-seeds", type=int, nargs="+", required=True,
        help="seeds whose trajectories are only evaluated on, never trained on",
    )  # fmt: skip
    train.add_argument("--out", type=Path, default=Path("runs/rl-policy.zip"),
                       help="the policy file (an SB3 zip; default: %(default)s)")  # fmt: skip
    train.add_argument("--timesteps", type=int, default=DEFAULT_TIMESTEPS)
    train.add_argument(
        "--stop-penalty", type=float, default=DEFAULT_STOP_PENALTY,
        help="λ: reward = ticket accuracy - λ x epochs used / max epochs (default: %(default)s)",
    )  # fmt: skip
    train.add_argument(
        "--history", type=int, default=ObservationLayout.history,
        help="checks of d_max / d_avg the policy sees (default: %(default)s)",
    )  # fmt: skip
    train.add_argument("--seed", type=int, default=0, help="DQN's seed")


def _config(args: argparse.Namespace, parallel: DataParallel = SINGLE_PROCESS) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    options = {k: v for k, v in vars(args).items() if k in names and k != "mode"}
    options["device"] = parallel.device(options["device"])
    representative = options.get("representative")
    if representative is not None and len(representative) == 1 and representative[0] in PRESETS:
        options["representative"] = representative[0]
    return RunConfig(**options)


def _variants(args: argparse.Namespace) -> dict[str, dict]:
    if args.command in ("search", "profile"):
        return {args.mode: {"mode": args.mode}}
    if args.command == "compare":
        return compare_variants(
            with_truncate=args.with_truncate, with_dense=args.with_dense, modes=args.modes
        )
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
    timeout = args.collective_timeout
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"--collective-timeout must be a number of seconds > 0, got {timeout}")


def _check_out(out: Path) -> None:
    """``out`` is a folder this process can write files in, or one it can create (nothing
    is created here: a refused command leaves no trace)."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out} cannot hold the results: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot hold the results: {existing} is not writable")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "backends":
        for name, status in backends.available().items():
            print(f"{name:10s} {'yes' if status.available else 'no ':3s} {status.reason}")
        return 0
    try:
        parallel = DataParallel.from_environment()
        if parallel.launched and args.command == "rl":
            raise ValueError(
                f"`worm-fast rl {args.rl_command}` runs in one process: start it without torchrun"
            )
    except ValueError as error:
        return _refuse(error)
    if args.command == "rl" and args.rl_command == "train":
        return _rl_train(args)
    if args.command == "merge":
        return _merge(args)
    try:
        config = _config(args, parallel)
        parallel.per_rank_batch(config.batch_size)
        _check_command_options(args)
        variants = {} if args.command == "rl" else _variants(args)
        check_variants(config, variants, runs=getattr(args, "runs", 1))
    except ValueError as error:
        return _refuse(error, parallel)
    with parallel.process_group(config.device, timeout=args.collective_timeout):
        try:
            parallel.check_same_everywhere("command line", vars(args))
        except ValueError as error:
            return _refuse(error, parallel)
        return _run_in_folder(args, config, variants, parallel)


def _refuse(error: Exception | str, parallel: DataParallel = SINGLE_PROCESS) -> int:
    print(f"{_speaker(parallel)}: {error}", file=sys.stderr)
    return 2


def _speaker(parallel: DataParallel) -> str:
    """``worm-fast``, and under torchrun which rank speaks."""
    if not parallel.launched:
        return "worm-fast"
    return f"worm-fast (rank {parallel.rank} of {parallel.world_size})"


def _run_in_folder(
    args: argparse.Namespace, config: RunConfig, variants: dict[str, dict], parallel: DataParallel
) -> int:
    """Run with ``--out`` held by rank 0, the one that writes it; when rank 0 cannot
    hold it, every rank refuses."""
    with ExitStack() as folder:
        refusal = None
        if parallel.is_main:
            try:
                _check_out(args.out)
                folder.enter_context(exclusive_folder(args.out))
            except (ValueError, FolderInUseError) as error:
                refusal = str(error)
        refusal = parallel.gather(refusal)[0]  # rank 0's verdict, on every rank
        if refusal is not None:
            return _refuse(refusal, parallel)
        return _run(args, config, variants, parallel)


def _run(
    args: argparse.Namespace, config: RunConfig, variants: dict[str, dict], parallel: DataParallel
) -> int:
    environment = {**report.environment(), "data_parallel": parallel.describe()}

    def save(document: dict) -> None:
        document["environment"] = environment
        report.write_results(args.out, document)

    if args.command == "rl":
        return _rl_record(args, config)
    try:
        document = run_variants(
            config, variants, runs=getattr(args, "runs", 1), command=args.command,
            progress=parallel.is_main and not args.no_progress,
            on_update=save if parallel.is_main else None, parallel=parallel,
        )  # fmt: skip
    except (DatasetNotFoundError, ModelNotFoundError, SetupError, PolicyError) as error:
        return _refuse(error, parallel)
    except NonFiniteError as error:
        print(f"{_speaker(parallel)}: run failed: {error}", file=sys.stderr)
        if parallel.is_main:
            print(f"results so far, marked failed, are in {args.out}/", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if parallel.is_main:
            print(f"\ninterrupted: results of the finished epochs are in {args.out}/",
                  file=sys.stderr)  # fmt: skip
        return 130
    if not parallel.is_main:
        return 0
    save(document)
    _print_report(args, document)
    return 0


def _print_report(args: argparse.Namespace, document: dict) -> None:
    """The figures, and the tables on stdout, of a finished results document."""
    if not args.no_plots:
        report.plot_mask_distances(document, args.out / "mask_distance.png")
        report.plot_losses(document, args.out / "loss.png")
    print(report.paper_table(document))
    if effects := report.paired_effects(document):
        print(effects)
    if args.command == "profile":
        print(report.full_profile(document["runs"][0]["profile"]))
    else:
        print(report.profile_table(document))
    print(f"results: {args.out}/ (results.json, epochs.csv, runs.csv, summary.csv, phases.csv, "
          "table.md"
          + ("" if args.no_plots else ", mask_distance.png, loss.png") + ")")  # fmt: skip


def _merge(args: argparse.Namespace) -> int:
    try:
        if args.out.resolve() in {folder.resolve() for folder in args.folders}:
            raise ValueError(f"--out {args.out} is one of the folders to join: choose a new one")
        sources = [str(folder) for folder in args.folders]
        document = merge_documents([load_document(f) for f in args.folders], sources)
        _check_out(args.out)
        with exclusive_folder(args.out):
            report.write_results(args.out, document)
            _print_report(args, document)
    except (ValueError, FolderInUseError) as error:
        return _refuse(error)
    return 0


def _rl_record(args: argparse.Namespace, config: RunConfig) -> int:
    from worm_fast.rl.record import record, trajectory_path

    for seed in range(config.seed, config.seed + args.runs):
        try:
            trajectory = record(
                replace(config, seed=seed), validation_fraction=args.validation_fraction,
                reward_steps=args.reward_steps, progress=not args.no_progress,
            )  # fmt: skip
        except (DatasetNotFoundError, ModelNotFoundError, ValueError) as error:
            print(f"worm-fast: {error}", file=sys.stderr)
            return 2
        path = trajectory.save(trajectory_path(args.out, seed))
        best = max(trajectory.ticket_accuracy)
        print(f"seed {seed}: {len(trajectory.features)} checks, EB's rule stops at check "
              f"{trajectory.eb_stop() + 1}, best ticket {best:.2f}% → {path}")  # fmt: skip
    return 0


def _rl_train(args: argparse.Namespace) -> int:
    try:
        from worm_fast.rl.record import load_trajectories
        from worm_fast.rl.train import evaluate, train_on_trajectories

        trajectories = load_trajectories(args.trajectories)
        held = set(args.holdout_seeds)
        missing = held - {t.seed for t in trajectories}
        training = [t for t in trajectories if t.seed not in held]
        if missing or not training:
            raise ValueError(
                f"held-out seeds {sorted(missing)} have no trajectory in {args.trajectories}"
                if missing else "every trajectory is held out: none is left to train on"
            )  # fmt: skip
        policy = train_on_trajectories(
            training, layout=ObservationLayout(args.history), stop_penalty=args.stop_penalty,
            timesteps=args.timesteps, seed=args.seed,
        )  # fmt: skip
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"worm-fast: {error}", file=sys.stderr)
        return 2
    path = policy.save(args.out)
    rows = evaluate(policy, [t for t in trajectories if t.seed in held], args.stop_penalty)
    report_path = path.with_suffix(".eval.json")
    evaluation = {"held_out": rows, "training_seeds": list(policy.training_seeds),
                  "stop_penalty": args.stop_penalty}  # fmt: skip
    atomic_write_text(report_path, json.dumps(evaluation, indent=1))
    print(report.rl_evaluation_table(rows))
    print(f"policy: {path} (trained on seeds {sorted(policy.training_seeds)}); "
          f"held-out evaluation: {report_path}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
