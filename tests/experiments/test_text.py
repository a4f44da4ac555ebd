"""Text tasks end to end: the embedded Rotten Tomatoes data, GLUE from disk, local
checkpoints, text run configs, EB vs WORM and Q/K vs Q/K/V runs, and the CLI."""

import json

import pytest
import torch

from worm_fast import cli
from worm_fast.experiments import RunConfig, run_variants
from worm_fast.experiments.data import DatasetNotFoundError, TokenizedText, load_text_task
from worm_fast.experiments.data.text import TEXT_TASKS, TextExample
from worm_fast.experiments.models import EMBEDDED_MODEL, ModelNotFoundError, load_tokenizer
from worm_fast.experiments.variants import compare_variants, value_masking_variants
from worm_fast.experiments.workloads import build_workload

transformers = pytest.importorskip("transformers")

# A few seconds per variant: a 2-layer BERT of width 32 with MiniLM's tokenizer.
TINY_RUN = dict(
    task="rt-polarity", train_subset=48, test_subset=32, max_length=32, batch_size=16,
    max_epochs=2, window=2, retrain_epochs=1, lr=1e-3,
)  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return load_tokenizer()
    except ModelNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A local Hugging Face checkpoint directory, as --model-path takes one."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# -- data --------------------------------------------------------------------------------


def test_rt_polarity_split_is_fixed_disjoint_and_labelled():
    train, dev, task = load_text_task("rt-polarity")
    assert task.num_classes == 2 and not task.sentence_pair
    assert 11_000 < len(train) < 12_000 and len(dev) == pytest.approx(len(train) / 9, rel=0.01)
    texts = {example.text for example in train}
    assert not texts & {example.text for example in dev}
    assert {example.label for example in train} == {0, 1}
    assert all(example.pair is None and example.text for example in train)
    # Plot summaries (category "plot", several sentences long) are dropped.
    assert max(len(example.text.split()) for example in train) < 150
    again, _, _ = load_text_task("rt-polarity")
    assert again == train


def write_glue(root, folder: str, header: list[str], rows: list[list[str]]) -> None:
    (root / folder).mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(header), *("\t".join(row) for row in rows)]
    for split in ("train", "dev"):
        (root / folder / f"{split}.tsv").write_text("\n".join(lines) + "\n")


def test_glue_tasks_read_sentences_pairs_and_labels(tmp_path):
    write_glue(tmp_path, "SST-2", ["sentence", "label"], [['a "fine" film', "1"], ["dull", "0"]])
    write_glue(
        tmp_path, "MRPC", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
        [["1", "7", "8", "He said so.", "So he said."]],
    )  # fmt: skip
    write_glue(
        tmp_path, "RTE", ["index", "sentence1", "sentence2", "label"],
        [["0", "A cat sat.", "An animal sat.", "entailment"],
         ["1", "A cat sat.", "A dog ran.", "not_entailment"]],
    )  # fmt: skip
    sst2, _, task = load_text_task("sst2", data_dir=tmp_path)
    assert sst2 == [TextExample('a "fine" film', None, 1), TextExample("dull", None, 0)]
    mrpc, _, task = load_text_task("mrpc", data_dir=tmp_path)
    assert task.sentence_pair and mrpc == [TextExample("He said so.", "So he said.", 1)]
    rte, dev, _ = load_text_task("rte", data_dir=tmp_path)
    assert [example.label for example in rte] == [0, 1] and dev == rte


def test_glue_missing_or_malformed_says_what_to_put_where(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"nope/RTE/train\.tsv.*sentence1, sentence2"):
        load_text_task("rte", data_dir=tmp_path / "nope")
    with pytest.raises(DatasetNotFoundError, match=r"no data directory.*DIR/SST-2/train\.tsv"):
        load_text_task("sst2")
    write_glue(tmp_path, "SST-2", ["text", "label"], [["good", "1"]])
    with pytest.raises(DatasetNotFoundError, match="has no column sentence"):
        load_text_task("sst2", data_dir=tmp_path)
    write_glue(tmp_path, "SST-2", ["sentence", "label"], [["good", "positive"]])
    with pytest.raises(ValueError, match=r"line 2: label 'positive' is not one of \('0', '1'\)"):
        load_text_task("sst2", data_dir=tmp_path)


def test_tokenized_pairs_truncate_and_pad_per_batch(tokenizer):
    examples = [
        TextExample("the first sentence", "and its pair", 1),
        TextExample("word " * 50, "another " * 50, 0),
    ]
    dataset = TokenizedText(examples, tokenizer, max_length=16)
    first, second = dataset[0], dataset[1]
    assert first["labels"] == 1 and len(second["input_ids"]) == 16
    assert 1 in first["token_type_ids"]  # the pair is encoded as the second segment
    batch = transformers.DataCollatorWithPadding(tokenizer)([first, second])
    assert batch["input_ids"].shape == (2, 16)  # padded to the longest, not to a fixed size
    assert batch["attention_mask"][0].sum() == len(first["input_ids"])
    assert batch["labels"].tolist() == [1, 0]


# -- models and configs ---------------------------------------------------------------------


def test_missing_checkpoint_says_what_a_checkpoint_holds(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"does not exist.*config\.json"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="lacks model weights"):
        load_tokenizer(tmp_path)


