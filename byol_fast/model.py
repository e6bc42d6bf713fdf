"""BYOL: an online network that predicts an EMA target network's projection of another view.

    online: encoder -> projector -> predictor      (trained)
    target: encoder -> projector                   (EMA of the online pair, no gradients)

Ten lines inside your own loop:

    learner = BYOL("resnet50", image_size=224, hidden_layer="avgpool")
    optimizer = LARS(learner.trainable_parameters(), lr=4.8, weight_decay=1e-6)  # 300 epochs at batch 4096
    for view1, view2 in loader:
        loss = learner(view1, view2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.update_target()
    torchvision.models.resnet50().load_state_dict(learner.encoder_state_dict())

Initialisation (`init`): "official" (default) as DeepMind's BYOL networks: the
last BatchNorm scale of every residual block starts at zero, so each block
starts as its shortcut, and the final Linear of projector and predictor has
no bias; "torchvision" keeps torchvision's and nn.Linear's defaults.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from byol_fast.ema import ema_update_
from byol_fast.timm_encoders import build_timm_encoder, check_timm_arch, is_timm_arch, prefix_hint

TORCHVISION_ENCODERS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2")
INITS = ("official", "torchvision")
"""Network initialisations (module docstring)."""
SMALL_STEM = "conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False); maxpool = nn.Identity()"
"""The small-image stem, as code: what build_encoder(name, small_stem=True) changes in torchvision's ResNet."""


def check_encoder_name(name: str) -> None:
    """Raise ValueError naming the fix unless `name` is a torchvision ResNet of TORCHVISION_ENCODERS or a timm
    model timm knows (`timm/<name>`; without timm installed, the message is the pip command)."""
    if is_timm_arch(name):
        check_timm_arch(name)
    elif name not in TORCHVISION_ENCODERS:
        raise ValueError(f"arch={name!r} is not supported: use one of {', '.join(TORCHVISION_ENCODERS)}, "
                         f"or a timm model as timm/<name> (e.g. timm/vit_small_patch16_224){prefix_hint(name)}")


def build_encoder(name: str, small_stem: bool = False, zero_init_residual: bool = False,
                  image_size: int = 224) -> nn.Module:
    """A randomly initialized encoder by name: the model an encoder's weights load into strictly.

    A torchvision ResNet (TORCHVISION_ENCODERS), or a timm model as `timm/<name>`
    (byol_fast.timm_encoders: built without its classifier, at `image_size` when
    its shapes depend on it, e.g. a ViT's position embeddings).

    small_stem: for 32-96 px images, solo-learn's CIFAR stem (SMALL_STEM):
    a 3x3 stride-1 first convolution and no max-pool instead of the 7x7
    stride-2 convolution and max-pool that shrink ImageNet images 4x. The
    new convolution is initialized as torchvision initializes every other.
    zero_init_residual: the official BYOL init of the residual blocks
    (torchvision's flag of that name).
    """
    if is_timm_arch(name):
        if small_stem:
            raise ValueError(f"small_stem applies to torchvision ResNets, not {name}: drop it (timm models keep "
                             f"their own stem)")
        return build_timm_encoder(name, image_size)
    if name not in TORCHVISION_ENCODERS:
        raise ValueError(f"unknown encoder {name!r}: use one of {', '.join(TORCHVISION_ENCODERS)}, a timm model as "
                         f"timm/<name>, or pass an nn.Module")
    net = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)  # solo-learn's padding
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net


def mlp(in_dim: int, hidden_dim: int, out_dim: int, final_bias: bool = True) -> nn.Sequential:
    """BYOL's projector/predictor: Linear -> BatchNorm -> ReLU -> Linear (without bias in the official init)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=final_bias),
    )


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """2 - 2 cos(p, z) per sample, computed in float32 whatever the autocast dtype."""
    prediction = F.normalize(prediction.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    return 2.0 - 2.0 * (prediction * target).sum(dim=-1)


def representation_layer(arch: str) -> str | None:
    """Where the representation of an encoder built by name is read: a torchvision ResNet's "avgpool"; a timm
    model's own output (built with num_classes=0, it ends at its pooled features)."""
    return None if is_timm_arch(arch) else "avgpool"


