"""One (or two) optimizer steps equal the reference's hand formulas, for every family."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sweeper.optim import (
    MOGA,
    Muon,
    Scion,
    build_optimizer,
    init_on_ball_,
    muon_scale,
    newton_schulz,
    rms_to_inf,
)

torch.set_num_threads(1)

VOCAB, WIDTH = 24, 16


class TinyLM(nn.Module):
    """Embedding -> MLP block (one bias) -> RMSNorm-like gain -> untied head."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, 2 * width, bias=False)
        self.fc2 = nn.Linear(2 * width, width)
        self.gain = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain
        return self.head(h)


def _model(seed: int = 0, **kw) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(**kw)


def _grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        grads[name] = p.grad.clone()
    return grads


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# Reference LMOs written out directly (not the library's), for W (d_out, d_in).
def _ref_colnorm(d):
    return d / (d.norm(dim=0, keepdim=True) / math.sqrt(d.shape[0]) + 1e-8)


def _ref_sign(d):
    return torch.sign(d) / d.shape[1]


def _ref_spectral(d):
    return newton_schulz(d) * math.sqrt(d.shape[0] / d.shape[1])


def _ref_bias(d):
    return d / (d.pow(2).mean().sqrt() + 1e-8)


def _ref_rownorm(d):
    return d / (d.norm(dim=1, keepdim=True) + 1e-8) / math.sqrt(d.shape[1])


# ---- Scion / uScion ---------------------------------------------------------------------------


def _scion(model: TinyLM, unconstrained: bool, alpha: float) -> Scion:
    return Scion(
        [
            {"params": [model.embed.weight], "lmo": "colnorm", "scale": 1.5, "transposed": True},
            {"params": [model.fc1.weight, model.fc2.weight], "lmo": "spectral", "scale": 3.0},
            {"params": [model.head.weight], "lmo": "sign", "scale": 10.0},
            {"params": [model.fc2.bias, model.gain], "lmo": "bias_rms", "scale": 0.5},
        ],
        lr=0.05,
        momentum=alpha,
        unconstrained=unconstrained,
    )


@pytest.mark.parametrize("unconstrained", [False, True])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
def test_scion_two_steps_match_formula(unconstrained, alpha):
    model = _model()
    opt = _scion(model, unconstrained, alpha)
    lr = 0.05
    lmo = {
        "embed.weight": (lambda d: _ref_colnorm(d.T).T, 1.5),
        "fc1.weight": (_ref_spectral, 3.0),
        "fc2.weight": (_ref_spectral, 3.0),
        "head.weight": (_ref_sign, 10.0),
        "fc2.bias": (_ref_bias, 0.5),
        "gain": (_ref_bias, 0.5),
    }
    W = _params(model)
    d = {n: torch.zeros_like(w) for n, w in W.items()}
    for step in range(2):
        g = _grads(model, seed=step)
        opt.step()
        for n in W:
            d[n] = (1 - alpha) * d[n] + alpha * g[n]
            fn, scale = lmo[n]
            shrink = 1.0 if unconstrained else 1.0 - lr
            W[n] = shrink * W[n] - lr * scale * fn(d[n])
            got = dict(model.named_parameters())[n]
            assert torch.allclose(got, W[n], atol=1e-5), (n, step)
    if alpha == 1.0:
        assert all(len(s) == 0 for s in opt.state.values())


def test_scion_embedding_colnorm_acts_on_transpose():
    # uScion from W = 0: every token's row (a column of the d x vocab map) moves by RMS lr*scale.
    model = _model()
    nn.init.zeros_(model.embed.weight)
    opt = Scion(
        [{"params": [model.embed.weight], "lmo": "colnorm", "transposed": True}],
        lr=0.1,
        momentum=1.0,
        scale=2.0,
        unconstrained=True,
    )
    _grads(model, 0)
    opt.step()
    row_rms = model.embed.weight.pow(2).mean(dim=1).sqrt()
    assert torch.allclose(row_rms, torch.full((VOCAB,), 0.2), atol=1e-6)


def _rownorm_trace(unconstrained: bool, start_scale: float, steps: int = 30) -> list[float]:
    head = nn.Linear(32, 8, bias=False)
    opt = Scion(
        [head.weight], lr=0.2, momentum=1.0, lmo="rownorm", scale=2.0, unconstrained=unconstrained
    )
    init_on_ball_("rownorm", head.weight.data, scale=start_scale)
    g = torch.randn(8, 32, generator=torch.Generator().manual_seed(0))
    trace = [rms_to_inf(head.weight).item()]
    for _ in range(steps):
        head.weight.grad = g.clone()  # a constant direction: the worst case for growth
        opt.step()
        trace.append(rms_to_inf(head.weight).item())
    return trace


