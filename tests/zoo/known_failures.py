"""The acceptance lines each zoo model misses today, with the cause: strict xfails of
``test_zoo_acceptance``. Measured by ``bench/coverage.py`` (docs/coverage.md has the numbers
and the user source lines); remove an entry when its XPASS shows the cause is fixed."""
from __future__ import annotations

ONNX_DRIFT = ("ONNX (default onnxruntime) vs convert(arithmetic='engine') relative L2 above 1e-2; cause not yet measured, likely layers "
              "kept in float Q/DQ (matmuls of two activations, transposed convs), whose accumulation order differs")
RANDOM_INIT_W8A8 = "W8A8 error 0.05-0.07 with random init (depthwise/SE outputs of ~1e-10 scale), traced whole"

_W8A8_RANDOM = {"timm/mobilenetv3_small_050": 0.071, "timm/mobilenetv4_conv_small": 0.103, "timm/maxvit": 0.070,
                "timm/mobilevit_xxs": 0.162, "timm/poolformer_s12": 0.052, "timm/fastvit_t8": 0.060,
                "timm/efficientvit_m0": 0.054}

KNOWN_FAILURES: dict[tuple[str, str], str] = {
    ("timm/maxvit", "onnx"): (f"{ONNX_DRIFT}: 0.039. Measured without finetune (0.024): the drift starts in "
                              "stages.0.blocks.0.attn_grid between attn.proj and mlp.fc1 (residual add, norm2, "
                              "fc1's input quantizer): skipping either layer gives 0.0000, skipping qkv or fc2 "
                              "0.034, skipping other blocks moves it between 0 and 0.045, as rounding flips of "
                              "one step do in a model whose W8A8 error is 0.07"),
    **{(name, "w8a8"): f"{RANDOM_INIT_W8A8}: {error}" for name, error in _W8A8_RANDOM.items()},
    ("timm/repvgg_a0", "w8a8"): ("W8A8 error 0.18 with BatchNorm statistics estimated on random images (0.011 at "
                                 "running_var 1, where the output hardly depended on the input): the float model "
                                 "itself moves 0.05 under uniform input noise of one 8-bit step, so 8-bit rounding "
                                 "at every layer adds up; traced whole"),
    ("timm/repvgg_a0", "onnx"): (f"{ONNX_DRIFT}: 0.036, the same at every onnxruntime optimisation level (no fusion at "
                                 "fault); convert(arithmetic='engine') itself differs from fake-quant by 0.09 on the "
                                 "same input: the model amplifies one-step rounding flips"),
    ("tv/fcos_resnet50_fpn", "w8a8"): ("W8A8 error 0.95: the outputs are detections ranked by score, and 8-bit "
                                       "rounding reorders random-init scores that differ by 1e-4 (the same boxes "
                                       "in another order); the head's own outputs (cls_logits, bbox_reg, "
                                       "bbox_ctrness) are off by 0.04-0.10 at P3-P5 and up to 1.5 at the 1x1 "
                                       "levels P6/P7"),
    ("efficientnet_pytorch/b0", "w8a8"): ("W8A8 error 0.40 with BatchNorm statistics estimated on random images (it "
                                          "read 0.0 at running_var 1, where the output was _fc.bias): the float model "
                                          "moves 0.10 under uniform input noise of one 8-bit step, and 80 activation "
                                          "quantizers add up (the ten worst alone give 0.08-0.21), traced "
                                          "whole"),
    ("efficientnet_pytorch/b0", "onnx"): (f"{ONNX_DRIFT}: 0.10 with torch on 2 threads (the zoo tests), 0.0 on one "
                                          "(bench/coverage.py; W8A8 0.434 against 0.403): the accumulation order of "
                                          "torch's convs flips roundings, which this model amplifies"),
    ("mobilenet_v3_small", "w8a8"): RANDOM_INIT_W8A8,
    ("smp/Unet(mobilenet_v2)", "w8a8"): RANDOM_INIT_W8A8,
    ("timm/efficientnet_b0", "w8a8"): RANDOM_INIT_W8A8,
    ("efficientnet_b0", "w8a8"): RANDOM_INIT_W8A8,
    ("hf/mobilevit", "w8a8"): ("W8A8 error 0.083 with random init at initializer_range 0.2 (0.19 at 0.3), "
                               "traced whole"),
    ("hf/dpt", "w8a8"): "W8A8 error 0.0515 with random init, traced whole",
    ("hf/detr", "w8a8"): "W8A8 error 0.0568 with random init, traced whole",
    ("hf/mask2former", "w8a8"): "W8A8 error 0.147, traced whole",
}
