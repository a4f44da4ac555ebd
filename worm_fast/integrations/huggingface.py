"""Early-Bird / WORM ticket search inside a Hugging Face ``Trainer`` run.

For example, on a tiny random BERT and random "sentences" (your model and dataset go
there)::

    import torch
    from transformers import BertConfig, BertForSequenceClassification
    from transformers import Trainer, TrainingArguments

    from worm_fast import prune
    from worm_fast.integrations.huggingface import WormCallback, load_ticket, worm_adamw

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=37)
    model = BertForSequenceClassification(config)
    train = [{"input_ids": torch.randint(1, 100, (8,)), "labels": i % 2} for i in range(32)]

    args = TrainingArguments("out", num_train_epochs=10, learning_rate=2e-5, report_to="none")
    trainer = Trainer(
        model=model, args=args, train_dataset=train,
        optimizer_cls_and_kwargs=worm_adamw(args),  # truncation fused into AdamW's step
        callbacks=[WormCallback(mode="worm", save_dir="out/ticket")],
    )
    trainer.train()  # stops at the epoch end where the ticket converges
    prune.apply_unstructured(model, load_ticket("out/ticket/ticket.pt").bool_masks())

WORM-gradient (``mode="gradient"``) adds the search's penalty to the training loss, which
a callback cannot do: train with :class:`WormTrainer`, a ``Trainer`` whose
``compute_loss`` adds it (or add ``callback.penalty()`` in your own ``compute_loss``):
``WormTrainer(model=model, args=args, train_dataset=train,
callbacks=[WormCallback(mode="gradient", save_dir="out/ticket")])``.

The callback builds an :class:`~worm_fast.search.EarlyBirdSearch` over the model and the
Trainer's optimizer when training begins, runs one check of Algorithm 1 at every epoch
end (or every ``check_every_steps`` optimizer steps), and stops training once the ticket
converges. Search settings default to the paper's for transformers (stop distance 0.01,
window 3, trigger margin 0.005, r = 3e-3, prune ratio 0.5, query and key weights as
representative layers); the first mask is taken after the first epoch unless
``first_check="init"`` (the paper presets' convention), which adds a check of the
untrained model when training begins. Modes ``worm`` and ``truncate`` need a WormAdamW (or WormSGD);
``eb`` and ``gradient`` work with any optimizer.

The search survives ``trainer.train(resume_from_checkpoint=...)``: every checkpoint the
Trainer writes under ``args.output_dir`` also holds the search's state
(``worm_search.pt``: its window of masks, r, trigger and every check), and a run resumed
from that checkpoint continues the search exactly where it was. A checkpoint without it
(written without the callback, or resumed from outside ``output_dir``) starts a fresh
search, with a warning.

Files in ``save_dir``: ``search.json`` (settings and every check, rewritten after each)
and ``ticket.pt`` once the ticket converges; a search that ends without converging saves
its newest mask as ``candidate.pt`` instead. If the representative weights turn NaN or
inf (the training diverged), the check raises :class:`~worm_fast.search.NonFiniteError`,
which stops the Trainer, and ``search.json`` says ``"status": "failed"`` and why. The
search settings are checked when the callback is made.
"""

import inspect
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from worm_fast.files import atomic_write, atomic_write_text, json_text
from worm_fast.optim import WormAdamW
from worm_fast.presets import PAPER_TRANSFORMER
from worm_fast.search import EarlyBirdSearch, NonFiniteError, Ticket, check_settings

logger = logging.getLogger(__name__)

SEARCH_STATE = "worm_search.pt"  # in each Trainer checkpoint folder


def worm_adamw(args: TrainingArguments, **overrides) -> tuple[type, dict]:
    """``(WormAdamW, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``, with the
    learning rate, betas, epsilon and weight decay of ``args``.

    The Trainer still builds the parameter groups, so biases and LayerNorm weights get
    no weight decay, as with its own AdamW; ``overrides`` replace any keyword argument.
    """
    kwargs = dict(
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=args.weight_decay,
    )
    return WormAdamW, {**kwargs, **overrides}