def test_constrained_scion_shrinks_to_ball_unconstrained_does_not():
    # (1-lr) W - lr u is a convex combination of W and -u (u on the ball of radius `scale`):
    # Scion contracts towards the ball and never leaves it; uScion's steps add up past it.
    trace = _rownorm_trace(unconstrained=False, start_scale=100.0)
    assert trace[0] == pytest.approx(100.0, rel=1e-5)
    for t, value in enumerate(trace):
        assert value <= 0.8**t * 100.0 + (1 - 0.8**t) * 2.0 + 1e-3
    assert trace[-1] < 2.0 + 0.2
    inside = _rownorm_trace(unconstrained=False, start_scale=2.0)
    assert max(inside) <= 2.0 + 1e-4
    free = _rownorm_trace(unconstrained=True, start_scale=2.0)
    assert free[-1] > 2.0 * 4  # grows about lr * scale per step along a fixed direction


def test_scion_conv_is_flattened():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    opt = Scion([conv.weight], lr=0.1, momentum=1.0, lmo="spectral", unconstrained=True)
    W0 = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    expected = W0 - 0.1 * _ref_spectral(conv.weight.grad.view(8, 27)).view_as(W0)
    assert torch.allclose(conv.weight, expected, atol=1e-6)


def test_scion_stacked_equals_separate_models():
    # K models in one (K, m, n) tensor move exactly like K separate optimizers.
    K = 3
    stacked = nn.Parameter(torch.randn(K, 12, 20))
    singles = [nn.Parameter(stacked[k].detach().clone()) for k in range(K)]
    opt = Scion([stacked], lr=0.1, momentum=0.5, lmo="spectral", stacked=True)
    opts = [Scion([s], lr=0.1, momentum=0.5, lmo="spectral") for s in singles]
    for step in range(2):
        g = torch.randn(K, 12, 20, generator=torch.Generator().manual_seed(step))
        stacked.grad = g.clone()
        opt.step()
        for k in range(K):
            singles[k].grad = g[k].clone()
            opts[k].step()
    for k in range(K):
        assert torch.allclose(stacked[k], singles[k], atol=1e-5)


def test_scion_rejects_unknown_lmo():
    with pytest.raises(ValueError, match="spectral"):
        Scion([nn.Parameter(torch.ones(2, 2))], lmo="nuclear")
    with pytest.raises(ValueError, match="colnorm"):
        Scion([{"params": [nn.Parameter(torch.ones(2, 2))], "lmo": "nuclear"}])
    with pytest.raises(ValueError, match="alpha"):
        Scion([{"params": [nn.Parameter(torch.ones(2, 2))], "momentum": 0.0}])


# ---- Muon -------------------------------------------------------------------------------------


def _adam_ref(w, g, m, v, t, lr, b1, b2, eps, wd):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    denom = (v / (1 - b2**t)).sqrt() + eps
    return w * (1 - lr * wd) - lr * (m / (1 - b1**t)) / denom, m, v


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_two_steps_match_formula(nesterov):
    model = _model()
    hidden = [model.fc1.weight, model.fc2.weight]  # (32, 16) tall, (16, 32) wide
    others = [model.embed.weight, model.head.weight, model.fc2.bias, model.gain]
    lr, beta, wd, adam_lr = 0.02, 0.95, 0.1, 3e-3
    opt = Muon(
        [{"params": hidden, "use_muon": True}, {"params": others, "use_muon": False}],
        lr=lr,
        momentum=beta,
        nesterov=nesterov,
        weight_decay=wd,
        adam_lr=adam_lr,
        adam_weight_decay=0.01,
    )
    names = dict((id(p), n) for n, p in model.named_parameters())
    W = _params(model)
    buf = {n: torch.zeros_like(w) for n, w in W.items()}
    m = {n: torch.zeros_like(w) for n, w in W.items()}
    v = {n: torch.zeros_like(w) for n, w in W.items()}
    for t in (1, 2):
        g = _grads(model, seed=t)
        opt.step()
        for p in hidden:
            n = names[id(p)]
            buf[n] = beta * buf[n] + (1 - beta) * g[n]
            u = (1 - beta) * g[n] + beta * buf[n] if nesterov else buf[n]
            d_out, d_in = u.shape
            scale = max(1.0, d_out / d_in) ** 0.5
            W[n] = W[n] * (1 - lr * wd) - lr * scale * newton_schulz(u)
            assert torch.allclose(p, W[n], atol=1e-6), (n, t)
        for p in others:
            n = names[id(p)]
            W[n], m[n], v[n] = _adam_ref(W[n], g[n], m[n], v[n], t, adam_lr, 0.9, 0.95, 1e-10, 0.01)
            assert torch.allclose(p, W[n], atol=1e-6), (n, t)


