"""`worm-fast rl record`, `rl train`, and the four searches compared from the CLI."""

import json

from tests.rl.conftest import TINY_ARGS
from worm_fast import cli


def test_record_train_and_compare_every_mode(tmp_path, capsys):
    recordings = tmp_path / "trajectories"
    assert cli.main(["rl", "record", *TINY_ARGS, "--seed", "100", "--runs", "3",
                     "--reward-steps", "2", "--out", str(recordings)]) == 0  # fmt: skip
    assert sorted(p.name for p in recordings.glob("trajectory-*")) == [
        f"trajectory-seed{seed}.json" for seed in (100, 101, 102)
    ]
    policy = tmp_path / "policy.zip"
    assert cli.main(["rl", "train", "--trajectories", str(recordings), "--holdout-seeds", "102",
                     "--timesteps", "200", "--out", str(policy)]) == 0  # fmt: skip
    evaluation = json.loads((tmp_path / "policy.eval.json").read_text())
    assert [row["seed"] for row in evaluation["held_out"]] == [102]
    assert evaluation["training_seeds"] == [100, 101]
    assert "EB rule check" in capsys.readouterr().out

    out = tmp_path / "compare"
    code = cli.main(["compare", *TINY_ARGS, "--modes", "eb,worm,gradient,rl", "--policy",
                     str(policy), "--out", str(out), "--no-plots"])  # fmt: skip
    assert code == 0
    document = json.loads((out / "results.json").read_text())
    assert [run["variant"] for run in document["runs"]] == [
        "EB Train", "WORM", "WORM-gradient", "WORM-RL",
    ]  # fmt: skip
    assert all(run["status"] == "complete" for run in document["runs"])
    assert all(run["metrics"]["total_flops"] > 0 for run in document["runs"])
    table = (out / "table.md").read_text()
    assert "| WORM-gradient |" in table and "| WORM-RL |" in table

    # The policy never plays on the seeds it was trained on.
    code = cli.main(["search", *TINY_ARGS, "--mode", "rl", "--policy", str(policy),
                     "--seed", "101", "--out", str(tmp_path / "seen")])  # fmt: skip
    assert code == 2 and "seeds [101] made trajectories" in capsys.readouterr().err


def test_bad_rl_and_gradient_options_fail_clearly(tmp_path, capsys):
    out = ["--out", str(tmp_path / "x")]
    assert cli.main(["search", *TINY_ARGS, "--mode", "rl", *out]) == 2
    assert "give the policy file (--policy PATH" in capsys.readouterr().err
    assert cli.main(["compare", *TINY_ARGS, "--modes", "eb,rl", *out]) == 2
    assert "give the policy file" in capsys.readouterr().err
    assert cli.main(["search", *TINY_ARGS, "--mode", "gradient", "--temperature", "0", *out]) == 2
    assert "temperature must be a number > 0" in capsys.readouterr().err
    junk = tmp_path / "junk.zip"
    junk.write_text("no")
    assert cli.main(["search", *TINY_ARGS, "--mode", "rl", "--policy", str(junk), *out]) == 2
    assert "not a stable-baselines3 DQN file" in capsys.readouterr().err
    assert cli.main(["rl", "train", "--trajectories", str(tmp_path), "--holdout-seeds", "1"]) == 2
    assert "no trajectory-seed*.json" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
