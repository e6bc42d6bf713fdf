"""timm models as BYOL encoders: `--arch timm/<name>` (timm is the optional extra `byol-fast[timm]`).

An encoder named `timm/<name>` is `timm.create_model(<name>, num_classes=0)`,
randomly initialized as timm initializes it (the official BYOL init zeroes
residual BatchNorm scales of ResNets only; the projector and predictor still
get it). num_classes=0 replaces the classifier with an Identity, so the
model's output is its pooled representation (`forward_head(pre_logits=True)`:
global average pool for CNNs, the class token or the token mean for ViTs) of
width `model.num_features`: nothing after the representation runs.

Models whose constructor takes `img_size` (ViT, DeiT, Swin, ...) are built at
the run's image_size, because their position embeddings are sized for it: a
ViT-S/16 at 96 px has 6x6 patches. The same call rebuilds the model that the
exported weights load into strictly: see `create_call`.

Everything here is checked before any heavy work: a missing timm names the pip
command, an unknown model name the closest timm names.
"""

from __future__ import annotations

import difflib
import functools

from torch import nn

TIMM_PREFIX = "timm/"
INSTALL_HINT = "pip install 'byol-fast[timm]' (or: pip install timm)"


def is_timm_arch(arch: str) -> bool:
    """Whether `arch` names a timm model (`timm/<name>`)."""
    return isinstance(arch, str) and arch.startswith(TIMM_PREFIX)


def model_name(arch: str) -> str:
    """`timm/vit_small_patch16_224` -> `vit_small_patch16_224`."""
    return arch[len(TIMM_PREFIX):]


def _import_timm(arch: str):
    try:
        import timm
    except ImportError as error:
        raise ValueError(f"arch={arch!r} needs timm, which is not installed: {INSTALL_HINT}") from error
    return timm


@functools.cache
def _all_model_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_timm_arch(arch: str) -> None:
    """Raise ValueError naming the fix unless timm is installed and knows the model `arch` names."""
    timm = _import_timm(arch)
    name = model_name(arch)
    if not name:
        raise ValueError(f"arch={arch!r} names no model: use timm/<name>, e.g. timm/vit_small_patch16_224 "
                         f"(timm.list_models() lists them)")
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, _all_model_names(), n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?" if close else \
        f"timm.list_models('*{name.split('_')[0]}*') lists the names timm {timm.__version__} knows"
    raise ValueError(f"arch={arch!r}: timm {timm.__version__} has no model {name!r}; {hint}")


def prefix_hint(arch: str) -> str:
    """For a bare name timm knows (`convnext_tiny`), the fix: " (timm has it: --arch timm/convnext_tiny)"."""
    try:
        import timm
    except ImportError:
        return ""
    return f" (timm has it: --arch {TIMM_PREFIX}{arch})" if timm.is_model(arch) else ""


def takes_image_size(arch: str) -> bool:
    """Whether the model's constructor takes `img_size` (its shapes then depend on the image size).

    Asked of the model's entrypoint on the meta device: a constructor without the argument raises at once.
    """
    return _takes_image_size(model_name(arch))


@functools.cache
def _takes_image_size(name: str) -> bool:
    import torch

    timm = _import_timm(TIMM_PREFIX + name)
    try:
        with torch.device("meta"):
            timm.create_model(name, pretrained=False, num_classes=0, img_size=224)
    except TypeError as error:
        if "img_size" in str(error):
            return False
        raise
    return True


def create_kwargs(arch: str, image_size: int) -> dict:
    """The keyword arguments of `timm.create_model` that build this encoder (and load its exported weights)."""
    kwargs = {"pretrained": False, "num_classes": 0}
    if takes_image_size(arch):
        kwargs["img_size"] = image_size
    return kwargs


def create_call(arch: str, image_size: int) -> str:
    """The `timm.create_model(...)` call, as code, whose model the exported weights load into with strict=True."""
    kwargs = {key: value for key, value in create_kwargs(arch, image_size).items() if key != "pretrained"}
    arguments = ", ".join([repr(model_name(arch))] + [f"{key}={value!r}" for key, value in kwargs.items()])
    return f"timm.create_model({arguments})"


def build_timm_encoder(arch: str, image_size: int) -> nn.Module:
    """A randomly initialized timm model without its classifier: images -> pooled representation."""
    check_timm_arch(arch)
    return _import_timm(arch).create_model(model_name(arch), **create_kwargs(arch, image_size))
