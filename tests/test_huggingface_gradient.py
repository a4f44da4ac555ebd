"""WORM-gradient in a Hugging Face Trainer: WormTrainer adds the callback's penalty to the
training loss (a callback alone cannot change the loss)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.test_huggingface import BATCH, synthetic_examples, tiny_bert  # noqa: E402
from worm_fast.integrations.huggingface import WormCallback, WormTrainer  # noqa: E402


def train(tmp_path, callback, trainer_class):
    args = transformers.TrainingArguments(
        str(tmp_path / "trainer"), num_train_epochs=3, per_device_train_batch_size=BATCH,
        learning_rate=1e-3, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    model = tiny_bert()
    trainer = trainer_class(model=model, args=args, train_dataset=synthetic_examples(),
                            callbacks=[callback])  # fmt: skip
    trainer.train()
    return model


def test_worm_trainer_adds_the_penalty_after_the_first_check(tmp_path):
    settings = dict(stop_distance=1e-9, window=3, representative="attention")
    penalized = WormCallback(mode="gradient", distance_weight=50.0, **settings)
    model = train(tmp_path / "a", penalized, WormTrainer)
    assert len(penalized.checks) == 3
    # The same run without the penalty: identical until the first check, then not.
    plain = WormCallback(mode="gradient", distance_weight=0.0, duration_weight=0.0, **settings)
    reference = train(tmp_path / "b", plain, WormTrainer)
    assert penalized.checks[0]["d_max"] is None
    names = list(penalized.search.params)
    weights = dict(model.named_parameters())
    reference_weights = dict(reference.named_parameters())
    assert any(not torch.equal(weights[n], reference_weights[n]) for n in names)


def test_worm_trainer_is_a_plain_trainer_in_other_modes(tmp_path):
    callback = WormCallback(mode="eb", stop_distance=1e-9, window=3)
    model = train(tmp_path / "a", callback, WormTrainer)
    plain = train(tmp_path / "b", WormCallback(mode="eb", stop_distance=1e-9, window=3),
                  transformers.Trainer)  # fmt: skip
    for (name, a), (_, b) in zip(model.named_parameters(), plain.named_parameters()):
        assert torch.equal(a, b), name
    assert callback.penalty() == 0.0


def test_rl_mode_is_refused_with_a_reason():
    with pytest.raises(ValueError, match="mode 'rl' needs the training loss"):
        WormCallback(mode="rl")
