"""Tap points: read named layers out of one forward pass, and stop after the deepest one.

Taps are forward hooks (or, for ``pre_logits``, a pre-hook on the final classifier), so they work
on any ``nn.Module`` without tracing. The hook of the deepest tap raises :class:`_StopForward`,
which cuts the network after it: no compute is spent on layers nobody reads.

:class:`TappedForward` is the one forward path of extraction and prediction (uint8 batches in,
tapped tensors on the device out); :class:`HostCopy` brings its outputs to the host in the cache's
dtype without stalling the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import CLASS_TOKEN_POOLS, OUTPUT, POOLS, PRE_LOGITS, Backbone
from ..common.devices import autocast
from ..errors import BackboneError, CacheError, ConfigError

log = logging.getLogger(__name__)

#: Images up to which an extraction without ``layers`` taps every stage and the pooled layer
#: (``FEATCACHE_SMALL_IMAGES`` overrides it; 0 turns it off).
SMALL_IMAGES = 20_000


class _StopForward(Exception):
    pass


@dataclass(frozen=True)
class LayerInfo:
    """A tap point: module name, output shape without the batch dimension, and stage flag."""

    name: str
    shape: tuple[int, ...]
    stage: bool

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "stage": self.stage}


def pool(x: torch.Tensor, how: str, prefix: int = 0) -> torch.Tensor:
    """Reduce a spatial map (N, C, H, W) or token sequence (N, T, D) to (N, C); ``none`` keeps it.

    ``cls`` takes a token sequence's first token, ``mean`` averages the tokens after the ``prefix``
    class and register tokens (a map's spatial mean), ``cls+mean`` concatenates both."""
    if how == "none" or x.ndim == 2:
        return x
    if x.ndim == 4:
        dims = (2, 3)
    elif x.ndim == 3:
        dims = (1,)
    else:
        return x.flatten(1)
    if how == "avg":
        return x.mean(dims)
    if how == "max":
        return x.amax(dims)
    if how == "avgmax":
        return torch.cat([x.mean(dims), x.amax(dims)], dim=1)
    if how == "mean":
        return x[:, prefix:].mean(1) if x.ndim == 3 else x.mean(dims)
    if how in CLASS_TOKEN_POOLS:
        if x.ndim != 3 or prefix < 1:
            raise ConfigError(f"--pool {how} reads a class token; this layer's output of shape "
                              f"{tuple(x.shape[1:])} has none. Use --pool mean or avg.")
        return x[:, 0] if how == "cls" else torch.cat([x[:, 0], x[:, prefix:].mean(1)], dim=1)
    raise ConfigError(f"The 'pool' option must be one of {', '.join(POOLS)}. Got {how!r}.")


def check_pool(backbone: Backbone, how: str) -> None:
    """Refuse a pool the backbone cannot give before any forward pass."""
    if how not in POOLS:
        raise ConfigError(f"The 'pool' option must be one of {', '.join(POOLS)}. Got {how!r}.")
    if how in CLASS_TOKEN_POOLS and backbone.prefix_tokens < 1:
        raise ConfigError(f"--pool {how} reads a class token; {backbone.name} has none. Use --pool mean or avg.")


def _own(captured: torch.Tensor, out: torch.Tensor, last: bool) -> torch.Tensor:
    """A copy of ``captured`` when it shares memory with a layer output that later layers may
    still modify in place (``ReLU(inplace=True)`` after a tapped conv or BatchNorm)."""
    if not last and captured.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        return captured.clone()
    return captured


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for v in out.values():
            if isinstance(v, torch.Tensor):
                return v
    raise BackboneError(f"A tapped layer returned {type(out).__name__}, not a tensor.")


def model_device(model: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _depth(name: str) -> int:
    return name.count(".") + 1


def pooled_shape(shape: tuple[int, ...], how: str) -> tuple[int, ...]:
    """The shape of one sample's features at a layer of ``shape`` after the ``how`` pooling."""
    if how == "none" or len(shape) <= 1:
        return tuple(shape)
    c = shape[0] if len(shape) == 3 else shape[-1]
    return (2 * c,) if how in ("avgmax", "cls+mean") else (c,)


def default_layers(backbone: Backbone, layers: Sequence[str], n_images: int | None, pool: str) -> list[str]:
    """The layers an extraction taps: ``layers`` when given, else what the data set calls for.

    Without ``layers``, a data set of at most :data:`SMALL_IMAGES` images on a backbone with stages
    and a pooled layer gets every stage and the pooled layer (what ``layers=("all",)`` taps: one
    forward pass either way, each stage a pooled vector, the cache about 1.6x that of the pooled
    layer alone for EfficientNet-Lite0), so that ``fit-head`` can sweep the layers and their
    joins: on the small imbalanced proxies of ``python -m benchmarks accuracy`` the plain path on
    ``pre_logits`` alone was 0, 1.9 and 4.9 points of test accuracy below the best layer. Larger data sets, unpooled maps
    (``pool="none"``), backbones without stages and ``n_images=None`` (a sharded run, which does not
    count the samples) get the backbone's default (pooled) layer.
    """
    if layers:
        return list(layers)
    small = int(os.environ.get("FEATCACHE_SMALL_IMAGES", SMALL_IMAGES))
    if n_images is not None and n_images <= small and backbone.stages and backbone.pooled and pool != "none":
        log.info("layers: every stage and %s tapped (%d images <= %d; fit-head sweeps them); pass "
                 "layers=%s for the pooled layer alone.", backbone.pooled, n_images, small, backbone.pooled)
        return list(backbone.stage_layers)
    return [backbone.default_layer]


def list_layers(backbone: Backbone, *, depth: int | None = 2) -> list[LayerInfo]:
    """Tap points of a backbone in forward order, with output shapes at its input size.

    Parameters
    ----------
    depth : int or None
        Keep module names with at most this many dotted parts (stages always kept);
        None keeps every module.
    """
    model = backbone.model
    size = backbone.preprocess.crop
    x = torch.zeros(1, 3, size, size, device=model_device(model))
    if isinstance(model, torch.jit.ScriptModule):
        with torch.inference_mode():
            out = _first_tensor(model(x))
        return [LayerInfo(OUTPUT, tuple(out.shape[1:]), False)]
    stages = set(backbone.stages)
    seen: dict[str, tuple[int, ...]] = {}
    handles = []
    modules = dict(model.named_modules())

    def hook(name):
        def fn(_m, _inp, out):
            if name not in seen:
                try:
                    seen[name] = tuple(_first_tensor(out).shape[1:])
                except BackboneError:
                    pass
        return fn

    def pre_hook(_m, inp):
        if PRE_LOGITS not in seen:
            seen[PRE_LOGITS] = tuple(inp[0].shape[1:])

    for name, m in modules.items():
        if name:
            handles.append(m.register_forward_hook(hook(name)))
    if backbone.classifier:
        handles.append(modules[backbone.classifier].register_forward_pre_hook(pre_hook))
    try:
        with torch.inference_mode():
            final = _first_tensor(model(x))
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, shape in seen.items():
        if name == PRE_LOGITS or depth is None or _depth(name) <= depth or name in stages:
            out.append(LayerInfo(name, shape, name in stages))
    out.append(LayerInfo(OUTPUT, tuple(final.shape[1:]), False))
    return out


class FeatureTap(nn.Module):
    """Run a backbone and return ``{layer: pooled tensor}`` for the requested layers.

    Parameters
    ----------
    backbone : Backbone
    layers : sequence of str
        Module names, ``pre_logits`` or ``output``.
    pool : {"avg", "max", "avgmax", "none"}
    order : sequence of str, optional
        All tap points in forward order (from :func:`list_layers`); used to stop after the
        deepest requested one.
    """

    def __init__(self, backbone: Backbone, layers: list[str], pool: str = "avg",
                 order: list[str] | None = None) -> None:
        super().__init__()
        check_pool(backbone, pool)
        self.model = backbone.model
        self.layers = list(layers)
        self.pool = pool
        self.prefix = backbone.prefix_tokens
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(self.model.named_modules()) if not isinstance(self.model, torch.jit.ScriptModule) else {}
        rank = {n: i for i, n in enumerate(order or [])}
        deepest = max(self.layers, key=lambda n: rank.get(n, -1)) if order else None
        if OUTPUT in self.layers:
            deepest = None  # the whole network runs anyway
        for name in self.layers:
            if name == OUTPUT:
                continue
            stop = name == deepest
            if name == PRE_LOGITS:
                if not backbone.classifier:
                    raise BackboneError(
                        f"{backbone.name} has no final nn.Linear, so it has no '{PRE_LOGITS}' layer. "
                        f"Use --layer {OUTPUT} or a module name from 'featcache layers {backbone.name}'."
                    )
                self._handles.append(modules[backbone.classifier].register_forward_pre_hook(self._pre_hook(stop)))
            elif name in modules:
                self._handles.append(modules[name].register_forward_hook(self._hook(name, stop)))
            else:
                raise BackboneError(
                    f"Layer '{name}' is not in {backbone.name}. "
                    f"Run 'featcache layers {backbone.name}' to list the layers."
                )

    def _hook(self, name: str, stop: bool):
        def fn(_m, _inp, out):
            self._captured[name] = _own(pool(_first_tensor(out), self.pool, self.prefix), _first_tensor(out), stop)
            if stop:
                raise _StopForward
        return fn

    def _pre_hook(self, stop: bool):
        def fn(_m, inp):
            self._captured[PRE_LOGITS] = _own(pool(inp[0], self.pool, self.prefix), inp[0], stop)
            if stop:
                raise _StopForward
        return fn

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        try:
            out = self.model(x)
            if OUTPUT in self.layers:
                self._captured[OUTPUT] = pool(_first_tensor(out), self.pool, self.prefix)
        except _StopForward:
            pass
        missing = [n for n in self.layers if n not in self._captured]
        if missing:
            raise BackboneError(f"Layers {missing} did not run in the forward pass; tap another layer.")
        return {n: self._captured[n] for n in self.layers}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class GraphTap(nn.Module):
    """The backbone cut after the deepest of ``layers`` as one torch.fx graph (no hooks), returning
    ``{layer: pooled output}`` like :class:`FeatureTap`. Used where hooks cannot be captured:
    ``torch.compile`` and ``torch.export``."""

    def __init__(self, backbone: Backbone, layers: list[str], pool_how: str) -> None:
        super().__init__()
        from torchvision.models.feature_extraction import create_feature_extractor

        check_pool(backbone, pool_how)
        self.layers, self.pool_how, self.prefix = list(layers), pool_how, backbone.prefix_tokens
        model = backbone.model
        if isinstance(model, torch.jit.ScriptModule):
            raise BackboneError(f"{backbone.name} is a TorchScript module; it cannot be traced with torch.fx.")
        nodes = {}
        for layer in self.layers:
            if layer == PRE_LOGITS:
                nodes[_classifier_input_node(backbone)] = layer
            elif layer != OUTPUT:
                nodes[layer] = layer
        self.whole = OUTPUT in self.layers
        import warnings

        try:
            with warnings.catch_warnings():  # about train- vs eval-mode graphs; we trace in eval mode
                warnings.filterwarnings("ignore", message="NOTE: The nodes obtained by tracing")
                if self.whole and not nodes:
                    self.extractor = _OutputDict(model, OUTPUT)
                elif self.whole:  # the whole network runs: its output is one more node of the graph
                    self.extractor = create_feature_extractor(
                        model, return_nodes={**nodes, _output_node(backbone): OUTPUT})
                else:
                    self.extractor = create_feature_extractor(model, return_nodes=nodes)
        except BackboneError:
            raise
        except Exception as e:
            raise BackboneError(f"{backbone.name} cannot be cut at {list(nodes)} with torch.fx ({e}).") from None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.extractor(x)
        return {n: pool(_first_tensor(out[n]), self.pool_how, self.prefix) for n in self.layers}


def _trace(backbone: Backbone):
    """The model's fx graph and the qualified name (as ``create_feature_extractor`` takes them) of
    each node."""
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer()
    try:
        graph = tracer.trace(backbone.model)
    except Exception as e:
        raise BackboneError(f"{backbone.name} cannot be traced with torch.fx ({e}).") from None
    return graph, tracer.node_to_qualname


def _classifier_input_node(backbone: Backbone) -> str:
    import torch.fx

    graph, names = _trace(backbone)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == backbone.classifier]
    if len(calls) != 1 or not isinstance(calls[0].args[0], torch.fx.Node) or calls[0].args[0] not in names:
        raise BackboneError(f"Cannot find the input of '{backbone.classifier}' in {backbone.name}'s graph.")
    return names[calls[0].args[0]]


def _output_node(backbone: Backbone) -> str:
    import torch.fx

    graph, names = _trace(backbone)
    arg = [n for n in graph.nodes if n.op == "output"][0].args[0]
    if isinstance(arg, (tuple, list)):
        arg = arg[0]
    if not isinstance(arg, torch.fx.Node) or arg not in names:
        raise BackboneError(f"Cannot find the output of {backbone.name}'s graph.")
    return names[arg]


class _Single(nn.Module):
    """One layer of a tap (:class:`GraphTap`, or :class:`FeatureTap` where torch.fx cannot trace)."""

    def __init__(self, tap: nn.Module, layer: str) -> None:
        super().__init__()
        self.tap, self.layer = tap, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(x)[self.layer]


def truncated_model(backbone: Backbone, layer: str, pool_how: str) -> nn.Module:
    """The backbone cut after ``layer`` as one traced module (torch.fx, no hooks) returning the
    pooled layer output; used for export. A network torch.fx cannot trace (data-dependent control
    flow, as in transformers models) is tapped by hooks instead, which ``torch.export`` in
    non-strict mode runs as plain Python."""
    try:
        return _Single(GraphTap(backbone, [layer], pool_how), layer)
    except BackboneError:
        if isinstance(backbone.model, torch.jit.ScriptModule):
            raise
        return _Single(FeatureTap(backbone, [layer], pool_how), layer)


class _OutputDict(nn.Module):
    def __init__(self, model: nn.Module, key: str = "out") -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return {self.key: self.model(x)}


def fold_batchnorm(model: nn.Module) -> int:
    """Fold eval-mode BatchNorm layers into the convolutions right before them (inference only).

    A ``Conv2d`` child followed by a ``BatchNorm2d`` sibling gets ``w * g / s`` and
    ``(b - mean) * g / s + beta``; the BatchNorm becomes ``nn.Identity`` (its name stays, so a tap
    on it still reads the same values). The caller checks the folded model against the original
    (see :func:`fold_batchnorm_checked`). Returns the number of folded pairs.
    """
    return len(_fold(model))


def _fold(model: nn.Module) -> list[tuple]:
    """Fold in place; returns what :func:`_unfold` needs to undo it."""
    undo = []
    for parent in model.modules():
        names = list(parent._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = parent._modules[a], parent._modules[b]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or conv.out_channels != bn.num_features or conv.groups < 1:
                continue
            undo.append((parent, b, bn, conv, conv.weight.detach().clone(), conv.bias))
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                    1 / torch.sqrt(bn.running_var + bn.eps)
                shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
                bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias = nn.Parameter((bias - bn.running_mean) * scale + shift, requires_grad=False)
            parent._modules[b] = nn.Identity()
    return undo


def _unfold(undo: list[tuple]) -> None:
    for parent, name, bn, conv, weight, bias in reversed(undo):
        with torch.no_grad():
            conv.weight.copy_(weight)
        conv.bias = bias
        parent._modules[name] = bn


def fold_batchnorm_checked(model: nn.Module, size: int, *, copy: bool = True) -> tuple[nn.Module, bool]:
    """``model`` with BatchNorm folded when that reproduces its output on a random input (a model
    whose BatchNorm does not follow its conv in the forward pass is left as it was).

    ``copy=False`` folds in place (no copy of the weights; undone when the check fails).
    Returns ``(model, folded)``.
    """
    import copy as copy_module

    if isinstance(model, torch.jit.ScriptModule) or model.training:
        return model, False
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a = _first_tensor(model(x))
    folded = copy_module.deepcopy(model) if copy else model
    undo = _fold(folded)
    if not undo:
        return model, False
    with torch.inference_mode():
        b = _first_tensor(folded(x))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4 * max(1.0, float(a.abs().max()))):
        if not copy:
            _unfold(undo)
        return model, False
    return folded, True


class TappedForward:
    """uint8 image batches -> tapped layers: the one forward path of extraction and prediction.

    Moves the model to ``device`` (channels_last where it helps), normalises uint8 batches on the
    device with the backbone's mean and std, and runs the tap under autocast for ``precision``.
    """

    def __init__(self, backbone: Backbone, layers: list[str], pool_how: str, *, device: torch.device,
                 precision: str = "fp32", channels_last: bool = True, order: list[str] | None = None,
                 compile: bool = False) -> None:
        script = isinstance(backbone.model, torch.jit.ScriptModule)
        self.channels_last = channels_last and device.type != "mps" and not script
        if order is None and not compile:
            order = [i.name for i in list_layers(backbone, depth=None)]
        backbone.model.to(device)
        if self.channels_last:
            backbone.model.to(memory_format=torch.channels_last)
        self.compiled = compile
        self.name = backbone.name
        if compile:
            # One graph without hooks; batches are padded to the largest size seen so that a short
            # last batch does not trigger a second compilation.
            self.tap = torch.compile(GraphTap(backbone, layers, pool_how).eval(), dynamic=False)
            self.max_batch = 0
        else:
            self.tap = FeatureTap(backbone, layers, pool_how, order=order)
        self.device, self.precision = device, precision
        pp = backbone.preprocess
        self.mean = torch.tensor(pp.mean, device=device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(pp.std, device=device).view(1, 3, 1, 1) * 255)

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``x``: uint8 (B, 3, H, W) on any device; returns ``{layer: tensor}`` on the device."""
        x = x.to(self.device, non_blocking=True).float().sub_(self.mean).mul_(self.inv_std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.precision):
            if not self.compiled:
                return self.tap(x)
            n = x.shape[0]
            self.max_batch = max(self.max_batch, n)
            if n < self.max_batch:
                x = torch.cat([x, x.new_zeros((self.max_batch - n, *x.shape[1:]))])
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            try:
                out = self.tap(x)
            except Exception as e:  # compilation happens at the first call
                raise BackboneError(f"torch.compile failed for {self.name}: {str(e).strip()[:300]}. Run with "
                                    f"compile=False.") from None
            return {k: v[:n] for k, v in out.items()}

    def remove(self) -> None:
        if not self.compiled:
            self.tap.remove()


class HostCopy:
    """Tapped outputs -> host arrays in the cache's dtype, without stalling the device.

    :meth:`start` casts each layer to the cache dtype and checks it is finite on the device, then
    starts a non-blocking copy into pinned host memory; :meth:`finish` waits for that copy (call it
    one batch later, after the next batch's forward pass was queued) and returns numpy arrays the
    caller owns. On the CPU both steps are plain tensor operations.
    """

    def __init__(self, layers: list[str], dtype: str, device: torch.device) -> None:
        self.layers, self.np_dtype = list(layers), np.dtype(dtype)
        self.torch_dtype = {"float16": torch.float16, "float32": torch.float32}[dtype]
        self.device = device
        self.pin = device.type == "cuda"

    def start(self, out: dict[str, torch.Tensor], n_base: int) -> dict:
        tensors, finite = [], []
        for name in self.layers:
            # Through float32, as the cached values always were: bf16 -> fp16 directly rounds twice.
            t = out[name].float().to(self.torch_dtype)
            finite.append(torch.isfinite(t).all())
            tensors.append(t)
        flags = torch.stack(finite)
        if self.device.type == "cpu":
            return {"host": tensors, "flags": flags, "event": None, "n": n_base}
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=self.pin)
        host_flags = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=self.pin)
        host_flags.copy_(flags, non_blocking=self.pin)
        event = None
        if self.pin:
            event = torch.cuda.Event()
            event.record()
        return {"host": host, "flags": host_flags, "event": event, "n": n_base}

    def finish(self, pending: dict) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """``(features per layer, augmented views per layer or [])`` of a started copy."""
        if pending["event"] is not None:
            pending["event"].synchronize()
        for name, ok in zip(self.layers, pending["flags"].tolist()):
            if not ok:
                raise CacheError(
                    f"Layer '{name}' gave values that are not finite in {self.np_dtype} "
                    f"(overflow or NaN). Use dtype='float32' (--dtype float32) or precision='fp32'."
                )
        b = pending["n"]
        feats, views = [], []
        for t in pending["host"]:
            # Views of fresh host tensors (the caching host allocator reuses a pinned block only
            # once no array refers to it): no copy on the hot path.
            f = t.numpy()
            feats.append(f[:b])
            if len(f) > b:  # augmented views follow the base crops, image by image
                views.append(f[b:].reshape(b, -1, *f.shape[1:]))
        return feats, views
