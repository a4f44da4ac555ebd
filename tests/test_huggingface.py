"""WormCallback in a real Trainer run on a tiny random BERT and a few dozen examples."""

import json

import pytest
import torch

from worm_fast import WormAdamW, prune
from worm_fast.representative import select

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from worm_fast.integrations.huggingface import WormCallback, load_ticket, worm_adamw  # noqa: E402

EXAMPLES, LENGTH, BATCH = 48, 8, 8  # 6 steps per epoch


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=99,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config)


def synthetic_examples():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 99, (EXAMPLES, LENGTH), generator=generator)
    labels = (ids[:, 0] > 50).long()
    mask = torch.ones(LENGTH, dtype=torch.long)
    return [dict(input_ids=ids[i], attention_mask=mask, labels=labels[i]) for i in range(EXAMPLES)]


def train(
    tmp_path, callback, *, epochs=4, lr=1e-3, worm_optimizer=True, save_strategy="no",
    resume_from=None,
):  # fmt: skip
    args = transformers.TrainingArguments(
        str(tmp_path / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=BATCH,
        learning_rate=lr, report_to="none", save_strategy=save_strategy,
        logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    model = tiny_bert()
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=synthetic_examples(), callbacks=[callback],
        optimizer_cls_and_kwargs=worm_adamw(args) if worm_optimizer else None,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=None if resume_from is None else str(resume_from))
    return trainer, model


def test_converged_ticket_stops_training_and_is_saved(tmp_path):
    # Window 2 and a distance nothing reaches: converges at the second check.
    callback = WormCallback(mode="worm", stop_distance=0.9, window=2, save_dir=tmp_path / "ticket")
    trainer, model = train(tmp_path, callback, epochs=5)
    assert callback.search.converged
    assert trainer.state.epoch == 2 and trainer.state.global_step == 2 * EXAMPLES // BATCH
    ticket = load_ticket(tmp_path / "ticket" / "ticket.pt")
    assert ticket.epoch == 2 and not (tmp_path / "ticket" / "candidate.pt").exists()
    masks = ticket.bool_masks()
    assert list(masks) == list(select(model, "attention"))
    for name, mask in masks.items():
        assert torch.equal(mask, callback.search.ticket.bool_masks()[name])
    prune.apply_unstructured(model, masks)  # the saved masks fit the model
    record = json.loads((tmp_path / "ticket" / "search.json").read_text())
    assert record["converged"] and [c["check"] for c in record["checks"]] == [1, 2]
    assert record["settings"]["representative"] == "attention"
    assert [c["global_step"] for c in record["checks"]] == [6, 12]


def test_unconverged_search_trains_every_epoch_and_saves_its_candidate(tmp_path):
    callback = WormCallback(mode="eb", stop_distance=1e-9, window=2, save_dir=tmp_path / "t")
    trainer, _ = train(tmp_path, callback, epochs=3, lr=1e-2, worm_optimizer=False)
    assert not callback.search.converged
    assert trainer.state.epoch == 3 and len(callback.checks) == 3
    assert all(check["d_max"] > 0 for check in callback.checks[1:])
    assert not (tmp_path / "t" / "ticket.pt").exists()
    assert load_ticket(tmp_path / "t" / "candidate.pt").epoch == 3


def test_truncate_mode_hands_masks_to_worm_adamw_every_k_steps(tmp_path):
    callback = WormCallback(mode="truncate", check_every_steps=4, stop_distance=1e-9)
    trainer, model = train(tmp_path, callback, epochs=2)
    assert [check["global_step"] for check in callback.checks] == [4, 8, 12]
    assert all(check["r"] == pytest.approx(3e-3) for check in callback.checks)
    optimizer = trainer.optimizer.optimizer  # accelerate wraps the Trainer's optimizer
    assert isinstance(optimizer, WormAdamW) and optimizer.truncation == pytest.approx(3e-3)
    truncated = {id(param) for param in optimizer.truncation_masks}
    assert truncated == {id(param) for param in select(model, "attention").values()}


def test_worm_adamw_takes_the_training_arguments(tmp_path):
    args = transformers.TrainingArguments(
        str(tmp_path), learning_rate=3e-5, adam_beta1=0.8, adam_epsilon=1e-7, weight_decay=0.1,
        report_to="none",
    )  # fmt: skip
    optimizer_class, kwargs = worm_adamw(args, amsgrad=True)
    assert optimizer_class is WormAdamW
    assert kwargs == dict(lr=3e-5, betas=(0.8, 0.999), eps=1e-7, weight_decay=0.1, amsgrad=True)


def test_truncating_modes_need_a_worm_optimizer(tmp_path):
    with pytest.raises(TypeError, match=r"optimizer_cls_and_kwargs=worm_adamw\(args\)"):
        train(tmp_path, WormCallback(mode="worm"), epochs=1, worm_optimizer=False)
    with pytest.raises(ValueError, match="check_every_steps must be a positive int"):
        WormCallback(check_every_steps=0)


def test_search_resumes_from_a_trainer_checkpoint_exactly(tmp_path):
    def callback():
        return WormCallback(mode="worm", stop_distance=1e-9, window=2, trigger_margin=1.0)

    uninterrupted = callback()
    train(tmp_path / "a", uninterrupted, epochs=4)

    first = callback()
    train(tmp_path / "b", first, epochs=4, save_strategy="epoch")
    checkpoint = tmp_path / "b" / "trainer" / "checkpoint-12"  # after epoch 2
    assert (checkpoint / "worm_search.pt").is_file()

    resumed = callback()
    trainer, _ = train(tmp_path / "b", resumed, epochs=4, resume_from=checkpoint)
    assert resumed.search.triggered_at is not None  # truncation was on when saved
    optimizer = trainer.optimizer.optimizer
    assert optimizer.truncation == pytest.approx(resumed.search.r)
    assert [c["global_step"] for c in resumed.checks] == [6, 12, 18, 24]
    for got, expected in zip(resumed.checks, uninterrupted.checks, strict=True):
        assert got == pytest.approx(expected)


def test_resuming_a_checkpoint_without_search_state_starts_afresh(tmp_path, caplog):
    train(tmp_path, WormCallback(mode="eb", stop_distance=1e-9), epochs=1, save_strategy="epoch")
    checkpoint = tmp_path / "trainer" / "checkpoint-6"
    (checkpoint / "worm_search.pt").unlink()
    resumed = WormCallback(mode="eb", stop_distance=1e-9)
    with caplog.at_level("WARNING"):
        train(tmp_path, resumed, epochs=2, resume_from=checkpoint)
    assert "starts afresh" in caplog.text
    assert [c["global_step"] for c in resumed.checks] == [12]


def test_first_check_init_checks_the_untrained_model_when_training_begins(tmp_path):
    callback = WormCallback(mode="eb", stop_distance=1e-9, window=2, first_check="init")
    train(tmp_path, callback, epochs=2)
    assert [c["global_step"] for c in callback.checks] == [0, 6, 12]
    assert [c["check"] for c in callback.checks] == [1, 2, 3]
    assert [record.epoch for record in callback.search.records] == [0, 1, 2]
    assert callback.checks[0]["d_max"] is None and callback.checks[1]["window_full"]
