"""Optimizers under operator norms: LMOs, norms, Scion/uScion, Muon, MOGA, AdamW variants.

Nothing here imports from the rest of sweeper: every optimizer is an ordinary
`torch.optim.Optimizer` for any PyTorch training loop. By hand, with per-layer norms:

    from sweeper.optim import Scion

    opt = Scion(
        [
            {"params": [model.embed.weight], "lmo": "colnorm", "scale": 1.0, "transposed": True},
            {"params": hidden_matrices, "lmo": "spectral", "scale": 3.0},
            {"params": [model.head.weight], "lmo": "sign", "scale": 10.0},
            {"params": gains_and_biases, "lmo": "bias_rms", "scale": 1.0},
        ],
        lr=2**-6,
        momentum=0.1,          # Scion's alpha: d <- (1 - alpha) d + alpha g
        unconstrained=False,   # True: uScion
    )
    opt.init()                 # weights onto their norm balls (norm gains left alone)
    # Scion(model.parameters()) also runs: lmo="auto", spectral matrices and bias_rms vectors.
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

Or by name, with the parameter roles inferred (or taken from `model.param_roles()`):

    from sweeper.optim import build_optimizer, accepted_hparams

    opt = build_optimizer("muon", model, lr=0.02, adam_lr=3e-4, lr_output=0.5)
    if hasattr(opt, "init"):
        opt.init()

Names: OPTIMIZER_NAMES; the settings of each (with defaults): `accepted_hparams(name)`.
torch's lr schedulers work; give OneCycleLR / CyclicLR one lr per group (`max_lr=[g["lr"] for g
in opt.param_groups]`) to keep the per-role lrs, and `cycle_momentum=False` for Scion, Muon and
MOGA, whose momentum is not SGD's (they refuse momentum cycling rather than be misread).
Operator norms for logging: `rms_to_inf(model.head.weight)` etc. (pass `W.mT` for an
embedding, which is stored transposed).
"""

from sweeper.optim.adamw import MuPAdamW, adamw_param_groups
from sweeper.optim.lmo import (
    LMO_NAMES,
    NS_COEFFS,
    as_matrix,
    bias_rms,
    colnorm,
    from_matrix,
    get_lmo,
    init_bias_rms_,
    init_colnorm_,
    init_on_ball_,
    init_rownorm_,
    init_sign_,
    init_spectral_,
    l2_norms,
    newton_schulz,
    rownorm,
    sign,
    spectral,
)
from sweeper.optim.moga import MOGA
from sweeper.optim.muon import Muon, muon_scale
from sweeper.optim.norms import l1_to_inf, l1_to_rms, rms_to_inf, rms_to_rms
from sweeper.optim.registry import OPTIMIZER_NAMES, accepted_hparams, build_optimizer
from sweeper.optim.roles import ROLES, ParamRole, param_roles
from sweeper.optim.scion import Scion

__all__ = [
    "LMO_NAMES",
    "MOGA",
    "NS_COEFFS",
    "OPTIMIZER_NAMES",
    "ROLES",
    "Muon",
    "MuPAdamW",
    "ParamRole",
    "Scion",
    "accepted_hparams",
    "adamw_param_groups",
    "as_matrix",
    "bias_rms",
    "build_optimizer",
    "colnorm",
    "from_matrix",
    "get_lmo",
    "init_bias_rms_",
    "init_colnorm_",
    "init_on_ball_",
    "init_rownorm_",
    "init_sign_",
    "init_spectral_",
    "l1_to_inf",
    "l1_to_rms",
    "l2_norms",
    "muon_scale",
    "newton_schulz",
    "param_roles",
    "rms_to_inf",
    "rms_to_rms",
    "rownorm",
    "sign",
    "spectral",
]