def test_muon_scale_conventions():
    assert muon_scale(64, 16, "keller") == 2.0
    assert muon_scale(16, 64, "keller") == 1.0
    assert muon_scale(16, 64, "speedrun") == 8.0
    assert muon_scale(16, 64, "moonlight") == pytest.approx(1.6)
    with pytest.raises(ValueError, match="moonlight"):
        muon_scale(1, 1, "bogus")
    # The convention reaches the update.
    p = nn.Parameter(torch.zeros(16, 64))
    opt = Muon(
        [{"params": [p], "use_muon": True}],
        lr=0.01,
        momentum=0.0,
        nesterov=False,
        scale_convention="speedrun",
    )
    p.grad = torch.randn(16, 64)
    opt.step()
    assert torch.allclose(p, -0.01 * 8.0 * newton_schulz(p.grad), atol=1e-6)


def test_muon_needs_use_muon_flag():
    with pytest.raises(ValueError, match="use_muon"):
        Muon([nn.Parameter(torch.ones(3, 3))])


# ---- MOGA -------------------------------------------------------------------------------------


def test_moga_row_p2_two_steps():
    W = nn.Parameter(torch.randn(12, 36))
    lr, beta, wd = 0.03, 0.95, 0.1
    opt = MOGA([W], lr=lr, beta=beta, weight_decay=wd, rule="row")
    ref, buf = W.detach().clone(), torch.zeros(12, 36)
    for seed in range(2):
        g = torch.randn(12, 36, generator=torch.Generator().manual_seed(seed))
        W.grad = g.clone()
        opt.step()
        buf = beta * buf + (1 - beta) * g
        ref = ref * (1 - lr * wd) - lr / math.sqrt(36) * buf / buf.norm(dim=1, keepdim=True)
        assert torch.allclose(W, ref, atol=1e-6)
    # Each row's step has l2 norm lr/sqrt(d_in): entry RMS about lr/d_in.


def test_moga_row_general_p():
    W = nn.Parameter(torch.zeros(6, 27))
    opt = MOGA([W], lr=0.1, beta=0.5, weight_decay=0.0, rule="row", p=3.0)
    g = torch.randn(6, 27)
    W.grad = g.clone()
    opt.step()
    M = 0.5 * g
    direction = torch.sign(M) * M.abs() ** 2 / (M.abs() ** 3).sum(1, keepdim=True) ** (2 / 3)
    assert torch.allclose(W, -0.1 * 27 ** (-1 / 3) * direction, atol=1e-6)
    # The dual map of l_3 gives rows of unit l_{3/2} norm.
    row_dual = (direction.abs() ** 1.5).sum(1) ** (2 / 3)
    assert torch.allclose(row_dual, torch.ones(6), atol=1e-5)


def test_moga_col_factor():
    W = nn.Parameter(torch.ones(20, 5))
    lr, wd = 0.02, 0.1
    opt = MOGA([W], lr=lr, beta=0.9, weight_decay=wd, rule="col")
    g = torch.randn(20, 5)
    W.grad = g.clone()
    opt.step()
    M = 0.1 * g
    expected = (1 - lr * wd) - lr * math.sqrt(20) / 5 * M / M.norm(dim=0, keepdim=True)
    assert torch.allclose(W, expected, atol=1e-6)


def test_moga_registry_roles_and_head_factor():
    lr = 0.01
    for head_fan_factor in (True, False):
        model = _model()
        opt = build_optimizer(
            "moga-row", model, lr, weight_decay=0.0, head_fan_factor=head_fan_factor
        )
        W0 = _params(model)
        _grads(model, 0)
        opt.step()
        delta = {n: W0[n] - p.detach() for n, p in model.named_parameters()}
        # Embedding and vectors: sign(momentum) with the plain lr, every entry moves by lr.
        for n in ("embed.weight", "gain", "fc2.bias"):
            assert torch.allclose(delta[n].abs(), torch.full_like(delta[n], lr)), n
        # Hidden: rows of norm lr / sqrt(d_in).
        assert torch.allclose(delta["fc1.weight"].norm(dim=1), torch.full((32,), lr / 4))
        assert torch.allclose(
            delta["fc2.weight"].norm(dim=1), torch.full((16,), lr / math.sqrt(32))
        )
        head_row = lr / 4 if head_fan_factor else lr
        assert torch.allclose(delta["head.weight"].norm(dim=1), torch.full((VOCAB,), head_row))


