"""Parameter roles, the registry, Scion's init, state_dict round trips, dtypes, isolation."""

from __future__ import annotations

import ast
import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import sweeper.optim
from sweeper.optim import (
    OPTIMIZER_NAMES,
    ParamRole,
    accepted_hparams,
    build_optimizer,
    l1_to_inf,
    l1_to_rms,
    param_roles,
    rms_to_inf,
    rms_to_rms,
)

torch.set_num_threads(1)

VOCAB, WIDTH = 32, 16


class TinyGPT(nn.Module):
    """Embedding, two blocks of (attention-like matrix, MLP), RMSNorm-like gains, untied head."""

    def __init__(self, vocab: int = VOCAB, width: int = WIDTH, declare: bool = False) -> None:
        super().__init__()
        self.width = width
        self.declare = declare
        self.tok = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "attn": nn.Linear(width, width, bias=False),
                    "up": nn.Linear(width, 4 * width, bias=False),
                    "down": nn.Linear(4 * width, width, bias=False),
                }
            )
            for _ in range(2)
        )
        self.norm = nn.Parameter(torch.ones(width))
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        for b in self.blocks:
            h = h + b["attn"](h)
            h = h + b["down"](torch.relu(b["up"](h)) * math.sqrt(2))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm
        return self.head(h)


class DeclaringGPT(TinyGPT):
    def param_roles(self) -> dict[str, str]:
        roles = {n: "hidden" for n, p in self.named_parameters() if p.ndim == 2}
        roles.update({"tok.weight": "input", "head.weight": "output", "norm": "vector"})
        return roles


def _batch(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 8), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, opt: torch.optim.Optimizer, seeds: range) -> None:
    for seed in seeds:
        x = _batch(seed)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


# ---- roles ------------------------------------------------------------------------------------


def _role_map(model: nn.Module) -> dict[str, tuple[str, bool]]:
    return {pr.name: (pr.role, pr.transposed) for pr in param_roles(model)}


def test_roles_inferred_for_gpt():
    roles = _role_map(TinyGPT())
    assert roles["tok.weight"] == ("input", True)
    assert roles["head.weight"] == ("output", False)
    assert roles["norm"] == ("vector", False)
    for i in range(2):
        for m in ("attn", "up", "down"):
            assert roles[f"blocks.{i}.{m}.weight"] == ("hidden", False)
    assert len(roles) == 9


def test_roles_declared_by_model_match_and_are_checked():
    model = DeclaringGPT()
    assert _role_map(model) == _role_map(TinyGPT())
    prs = param_roles(model)
    assert all(isinstance(pr, ParamRole) for pr in prs)
    assert prs[0].param is dict(model.named_parameters())[prs[0].name]
    with pytest.raises(AttributeError):
        prs[0].role = "hidden"  # frozen

    class Missing(TinyGPT):
        def param_roles(self):
            return {"tok.weight": "input"}

    class Bad(DeclaringGPT):
        def param_roles(self):
            return {**super().param_roles(), "norm": "gain"}

    class Unknown(DeclaringGPT):
        def param_roles(self):
            return {**super().param_roles(), "nope.weight": "hidden"}

    with pytest.raises(ValueError, match="no role"):
        param_roles(Missing())
    with pytest.raises(ValueError, match="unknown roles"):
        param_roles(Bad())
    with pytest.raises(ValueError, match="lacks"):
        param_roles(Unknown())


def test_roles_inferred_for_mlp_and_conv_and_tied():
    mlp = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.Linear(20, 3))
    assert _role_map(mlp) == {
        "0.weight": ("input", False),
        "0.bias": ("vector", False),
        "2.weight": ("hidden", False),
        "2.bias": ("vector", False),
        "3.weight": ("output", False),
        "3.bias": ("vector", False),
    }
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    roles = _role_map(cnn)
    assert roles["0.weight"][0] == "input" and roles["1.weight"][0] == "hidden"
    assert roles["3.weight"][0] == "output"

    tied = TinyGPT()
    tied.head.weight = tied.tok.weight
    roles = _role_map(tied)
    assert "head.weight" not in roles and roles["tok.weight"] == ("input", True)


def test_frozen_params_are_skipped():
    model = TinyGPT()
    model.norm.requires_grad_(False)
    assert "norm" not in _role_map(model)
    opt = build_optimizer("scion", model, 0.01)
    assert all(p is not model.norm for g in opt.param_groups for p in g["params"])


# ---- registry ---------------------------------------------------------------------------------


