"""The optimizer and the learning-rate schedule: the LR is a pure function of the global step.

    python -c "import optim, config; print(optim.lr_at(500, 1000, config.resolve('cpu')))"
"""
import math

import torch


def make_optimizer(model, cfg):
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay, **fused)


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
