"""The optimizers in an ordinary PyTorch loop: plain `model.parameters()`, torch's lr
schedulers, torch's own Muon, and checkpoints (issue 13)."""

from __future__ import annotations

import copy
import functools
import io
from collections.abc import Iterable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

import sweeper.optim.muon
from sweeper.optim import (
    MOGA,
    OPTIMIZER_NAMES,
    Muon,
    Scion,
    bias_rms,
    build_optimizer,
    newton_schulz,
    rms_to_rms,
)

torch.set_num_threads(1)


def _mlp(seed: int = 0) -> nn.Sequential:
    """The plain model users try first: biases and a LayerNorm, no declared roles."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _loss(model: nn.Module, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def _train(model: nn.Module, opt: torch.optim.Optimizer, seeds: Iterable[int], sched=None) -> None:
    for seed in seeds:
        _loss(model, seed).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def _build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(name, model, 0.01)


# ---- 1. Optimizer(model.parameters()) ---------------------------------------------------------


@pytest.mark.parametrize("unconstrained", [False, True])
def test_scion_takes_plain_model_parameters(unconstrained):
    # Was: accepted, then "a matrix LMO needs at least 2 dims" at the first step. The default
    # lmo is now `auto` (the reference code's default): spectral matrices, bias_rms vectors.
    model = _mlp()
    opt = Scion(model.parameters(), lr=0.05, momentum=1.0, unconstrained=unconstrained)
    opt.init()
    for layer in (model[0], model[2]):
        assert rms_to_rms(layer.weight).item() == pytest.approx(1.0, rel=1e-4)
    assert torch.equal(model[1].weight, torch.ones(16))  # norm gains left alone by init

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, 0).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    shrink = 1.0 if unconstrained else 1.0 - 0.05
    for n, p in model.named_parameters():
        if p.ndim == 1:  # every vector moved by the RMS-normalized gradient
            assert torch.allclose(p, shrink * before[n] - 0.05 * bias_rms(grads[n]), atol=1e-6), n

    first = _loss(model, 0).item()
    _train(model, opt, [0] * 20)  # one batch, fitted
    assert _loss(model, 0).item() < first


def test_scion_matrix_lmo_on_a_vector_fails_at_construction():
    with pytest.raises(ValueError, match=r"shape \(16,\).*bias_rms.*build_optimizer"):
        Scion(_mlp().parameters(), lmo="spectral")
    # With named parameters the message names the parameter too.
    with pytest.raises(ValueError, match=r"'0\.bias' of shape \(16,\)"):
        Scion(_mlp().named_parameters(), lmo="sign")
    # A refused add_param_group leaves the optimizer as it was.
    model = _mlp()
    opt = Scion([model[0].weight])
    with pytest.raises(ValueError, match="matrix norm"):
        opt.add_param_group({"params": [model[0].bias], "lmo": "colnorm"})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match="stacked"):
        Scion([nn.Parameter(torch.ones(3, 4, 4))], stacked=True)  # auto can't tell models apart


def test_muon_vectors_fail_at_construction_with_a_way_out():
    model = _mlp()
    with pytest.raises(ValueError, match="build_optimizer"):
        Muon(model.parameters())
    # Was: "not enough values to unpack" at the first step.
    with pytest.raises(ValueError, match=r"shape \(16,\).*use_muon=False.*build_optimizer"):
        Muon([{"params": model.parameters(), "use_muon": True}])
    matrices = [p for p in model.parameters() if p.ndim == 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    opt = Muon([{"params": matrices, "use_muon": True}, {"params": vectors, "use_muon": False}])
    _train(model, opt, range(3))


def test_moga_takes_plain_model_parameters():
    model = _mlp()
    opt = MOGA(model.parameters(), lr=0.01, weight_decay=0.0)
    before = model[1].bias.detach().clone()
    _loss(model, 0).backward()
    g = model[1].bias.grad.clone()
    opt.step()
    assert torch.allclose(model[1].bias, before - 0.01 * torch.sign(g))  # vectors: sign rule


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_registry_runs_on_plain_sequential(name):
    model = _mlp()
    opt = _build(name, model)
    if hasattr(opt, "init"):
        opt.init()
    _train(model, opt, range(3))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- 2. lr schedulers -------------------------------------------------------------------------


def _momenta(opt: torch.optim.Optimizer) -> list[tuple]:
    keys = ("momentum", "beta", "betas")
    return [tuple(g.get(k) for k in keys) for g in opt.param_groups]


def _check_schedule(opt: torch.optim.Optimizer, sched, start: list[float]) -> None:
    """A few steps: lrs move, per-group ratios (role multipliers, muP) stay, momenta stay."""
    model_momenta = _momenta(opt)
    seen = []
    for _ in range(4):
        for g in opt.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        lrs = [g["lr"] for g in opt.param_groups]
        seen.append(lrs[0])
        ratios = [lr / lrs[0] for lr in lrs]
        assert ratios == pytest.approx([s / start[0] for s in start])
    assert len(set(seen)) > 1
    assert _momenta(opt) == model_momenta


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_one_cycle_without_momentum_cycling_works(name):
    opt = _build(name, _mlp())
    start = [g["lr"] for g in opt.param_groups]
    # max_lr per group: a single float would set every group to it, erasing the per-role lrs.
    sched = lr_scheduler.OneCycleLR(opt, max_lr=start, total_steps=10, cycle_momentum=False)
    _check_schedule(opt, sched, start)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_momentum_cycling_never_changes_the_meaning(name, scheduler):
    # Was: OneCycleLR wrote SGD's beta 0.85-0.95 into Scion's alpha (0.1 -> 0.95, silently).
    opt = _build(name, _mlp())
    before = _momenta(opt)
    start = [g["lr"] for g in opt.param_groups]
    make = {
        "OneCycleLR": lambda: lr_scheduler.OneCycleLR(opt, max_lr=start, total_steps=10),
        "CyclicLR": lambda: lr_scheduler.CyclicLR(opt, [lr / 4 for lr in start], start),
    }[scheduler]
    if name.startswith("adamw"):  # torch's AdamW: beta1 is what they cycle, correctly
        make()
        assert [g["betas"][1] for g in opt.param_groups] == [b[2][1] for b in before]
        return
    with pytest.raises(ValueError, match="cycle_momentum"):
        make()
    assert _momenta(opt) == before


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
@pytest.mark.parametrize(
    "make",
    [
        lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=8),
        lambda opt: lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step)),
        lambda opt: lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=4),
    ],
    ids=["CosineAnnealingLR", "LambdaLR", "LinearLR"],
)
def test_lr_only_schedulers_work(name, make):
    opt = _build(name, _mlp())
    start = [g["lr"] for g in opt.param_groups]
    _check_schedule(opt, make(opt), start)


# ---- 3. against torch.optim.Muon --------------------------------------------------------------

# Our scale_convention -> torch's adjust_lr_fn (the factor on the orthogonalized update).
# "speedrun" (sqrt(max(d_out, d_in))) has no torch counterpart.
TORCH_ADJUST_LR_FN = {"keller": "original", "moonlight": "match_rms_adamw"}


def _against_torch_muon(shape, convention, nesterov, bf16_ns, monkeypatch) -> float:
    """Max |ours - torch's| over 5 steps on one weight, relative to how far it moved."""
    if bf16_ns:  # torch's Newton-Schulz runs in bfloat16 on every device; ours off CUDA: f32
        ns = functools.partial(newton_schulz, dtype=torch.bfloat16)
        monkeypatch.setattr(sweeper.optim.muon, "newton_schulz", ns)
    W0 = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours, theirs = nn.Parameter(W0.clone()), nn.Parameter(W0.clone())
    hp = dict(lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1, ns_steps=5)
    opt_ours = Muon([{"params": [ours], "use_muon": True}], scale_convention=convention, **hp)
    opt_theirs = torch.optim.Muon([theirs], adjust_lr_fn=TORCH_ADJUST_LR_FN[convention], **hp)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        g = torch.randn(shape, generator=gen)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    moved = (theirs - W0).abs().max().item()
    return (ours - theirs).abs().max().item() / moved