def _truncating_optimizer(optimizer):
    """The optimizer under accelerate's wrapper (``AcceleratedOptimizer.optimizer``)."""
    while not hasattr(optimizer, "set_truncation") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class WormCallback(TrainerCallback):
    """Runs the Early-Bird / WORM search in a ``Trainer`` and stops once the ticket converges.

    Args:
        check_every_steps: check every this many optimizer steps; None: at epoch ends.
        save_dir: where to write ``search.json`` and the ticket; None: keep them in memory
            only (``.search``, ``.search.ticket``).
        **search_kwargs: :class:`~worm_fast.search.EarlyBirdSearch` settings (``mode``,
            ``prune_ratio``, ``stop_distance``, ``window``, ``trigger_margin``,
            ``truncation``, ``scope``, ``representative``, ``backend``) over the paper's
            transformer defaults.
    """

    def __init__(
        self,
        *,
        check_every_steps: int | None = None,
        save_dir: str | os.PathLike | None = None,
        **search_kwargs,
    ) -> None:
        if search_kwargs.get("mode") == "rl":
            raise ValueError(
                "WormCallback runs modes eb, truncate, worm and gradient; mode 'rl' needs the "
                "training loss at each check: drive an EarlyBirdSearch(mode='rl') yourself"
            )
        if check_every_steps is not None and (
            isinstance(check_every_steps, bool)
            or not isinstance(check_every_steps, int)
            or check_every_steps < 1
        ):
            raise ValueError(
                f"check_every_steps must be a positive int or None, got {check_every_steps!r}"
            )
        defaults = _search_defaults()
        unknown = sorted(set(search_kwargs) - set(defaults))
        if unknown:
            raise TypeError(
                f"WormCallback got unknown keyword(s) {', '.join(unknown)}; EarlyBirdSearch "
                f"takes {', '.join(sorted(defaults))}"
            )
        # A check at every epoch end (or every k steps), as EarlyBirdSearch's default;
        # first_check="init" adds the paper presets' check before training.
        self.search_kwargs = {**PAPER_TRANSFORMER.kwargs(), "first_check": "epoch",
                              **search_kwargs}  # fmt: skip
        settings = {**defaults, **self.search_kwargs}
        check_settings(
            **{name: settings[name] for name in inspect.signature(check_settings).parameters}
        )
        self.check_every_steps = check_every_steps
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.search: EarlyBirdSearch | None = None
        self.checks: list[dict] = []  # every check's record, with the Trainer's step

    def penalty(self) -> torch.Tensor | float:
        """Mode ``gradient``: the search's penalty, to add to the training loss (0 in the
        other modes, and before training begins)."""
        if self.search is None or self.search.mode != "gradient":
            return 0.0
        return self.search.penalty()

    # -- Trainer events ---------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        optimizer = _truncating_optimizer(optimizer)
        mode = self.search_kwargs.get("mode", "worm")
        if mode in ("truncate", "worm") and not hasattr(optimizer, "set_truncation"):
            raise TypeError(
                f"WormCallback(mode={mode!r}) truncates updates and needs the Trainer to use "
                "WormAdamW: pass Trainer(optimizer_cls_and_kwargs=worm_adamw(args)), got "
                f"{type(optimizer).__name__}; or use mode='eb'"
            )
        self.search = EarlyBirdSearch(model, optimizer, **self.search_kwargs)
        self.checks = []
        if state.global_step > 0:  # resumed from a checkpoint
            self._resume(args, state, control)
        elif self.search.config["first_check"] == "init":  # the untrained model's mask
            self._check(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.check_every_steps is not None and state.global_step % self.check_every_steps == 0:
            self._check(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.check_every_steps is None:
            self._check(state, control)

    def on_save(self, args, state, control, **kwargs):
        # Called right after the Trainer wrote checkpoint-<global_step>.
        folder = _checkpoint_folder(args, state)
        if self.search is None or not state.is_world_process_zero or not folder.is_dir():
            return
        payload = {"search": self.search.state_dict(), "checks": self.checks}
        atomic_write(folder / SEARCH_STATE, lambda file: torch.save(payload, file))

    def on_train_end(self, args, state, control, **kwargs):
        search = self.search
        if search is not None and not search.converged and search.records:
            self._save_ticket(search.candidate(), "candidate.pt", converged=False)

    # -- the search -------------------------------------------------------------------

    def _resume(self, args, state, control) -> None:
        path = _checkpoint_folder(args, state) / SEARCH_STATE
        if not path.is_file():
            logger.warning(
                "Resumed at step %d without %s: the Early-Bird search starts afresh",
                state.global_step, path,
            )  # fmt: skip
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.search.load_state_dict(saved["search"])  # hands masks and r to the optimizer
        self.checks = saved["checks"]
        logger.info("Early-Bird search resumed from %s after %d checks", path, len(self.checks))
        if self.search.converged:  # the run was saved after its ticket converged
            control.should_training_stop = True

    def _check(self, state, control) -> None:
        if self.search is None or self.search.converged:
            return  # after convergence the Trainer is stopping; nothing is left to decide
        try:
            record = self.search.check()
        except NonFiniteError as error:  # training diverged: say so, then stop the Trainer
            self._save_checks(error=str(error))
            raise
        entry = asdict(record)
        del entry["epoch"]  # the Trainer's epoch is the one recorded
        entry["check"] = len(self.search.records)
        self.checks.append({**entry, "global_step": state.global_step, "epoch": state.epoch})
        logger.info(
            "Early-Bird check %d at step %d: d_max=%s d_avg=%s r=%g%s",
            entry["check"], state.global_step, record.d_max, record.d_avg, record.r,
            " (converged)" if record.converged else "",
        )  # fmt: skip
        self._save_checks()
        if record.converged:
            self._save_ticket(self.search.ticket, "ticket.pt", converged=True)
            control.should_training_stop = True

    def _save_checks(self, error: str | None = None) -> None:
        if self.save_dir is None:
            return
        document = {
            "settings": {**self.search.config, "representative": self._representative()},
            "representative_parameters": list(self.search.params),
            "converged": self.search.converged,
            "checks": self.checks,
        }
        if error is not None:
            document.update(status="failed", error=error)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.save_dir / "search.json", json_text(document, indent=1))

    def _representative(self):
        representative = self.search_kwargs["representative"]
        return representative if isinstance(representative, str) else list(representative)

    def _save_ticket(self, ticket: Ticket, name: str, *, converged: bool) -> None:
        if self.save_dir is None:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        payload = {
            "check": ticket.epoch,
            "converged": converged,
            "packed": {key: mask.cpu() for key, mask in ticket.packed.items()},
            "shapes": {key: list(shape) for key, shape in ticket.shapes.items()},
            "selections": {key: asdict(sel) for key, sel in ticket.selections.items()},
        }
        atomic_write(self.save_dir / name, lambda f: torch.save(payload, f))


class WormTrainer(Trainer):
    """A ``Trainer`` whose training loss includes the WORM-gradient penalty of its
    :class:`WormCallback` (in ``callbacks``); with any other mode it is a plain Trainer.

    The penalty joins the loss of every training micro-batch (so with gradient
    accumulation each optimizer step sees it once, on average) and never the
    evaluation loss.
    """

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        callback = next(
            (c for c in self.callback_handler.callbacks if isinstance(c, WormCallback)), None
        )
        if callback is None or not model.training:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + callback.penalty(), outputs
        return result + callback.penalty()


def _search_defaults() -> dict:
    """The settings ``EarlyBirdSearch`` takes by keyword, with their defaults."""
    parameters = inspect.signature(EarlyBirdSearch).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _checkpoint_folder(args: TrainingArguments, state) -> Path:
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"


def load_ticket(path: str | os.PathLike) -> Ticket:
    """A ticket (or candidate) saved by :class:`WormCallback`; ``.bool_masks()`` gives the
    masks by parameter name, for ``worm_fast.prune.apply_unstructured``."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return Ticket(
        epoch=payload["check"],
        packed=payload["packed"],
        shapes={key: torch.Size(shape) for key, shape in payload["shapes"].items()},
        selections=payload.get("selections", {}),  # saved before selections: none
    )
