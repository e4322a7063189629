"""Third-party architectures for the zoo, installed from PyPI and built with random init.

timm (``create_model(name, pretrained=False)`` with narrowed depths and widths where the
family takes them), transformers from small configs, segmentation_models_pytorch with
``encoder_weights=None``, efficientnet_pytorch ``EfficientNet.from_name``. Nothing is
downloaded (``HF_HUB_OFFLINE=1``). Each builder keeps the family's real blocks and code paths
at the smallest depth, width and input size the architecture accepts, so that one model runs
the whole stage pipeline in seconds on a CPU core. Where the random init is degenerate (the
output hardly depends on the input through eval-mode BatchNorms at running_var 1), the
BatchNorm statistics are estimated on random images (``with_batchnorm_statistics``).
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .torchvision_zoo import load_torchvision, randomize_zero_weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")

Builder = Callable[[], nn.Module]
# name -> (builder, inputs(seed) -> tuple)
Zoo = dict[str, tuple[Builder, Callable[[int], tuple]]]


def image(shape: tuple[int, ...]) -> Callable[[int], tuple]:
    """Inputs of one random image batch of ``shape``."""
    return lambda seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)),)


def _tokens(seed: int) -> tuple:
    return (torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(seed)),)


IMG64, IMG32 = image((2, 3, 64, 64)), image((2, 3, 32, 32))


def with_batchnorm_statistics(build: Builder, shape: tuple[int, ...] = (16, 3, 64, 64), batches: int = 4) -> Builder:
    """``build``, then every BatchNorm's running statistics estimated on ``batches`` random
    image batches (train-mode forwards, ``momentum=None``: their plain average), as a trained
    model's BatchNorms have seen data. At running_var 1 a random-init conv stack keeps shrinking
    its activations (a default-init conv passes about a third of its input's variance on)."""
    def build_with_statistics() -> nn.Module:
        model = build()
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        with torch.no_grad():
            for seed in range(batches):
                model(*image(shape)(1000 + seed))  # seeds no test input uses
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        return model.eval()

    return build_with_statistics


def _timm(name: str, **kwargs) -> Builder:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)

    return build


def _timm_class(module: str, name: str, **kwargs) -> Builder:
    """A timm class built directly, where its registered variants fix the sizes we narrow."""
    def build() -> nn.Module:
        import timm.models

        return getattr(getattr(timm.models, module), name)(num_classes=10, **kwargs)

    return build


