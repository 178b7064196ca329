"""The optimizers and the learning-rate schedule: the LR is a pure function of the global step.

    python -c "import optim, config; print(optim.lr_at(500, 1000, config.resolve('cpu')))"
"""
import math

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)     # Muon's quintic Newton-Schulz (torch.optim.Muon's defaults)


def param_groups(model, cfg, keep=lambda p: True):
    """The model's parameters that keep() takes, in one group, or with bn_bias_lr != 1 the BatchNorm biases apart:
    lr_scale (which engine.train_step applies) and weight decay / lr_scale, so that their decay per step,
    lr x weight_decay, is the other weights' (airbench)."""
    params = [p for p in model.parameters() if keep(p)]
    if cfg.bn_bias_lr == 1:
        return [{"params": params}]
    ids = {id(m.bias) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return [{"params": [p for p in params if id(p) not in ids]},
            {"params": [p for p in params if id(p) in ids], "lr_scale": cfg.bn_bias_lr,
             "weight_decay": cfg.weight_decay / cfg.bn_bias_lr}]


def make_optimizer(model, cfg, precision="fp32"):
    """cfg.optimizer over the model: sgd, adam, adamw, or muon (Muon for the convolution filters, Nesterov SGD with
    lr, momentum and weight_decay for the rest: BatchNorm and the linear head, as the CIFAR-100 speedruns do).
    Muon's Newton-Schulz runs in bf16 where the run's precision is bf16, else in fp32."""
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "muon":
        filters = [p for p in model.parameters() if p.ndim == 4]
        muon = Muon([{"params": filters, "lr_scale": cfg.muon_lr / cfg.lr}], lr=cfg.muon_lr,
                    momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay, ns_steps=cfg.ns_steps,
                    normalize=cfg.muon_normalize,
                    ns_dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        sgd = torch.optim.SGD(param_groups(model, cfg, keep=lambda p: p.ndim != 4), lr=cfg.lr, momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0, **fused)
        return Optimizers(muon, sgd)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=cfg.nesterov and cfg.momentum > 0, **fused)
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return adam(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay,
                **fused)


# ----------------------------------------------------------------------------
# Muon for convolution filters

def orthogonalize(g, steps, dtype=torch.float32):
    """About the nearest semi-orthogonal matrix to the matrix g (U S' V^T with S' near 1), by Muon's quintic
    Newton-Schulz iteration, in dtype (bf16 where the device runs it natively: a CPU without it emulates bf16)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


def as_matrix(t):
    """A filter bank (out, in, k, k) as an out x (k k in) matrix: a view of channels-last memory. The column order does
    not matter: orthogonalize(G P) = orthogonalize(G) P for a permutation P."""
    return t.permute(0, 2, 3, 1).reshape(len(t), -1)


def from_matrix(m, shape):
    """as_matrix undone: the (out, in, k, k) filters of an out x (k k in) matrix."""
    out, c_in, kh, kw = shape
    return m.reshape(out, kh, kw, c_in).permute(0, 3, 1, 2)


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan): Nesterov momentum of each filter bank, orthogonalised as a matrix and scaled by
    sqrt(max(1, rows / columns)), with decoupled weight decay, as torch.optim.Muon does for the 2-D parameters it
    accepts; convolution filters are 4-D, hence this one (airbench94_muon flattens them the same way).
    Under fp16 a GradScaler hands it grad_scale and found_inf (as to torch's fused optimizers): it unscales, and
    leaves weights and momentum as they were where found_inf is set, on the device, without waiting on it."""
    _step_supports_amp_scaling = True

    def __init__(self, params, lr, momentum=0.95, weight_decay=0.0, ns_steps=5, normalize=False,
                 ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps,
                                      normalize=normalize))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = as_matrix(p.grad) if grad_scale is None else as_matrix(p.grad) / grad_scale
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                before = None if found_inf is None else (p.clone(), buf.clone())
                buf.lerp_(grad, 1 - momentum)
                update = orthogonalize(grad.lerp(buf, momentum), group["ns_steps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                if group.get("normalize"):      # airbench94_muon: the filters at norm sqrt(out) before each step
                    p.mul_(len(p) ** 0.5 / p.norm().clamp(min=1e-7))
                rows, cols = update.shape
                p.add_(from_matrix(update.to(p.dtype), p.shape), alpha=-lr * max(1.0, rows / cols) ** 0.5)
                if before is not None:      # the step of an overflowed fp16 backward is skipped
                    p.copy_(torch.where(found_inf > 0, before[0], p))
                    buf.copy_(torch.where(found_inf > 0, before[1], buf))


class Optimizers:
    """Several optimizers stepped as one (Muon for the filters, SGD for the rest), with what the engine and
    torch.amp.GradScaler use of an optimizer: param_groups, zero_grad, step, state_dict, load_state_dict."""

    def __init__(self, *optimizers):
        self.optimizers = optimizers

    @property
    def param_groups(self):
        return [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def _step_supports_amp_scaling(self):
        """Where each optimizer takes a GradScaler's grad_scale and found_inf (Muon; SGD when fused, as on CUDA), the
        scaler hands them over instead of reading found_inf on the host before every step."""
        return all(getattr(opt, "_step_supports_amp_scaling", False) for opt in self.optimizers)

    def zero_grad(self, set_to_none=True):
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        handed = {name: getattr(self, name) for name in ("grad_scale", "found_inf") if hasattr(self, name)}
        for opt in self.optimizers:
            for name, value in handed.items():
                setattr(opt, name, value)
            opt.step()
            for name in handed:
                delattr(opt, name)

    def state_dict(self):
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state):
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


# ----------------------------------------------------------------------------
# the schedule

def lr_at(step, total_steps, cfg):
    """The LR of a global step: linear warmup, then constant, cosine or linear (one-cycle) decay to final_lr, wsd
    (constant, then linear decay to final_lr over the last `cooldown` of the run), or multistep: lr x gamma at each
    milestone passed."""
    warmup = int(cfg.warmup * total_steps)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "multistep":     # milestones: fractions of the run if all < 1, else epochs
        unit = total_steps if max(cfg.milestones) < 1 else total_steps / cfg.epochs
        return cfg.lr * cfg.gamma ** sum(step >= round(m * unit) for m in cfg.milestones)
    end = cfg.final_lr * cfg.lr
    if cfg.schedule == "wsd":
        decay_from = total_steps - int(cfg.cooldown * total_steps)
        t = max(0, step - decay_from + 1) / max(1, total_steps - decay_from)
        return cfg.lr + (end - cfg.lr) * t
    t = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return end + (cfg.lr - end) * 0.5 * (1 + math.cos(math.pi * t))
    return cfg.lr + (end - cfg.lr) * t
