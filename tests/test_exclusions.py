"""Which parameters skip weight decay and LARS trust scaling, checked by name on real models: torchvision and timm
ResNets, a ViT, a ConvNeXt, DeiT's distillation token, Swin's relative position bias tables, and a BYOL learner."""

import pytest
import torch
import torchvision
from torch import nn

from byol_fast.exclusions import exclusion_rule, no_decay_names
from byol_fast.lars import excluded_by_default

timm = pytest.importorskip("timm", reason="the timm extra is not installed: pip install 'byol-fast[timm]'")


def decayed(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()} - no_decay_names(model)


@pytest.mark.parametrize("build", [torchvision.models.resnet50, lambda: timm.create_model("resnet50", num_classes=0)],
                         ids=["torchvision", "timm"])
def test_a_resnet_keeps_byols_rule_biases_and_batchnorm(build):
    with torch.device("meta"):
        net = build()
    expected = {name for name, p in net.named_parameters() if excluded_by_default(p)}
    assert no_decay_names(net) == expected  # the official recipe's exclusions, unchanged
    assert {"bn1.weight", "bn1.bias", "layer4.2.bn3.weight", "layer1.0.downsample.1.bias"} <= expected
    assert {"conv1.weight", "layer4.2.conv3.weight", "layer1.0.downsample.0.weight"} <= decayed(net)


def test_vit_exempts_position_embedding_class_token_norms_and_biases():
    net = timm.create_model("test_vit", num_classes=0, img_size=32)
    exempt = no_decay_names(net)
    assert {"pos_embed", "cls_token", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
            "blocks.0.attn.qkv.bias", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias"} <= exempt
    assert net.pos_embed.ndim == 3 and net.cls_token.ndim == 3  # what `ndim <= 1` alone would decay
    assert decayed(net) == {name for name, p in net.named_parameters()
                            if name.endswith("weight") and p.ndim > 1}  # every matrix and the patch convolution
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
            "blocks.0.mlp.fc1.weight"} <= decayed(net)


def test_deit_distillation_token_and_swin_relative_position_tables():
    with torch.device("meta"):
        deit = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=0)
        swin = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0)
    assert {"cls_token", "dist_token", "pos_embed"} <= no_decay_names(deit)
    tables = {name for name, _ in swin.named_parameters() if name.endswith("relative_position_bias_table")}
    assert len(tables) == 12 and all(swin.get_parameter(name).ndim == 2 for name in tables)
    assert tables <= no_decay_names(swin)
    assert "layers.0.blocks.0.attn.qkv.weight" in decayed(swin) and "layers.0.blocks.0.norm1.weight" not in decayed(swin)


def test_convnext_exempts_its_layernorm2d_and_layer_scale():
    net = timm.create_model("test_convnext", num_classes=0)
    exempt = no_decay_names(net)
    assert type(net.stem[1]).__name__ == "LayerNorm2d"
    assert {"stem.1.weight", "stem.1.bias", "stages.0.blocks.0.norm.weight", "stages.0.blocks.0.gamma",
            "stages.1.downsample.0.weight", "stages.0.blocks.0.conv_dw.bias"} <= exempt  # downsample.0: a norm
    assert {"stem.0.weight", "stages.0.blocks.0.conv_dw.weight", "stages.0.blocks.0.mlp.fc1.weight",
            "stages.1.downsample.1.weight"} <= decayed(net)


def test_a_norm_with_a_matrix_and_a_declared_no_weight_decay_are_honoured():
    class Declares(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, 4))
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self) -> set[str]:
            return {"scale", "missing_token"}  # timm lists names a model may not have

    model = nn.Sequential(Declares(), nn.GroupNorm(2, 4))
    model[1].weight = nn.Parameter(torch.ones(4, 1))  # a norm parameter of 2 dimensions: exempt by its module
    assert no_decay_names(model) == {"0.scale", "0.proj.bias", "1.weight", "1.bias"}


def test_the_rule_on_a_byol_learner_covers_its_encoder_and_heads():
    from byol_fast.model import BYOL

    learner = BYOL("timm/test_vit", image_size=32, projection_hidden_size=32, prediction_hidden_size=32)
    exclude = exclusion_rule(learner)
    encoder = learner.online_encoder.net
    assert exclude(encoder.pos_embed) and exclude(encoder.cls_token) and exclude(encoder.blocks[0].norm1.weight)
    assert exclude(learner.online_projector[1].weight) and exclude(learner.online_predictor[0].bias)
    assert not exclude(encoder.blocks[0].attn.qkv.weight) and not exclude(learner.online_predictor[3].weight)