def timm_zoo() -> Zoo:
    """25 timm families, at 64x64 inputs (32x32 where the family allows it)."""
    vit_small = dict(img_size=64, depth=2, embed_dim=64, num_heads=2)
    return {
        "timm/efficientnet_b0": (_timm("efficientnet_b0"), IMG64),
        "timm/mobilenetv3_small_050": (_timm("mobilenetv3_small_050"), IMG64),
        "timm/mobilenetv4_conv_small": (_timm("mobilenetv4_conv_small"), IMG64),
        "timm/regnetx_002": (_timm("regnetx_002"), IMG64),
        "timm/convnext_atto": (_timm("convnext_atto"), IMG64),
        "timm/resnet18": (_timm("resnet18"), IMG64),
        # At running_var 1 its output hardly depends on the input (gradients toward the stem
        # below float32 resolution of the weights).
        "timm/repvgg_a0": (with_batchnorm_statistics(_timm("repvgg_a0")), IMG64),
        "timm/ghostnet_100": (_timm("ghostnet_100"), IMG64),
        "timm/swin": (_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=4, embed_dim=32,
                            depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), IMG64),
        "timm/vit": (_timm("vit_tiny_patch16_224", patch_size=8, **vit_small), IMG64),
        "timm/deit_distilled": (_timm("deit_tiny_distilled_patch16_224", patch_size=8, **vit_small), IMG64),
        "timm/beit": (_timm("beit_base_patch16_224", patch_size=8, **vit_small), IMG64),
        "timm/eva02": (_timm("eva02_tiny_patch14_224", patch_size=8, **vit_small), IMG64),
        "timm/cait": (_timm("cait_xxs24_224", patch_size=8, img_size=64, depth=2, embed_dim=64, num_heads=2), IMG64),
        "timm/mixer": (_timm_class("mlp_mixer", "MlpMixer", patch_size=8, img_size=64, num_blocks=2, embed_dim=64),
                       IMG64),
        "timm/pvt_v2_b0": (_timm("pvt_v2_b0", depths=(1, 1, 1, 1)), IMG64),
        # Its attention biases are sized for a 7x7 last stage: 224x224 inputs only.
        "timm/efficientformer_l1": (_timm("efficientformer_l1", depths=(1, 1, 1, 2), embed_dims=(16, 32, 48, 64)),
                                    image((2, 3, 224, 224))),
        "timm/efficientformerv2_s0": (_timm("efficientformerv2_s0", depths=(1, 1, 2, 2), img_size=64), IMG64),
        "timm/maxvit": (_timm("maxvit_pico_rw_256", img_size=64), IMG64),
        "timm/coatnet": (_timm("coatnet_pico_rw_224", img_size=64), IMG64),
        "timm/levit_128s": (_timm("levit_128s", img_size=64), IMG64),
        "timm/mobilevit_xxs": (_timm("mobilevit_xxs"), IMG64),
        "timm/poolformer_s12": (_timm_class("metaformer", "MetaFormer", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)), IMG64),
        "timm/edgenext_xx_small": (_timm("edgenext_xx_small", depths=(1, 1, 2, 1)), IMG64),
        "timm/fastvit_t8": (_timm("fastvit_t8", layers=(1, 1, 1, 1)), IMG64),
        "timm/xcit_nano": (_timm("xcit_nano_12_p16_224", img_size=64, depth=2), IMG64),
        "timm/efficientvit_m0": (_timm("efficientvit_m0", img_size=64), IMG64),
        "timm/repvit_m0_9": (_timm("repvit_m0_9"), IMG64),
    }


def _hf(model_class: str, config_class: str, **config) -> Builder:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))

    return build


_VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64)
_RESNET = dict(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1], layer_type="basic")


def transformers_zoo() -> Zoo:
    """12 transformers architectures from small configs; DETR and Mask2Former on
    transformers' own ResNet/Swin backbones (no timm backbone, no pretrained backbone).
    Nothing is imported until a model is built (the default test run collects this file)."""
    return {
        "hf/bert": (_hf("BertModel", "BertConfig", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32), _tokens),
        # use_cache=False: the model scores a whole sequence in one call (no KV cache in its
        # output, which torch.export refuses: DynamicCache has no pytree registration).
        "hf/gpt2_lm(tied)": (_hf("GPT2LMHeadModel", "GPT2Config", vocab_size=100, n_embd=32, n_layer=2,
                                 n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0, use_cache=False),
                             _tokens),
        "hf/vit": (_hf("ViTForImageClassification", "ViTConfig", num_labels=10, **_VIT), IMG32),
        "hf/deit": (_hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", num_labels=10, **_VIT), IMG32),
        "hf/swin": (_hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=2, embed_dim=16,
                        depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=10), IMG32),
        "hf/convnext": (_hf("ConvNextForImageClassification", "ConvNextConfig", hidden_sizes=[8, 16, 32, 64],
                            depths=[1, 1, 1, 1], num_labels=10), IMG32),
        "hf/resnet": (_hf("ResNetForImageClassification", "ResNetConfig", num_labels=10, **_RESNET), IMG32),
        # At the default initializer_range (0.02) the activations shrink ~100x per stage and
        # underflow to exactly 0 in float32 by encoder.layer.4: a zero output, zero gradients.
        "hf/mobilevit": (_hf("MobileViTForImageClassification", "MobileViTConfig", image_size=64,
                             hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
                             num_labels=10, initializer_range=0.2), IMG64),
        "hf/segformer": (_hf("SegformerForSemanticSegmentation", "SegformerConfig", num_encoder_blocks=2,
                             depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
                             strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             decoder_hidden_size=32, num_labels=3), IMG64),
        "hf/dpt": (_hf("DPTForDepthEstimation", "DPTConfig", image_size=32, patch_size=8, hidden_size=32,
                       num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32],
                       fusion_hidden_size=16, head_in_index=-1), IMG32),
        "hf/detr": (_hf("DetrForObjectDetection", "DetrConfig", use_timm_backbone=False, use_pretrained_backbone=False,
                        backbone_config=dict(model_type="resnet", out_features=["stage4"], **_RESNET), d_model=32,
                        encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=3), IMG64),
        # Mask2FormerForUniversalSegmentation builds its Hungarian-matching loss (scipy, not
        # installed) in __init__: the model without the loss head.
        "hf/mask2former": (_hf("Mask2FormerModel", "Mask2FormerConfig",
                               backbone_config=dict(model_type="swin", image_size=64, embed_dim=16, depths=[1, 1, 1, 1],
                                                          num_heads=[1, 1, 2, 2], window_size=2,
                                                          out_features=["stage1", "stage2", "stage3", "stage4"]),
                               feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_layers=1,
                               decoder_layers=2, num_attention_heads=2, encoder_feedforward_dim=64,
                               dim_feedforward=64, num_queries=8, num_labels=3, common_stride=4), IMG64),
    }