needs_torch_muon = pytest.mark.skipif(
    not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9"
)


@needs_torch_muon
@pytest.mark.parametrize("shape", [(24, 12), (12, 24), (16, 16)])
@pytest.mark.parametrize("convention", ["keller", "moonlight"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_matches_torch_muon(shape, convention, nesterov, monkeypatch):
    # Same momentum (buf.lerp_(g, 1 - beta); Nesterov g.lerp(buf, beta)), NS coefficients,
    # steps and eps, the same decoupled decay W (1 - lr wd) with the unscaled lr. With NS in
    # the same dtype the two agree to bf16 rounding (here exactly).
    assert _against_torch_muon(shape, convention, nesterov, True, monkeypatch) < 2e-3


@needs_torch_muon
@pytest.mark.parametrize("convention", ["keller", "moonlight"])
def test_muon_float32_ns_is_torch_muon_up_to_bf16(convention, monkeypatch):
    # Our CPU default (float32 NS) differs from torch's bf16 NS by about 1% of the update.
    assert _against_torch_muon((24, 12), convention, True, False, monkeypatch) < 3e-2


# ---- 4. checkpoints ---------------------------------------------------------------------------


def _by_hand(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "scion-auto":
        return Scion(model.parameters(), lr=0.02, momentum=0.1)
    return MOGA(model.parameters(), lr=0.01)


@pytest.mark.parametrize("name", [*OPTIMIZER_NAMES, "scion-auto", "moga-plain"])
def test_resume_with_scheduler_is_bit_identical(name):
    # A bias-and-LayerNorm model, with a OneCycleLR whose state is checkpointed too.
    def make(model):
        opt = _by_hand(name, model) if name in ("scion-auto", "moga-plain") else _build(name, model)
        start = [g["lr"] for g in opt.param_groups]
        sched = lr_scheduler.OneCycleLR(opt, max_lr=start, total_steps=10, cycle_momentum=False)
        return opt, sched

    model_a = _mlp()
    opt_a, sched_a = make(model_a)
    if hasattr(opt_a, "init"):
        opt_a.init()
    _train(model_a, opt_a, range(3), sched_a)

    buffer = io.BytesIO()
    ckpt = {"model": model_a.state_dict(), "opt": opt_a.state_dict(), "sched": sched_a.state_dict()}
    torch.save(ckpt, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model_b = _mlp(seed=1)
    opt_b, sched_b = make(model_b)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    sched_b.load_state_dict(ckpt["sched"])

    _train(model_a, opt_a, range(3, 7), sched_a)
    _train(model_b, opt_b, range(3, 7), sched_b)
    for (n, pa), (_, pb) in zip(
        model_a.named_parameters(), model_b.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), n


def test_deepcopied_optimizers_keep_their_defaults():
    # Scion's alpha default and Muon's per-kind defaults live outside `defaults`: a copy
    # (pickle, deepcopy) must still fill new groups from them.
    model = _mlp()
    scion = copy.deepcopy(Scion([model[0].weight], momentum=0.3))
    scion.add_param_group({"params": [model[2].weight]})
    assert scion.param_groups[-1]["momentum"] == 0.3
    muon = copy.deepcopy(Muon([{"params": [model[0].weight], "use_muon": True}], adam_lr=1e-3))
    muon.add_param_group({"params": [model[0].bias], "use_muon": False})
    assert muon.param_groups[-1]["lr"] == 1e-3