def _resolve_hidden_layer(net: nn.Module, hidden_layer: str | int | None) -> str | None:
    """The dotted module name the representation is read from (None: the net's own output)."""
    if hidden_layer is None:
        return None
    if isinstance(hidden_layer, int):
        children = [name for name, _ in net.named_children()]
        if not -len(children) <= hidden_layer < len(children):
            raise ValueError(
                f"hidden_layer={hidden_layer} is out of range for a net with {len(children)} children "
                f"({', '.join(children)}): use an index in [{-len(children)}, {len(children) - 1}] or a name"
            )
        return children[hidden_layer]
    names = dict(net.named_modules())
    if hidden_layer not in names or hidden_layer == "":
        top = ", ".join(name for name, _ in net.named_children())
        raise ValueError(f"hidden_layer={hidden_layer!r} is not a module of the encoder: use one of {top} (or a dotted path)")
    return hidden_layer


class RepresentationEncoder(nn.Module):
    """Runs a network and returns the flattened output of one of its modules.

    The forward hook is a bound method of this wrapper, so `copy.deepcopy` of the
    wrapper re-binds it to the copy: the target network captures its own output.
    Layers after the hidden layer still run (a ResNet's `fc` costs ~0.1% of the
    step) so the wrapped net stays a plain torchvision model for export.
    """

    def __init__(self, net: nn.Module, hidden_layer: str | int | None) -> None:
        super().__init__()
        self.net = net
        self.hidden_layer = _resolve_hidden_layer(net, hidden_layer)
        self._captured: Tensor | None = None
        if self.hidden_layer is not None:
            net.get_submodule(self.hidden_layer).register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._captured = output

    def forward(self, images: Tensor) -> Tensor:
        output = self.net(images)
        if self.hidden_layer is not None:
            output, self._captured = self._captured, None
            if output is None:
                raise RuntimeError(f"hidden_layer {self.hidden_layer!r} did not run in the encoder's forward")
        return output.flatten(1)