def test_moga_col_registry_and_weight_decay_on_matrices_only():
    lr, wd = 0.01, 0.1
    model = _model()
    opt = build_optimizer("moga-col", model, lr)  # weight_decay 0.1 by default
    W0 = _params(model)
    g = _grads(model, 0)
    opt.step()
    M = 0.05 * g["fc1.weight"]  # (32, 16)
    expected = W0["fc1.weight"] * (1 - lr * wd) - lr * math.sqrt(32) / 16 * M / M.norm(dim=0)
    assert torch.allclose(model.fc1.weight, expected, atol=1e-6)
    expected_gain = W0["gain"] - lr * torch.sign(g["gain"])  # no decay on vectors
    assert torch.allclose(model.gain, expected_gain)
    expected_emb = W0["embed.weight"] * (1 - lr * wd) - lr * torch.sign(g["embed.weight"])
    assert torch.allclose(model.embed.weight, expected_emb)


# ---- AdamW parameterizations ------------------------------------------------------------------


def _first_step_lrs(name: str, **hparams) -> dict[str, float]:
    """Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g): read each param's lr off it."""
    model = _model()
    opt = build_optimizer(name, model, 1e-2, **hparams)
    W0 = _params(model)
    g = _grads(model, 0)
    opt.step()
    lrs = {}
    for n, p in model.named_parameters():
        step = (W0[n] - p.detach()) / torch.sign(g[n])
        assert torch.allclose(step, step.mean().expand_as(step), rtol=1e-4), n
        lrs[n] = step.mean().item()
    return lrs


def test_adamw_sp_one_lr():
    lrs = _first_step_lrs("adamw")
    assert all(v == pytest.approx(1e-2, rel=1e-4) for v in lrs.values())


def test_adamw_mup_lrs():
    # width 16, base_width 64 -> width_mult 1/4: hidden and output lr / width_mult.
    lrs = _first_step_lrs("adamw-mup")
    assert lrs["embed.weight"] == pytest.approx(1e-2, rel=1e-4)
    assert lrs["gain"] == pytest.approx(1e-2, rel=1e-4)
    assert lrs["fc2.bias"] == pytest.approx(1e-2, rel=1e-4)
    for n in ("fc1.weight", "fc2.weight", "head.weight"):
        assert lrs[n] == pytest.approx(4e-2, rel=1e-4)
    lrs = _first_step_lrs("adamw-mup", width_mult=2.0, lr_output=0.5)
    assert lrs["fc1.weight"] == pytest.approx(5e-3, rel=1e-4)
    assert lrs["head.weight"] == pytest.approx(2.5e-3, rel=1e-4)
    assert lrs["embed.weight"] == pytest.approx(1e-2, rel=1e-4)


def test_adamw_rescaled_lrs():
    lrs = _first_step_lrs("adamw-rescaled", lr_vector=3.0)
    assert lrs["fc1.weight"] == pytest.approx(1e-2 / 16, rel=1e-4)  # (32, 16): d_in 16
    assert lrs["fc2.weight"] == pytest.approx(1e-2 / 32, rel=1e-4)  # (16, 32): d_in 32
    assert lrs["head.weight"] == pytest.approx(1e-2 / 16, rel=1e-4)
    assert lrs["embed.weight"] == pytest.approx(1e-2, rel=1e-4)
    assert lrs["gain"] == pytest.approx(3e-2, rel=1e-4)


def test_adamw_weight_decay_skips_vectors():
    model = _model()
    opt = build_optimizer("adamw", model, 1e-2, weight_decay=0.5)
    wd = {g["role"]: g["weight_decay"] for g in opt.param_groups}
    assert wd == {"input": 0.5, "hidden": 0.5, "output": 0.5, "vector": 0.0}
    assert opt.param_groups[0]["betas"] == (0.9, 0.95) and opt.param_groups[0]["eps"] == 1e-8


def test_adamw_mup_init():
    torch.manual_seed(0)
    model = TinyLM(vocab=64, width=128)
    with torch.no_grad():
        model.fc2.bias.fill_(0.3)
    opt = build_optimizer("adamw-mup", model, 1e-3)
    opt.init()
    assert model.fc1.weight.std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert model.fc2.weight.std().item() == pytest.approx(256**-0.5, rel=0.05)
    assert model.head.weight.std().item() == pytest.approx(1 / 128, rel=0.05)
    assert model.embed.weight.std().item() == pytest.approx(64**-0.5, rel=0.05)  # fan-in: vocab
    assert torch.equal(model.gain, torch.ones(128))
    assert torch.equal(model.fc2.bias, torch.full((128,), 0.3))
