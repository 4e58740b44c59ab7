"""The Visual Genome bottom-up-attention (BUTD) Faster R-CNN, built from Detectron2's components.

ResNet-101 C4 with the Caffe stem (max-pool pad 0, ceil mode), MSRA blocks (stride in the 1×1),
frozen BN, BGR input minus the Caffe pixel mean; RPN on res4 with a 512-channel hidden conv
(pre-NMS 6000, NMS 0.7, post-NMS 300 at test); 14×14 RoIPool on res4; res5 per region with stride
1 and dilation 2, mean-pooled to 2048-d; a 1601-way classifier (1600 VG objects + background, last
column in Detectron2's order) with class-specific boxes; the attribute head (class embedding 256,
2304 → 512 → 401).

The VG differences are registered through Detectron2's registries (`BUTDBackbone`,
`BUTDRes5ROIHeads`) and keep Detectron2's state-dict names, so the community BUTD port's weights
load by name (see weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from feature_extraction.d2compat import import_detectron2

import_detectron2()

from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, ROI_HEADS_REGISTRY, build_model  # noqa: E402
from detectron2.modeling.backbone.resnet import BasicStem, BottleneckBlock, ResNet, build_resnet_backbone  # noqa: E402
from detectron2.modeling.roi_heads import Res5ROIHeads  # noqa: E402
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

CAFFE_PIXEL_MEAN = [102.9801, 115.9465, 122.7717]  # BGR, pixel values stay in 0..255
NUM_OBJECTS = 1600
NUM_ATTRIBUTES = 400


class CaffeMaxPoolStem(BasicStem):
    """BasicStem whose max-pool matches Caffe: kernel 3, stride 2, no padding, ceil mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


@BACKBONE_REGISTRY.register()
def build_butd_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    backbone = build_resnet_backbone(cfg, input_shape)
    stem = backbone.stem
    caffe_stem = CaffeMaxPoolStem.__new__(CaffeMaxPoolStem)
    caffe_stem.__dict__ = stem.__dict__  # same conv1 module: same parameter names
    backbone.stem = caffe_stem
    return backbone


class BUTDOutputLayers(FastRCNNOutputLayers):
    """Class scores and class-specific boxes as Detectron2's, plus the BUTD attribute head."""

    def __init__(self, cfg: CfgNode, input_shape: ShapeSpec):
        super().__init__(cfg, input_shape)
        num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
        self.cls_embedding = nn.Embedding(num_classes + 1, 256)
        self.fc_attr = nn.Linear(input_shape.channels + 256, 512)
        self.attr_score = nn.Linear(512, NUM_ATTRIBUTES + 1)

    def attributes(self, x: torch.Tensor, class_logits: torch.Tensor) -> torch.Tensor:
        """Attribute logits (R, 401) from the pooled features and the argmax class (background incl.)."""
        embedded = self.cls_embedding(class_logits.argmax(dim=-1))
        return self.attr_score(F.relu(self.fc_attr(torch.cat([x, embedded], dim=-1))))


@ROI_HEADS_REGISTRY.register()
class BUTDRes5ROIHeads(Res5ROIHeads):
    """Res5ROIHeads with res5 at stride 1 and dilation 2 (14×14 out) and the BUTD predictor."""

    @classmethod
    def _build_res5_block(cls, cfg: CfgNode):
        stage_channel_factor = 2**3
        bottleneck = cfg.MODEL.RESNETS.NUM_GROUPS * cfg.MODEL.RESNETS.WIDTH_PER_GROUP * stage_channel_factor
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * stage_channel_factor
        blocks = ResNet.make_stage(
            BottleneckBlock,
            3,
            stride_per_block=[1, 1, 1],
            in_channels=out_channels // 2,
            bottleneck_channels=bottleneck,
            out_channels=out_channels,
            num_groups=cfg.MODEL.RESNETS.NUM_GROUPS,
            norm=cfg.MODEL.RESNETS.NORM,
            stride_in_1x1=cfg.MODEL.RESNETS.STRIDE_IN_1X1,
            dilation=2,
        )
        return nn.Sequential(*blocks), out_channels

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape):
        ret = super().from_config(cfg, input_shape)
        channels = ret["res5"][-1].out_channels
        ret["box_predictor"] = BUTDOutputLayers(cfg, ShapeSpec(channels=channels, height=1, width=1))
        return ret


def butd_config(
    *, depth: int = 101, post_nms_topk: int = 300, min_size: int = 600, max_size: int = 1000, device: str = "cpu"
) -> CfgNode:
    """The Detectron2 config of the VG BUTD detector (test time)."""
    cfg = get_cfg()
    m = cfg.MODEL
    m.DEVICE = device
    m.META_ARCHITECTURE = "GeneralizedRCNN"
    m.PIXEL_MEAN = list(CAFFE_PIXEL_MEAN)
    m.PIXEL_STD = [1.0, 1.0, 1.0]
    m.BACKBONE.NAME = "build_butd_backbone"
    m.BACKBONE.FREEZE_AT = 2
    m.RESNETS.DEPTH = depth
    m.RESNETS.OUT_FEATURES = ["res4"]
    m.RESNETS.STRIDE_IN_1X1 = True  # MSRA blocks
    m.RESNETS.NORM = "FrozenBN"
    m.ANCHOR_GENERATOR.SIZES = [[64, 128, 256, 512]]
    m.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]
    m.PROPOSAL_GENERATOR.NAME = "RPN"
    m.RPN.IN_FEATURES = ["res4"]
    m.RPN.CONV_DIMS = [512]  # the 512-channel hidden conv
    m.RPN.PRE_NMS_TOPK_TEST = 6000
    m.RPN.POST_NMS_TOPK_TEST = post_nms_topk
    m.RPN.NMS_THRESH = 0.7
    m.ROI_HEADS.NAME = "BUTDRes5ROIHeads"
    m.ROI_HEADS.IN_FEATURES = ["res4"]
    m.ROI_HEADS.NUM_CLASSES = NUM_OBJECTS
    m.ROI_BOX_HEAD.POOLER_TYPE = "ROIPool"
    m.ROI_BOX_HEAD.POOLER_RESOLUTION = 14
    m.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0
    cfg.INPUT.FORMAT = "BGR"
    cfg.INPUT.MIN_SIZE_TEST = min_size
    cfg.INPUT.MAX_SIZE_TEST = max_size
    cfg.freeze()
    return cfg