def test_text_configs_take_the_paper_transformer_defaults():
    text = RunConfig(task="rt-polarity")
    assert (text.stop_distance, text.window, text.trigger_margin) == (0.01, 3, 0.005)
    assert (text.representative, text.optimizer, text.model) == (
        "attention",
        "adamw",
        EMBEDDED_MODEL,
    )
    assert text.train_subset == TEXT_TASKS["rt-polarity"].default_train_subset
    assert RunConfig(task="sst2").train_subset == "all"
    cnn = RunConfig()
    assert (cnn.stop_distance, cnn.window, cnn.representative, cnn.optimizer) == (
        0.1, 5, "batchnorm", "sgd",
    )  # fmt: skip
    assert RunConfig(task="rte", stop_distance=0.02).stop_distance == 0.02


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(task="rt-polarity", model="resnet20"), "is a CNN; text tasks fine-tune"),
        (dict(task="rt-polarity", prune="structured"), "unstructured masks"),
        (dict(task="rt-polarity", dataset="mnist"), "either a text task or an image dataset"),
        (dict(model_path="/some/bert"), "--model-path"),
        (dict(task="cola"), "unknown task 'cola'"),
    ],
)
def test_text_config_errors(options, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**options)


# -- runs -------------------------------------------------------------------------------------


def test_text_workload_pads_batches_and_seeds_the_new_head(tiny_checkpoint):
    config = RunConfig(**TINY_RUN, model_path=tiny_checkpoint)
    first, again = build_workload(config), build_workload(config)
    other = build_workload(RunConfig(**{**TINY_RUN, "seed": 1}, model_path=tiny_checkpoint))
    head = "classifier.weight"
    assert torch.equal(first.model.state_dict()[head], again.model.state_dict()[head])
    assert not torch.equal(first.model.state_dict()[head], other.model.state_dict()[head])
    # The body is the checkpoint's, whatever the seed.
    body = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(first.model.state_dict()[body], other.model.state_dict()[body])
    batch = next(iter(first.train_loader))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= 32
    assert first.train_samples == 48 and first.eval_samples == 32


def test_compare_eb_and_worm_on_a_local_checkpoint(tiny_checkpoint):
    config = RunConfig(**TINY_RUN, model_path=tiny_checkpoint)
    document = run_variants(config, compare_variants())
    eb, worm = document["runs"]
    assert (eb["status"], worm["status"]) == ("complete", "complete")
    # Same head initialization and data order: identical until WORM's trigger can fire.
    assert eb["rows"][0]["batch_losses"] == worm["rows"][0]["batch_losses"]
    for entry in (eb, worm):
        metrics = entry["metrics"]
        assert metrics["accuracy_gain_1"] == pytest.approx(
            metrics["retrain_accuracy_1"] - metrics["pre_pruned_accuracy"]
        )
        assert metrics["ticket_density"] == pytest.approx(0.5, abs=1e-3)
        # Half of the 2 layers' query and key weights (32 x 32), give or take the threshold.
        pruned = metrics["params_before"] - metrics["params_after"]
        assert abs(pruned - 2 * 2 * 32 * 32 // 2) <= 1
    phases = {row["phase"]: row for row in eb["profile"]["phases"]}
    assert phases["search"]["model_flops"] > 0


def test_value_masking_prunes_value_weights_too(tiny_checkpoint):
    config = RunConfig(**{**TINY_RUN, "retrain_epochs": 0}, model_path=tiny_checkpoint)
    document = run_variants(config, value_masking_variants("eb"))
    qk, qkv = (entry["metrics"] for entry in document["runs"])
    pruned = {
        label: m["params_before"] - m["params_after"] for label, m in (("qk", qk), ("qkv", qkv))
    }
    assert pruned["qkv"] == pruned["qk"] * 3 // 2


def test_cli_on_the_embedded_model_and_data(tmp_path, capsys):
    """``worm-fast search --task rt-polarity`` on a small slice, with all-MiniLM-L6-v2."""
    code = cli.main([
        "search", "--task", "rt-polarity", "--mode", "worm", "--train-subset", "32",
        "--test-subset", "16", "--max-length", "24", "--batch-size", "16", "--epochs", "2",
        "--window", "2", "--retrain-epochs", "1", "--no-progress", "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"| rt-polarity ({EMBEDDED_MODEL}) | worm |" in printed
    for row in ("Pre-Pruned Accuracy", "Epochs to Prune", "Pruned Accuracy",
                "Accuracy after 1 Epoch of Retraining", "Accuracy Gain after 1 Epoch",
                "Time to Prune and Re-train"):  # fmt: skip
        assert f"| {row} |" in printed
    document = json.loads((tmp_path / "results.json").read_text())
    (only,) = document["runs"]
    assert only["status"] == "complete" and only["config"]["representative"] == "attention"
    assert [row["phase"] for row in only["rows"]] == ["search", "search", "prune", "retrain"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_missing_glue_and_model_exit_with_what_to_do(tmp_path, capsys):
    code = cli.main(["compare", "--task", "mrpc", "--data-dir", str(tmp_path / "glue"),
                     "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "glue/MRPC/train.tsv" in capsys.readouterr().err
    code = cli.main(["compare", "--task", "rt-polarity", "--model-path", str(tmp_path / "bert"),
                     "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert "config.json" in capsys.readouterr().err
