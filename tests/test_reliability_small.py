"""Smaller refusals at the door: WormCallback's settings when it is made, a diverged search
inside a Trainer recorded as failed, and why the extension is unavailable."""

import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from worm_fast import EarlyBirdSearch, NonFiniteError
from worm_fast.backends import cpp

pytest.importorskip("transformers")

from worm_fast.integrations.huggingface import WormCallback


def test_callback_refuses_unknown_settings_when_made():
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) stop_distanse; EarlyBirdSearch"):
        WormCallback(stop_distanse=0.1)


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(stop_distance=float("nan")), "stop_distance must be a finite number > 0"),
        (dict(window=2.5), "window must be an integer >= 2"),
        (dict(mode="fast"), "mode must be one of"),
    ],
)
def test_callback_refuses_settings_out_of_range_when_made(setting, message):
    with pytest.raises(ValueError, match=message):
        WormCallback(**setting)


def test_a_diverged_search_in_a_trainer_is_saved_as_failed(tmp_path):
    callback = WormCallback(mode="eb", save_dir=tmp_path)
    weights = {"layer.query.weight": nn.Parameter(torch.randn(4, 4))}
    callback.search = EarlyBirdSearch(weights, mode="eb")
    with torch.no_grad():
        weights["layer.query.weight"][0, 0] = float("nan")
    state = SimpleNamespace(global_step=6, epoch=1.0)
    control = SimpleNamespace(should_training_stop=False)
    with pytest.raises(NonFiniteError):
        callback.on_epoch_end(None, state, control)
    document = json.loads((tmp_path / "search.json").read_text())
    assert document["status"] == "failed" and "NaN or inf" in document["error"]
    assert not (tmp_path / "ticket.pt").exists()


def test_a_missing_extension_is_said_to_be_missing(monkeypatch):
    # Importing a missing _C from inside the package reads "partially initialized module
    # (most likely due to a circular import)"; the reason must say what is wrong.
    real = importlib.util.find_spec("worm_fast._C")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert cpp._load().startswith("worm_fast._C is not built; build it with")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: real)

    def broken(name):
        raise ImportError("undefined symbol: _ZN3c10")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.warns(RuntimeWarning, match=r"failed to load \(undefined symbol"):
        assert "Rebuild it against this torch" in cpp._load()