def _smp(arch: str, encoder: str) -> Builder:
    def build() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    return build


def smp_zoo() -> Zoo:
    """UNet, FPN and DeepLabV3+ on a ResNet-18 and a MobileNetV2 encoder."""
    return {f"smp/{arch}({encoder})": (_smp(arch, encoder), IMG64)
            for arch in ("Unet", "FPN", "DeepLabV3Plus") for encoder in ("resnet18", "mobilenet_v2")}


def efficientnet_pytorch_zoo() -> Zoo:
    def build() -> nn.Module:
        from efficientnet_pytorch import EfficientNet

        return EfficientNet.from_name("efficientnet-b0", image_size=64, num_classes=10)

    # At running_var 1 its features reach _fc at ~1e-13: the output is _fc.bias to the last bit.
    return {"efficientnet_pytorch/b0": (with_batchnorm_statistics(build), IMG64)}


def _detection_images(seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return ([torch.rand((3, 64, 64), generator=generator) for _ in range(2)],)


def torchvision_dense_zoo() -> Zoo:
    """torchvision detection (FCOS) and segmentation (DeepLabV3, LR-ASPP) with weights=None."""
    torchvision = load_torchvision()
    if torchvision is None:
        return {}
    detection, segmentation = torchvision.models.detection, torchvision.models.segmentation
    none = dict(weights=None, weights_backbone=None)
    # score_thresh 0: at the classification prior 0.01 no random-init score reaches the default
    # 0.2, and any threshold makes the number of candidates per level depend on the values,
    # which the captured graph would take from the example (topk's k). At 0 it is the anchor
    # count; topk_candidates and detections_per_img keep the ranking and nms small.
    return {
        "tv/fcos_resnet50_fpn": (lambda: detection.fcos_resnet50_fpn(**none, num_classes=3, min_size=64,
                                                                     max_size=64, detections_per_img=10,
                                                                     score_thresh=0.0, topk_candidates=20),
                                 _detection_images),
        "tv/deeplabv3_mobilenet_v3_large": (lambda: segmentation.deeplabv3_mobilenet_v3_large(**none, num_classes=3),
                                            IMG64),
        "tv/lraspp_mobilenet_v3_large": (lambda: segmentation.lraspp_mobilenet_v3_large(**none, num_classes=3),
                                         IMG64),
    }


def thirdparty_zoo() -> dict[str, tuple[str, Builder, Callable[[int], tuple]]]:
    """name -> (family, builder giving an eval-mode model with seeded random init, inputs)."""
    load_torchvision()  # timm and smp import torchvision, which needs its op schemas first
    found = {}
    for family, zoo in (("timm", timm_zoo), ("transformers", transformers_zoo), ("smp", smp_zoo),
                        ("efficientnet_pytorch", efficientnet_pytorch_zoo), ("torchvision", torchvision_dense_zoo)):
        for name, (build, inputs) in zoo().items():
            def built(build=build) -> nn.Module:
                torch.manual_seed(0)
                return randomize_zero_weights(build()).eval()

            found[name] = (family, built, inputs)
    return found
