"""Detectors: compress the backbone and FPN of a torchvision detector, scored by the whole detector's loss.

torch.fx cannot trace a torchvision detector whole: its ``forward`` branches on
the number of boxes, loops over images and runs NMS.  Its ``backbone`` (the
``BackboneWithFPN`` of Faster R-CNN / RetinaNet / FCOS, the
``SSDLiteFeatureExtractorMobileNet`` of SSDlite) is a plain feed-forward
network from the batched image tensor ``(N, 3, H, W)`` to an ordered dict of
feature maps ``{level: (N, C_l, H_l, W_l)}``, and that traces.

So we compress the backbone alone with :func:`oba_fx.compress` and let its
loss run the rest of the detector::

    loss(features, batch) = Σ_k  detector_losses_k(features, batch.images, batch.targets)

where the sum is over the detector's own training losses (``loss_classifier +
loss_box_reg + loss_objectness + loss_rpn_box_reg`` for Faster R-CNN;
``classification + bbox_regression`` for RetinaNet and SSD;
``classification + bbox_regression + bbox_ctrness`` for FCOS).  Those losses
come from the detector's own ``forward``: a shallow view of the detector whose
``transform`` returns the batch's already transformed images and targets and
whose ``backbone`` returns the given features.  No loss is reimplemented, so
every family (and any subclass of GeneralizedRCNN, RetinaNet, FCOS or SSD)
gets exactly its training objective.

The feature maps are the backbone's outputs, and ``oba_fx`` never prunes a
dimension that reaches the model output: every level keeps its channel width,
so the heads (RPN, RoI heads, classification and regression heads) keep their
input widths and their weights untouched.  What is pruned: the body's inner
channels (bottleneck widths, inverted-residual expansions, squeeze-excitation
hidden units) and the body's outputs that feed the FPN's lateral 1x1 convs
(see the report's ``widths``).  The FPN's own 256 top-down channels are frozen
today: ``interpolate(size=lateral.shape[-2:])`` reads the spatial sizes
through a slice of ``.shape``, which the shape tracking attributes to every dim.

The RoI pooling of two-stage detectors runs through :class:`_RoIAlign` (see
:class:`AnyOrderRoIAlign`), the torchvision kernel with a backward that is
itself differentiable, because the second-order criteria differentiate the
loss twice in the features.

A torchvision backbone with ``FrozenBatchNorm2d`` (the pretrained
configurations) is traced through: its scale and shift are per-channel
constants of the graph, sliced with the channels.  Parameters frozen by
``trainable_backbone_layers`` (``requires_grad=False``) stay frozen.

Two choices made in the loss, and why:

* Only the modules whose ``forward`` switches between the loss path and the
  inference path on ``self.training`` (the detector itself, its
  ``RegionProposalNetwork`` and ``RoIHeads``) run in training mode.  Their
  sub-modules, e.g. the BatchNorm layers of the SSDlite head, stay in eval
  mode, as :func:`oba_fx.compress` runs the backbone: a calibration batch of
  a few images would otherwise replace the trained statistics by its own,
  and the running statistics would drift while scoring.
* The RPN and RoI samplers draw random anchors and proposals
  (``torch.randperm``); the loss reseeds the generator with ``seed`` on every
  call (the global generator state is restored afterwards), so the same
  batch always gives the same loss and the curvature of one function is
  measured.

The FLOPs target counts the backbone + FPN only (``report["flops"]``).  The
whole detector is counted too (``report["detector_flops"]``, eval mode on the
first calibration image): its heads are not pruned, so the whole-detector
ratio is closer to 1 than the target, and for two-stage detectors the RoI
head's cost depends on the number of proposals left after NMS, which depends
on the weights.

Example::

    import torch, torchvision
    from oba_fx.detection import compress_backbone

    det = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3,
                                                         min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4., 6., 40., 50.]]), "labels": torch.tensor([1])} for _ in images]
    res = compress_backbone(det, images, targets, target_flops=0.7, criterion="magnitude")
    res.model.eval()(images)               # detections; res.model.train()(images, targets) gives the losses
    res.report["flops"]["ratio"]            # backbone + FPN, ≈ 0.7
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .compress import DEFAULT_CRITERION, CompressResult, compress
from .passes.errors import UsageError

__all__ = ["compress_backbone", "DetectionBatch", "detection_loss", "AnyOrderRoIAlign"]


@dataclass
class DetectionBatch:
    """One calibration batch as the detector's ``transform`` returns it.

    Attributes:
        images: ``torchvision.models.detection.image_list.ImageList``: the
            padded, normalised batch ``images.tensors`` (N, 3, H, W) and each
            image's size after resizing, ``images.image_sizes``.
        targets: N dicts with ``boxes`` (K, 4) in the resized coordinates and
            ``labels`` (K,) (and whatever else the family's loss reads).
    """

    images: Any
    targets: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.targets)


class _Given(nn.Module):
    """Stands in for ``transform`` or ``backbone``: returns what the loss hands it."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, *args, **kwargs):
        return self.value

    def postprocess(self, detections, *args):  # GeneralizedRCNN calls it in training too, on empty detections
        return detections


def _loss_path_modules(detector: nn.Module) -> list[nn.Module]:
    """The detector and the sub-modules that choose their loss path on ``self.training``."""
    from torchvision.models.detection.roi_heads import RoIHeads
    from torchvision.models.detection.rpn import RegionProposalNetwork

    return [detector] + [m for m in detector.modules() if isinstance(m, (RegionProposalNetwork, RoIHeads))]


class _RoIAlign(torch.autograd.Function):
    """``roi_align`` as the linear map it is in the features: y = A(rois)·x, differentiable to any order.

    torchvision's kernel gives y and the vector-Jacobian product Aᵀ·ḡ, but that
    backward is not itself differentiable ("double backwards on roi_align not
    supported"), and the second-order criteria differentiate the loss twice
    with respect to the feature maps.  As y is linear in x, the derivative of
    the backward with respect to its input ḡ is A again: two Functions that
    call each other's kernel give every order exactly, with the kernel's own
    values.  (torchvision's pure-PyTorch ``_roi_align`` is twice differentiable
    but differs from the kernel for boxes that reach outside the feature map.)
    The boxes get no gradient: the RPN detaches its proposals.
    """

    @staticmethod
    def forward(ctx, features, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.conf = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        ctx.shape = tuple(features.shape)
        with torch._C.DisableTorchFunction():  # the kernel itself, not AnyOrderRoIAlign's substitute
            return torch.ops.torchvision.roi_align(features, rois, spatial_scale, pooled_height, pooled_width,
                                                   sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        return (_RoIAlignTranspose.apply(grad, rois, ctx.shape, *ctx.conf),) + (None,) * 6


class _RoIAlignTranspose(torch.autograd.Function):
    """x̄ = A(rois)ᵀ·ḡ, the backward of :class:`_RoIAlign`; its own backward is A."""

    @staticmethod
    def forward(ctx, grad, rois, shape, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        ctx.save_for_backward(rois)
        ctx.conf = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        n, c, h, w = shape
        with torch._C.DisableTorchFunction():
            return torch.ops.torchvision._roi_align_backward(grad.contiguous(), rois, spatial_scale, pooled_height,
                                                             pooled_width, n, c, h, w, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad_grad):
        (rois,) = ctx.saved_tensors
        return (_RoIAlign.apply(grad_grad, rois, *ctx.conf),) + (None,) * 7


_ROI_ALIGN_ARGS = ("input", "rois", "spatial_scale", "pooled_height", "pooled_width", "sampling_ratio", "aligned")


class AnyOrderRoIAlign(torch.overrides.TorchFunctionMode):
    """Inside it, ``torchvision::roi_align`` runs as :class:`_RoIAlign` (same values, derivatives of any order).

    A TorchFunctionMode sees the op however it is reached (``torchvision.ops.roi_align``,
    ``RoIAlign``, ``MultiScaleRoIAlign``), and only in the thread and the block
    that enter it: nothing of torchvision is patched.

    Example::

        with AnyOrderRoIAlign():
            pooled = torchvision.ops.roi_align(features, boxes, (7, 7), 1 / 16, 2)
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.torchvision.roi_align or func is torch.ops.torchvision.roi_align.default:
            args = tuple(args) + tuple(kwargs[k] for k in _ROI_ALIGN_ARGS[len(args):] if k in (kwargs or {}))
            features, rois, *rest = args
            return _RoIAlign.apply(features, rois.detach(), *rest)
        return func(*args, **(kwargs or {}))


def detection_loss(detector: nn.Module, seed: int = 0) -> Callable[[dict, DetectionBatch], torch.Tensor]:
    """The loss ``loss_fn(features, batch)`` that runs ``detector`` after its backbone.

    Args:
        detector: a torchvision detector (GeneralizedRCNN, RetinaNet, FCOS, SSD or
            a subclass); its modules are shared, not copied, and its modes are
            restored after every call.
        seed: the RNG seed of the proposal and anchor samplers, reset on every call.

    Returns:
        ``loss_fn(features, batch) -> scalar``: ``features`` is the backbone's
        output (a dict of (N, C_l, H_l, W_l) maps, or one tensor), ``batch`` a
        :class:`DetectionBatch`; the value is the sum of the detector's training
        losses, each a mean over its sampled anchors, proposals or boxes.
    """
    heads = copy.copy(detector)  # a view: its own module table, the detector's modules
    heads._modules = dict(detector._modules)
    heads.transform, heads.backbone = _Given(), _Given()
    switched = _loss_path_modules(heads)

    def loss_fn(features, batch: DetectionBatch) -> torch.Tensor:
        if not isinstance(batch, DetectionBatch):
            raise TypeError(f"detection_loss needs a DetectionBatch as targets, got {type(batch).__name__}; "
                            "build the calibration with oba_fx.detection.compress_backbone")
        first = features if isinstance(features, torch.Tensor) else next(iter(features.values()))
        if first.shape[0] != len(batch):
            raise UsageError(f"the features hold {first.shape[0]} images but the batch has {len(batch)} targets "
                             "(micro_batch= cannot split detection targets; leave it unset)")
        heads.transform.value = (batch.images, [dict(t) for t in batch.targets])
        heads.backbone.value = features
        modes = {m: m.training for m in heads.modules()}
        heads.eval()
        for m in switched:
            m.training = True
        devices = [first.device.index or 0] if first.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), AnyOrderRoIAlign():
                torch.manual_seed(seed)
                losses = heads(batch.images.tensors, batch.targets)
        finally:
            for m, was in modes.items():
                m.training = was
            heads.transform.value = heads.backbone.value = None
        if not isinstance(losses, dict) or not losses:
            raise TypeError(f"{type(detector).__name__} returned {type(losses).__name__} in training mode; "
                            "compress_backbone needs a detector whose training forward returns a dict of losses")
        return sum(losses.values())

    return loss_fn


def _check_detector(detector: nn.Module) -> None:
    for attr in ("transform", "backbone"):
        if not isinstance(getattr(detector, attr, None), nn.Module):
            raise TypeError(f"{type(detector).__name__} has no `{attr}` module; compress_backbone works on "
                            "torchvision detectors (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD, SSDlite)")


def _check_data(images, targets) -> None:
    if not isinstance(images, (list, tuple)) or not images or \
            not all(isinstance(x, torch.Tensor) and x.ndim == 3 for x in images):
        raise TypeError("images must be a non-empty list of (3, H, W) tensors, as torchvision detectors take them")
    if not isinstance(targets, (list, tuple)) or len(targets) != len(images):
        raise UsageError(f"targets must be a list with one dict per image: got "
                         f"{len(targets) if isinstance(targets, (list, tuple)) else type(targets).__name__} "
                         f"for {len(images)} images")
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or "boxes" not in t or "labels" not in t:
            raise UsageError(f"targets[{i}] must be a dict with 'boxes' (K, 4) and 'labels' (K,)")


def _feature_widths(backbone: nn.Module, x: torch.Tensor) -> dict[str, int]:
    with torch.no_grad():
        out = backbone(x)
    if isinstance(out, torch.Tensor):
        out = {"0": out}
    return {k: int(v.shape[1]) for k, v in out.items()}


def _detector_cost(detector: nn.Module, image: torch.Tensor) -> tuple[int, int]:
    """(FLOPs, params) of the whole detector in eval mode under no_grad on one (3, H, W) image.

    FLOPs are ``FlopCounterMode`` totals (a multiply-add = 2 FLOPs), as in
    :mod:`oba_fx.counting`, but on the detector's own device: NMS and the box
    filtering are data-dependent and cannot run on the meta device.  The fused
    kernels that make :mod:`oba_fx.counting` prefer the meta device (attention,
    RNNs) do not occur in these detectors' convolutional heads.  A deep copy is
    run because the anchor generator caches its anchors on the module.
    """
    det = copy.deepcopy(detector).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        det([image.to(next(det.parameters()).device)])
    params = sum(p.numel() for p in {id(p): p for p in det.parameters()}.values())
    return int(counter.get_total_flops()), int(params)


def compress_backbone(
    detector: nn.Module,
    images: Sequence[torch.Tensor],
    targets: Sequence[dict[str, torch.Tensor]],
    *,
    target_flops: float = 0.5,
    criterion: str | Callable = DEFAULT_CRITERION,
    batch_size: int | None = None,
    seed: int = 0,
    **compress_kwargs,
) -> CompressResult:
    """Compress ``detector.backbone`` (body + FPN / extra layers) to a FLOPs target, scored by the detector's loss.

    Args:
        detector: a torchvision detector; never modified.
        images: calibration images, a list of (3, H, W) float tensors in [0, 1]
            (what the detector's ``forward`` takes).
        targets: one dict per image with ``boxes`` (K, 4, absolute x1y1x2y2) and
            ``labels`` (K,), as for the detector's training forward.
        target_flops: fraction of the **backbone + FPN** FLOPs to keep, in (0, 1];
            the heads are not pruned and not part of this count.
        criterion: as in :func:`oba_fx.compress`.
        batch_size: images per calibration batch (default: all in one batch).
            The detector's transform pads every batch to a common size, so the
            batches may differ in (H, W); the first batch is the trace and FLOPs
            example.
        seed: seed of the detector's proposal/anchor samplers inside the loss.
        **compress_kwargs: passed to :func:`oba_fx.compress` (``steps``,
            ``max_layer_ratio``, ``round_to``, ``ignore`` ...); not ``loss_fn``,
            which is the detector's own loss, nor ``micro_batch``.

    Returns:
        CompressResult: ``.model`` is a deep copy of ``detector`` with the slim
        backbone (a ``torch.fx.GraphModule``) in place of ``detector.backbone``,
        every module in the train/eval mode it had in ``detector``; ``.report`` is the report of
        :func:`oba_fx.compress` for the backbone (``flops``, ``params`` and
        ``widths`` count the backbone + FPN), plus:

        * ``detector_flops``: ``{"before", "after", "ratio"}`` of the whole
          detector in eval mode on ``images[0]`` (heads included);
        * ``detector_params``: the same for parameters;
        * ``feature_channels``: ``{level: channels}`` of the backbone's output,
          equal before and after (the heads keep their input widths);
        * ``scope``: ``"backbone + FPN"``.

    Raises:
        TypeError / ValueError: not a torchvision-style detector, malformed
            images or targets, or a ``loss_fn``/``micro_batch`` argument.
        Whatever :func:`oba_fx.compress` raises (an unreachable target lists the
        frozen groups).
    """
    _check_detector(detector)
    _check_data(images, targets)
    for bad, why in (("loss_fn", "the loss is the detector's own training loss"),
                     ("micro_batch", "detection targets cannot be split along the batch"),
                     ("example_inputs", "the example is the first transformed calibration batch"),
                     ("calibration", "the calibration batches are built from images and targets")):
        if bad in compress_kwargs:
            raise UsageError(f"compress_backbone does not take {bad}=: {why}")
    n = len(images)
    batch_size = n if batch_size is None else batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive int, got {batch_size!r}")

    working = copy.deepcopy(detector)
    working.eval()
    calibration = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            ims = [x.to(next(working.parameters()).device) for x in images[i:i + batch_size]]
            tgs = [{k: v.to(ims[0].device) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets[i:i + batch_size]]
            # the transform resizes the boxes with the images only when it is handed targets
            image_list, tgs = working.transform(ims, tgs)
            calibration.append((image_list.tensors, DetectionBatch(image_list, tgs)))
    example = calibration[0][0]
    widths = _feature_widths(working.backbone, example)

    result = compress(working.backbone, example, calibration, target_flops=target_flops, criterion=criterion,
                      loss_fn=detection_loss(working, seed=seed), **compress_kwargs)
    slim = result.model
    after_widths = _feature_widths(slim, example)
    if after_widths != widths:  # compress never prunes output dims; a change would break the heads
        raise RuntimeError(f"oba_fx bug: the backbone's output widths changed from {widths} to {after_widths}")

    # every module keeps the user's train/eval flag (a detector may hold frozen-statistics modules in eval)
    modes = dict((name, m.training) for name, m in detector.backbone.named_modules())
    for name, m in slim.named_modules():
        m.training = modes.get(name, detector.backbone.training)
    new = copy.deepcopy(detector)
    new.backbone = slim
    f0, p0 = _detector_cost(detector, images[0])
    f1, p1 = _detector_cost(new, images[0])
    report = dict(result.report)
    report["scope"] = "backbone + FPN"
    report["feature_channels"] = widths
    report["detector_flops"] = {
        "before": f0, "after": f1, "ratio": f1 / f0 if f0 else None,
        "note": "whole detector, eval mode, no_grad, images[0]; heads not pruned; a two-stage detector's RoI head "
                "cost scales with the proposals kept after NMS, which depend on the weights"}
    report["detector_params"] = {"before": p0, "after": p1, "ratio": p1 / p0}
    return CompressResult(model=new, report=report)
