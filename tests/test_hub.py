"""hubconf.py: torch.hub lists the recipes and loads a trained checkpoint in eval mode; a missing file is one error."""
import importlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import config
import engine
import files

REPO = str(Path(__file__).resolve().parent.parent)


def test_hub_lists_the_cpu_recipes_and_nothing_else():
    """torch.hub.list's own rule (it reads GitHub repositories only): the public callables of hubconf.py."""
    hub = importlib.import_module("hubconf")
    assert sorted(f for f in dir(hub) if callable(getattr(hub, f)) and not f.startswith("_")) == ["cpu", "cpu5"]


def test_hub_loads_a_checkpoint_of_the_recipe_in_eval_mode(tmp_path):
    cfg = config.resolve("cpu5")
    trained = engine.build_model(cfg)
    path = tmp_path / "cpu5.ckpt"
    files.save_checkpoint({"format_version": files.FORMAT_VERSION, "config": asdict(cfg), "model": trained.state_dict(),
                           "classes": [str(i) for i in range(100)], "epoch": 1}, path)
    model = torch.hub.load(REPO, "cpu5", source="local", pretrained=True, weights=str(path))
    assert not model.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


def test_hub_says_which_weights_file_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained weights for cpu at .*nothing.ckpt"):
        torch.hub.load(REPO, "cpu", source="local", pretrained=True, weights=str(tmp_path / "nothing.ckpt"))


def test_hub_refuses_a_checkpoint_of_another_architecture(tmp_path):
    cfg = config.resolve("smoke")
    path = tmp_path / "smoke.ckpt"
    files.save_checkpoint({"format_version": files.FORMAT_VERSION, "config": asdict(cfg),
                           "model": engine.build_model(cfg).state_dict(), "classes": [], "epoch": 1}, path)
    with pytest.raises(ValueError, match="another architecture"):
        torch.hub.load(REPO, "cpu5", source="local", pretrained=True, weights=str(path))


@pytest.mark.parametrize("exp", ["cpu", "cpu5"])
def test_the_shipped_weights_load_into_the_recipes_model(exp):
    model = torch.hub.load(REPO, exp, source="local", pretrained=True)
    assert model.fc.out_features == 100 and not model.training