def build_butd(cfg: CfgNode) -> nn.Module:
    model = build_model(cfg)
    model.eval()
    return model


@dataclass
class Detections:
    """One image's raw detector outputs, in resized-image coordinates."""

    proposals: torch.Tensor  # (R, 4) xyxy
    features: torch.Tensor  # (R, 2048) mean-pooled res5
    probs: torch.Tensor  # (R, 1601) softmax, background last (Detectron2 order)
    deltas: torch.Tensor  # (R, 1600*4) class-specific box regression
    attr_logits: torch.Tensor  # (R, 401)


def detect(
    model: nn.Module,
    images: list[torch.Tensor],
    autocast_dtype: torch.dtype | None = None,
    boxes: list[torch.Tensor] | None = None,
) -> list[Detections]:
    """Run the detector on a batch of BGR uint8/float CHW tensors, already at test scale.

    With `boxes` (per image, (R, 4) xyxy at test scale) the RoI head runs on those boxes instead of
    the RPN's proposals: features of given (ground-truth) boxes.
    Backbone and res5 may run under autocast (bf16); RPN, RoIPool, NMS and the heads stay fp32."""
    device = model.pixel_mean.device
    heads = model.roi_heads
    out = []
    with torch.inference_mode():
        # NOTE: one image at a time, backbone included: padded to its batchmates' size, an image's
        # features would depend on which images it was batched with, so a rebuild that extracts
        # only the new images would not reproduce a build from scratch. The RoI head (res5 on 14×14
        # per region) is ~90 % of the FLOPs and never gained from batching (measured on CPU: batch 4
        # of 300 regions was 25 % slower and used 2.3× the memory of one image at a time).
        for i, img in enumerate(images):
            batch = model.preprocess_image([{"image": img.to(device)}])  # normalize, pad to size_divisibility
            with _autocast(device, autocast_dtype):
                feats = model.backbone(batch.tensor)
            feats = {k: v.float() for k, v in feats.items()}
            if boxes is None:
                (p,), _ = model.proposal_generator(batch, feats, None)
            else:
                p = Instances(batch.image_sizes[0])
                p.proposal_boxes = Boxes(boxes[i].to(device).float())
            level = [feats[f] for f in heads.in_features]
            pooled_input = heads.pooler(level, [p.proposal_boxes]).contiguous(memory_format=torch.channels_last)
            with _autocast(device, autocast_dtype):
                box_feats = heads.res5(pooled_input)
            pooled = box_feats.float().mean(dim=[2, 3])  # (R, 2048): the BUTD feature
            logits, deltas = heads.box_predictor(pooled)
            attrs = heads.box_predictor.attributes(pooled, logits)
            out.append(Detections(p.proposal_boxes.tensor, pooled, F.softmax(logits, dim=-1), deltas, attrs))
    return out


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device_type=device.type, enabled=False)
    return torch.autocast(device_type=device.type, dtype=dtype)


def init_random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic random weights that keep activations finite (for tests and benchmarks).

    Detectron2's own init with identity FrozenBN lets activations grow ~1e7× through 33 residual
    blocks and the RPN then proposes nothing; scaling each residual branch's last BN by 0.2 (the
    usual "small residual" trick) keeps every layer in range. Compute cost is the real model's."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                std = 0.01 if "rpn_head" in name else (2.0 / fan_out) ** 0.5  # Detectron2's RPN init
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.01)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.01)
            elif isinstance(module, FrozenBatchNorm2d):
                module.weight.fill_(0.2 if name.endswith("conv3.norm") else 1.0)
                module.bias.zero_()
                module.running_mean.zero_()
                module.running_var.fill_(1.0 - module.eps)
    return model


def fold_frozen_bn(model: nn.Module) -> nn.Module:
    """Fold every FrozenBN into the conv before it (inference only; same outputs up to rounding).

    Detectron2 applies FrozenBN as a separate pass after each of the ~100 convs; folded, the
    scale and shift ride along in the conv (measured ~10% faster on CPU)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Conv2d) and isinstance(module.norm, FrozenBatchNorm2d):
                bn = module.norm
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                module.weight.mul_(scale.reshape(-1, 1, 1, 1))
                bias = bn.bias - bn.running_mean * scale
                if module.bias is None:
                    module.bias = nn.Parameter(bias.clone(), requires_grad=False)
                else:
                    module.bias.add_(bias)
                module.norm = None
    return model


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Folded BN and channels-last memory (oneDNN's fast layout on CPU, tensor cores' on GPU)."""
    fold_frozen_bn(model)
    return model.to(memory_format=torch.channels_last)
