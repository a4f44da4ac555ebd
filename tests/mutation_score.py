"""The mutation score of each module of the last ``make mutate`` (docs/mutation.md).

mutmut keeps each mutated file's results in ``mutants/<path>.meta`` (JSON, the exit code
of its tests per mutant). A mutant counts as killed when its tests failed, timed out or
crashed; the score of a module is killed / mutants tested. Mutants no test reaches count
as survivors; mutants not yet run are left out and counted apart.

    python -m tests.mutation_score [--survivors]
"""

import argparse
import json
import sys
from pathlib import Path

KILLED = {1, 3, 24, -24, 152, 255, 36, -11, -9}  # failed, pytest error, timeout, crash
NOT_RUN = {None, 2, 34}  # not checked yet, interrupted, skipped
SURVIVED = 0


def module_results(mutants: Path) -> dict[str, dict[str, int | None]]:
    """``{module path: {mutant name: exit code}}`` for every mutated file."""
    return {
        str(meta.relative_to(mutants)).removesuffix(".meta"): json.loads(meta.read_text())[
            "exit_code_by_key"
        ]
        for meta in sorted(mutants.rglob("*.py.meta"))
    }


def score_lines(results: dict[str, dict[str, int | None]], *, survivors: bool) -> list[str]:
    lines = [f"{'module':40} {'score':>7} {'killed':>7} {'tested':>7} {'not run':>8}"]
    totals = [0, 0, 0]
    for module, codes in results.items():
        tested = [code for code in codes.values() if code not in NOT_RUN]
        killed = sum(code in KILLED for code in tested)
        not_run = len(codes) - len(tested)
        score = f"{100 * killed / len(tested):6.1f}%" if tested else "    n/a"
        lines.append(f"{module:40} {score} {killed:7} {len(tested):7} {not_run:8}")
        totals = [totals[0] + killed, totals[1] + len(tested), totals[2] + not_run]
        if survivors:
            lines += [f"    {name} ({'no test reaches it' if code == 33 else code})"
                      for name, code in codes.items() if code not in NOT_RUN | KILLED]  # fmt: skip
    killed, tested, not_run = totals
    overall = f"{100 * killed / tested:6.1f}%" if tested else "    n/a"
    lines.append(f"{'all':40} {overall} {killed:7} {tested:7} {not_run:8}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", action="store_true", help="list each module's survivors")
    args = parser.parse_args(argv)
    results = module_results(args.mutants)
    if not results:
        print(f"no mutmut results under {args.mutants}/: run `make mutate` first", file=sys.stderr)
        return 2
    print("\n".join(score_lines(results, survivors=args.survivors)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
