"""Which parameters get no weight decay (and, under LARS, no trust scaling), for any architecture.

BYOL's rule (DESIGN.md) exempts biases and BatchNorm parameters; for ResNets
that is `param.ndim <= 1` (byol_fast.lars.excluded_by_default). Other encoders
hold parameters the rule misses and that the recipes they come from exempt too:

- normalization layers of any kind (BatchNorm, LayerNorm, GroupNorm, timm's
  LayerNorm2d / RmsNorm / BatchNormAct2d ...): exempt whatever their shapes;
- a ViT's position embedding (1, N, D) and class / distillation / register
  tokens (1, 1, D): decaying them pulls the model toward position-blind,
  token-free attention (DeiT's and timm's `no_weight_decay()`, MAE's and DINO's
  param groups exempt them);
- Swin's and BEiT's relative position bias tables (2-D), for the same reason.

The rule is by name and module type, so it can be checked by name on real models
(tests/test_exclusions.py), and it asks the model too: every submodule's timm-style
`no_weight_decay()` set of names is honoured.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor, nn

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
"""Normalization layers torch defines; timm's derive from these or have "Norm" in their class name."""
NO_DECAY_NAME = re.compile(r"(^|\.)(pos_embed\w*|absolute_pos_embed|position_embeddings?|cls_token|dist_token|"
                           r"reg_token|register_tokens|mask_token|relative_position_bias_table)$")
"""Parameter names (last component) of position embeddings, special tokens and relative position bias tables."""


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def no_decay_names(model: nn.Module) -> set[str]:
    """Names (as in `model.named_parameters()`) of the parameters exempt from weight decay and LARS trust scaling."""
    names = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        own = {prefix + name for name, _ in module.named_parameters(recurse=False)}
        if _is_norm(module):
            names |= own
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            # timm lists names relative to the module that declares them, some of parameters it may not have.
            names |= {prefix + name for name in declared()}
        names |= {name for name in own if NO_DECAY_NAME.search(name)}
    return {name for name, param in model.named_parameters() if name in names or param.ndim <= 1}


def exclusion_rule(model: nn.Module) -> Callable[[Tensor], bool]:
    """The optimizers' `exclude` predicate: True for the parameters of `model` that no_decay_names lists."""
    parameters = dict(model.named_parameters())
    exempt = {id(parameters[name]) for name in no_decay_names(model)}
    return lambda param: id(param) in exempt
