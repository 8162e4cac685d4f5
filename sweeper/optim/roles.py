"""Parameter roles: which layer of the network each parameter is.

Roles pick the norm (and so the LMO, lr and init) per parameter:
`input` (first layer / token embedding), `hidden` (every other matrix), `output` (the readout),
`vector` (biases, norm gains, scalars).

A model may declare its roles with a method `param_roles() -> {param_name: role}`; otherwise
they are inferred from the module structure (see `param_roles`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import nn

Role = Literal["input", "hidden", "output", "vector"]
ROLES: tuple[str, ...] = get_args(Role)

# Modules whose weight is stored (d_in, d_out): a lookup table is the map one-hot -> row.
_TRANSPOSED_MODULES = (nn.Embedding, nn.EmbeddingBag)
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True, eq=False)  # eq=False: identity comparison, tensors have no truth value
class ParamRole:
    name: str
    param: nn.Parameter
    role: Role
    transposed: bool


def param_roles(model: nn.Module) -> list[ParamRole]:
    """The role of every trainable parameter of `model`, in `named_parameters()` order.

    With a `model.param_roles()` method, its `{name: role}` dict decides (it must name every
    trainable parameter). Otherwise: 1-D (and 0-D) -> vector; `nn.Embedding` weights -> input;
    the weight of the last `nn.Linear` in module order -> output; with no embedding, the weight
    of the first `nn.Linear` / `nn.ConvNd` -> input; every other matrix (conv kernels included)
    -> hidden. `transposed` is True for `nn.Embedding` weights either way.
    Tied weights appear once, under their first name (as `named_parameters()` lists them).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    transposed_ids = {id(m.weight) for m in model.modules() if isinstance(m, _TRANSPOSED_MODULES)}
    declared = getattr(model, "param_roles", None)
    roles = _checked(declared(), model, named) if callable(declared) else _inferred(model, named)
    return [ParamRole(n, p, roles[n], id(p) in transposed_ids) for n, p in named]


def _checked(
    declared: dict[str, str], model: nn.Module, named: list[tuple[str, nn.Parameter]]
) -> dict[str, Role]:
    every_name = {n for n, _ in model.named_parameters()}
    unknown = sorted(set(declared) - every_name)
    if unknown:
        raise ValueError(f"param_roles() names parameters the model lacks: {unknown}")
    missing = [n for n, _ in named if n not in declared]
    if missing:
        raise ValueError(f"param_roles() gives no role to trainable parameters: {missing}")
    bad = {n: r for n, r in declared.items() if r not in ROLES}
    if bad:
        raise ValueError(f"param_roles() gives unknown roles {bad}; roles are {ROLES}")
    return declared  # type: ignore[return-value]


def _inferred(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> dict[str, Role]:
    modules = list(model.modules())
    embeddings = {id(m.weight) for m in modules if isinstance(m, _TRANSPOSED_MODULES)}
    linears = [m for m in modules if isinstance(m, nn.Linear)]
    output = {id(linears[-1].weight)} if linears else set()
    first_layers = [m for m in modules if isinstance(m, (nn.Linear, *_CONV_MODULES))]
    inputs = set(embeddings)
    if not embeddings and first_layers and id(first_layers[0].weight) not in output:
        inputs.add(id(first_layers[0].weight))

    roles: dict[str, Role] = {}
    for name, p in named:
        if p.ndim < 2:
            roles[name] = "vector"
        elif id(p) in inputs:
            roles[name] = "input"
        elif id(p) in output:
            roles[name] = "output"
        else:
            roles[name] = "hidden"
    return roles


def param_label(group: dict[str, Any], index: int) -> str:
    """How an error message names parameter `index` of an optimizer param group: its name
    when the optimizer was given `model.named_parameters()`, and always its shape."""
    shape = tuple(group["params"][index].shape)
    names = group.get("param_names")
    return (
        f"parameter {names[index]!r} of shape {shape}" if names else f"a parameter of shape {shape}"
    )
