"""The proxy models: shapes, causality, roles, the MLP's one-hot input, every optimizer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from trial_specs import make_trial

from sweeper.models import GPT, MLP, build_model
from sweeper.optim import OPTIMIZER_NAMES, build_optimizer, param_roles
from sweeper.spec import TrialSpec

torch.set_num_threads(1)
V = 256


def trial(**changes) -> TrialSpec:
    return make_trial(**changes)


@pytest.mark.parametrize(
    "width, n_head, head_size", [(32, 1, 32), (64, 1, 64), (96, 1, 64), (128, 2, 64), (256, 4, 64)]
)
def test_heads_keep_their_size_as_width_grows(width, n_head, head_size):
    model = GPT(V, width, depth=1, seq_len=16)
    attn = model.blocks[0].attn
    assert (attn.n_head, attn.head_size) == (n_head, head_size)
    assert model(torch.randint(0, V, (2, 16))).shape == (2, 16, V)
    assert model.width == width and model.depth == 1


def test_attention_scale_options():
    sqrt = GPT(V, 128, 1, 16, attn_scale="sqrt").blocks[0].attn.scale
    mup = GPT(V, 128, 1, 16, attn_scale="mup").blocks[0].attn.scale
    assert sqrt == pytest.approx(1 / 8) and mup == pytest.approx(1 / 64)
    with pytest.raises(ValueError, match="attn_scale"):
        GPT(V, 128, 1, 16, attn_scale="auto")


@pytest.mark.parametrize("kind", ["gpt", "mlp"])
def test_models_are_causal(kind):
    torch.manual_seed(0)
    model = build_model(trial(model=kind))
    x = torch.randint(1, V, (2, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    assert torch.allclose(a[:, :20], b[:, :20], atol=1e-5)  # the past does not see the future
    assert not torch.allclose(a[:, 20], b[:, 20])


def test_mlp_input_layer_is_a_linear_map_on_concatenated_one_hots():
    torch.manual_seed(0)
    c = 3
    model = MLP(V, width=16, depth=1, context=c)
    idx = torch.randint(0, V, (2, 10))
    padded = F.pad(idx, (c - 1, 0), value=0)  # token 0 pads before the start
    # window of position t: tokens t-c+1 .. t, oldest first, one-hot each, concatenated
    onehots = torch.cat(
        [F.one_hot(padded[:, j : j + 10], V).float() for j in range(c)], dim=-1
    )  # (2, 10, c * V)
    expected = onehots @ model.wte.weight  # the Embedding's weight is the (c*V, width) matrix
    assert torch.allclose(model.wte(idx), expected, atol=1e-5)
    # and the MLP sees exactly c tokens: changing one c positions back changes nothing
    y = idx.clone()
    y[:, 2] = (y[:, 2] + 1) % V
    with torch.no_grad():
        a, b = model(idx), model(y)
    assert torch.allclose(a[:, 2 + c :], b[:, 2 + c :]) and not torch.allclose(a[:, 2], b[:, 2])


@pytest.mark.parametrize("kind", ["gpt", "mlp"])
def test_param_roles_tag_every_parameter(kind):
    model = build_model(trial(model=kind))
    roles = model.param_roles()
    assert set(roles) == {n for n, _ in model.named_parameters()}
    assert roles["wte.weight"] == "input" and roles["lm_head.weight"] == "output"
    params = dict(model.named_parameters())
    for name, role in roles.items():
        assert (role == "vector") == (params[name].ndim == 1), name
    hidden = [n for n, r in roles.items() if r == "hidden"]
    assert len(hidden) == (6 * 2 if kind == "gpt" else 2)
    # the optimizers' view agrees, with the embedding flagged as stored transposed
    by_name = {pr.name: pr for pr in param_roles(model)}
    assert by_name["wte.weight"].transposed and not by_name["lm_head.weight"].transposed


def test_coord_layers_go_from_input_to_output():
    gpt = GPT(V, 64, 2, 16)
    names = [n for n, _ in gpt.coord_layers()]
    assert names == [
        "wte",
        "blocks.0.attn",
        "blocks.0.mlp",
        "blocks.1.attn",
        "blocks.1.mlp",
        "lm_head",
    ]
    mlp = MLP(V, 32, 3, 4)
    assert [n for n, _ in mlp.coord_layers()] == [
        "wte",
        "hidden.0",
        "hidden.1",
        "hidden.2",
        "lm_head",
    ]


def test_zero_init_out():
    gpt = GPT(V, 64, 2, 16, zero_init_out=True)
    for block in gpt.blocks:
        assert not block.attn.c_proj.weight.any() and not block.mlp.c_proj.weight.any()
        assert block.attn.c_q.weight.any()
    assert not MLP(V, 32, 1, 4, zero_init_out=True).lm_head.weight.any()


def test_standard_init_scales():
    torch.manual_seed(0)
    gpt = GPT(V, 256, 1, 16)
    assert gpt.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert gpt.blocks[0].mlp.c_fc.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert gpt.blocks[0].mlp.c_proj.weight.std().item() == pytest.approx(1 / 32, rel=0.05)
    # initial loss near ln(vocab): logits of order one
    x = torch.randint(0, V, (4, 16))
    assert abs(gpt.loss(x, x).item() - math.log(V)) < 1.5


def test_init_depends_on_the_seed_not_the_lr():
    def weights(seed, lr):
        torch.manual_seed(seed)
        return build_model(trial(seed=seed, lr=lr)).lm_head.weight.detach().clone()

    assert torch.equal(weights(0, 1e-3), weights(0, 1.0))
    assert not torch.equal(weights(0, 1e-3), weights(1, 1e-3))


@pytest.mark.parametrize("kind", ["gpt", "mlp"])
@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_optimizer_takes_a_step_on_every_model(kind, name):
    torch.manual_seed(0)
    model = build_model(trial(model=kind, width=32, depth=1))
    opt = build_optimizer(name, model, lr=1e-3)
    if callable(getattr(opt, "init", None)):
        opt.init()
    x = torch.randint(0, V, (2, 32))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = model.loss(x, x.roll(-1, 1))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in moved and "wte.weight" in moved