def test_names_and_hparams():
    assert OPTIMIZER_NAMES == (
        "adamw",
        "adamw-mup",
        "adamw-rescaled",
        "muon",
        "scion",
        "uscion",
        "moga-row",
        "moga-col",
    )
    for name in OPTIMIZER_NAMES:
        h = accepted_hparams(name)
        for role in ("input", "hidden", "output", "vector"):
            assert h[f"lr_{role}"] == 1.0
        # Every value a plain scalar (or None = derived), so a grid can sweep it.
        assert all(v is None or isinstance(v, bool | int | float | str) for v in h.values())
    scion = accepted_hparams("scion")
    assert scion["momentum"] == 0.1
    assert (scion["scale_input"], scion["scale_hidden"], scion["scale_output"]) == (1.0, 3.0, 10.0)
    assert (scion["lmo_input"], scion["lmo_hidden"], scion["lmo_output"]) == (
        "colnorm",
        "spectral",
        "sign",
    )
    muon = accepted_hparams("muon")
    assert (muon["momentum"], muon["nesterov"], muon["adam_lr"], muon["adam_eps"]) == (
        0.95,
        True,
        3e-4,
        1e-10,
    )
    moga = accepted_hparams("moga-row")
    assert moga == {**moga, "beta": 0.95, "p": 2.0, "weight_decay": 0.1, "head_fan_factor": True}
    accepted_hparams("muon")["momentum"] = 0.0  # a copy: the defaults stay put
    assert accepted_hparams("muon")["momentum"] == 0.95


def test_unknown_name_and_hparam_raise_listing_accepted():
    with pytest.raises(ValueError, match="moga-row") as e:
        build_optimizer("lion", TinyGPT(), 0.01)
    assert all(name in str(e.value) for name in OPTIMIZER_NAMES)
    with pytest.raises(ValueError, match="accepted:.*scale_output") as e:
        build_optimizer("scion", TinyGPT(), 0.01, betas=0.9)
    assert "betas" in str(e.value)
    with pytest.raises(ValueError, match="adam_lr"):
        build_optimizer("muon", TinyGPT(), 0.01, head_fan_factor=False)
    with pytest.raises(ValueError, match="unknown"):
        accepted_hparams("sgd")
    with pytest.raises(ValueError, match="rownorm"):
        build_optimizer("scion", TinyGPT(), 0.01, lmo_output="frobenius")
    with pytest.raises(ValueError, match="keller"):
        build_optimizer("muon", TinyGPT(), 0.01, scale_convention="bogus")


def test_scion_groups_and_lr_multipliers():
    model = TinyGPT()
    opt = build_optimizer("uscion", model, 0.1, lr_hidden=0.125, scale_output=16.0, momentum=1.0)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["input"]["lmo"] == "colnorm" and by_role["input"]["transposed"]
    assert by_role["hidden"]["lmo"] == "spectral" and by_role["hidden"]["scale"] == 3.0
    assert by_role["output"]["lmo"] == "sign" and by_role["output"]["scale"] == 16.0
    assert by_role["vector"]["lmo"] == "bias_rms"
    assert by_role["hidden"]["lr"] == pytest.approx(0.0125) and by_role["input"]["lr"] == 0.1
    assert all(g["unconstrained"] and g["momentum"] == 1.0 for g in opt.param_groups)
    assert not any(g["unconstrained"] for g in build_optimizer("scion", model, 0.1).param_groups)


def test_muon_groups_and_lr_multipliers():
    model = TinyGPT()
    opt = build_optimizer("muon", model, 0.02, adam_lr=1e-3, lr_hidden=0.5, lr_output=0.25)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert by_role["hidden"]["use_muon"] and by_role["hidden"]["lr"] == 0.01
    assert not by_role["input"]["use_muon"] and by_role["input"]["lr"] == 1e-3
    assert by_role["output"]["lr"] == 2.5e-4 and by_role["vector"]["lr"] == 1e-3
    assert by_role["output"]["betas"] == (0.9, 0.95) and by_role["output"]["eps"] == 1e-10


def test_init_only_where_expected():
    for name in OPTIMIZER_NAMES:
        has_init = hasattr(build_optimizer(name, TinyGPT(), 0.01), "init")
        assert has_init == (name in ("scion", "uscion", "adamw-mup")), name


