"""Muon for the convolution filters, the warm-up/stable/decay schedule, and the training compute of a run."""
import json

import pytest
import torch

import config
import engine
import optim
import roofline
import run_train
from config import Config
from fault_helpers import main_error, quiet, small, synthetic_data


def test_muon_steps_a_filter_bank_as_torchs_muon_steps_the_same_matrix():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 8, 3, bias=False).to(memory_format=torch.channels_last)
    matrix = torch.nn.Parameter(conv.weight.detach().reshape(8, -1).clone())
    ours = optim.Muon(conv.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, ns_steps=5)
    theirs = torch.optim.Muon([matrix], lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=True, ns_steps=5)
    for _ in range(3):
        grad = torch.randn(8, 6, 3, 3)
        conv.weight.grad, matrix.grad = grad.contiguous(memory_format=torch.channels_last), grad.reshape(8, -1)
        ours.step()
        theirs.step()      # note: torch's Newton-Schulz runs in bf16, ours here in fp32
    assert torch.allclose(conv.weight.detach().reshape(8, -1), matrix.detach(), atol=2e-3)


def test_newton_schulz_gives_singular_values_near_one():
    s = torch.linalg.svdvals(optim.orthogonalize(torch.randn(16, 40), steps=5))
    assert s.min() > 0.5 and s.max() < 1.3


def test_muon_takes_the_filters_and_nesterov_sgd_the_rest():
    model = engine.build_model(Config(blocks=[1], channels=[8], optimizer="muon", bn_bias_lr=4))
    opt = optim.make_optimizer(model, Config(blocks=[1], channels=[8], optimizer="muon", lr=0.2, muon_lr=0.05))
    muon, sgd = opt.optimizers
    filters = {id(p) for p in model.parameters() if p.ndim == 4}
    assert {id(p) for g in muon.param_groups for p in g["params"]} == filters and len(filters) == 3
    assert {id(p) for g in sgd.param_groups for p in g["params"]} == {id(p) for p in model.parameters()} - filters
    assert sgd.defaults["nesterov"] and muon.param_groups[0]["lr_scale"] == pytest.approx(0.25)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    engine.train_step(model, opt, x, y, Config(), lr=0.2)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.05)
    again = optim.make_optimizer(model, Config(blocks=[1], channels=[8], optimizer="muon"))
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.optimizers[0].state[model.stem[0].weight]["momentum_buffer"],
                       muon.state[model.stem[0].weight]["momentum_buffer"])


def test_wsd_warms_up_holds_then_decays_linearly_over_the_cooldown():
    cfg = Config(lr=1.0, schedule="wsd", warmup=0.1, cooldown=0.4, final_lr=0.0)
    lrs = [optim.lr_at(step, 100, cfg) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(lr == 1.0 for lr in lrs[10:60])
    assert lrs[60] == pytest.approx(1 - 1 / 40) and lrs[80] == pytest.approx(0.5 - 1 / 40) and lrs[99] == 0.0


@pytest.mark.parametrize("setting, words", [
    ("muon_lr=0", "'muon_lr' must be > 0"), ("ns_steps=0", "'ns_steps' must be > 0"),
    ("muon_momentum=1", "'muon_momentum' must be in [0, 1)"), ("cooldown=1.5", "'cooldown' must be in [0, 1]"),
    ("ns_steps=2.5", "'ns_steps' must be int"),
    ("muon_weight_decay=-1", "'muon_weight_decay' must be >= 0"), ("optimizer=lion", "'optimizer' must be one of"),
    ("muon_normalize=2", "'muon_normalize' must be bool")])
def test_bad_muon_and_schedule_values_are_one_error_line(setting, words, monkeypatch, capsys):
    assert words in main_error(run_train, ["--exp", "smoke", "--set", setting], monkeypatch, capsys)


def test_cooldown_and_warmup_beyond_the_run_are_refused():
    with pytest.raises(config.UserError, match="add up to at most 1"):
        config.resolve("smoke", [("schedule", "wsd"), ("warmup", 0.7), ("cooldown", 0.4)])


def test_a_run_records_its_training_flops_as_one_steps_count_times_its_steps(tmp_path):
    cfg = small(tmp_path / "out", synthetic_data(tmp_path / "data"), ("optimizer", "muon"), epochs=2)   # 8 steps each
    s = quiet(cfg)
    assert s["train_flops"] == roofline.step_flops(engine.build_model(cfg), cfg) * 16 > 0
    assert json.loads((tmp_path / "out" / "smoke.json").read_text())["train_flops"] == s["train_flops"]


def muon_and_fused_sgd():
    """A tiny model under what make_optimizer gives a CUDA run: Muon for its filters, fused Nesterov SGD the rest."""
    torch.manual_seed(0)
    model = engine.build_model(Config(blocks=[1], channels=[8], stem_stride=2))
    filters = [p for p in model.parameters() if p.ndim == 4]
    rest = [p for p in model.parameters() if p.ndim != 4]
    return model, optim.Optimizers(optim.Muon(filters, lr=0.05), torch.optim.SGD(rest, lr=0.1, momentum=0.9,
                                                                                  nesterov=True, fused=True))


def scaled_step(model, opt, scaler, poison=False):
    opt.zero_grad()
    torch.manual_seed(1)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    scaler.scale(loss).backward()
    if poison:
        model.fc.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def test_a_grad_scaler_steps_muon_and_fused_sgd_without_reading_found_inf_on_the_host(monkeypatch):
    model, opt = muon_and_fused_sgd()
    def no_sync(self):
        raise AssertionError("a host sync in the optimizer step")
    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    scaled_step(model, opt, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))


def test_scaled_steps_equal_plain_steps_and_one_that_overflowed_changes_nothing():
    plain, plain_opt = muon_and_fused_sgd()
    scaled_step(plain, plain_opt, torch.amp.GradScaler("cpu", enabled=False))
    model, opt = muon_and_fused_sgd()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaled_step(model, opt, scaler)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), plain.parameters()))
    weights = [p.detach().clone() for p in model.parameters()]
    buffers = [s["momentum_buffer"].clone() for o in opt.optimizers for s in o.state.values()]
    scaled_step(model, opt, scaler, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(buffers, (s for o in opt.optimizers
                                                                               for s in o.state.values())))
    assert scaler.get_scale() == 2.0 ** 9
    scaled_step(plain, plain_opt, torch.amp.GradScaler("cpu", enabled=False))
    scaled_step(model, opt, scaler)       # at half the scale: the momentum holds unscaled gradients
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(model.parameters(), plain.parameters()))


def test_muon_normalize_makes_the_step_independent_of_the_filters_scale():
    def stepped(scale, normalize):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(6, 8, 3, bias=False)
        with torch.no_grad():
            conv.weight.mul_(scale)
        opt = optim.Muon(conv.parameters(), lr=0.1, normalize=normalize)
        conv.weight.grad = torch.randn(8, 6, 3, 3)
        opt.step()
        return conv.weight.detach()
    assert torch.allclose(stepped(1.0, True), stepped(10.0, True), atol=1e-5)
    assert stepped(1.0, True).norm() == pytest.approx((8 + 0.1 ** 2 * 8) ** 0.5, rel=0.05)    # sqrt(out) and U
    assert not torch.allclose(stepped(1.0, False), stepped(10.0, False) / 10, atol=1e-3)