class BYOL(nn.Module):
    """The BYOL learner: online and target networks and the symmetric loss.

    Args:
        net: a torchvision ResNet name (see TORCHVISION_ENCODERS), a timm model as
            "timm/<name>" (byol_fast.timm_encoders), or any nn.Module.
        image_size: side of the square views; checked by a probe forward at construction
            (and the size a timm ViT is built for).
        hidden_layer: module name (dotted), index into `net.named_children()`, or None
            to use the net's own output as the representation. "auto" (default):
            representation_layer(net) for a name ("avgpool" for ResNets, the output of
            a timm model), "avgpool" for a module.
        projection_size: output size of projector and predictor (256 in BYOL).
        projection_hidden_size: hidden width of the projector (4096 in BYOL).
        prediction_hidden_size: hidden width of the predictor (4096 in BYOL).
        tau: initial EMA coefficient, kept in the 0-dim buffer `self.tau` that a
            schedule overwrites in place.
        init: "official" (DeepMind's: zero last BatchNorm scale in each residual
            block of an encoder built by name, no bias on the final Linear of
            projector and predictor) or "torchvision" (library defaults). A
            module passed as `net` keeps its own weights either way.
        small_stem: build the named ResNet with the small-image stem
            (build_encoder); for a module, build it so yourself.
    """

    def __init__(
        self,
        net: nn.Module | str,
        image_size: int = 224,
        hidden_layer: str | int | None = "auto",
        projection_size: int = 256,
        projection_hidden_size: int = 4096,
        prediction_hidden_size: int = 4096,
        tau: float = 0.996,
        init: str = "official",
        small_stem: bool = False,
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init={init!r} is not an initialisation: use one of {', '.join(INITS)}")
        official = init == "official"
        if hidden_layer == "auto":
            hidden_layer = representation_layer(net) if isinstance(net, str) else "avgpool"
        if isinstance(net, str):
            net = build_encoder(net, small_stem=small_stem, zero_init_residual=official, image_size=image_size)
        elif small_stem:
            raise ValueError("small_stem=True needs an encoder name; for your own module, give it the stem "
                             "yourself (e.g. byol_fast.model.build_encoder(name, small_stem=True))")
        if not isinstance(net, nn.Module):
            raise ValueError(f"net must be an nn.Module or an encoder name, got {type(net).__name__}")
        for name, size in (("image_size", image_size), ("projection_size", projection_size),
                           ("projection_hidden_size", projection_hidden_size),
                           ("prediction_hidden_size", prediction_hidden_size)):
            if not isinstance(size, int) or size <= 0:
                raise ValueError(f"{name}={size!r} must be a positive integer")
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau={tau} must lie in [0, 1] (BYOL uses 0.996)")
        self.image_size = image_size
        self.online_encoder = RepresentationEncoder(net, hidden_layer)
        representation_size, unused = self._probe_encoder(image_size)
        self._unused_encoder_parameters = unused
        self.online_projector = mlp(representation_size, projection_hidden_size, projection_size,
                                    final_bias=not official)
        self.online_predictor = mlp(projection_size, prediction_hidden_size, projection_size, final_bias=not official)
        self.target_encoder = copy.deepcopy(self.online_encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.online_projector).requires_grad_(False)
        device = next(net.parameters(), torch.empty(0)).device
        self.register_buffer("tau", torch.tensor(float(tau), device=device))

    @torch.enable_grad()
    def _probe_encoder(self, image_size: int) -> tuple[int, set[str]]:
        """One eval-mode forward/backward on two random images at construction time.

        Finds the representation size, proves the hidden layer runs and the image
        size fits, and lists encoder parameters no gradient reaches (a ResNet's
        `fc` when reading `avgpool`) so optimizers and all-reduce can skip them.
        Eval mode keeps BatchNorm running statistics untouched.
        """
        encoder = self.online_encoder
        first = next(encoder.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
        was_training = encoder.training
        encoder.eval()
        try:
            representation = encoder(torch.randn(2, 3, image_size, image_size, device=device))
        except RuntimeError as error:
            if "did not run" in str(error):
                raise ValueError(f"{error}: pick a hidden_layer on the forward path") from error
            raise ValueError(
                f"the encoder cannot take {image_size}x{image_size} images ({error}); "
                "use a larger image_size (ResNets need at least 32)"
            ) from error
        finally:
            encoder.train(was_training)
        if representation.requires_grad:
            representation.float().sum().backward()
        unused = {name for name, p in encoder.net.named_parameters() if p.requires_grad and p.grad is None}
        for p in encoder.parameters():
            p.grad = None
        return representation.shape[1], unused

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Online parameters that receive gradients: encoder (minus unused layers), projector, predictor."""
        encoder = [p for name, p in self.online_encoder.net.named_parameters()
                   if p.requires_grad and name not in self._unused_encoder_parameters]
        return encoder + list(self.online_projector.parameters()) + list(self.online_predictor.parameters())

    def ema_pairs(self) -> tuple[list[Tensor], list[Tensor]]:
        """(target, online) parameter lists in matching order for the EMA."""
        target = list(self.target_encoder.parameters()) + list(self.target_projector.parameters())
        online = list(self.online_encoder.parameters()) + list(self.online_projector.parameters())
        return target, online

    @torch.no_grad()
    def update_target(self) -> None:
        """target = tau * target + (1 - tau) * online, with tau from the device buffer."""
        ema_update_(*self.ema_pairs(), self.tau)

    def forward(self, view1: Tensor, view2: Tensor) -> Tensor:
        """The symmetric BYOL loss, averaged over the batch; each view runs on its own."""
        prediction1 = self.online_predictor(self.online_projector(self.online_encoder(view1)))
        prediction2 = self.online_predictor(self.online_projector(self.online_encoder(view2)))
        with torch.no_grad():
            target1 = self.target_projector(self.target_encoder(view1))
            target2 = self.target_projector(self.target_encoder(view2))
        return (regression_loss(prediction1, target2) + regression_loss(prediction2, target1)).mean()

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The online encoder's weights, loadable with strict=True into the plain net."""
        return {name: tensor.detach().clone() for name, tensor in self.online_encoder.net.state_dict().items()}