def test_scion_init_puts_weights_on_their_balls():
    model = TinyGPT()
    opt = build_optimizer("scion", model, 0.01, scale_hidden=2.0, scale_output=10.0)
    opt.init()
    # ColNorm input (acting on the transpose of the (vocab, d) table): every token column
    # of the d x vocab map has RMS = scale.
    assert l1_to_rms(model.tok.weight.mT).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(model.tok.weight.pow(2).mean(1).sqrt(), torch.ones(VOCAB), atol=1e-5)
    for b in model.blocks:
        for m in ("attn", "up", "down"):
            assert rms_to_rms(b[m].weight).item() == pytest.approx(2.0, rel=1e-4)
    assert l1_to_inf(model.head.weight).item() == pytest.approx(10.0 / WIDTH)
    assert torch.equal(model.norm, torch.ones(WIDTH))  # norm gains left alone

    # Rownorm output: rows of norm scale/sqrt(d_in), so rms_to_inf = scale.
    model = TinyGPT()
    build_optimizer("scion", model, 0.01, lmo_output="rownorm", scale_output=7.0).init()
    assert torch.allclose(model.head.weight.norm(dim=1), torch.full((VOCAB,), 7.0 / 4.0))
    assert rms_to_inf(model.head.weight).item() == pytest.approx(7.0, rel=1e-5)


def test_scion_zero_init_vectors_on_request():
    lin = nn.Linear(4, 4)
    opt = sweeper.optim.Scion(
        [{"params": [lin.weight]}, {"params": [lin.bias], "lmo": "bias_rms", "zero_init": True}]
    )
    opt.init()
    assert torch.equal(lin.bias, torch.zeros(4))


# ---- state_dict, dtypes, training -------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_state_dict_round_trip_continues_identically(name):
    torch.manual_seed(0)
    model_a = TinyGPT()
    opt_a = build_optimizer(name, model_a, 0.01)
    if hasattr(opt_a, "init"):
        opt_a.init()
    _train(model_a, opt_a, range(3))

    # B: a fresh model + optimizer, restored from A's checkpoint (through bytes, like a file).
    model_b = TinyGPT()
    opt_b = build_optimizer(name, model_b, 0.5)  # wrong lr on purpose: the state restores it
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    buffer.seek(0)
    ckpt = torch.load(buffer, weights_only=True)
    model_b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])

    _train(model_a, opt_a, range(3, 6))
    _train(model_b, opt_b, range(3, 6))
    for (n, pa), (_, pb) in zip(
        model_a.named_parameters(), model_b.named_parameters(), strict=True
    ):
        assert torch.equal(pa, pb), n
    assert len(opt_a.state) > 0


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_bf16_params_train_and_loss_falls(name):
    torch.manual_seed(0)
    model = TinyGPT()
    lr = {"adamw": 1e-2, "adamw-mup": 1e-2, "adamw-rescaled": 0.1, "muon": 0.02}.get(name, 0.05)
    hp = {"adam_lr": 1e-2} if name == "muon" else {}
    opt = build_optimizer(name, model, lr, **hp)
    if hasattr(opt, "init"):
        opt.init()
    x = _batch(0)

    def loss_of(m: nn.Module) -> float:
        return nn.functional.cross_entropy(m(x).flatten(0, 1).float(), x.flatten()).item()

    model.bfloat16()
    before = loss_of(model)
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1).float(), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    for state in opt.state.values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == torch.bfloat16
    assert loss_of(model) < before


def test_closure_is_called():
    model = TinyGPT()
    for name in ("scion", "muon", "moga-row"):
        opt = build_optimizer(name, model, 0.01)
        x = _batch(0)

        def closure(opt=opt, x=x):
            opt.zero_grad()
            loss = model(x).square().mean()
            loss.backward()
            return loss

        assert torch.is_tensor(opt.step(closure))


def test_copy_of_model_gives_same_groups():
    # Groups are deterministic (role order), so two builds line up for load_state_dict.
    a, b = TinyGPT(), copy.deepcopy(TinyGPT())
    for name in OPTIMIZER_NAMES:
        ga = [(g.get("role"), len(g["params"])) for g in build_optimizer(name, a, 0.1).param_groups]
        gb = [(g.get("role"), len(g["params"])) for g in build_optimizer(name, b, 0.1).param_groups]
        assert ga == gb


def test_optim_imports_nothing_else_from_sweeper():
    root = Path(sweeper.optim.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
            elif isinstance(node, ast.Import):
                mod = node.names[0].name
            else:
                continue
            if mod.split(".")[0] == "sweeper":
                assert mod.startswith("sweeper.optim"), (path.name, mod)
