"""The optimizer and the learning-rate schedule: the LR is a pure function of the global step.

    python -c "import optim, config; print(optim.lr_at(500, 1000, config.resolve('cpu')))"
"""
import math

import torch


def param_groups(model, cfg):
    """One group, or with bn_bias_lr != 1 the BatchNorm biases apart: lr_scale (which engine.train_step applies) and
    weight decay / lr_scale, so that their decay per step, lr x weight_decay, is the other weights' (airbench)."""
    if cfg.bn_bias_lr == 1:
        return [{"params": list(model.parameters())}]
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    ids = {id(b) for b in biases}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": biases, "lr_scale": cfg.bn_bias_lr, "weight_decay": cfg.weight_decay / cfg.bn_bias_lr}]


def make_optimizer(model, cfg):
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return adam(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, **fused)


def lr_at(step, total_steps, cfg):
    """The LR of a global step: linear warmup, then constant, cosine or linear (one-cycle) decay to final_lr, or
    multistep: lr x gamma at each milestone passed."""
    warmup = int(cfg.warmup * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":     # milestones: fractions of the run if all < 1, else epochs
        unit = total_steps if max(cfg.milestones) < 1 else total_steps / cfg.epochs
        return cfg.lr * cfg.gamma ** sum(step >= round(m * unit) for m in cfg.milestones)
    t = (step - warmup) / max(1, total_steps - warmup)
    end = cfg.final_lr * cfg.lr
    if cfg.schedule == "cosine":
        return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr + (end - cfg.lr) * t
