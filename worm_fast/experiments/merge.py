"""One experiment's seeds, run in several processes or on several machines, as one result.

``worm-fast compare --seed 0 --runs 3`` and ``--seed 3 --runs 2``, with otherwise equal
options, run the same per-seed work as ``--runs 5`` (each seed's variants start from the
weights and data order of that seed, whichever process runs them), so their results.json
documents join into the document of the whole experiment: the runs in seed order, the
summary recomputed over all of them. Documents that do not belong together (another
command, other variants, any setting but the seed) are refused, naming the difference.

A seed may appear in several documents. Its finished run supersedes unfinished attempts
(``running``: the process was killed; ``interrupted``), so a seed rerun elsewhere
replaces its broken attempt. Two finished runs of one seed and variant are one result
when every metric but the wall times agrees (the first is kept; the runs are
deterministic on one machine); if they differ they are refused, naming the metrics:
which one counts would be a choice the table hides.
"""

import json
from pathlib import Path

from worm_fast.experiments.variants import summarize

RESULTS_FILE = "results.json"
UNFINISHED = ("running", "interrupted")


class MergeError(ValueError):
    """Result folders that cannot be joined into one experiment."""


def load_document(folder: str | Path) -> dict:
    """The results document a ``worm-fast`` run (``compare``, ``sweep``, …) wrote in ``folder``."""
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        raise MergeError(
            f"{folder} has no {RESULTS_FILE}: expected a folder written by `worm-fast "
            "compare`, `sweep`, `value-masking`, `search` or `profile`"
        )
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise MergeError(f"{path} is not a readable results document: {error}") from error
    keys = ("command", "base_config", "variants", "runs")
    if not isinstance(document, dict) or any(key not in document for key in keys):
        raise MergeError(f"{path} is not a worm-fast results document (it needs {keys})")
    return document


def merge_documents(documents: list[dict], sources: list[str] | None = None) -> dict:
    """The results document of the experiment whose seeds ``documents`` hold between them.
    ``sources`` names each document (its folder) in errors and in ``merged_from``."""
    if len(documents) < 2:
        raise MergeError(f"merging needs at least two result folders, got {len(documents)}")
    sources = sources or [f"document {i}" for i in range(len(documents))]
    first, reference = documents[0], _shared_settings(documents[0])
    for document, source in zip(documents[1:], sources[1:], strict=True):
        settings = _shared_settings(document)
        if differing := _differing(reference, settings):
            details = ", ".join(f"{k}: {reference.get(k)!r} vs {settings.get(k)!r}"
                                for k in differing)  # fmt: skip
            raise MergeError(
                f"{source} is not the same experiment as {sources[0]} ({details}); only "
                "the seeds may differ"
            )
    order = list(first["variants"])
    runs = _one_run_per_seed(documents, sources)
    runs.sort(key=lambda run: (run["seed"], order.index(run["variant"])))
    base_seed = min(document["base_config"]["seed"] for document in documents)
    return {
        "command": first["command"],
        "base_config": {**first["base_config"], "seed": base_seed},
        "variants": first["variants"],
        "runs": runs,
        "summary": summarize(runs),
        "environment": first.get("environment", {}),
        "merged_from": list(map(_origin, documents, sources)),
    }


def _origin(document: dict, source: str) -> dict:
    seeds = sorted({run["seed"] for run in document["runs"]})
    return {"folder": source, "seeds": seeds, "environment": document.get("environment", {})}


def _shared_settings(document: dict) -> dict:
    """What must agree between the parts of one experiment: all but the seed."""
    config = {k: v for k, v in document["base_config"].items() if k != "seed"}
    return {"command": document["command"], "variants": document["variants"], **config}


def _one_run_per_seed(documents: list[dict], sources: list[str]) -> list[dict]:
    chosen: dict[tuple[str, int], tuple[dict, str]] = {}
    for document, source in zip(documents, sources, strict=True):
        for run in document["runs"]:
            key = (run["variant"], run["seed"])
            if key not in chosen or chosen[key][0]["status"] in UNFINISHED:
                chosen[key] = (run, source)
            elif run["status"] not in UNFINISHED:
                kept, kept_source = chosen[key]
                if differing := _differing(_timeless(kept), _timeless(run)):
                    raise MergeError(
                        f"{run['variant']!r} seed {run['seed']} finished in both {kept_source} "
                        f"and {source} with different results ({', '.join(differing)}): "
                        "keep one of them"
                    )
    return [run for run, _ in chosen.values()]


def _differing(ours: dict, theirs: dict) -> list[str]:
    """The keys whose values differ between two dicts (or that only one has)."""
    return sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))


def _timeless(run: dict) -> dict:
    """What two runs of one seed must share: the status and every metric but wall times."""
    metrics = {k: v for k, v in run.get("metrics", {}).items() if "seconds" not in k}
    return {"status": run["status"], **metrics}
