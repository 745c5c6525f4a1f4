"""oba_fx.detection.compress_backbone on a tiny Faster R-CNN (MobileNetV3-Large FPN, 64x64 images).

One compression (module fixture) is checked against independent computations:
the backbone's FLOPs by our own FlopCounterMode run, the calibration loss by
calling the detector's RPN and RoI heads directly, the feature widths by
running both backbones, and the user's detector by a snapshot.
"""
import copy

import pytest
import torch

pytest.importorskip("torchvision")
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn  # noqa: E402
from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402

from torchvision.ops import roi_align  # noqa: E402

from oba_fx.detection import AnyOrderRoIAlign, DetectionBatch, compress_backbone, detection_loss  # noqa: E402
from oba_fx.passes.curvature import curvature  # noqa: E402

TARGET = 0.7


def _flops(module, *args):
    module = copy.deepcopy(module).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(*args)
    return fc.get_total_flops()


def _warm_batch_norm(det):
    """Running statistics from a few batches, as in a trained detector.

    With torchvision's initialisation and the default running statistics
    (mean 0, var 1) the eval-mode MobileNetV3 features shrink to ~1e-8, and the
    heads would see zeros.
    """
    bns = [m for m in det.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    det.train()
    with torch.no_grad():
        for _ in range(2):
            det.backbone(det.transform([torch.rand(3, 64, 64) for _ in range(2)])[0].tensors)
    for m in bns:
        m.momentum = 0.01
    det.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    det = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3,
                                            min_size=64, max_size=64)
    _warm_batch_norm(det)
    # as trainable_backbone_layers does with pretrained weights: the stem stays frozen
    for p in det.backbone.body["0"].parameters():
        p.requires_grad_(False)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 12.0, 52.0, 60.0]]), "labels": torch.tensor([2])}]
    snapshot = {k: v.clone() for k, v in det.state_dict().items()}
    flags = {n: p.requires_grad for n, p in det.named_parameters()}
    res = compress_backbone(det, images, copy.deepcopy(targets), target_flops=TARGET, criterion="oba",
                            progress=False)
    return det, images, targets, snapshot, flags, res


def _reference_loss(det, backbone, images, targets):
    """Σ of the RPN and RoI-head training losses, by calling them directly (norm layers in eval, seed 0)."""
    det = copy.deepcopy(det).eval()
    image_list, tgs = det.transform(images, copy.deepcopy(targets))
    with torch.no_grad():
        features = backbone.eval()(image_list.tensors)
        det.rpn.training = det.roi_heads.training = True
        torch.manual_seed(0)
        proposals, rpn_losses = det.rpn(image_list, features, tgs)
        _, roi_losses = det.roi_heads(features, proposals, image_list.image_sizes, tgs)
    return float(sum({**rpn_losses, **roi_losses}.values()))


@pytest.mark.slow
def test_backbone_flops_meet_the_target_by_an_independent_count(setup):
    det, images, _, _, _, res = setup
    x = det.transform(images)[0].tensors
    ratio = _flops(res.model.backbone, x) / _flops(det.backbone, x)
    assert abs(ratio - TARGET) < 0.02, ratio
    assert res.report["flops"]["ratio"] == pytest.approx(ratio, rel=1e-6)
    assert res.report["scope"] == "backbone + FPN"
    # the whole detector (eval, first image): heads are not pruned, so it keeps more than the target
    assert res.report["detector_flops"]["before"] == _flops(det, [images[0]])
    assert res.report["detector_flops"]["after"] == _flops(res.model, [images[0]])


def test_feature_widths_and_heads_are_kept(setup):
    det, images, _, _, _, res = setup
    assert isinstance(det.backbone, BackboneWithFPN) and res.model.backbone is not det.backbone
    for x in (det.transform(images)[0].tensors, torch.randn(1, 3, 96, 128)):  # another batch and image size
        with torch.no_grad():
            before, after = det.backbone.eval()(x), res.model.backbone.eval()(x)
        assert list(after) == list(before)
        assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert res.report["feature_channels"] == {"0": 256, "1": 256, "pool": 256}
    heads = {k: v for k, v in det.state_dict().items() if not k.startswith("backbone.")}
    slim_state = res.model.state_dict()
    assert all(torch.equal(slim_state[k], v) for k, v in heads.items())
    # something inside the backbone did shrink
    assert sum(p.numel() for p in res.model.backbone.parameters()) < sum(p.numel() for p in det.backbone.parameters())


def test_calibration_loss_is_the_detectors_own(setup):
    det, images, targets, _, _, res = setup
    step = res.report["step_reports"][0]
    assert step["loss_before"] == pytest.approx(_reference_loss(det, det.backbone, images, targets), rel=1e-5)
    assert step["loss_after"] == pytest.approx(_reference_loss(det, res.model.backbone, images, targets), rel=1e-5)
    assert step["loss_after"] != step["loss_before"]


def test_slim_detector_detects_and_trains(setup):
    _, images, targets, _, flags, res = setup
    new = res.model
    assert not any(m.training for m in new.modules())  # the user's detector was in eval mode, every module
    with torch.no_grad():
        detections = new.eval()(images)
    assert len(detections) == 2 and all(d["boxes"].ndim == 2 and d["boxes"].shape[1] == 4 for d in detections)
    assert all(len(d["scores"]) == len(d["labels"]) == len(d["boxes"]) for d in detections)
    losses = new.train()(images, copy.deepcopy(targets))
    new.eval()
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    frozen = [n for n, f in flags.items() if not f]
    now = dict(new.named_parameters())
    assert frozen and all(not now[n].requires_grad for n in frozen if n in now)
    assert sum(n in now for n in frozen) > 0  # the stem's names survive the rewrite


def test_users_detector_is_unchanged(setup):
    det, images, _, snapshot, flags, _ = setup
    state = det.state_dict()
    assert set(state) == set(snapshot) and all(torch.equal(state[k], v) for k, v in snapshot.items())
    assert {n: p.requires_grad for n, p in det.named_parameters()} == flags
    assert isinstance(det.backbone, BackboneWithFPN) and not det.training
    with torch.no_grad():
        out = det(images)  # still runs: e.g. the anchor cache was not moved to the meta device
    assert len(out) == 2


def test_curvature_through_the_detector_loss_matches_plain_autograd(setup):
    """g and Hδ (δ = −θ) of the detection loss, by the curvature engine vs double backward written out by hand."""
    det, images, targets, _, _, _ = setup
    backbone = copy.deepcopy(det.backbone).eval()
    image_list, tgs = det.transform(images, copy.deepcopy(targets))
    names = ["body.16.0.weight", "fpn.layer_blocks.1.0.weight"]  # the last body conv and an FPN output conv
    res = curvature(backbone, [(image_list.tensors, DetectionBatch(image_list, tgs))], want=("g", "H"),
                    loss_fn=detection_loss(det), params=names, progress=False)

    heads = copy.deepcopy(det).eval()
    heads.rpn.training = heads.roi_heads.training = True
    leaves = [dict(backbone.named_parameters())[n].detach().clone().requires_grad_() for n in names]
    with AnyOrderRoIAlign():  # the kernel has no double backward
        features = torch.func.functional_call(backbone, dict(zip(names, leaves)), (image_list.tensors,))
        torch.manual_seed(0)
        proposals, rpn_losses = heads.rpn(image_list, features, tgs)
        _, roi_losses = heads.roi_heads(features, proposals, image_list.image_sizes, tgs)
        loss = sum({**rpn_losses, **roi_losses}.values())
        grads = torch.autograd.grad(loss, leaves, create_graph=True)
        hvps = torch.autograd.grad(grads, leaves, [-leaf.detach() for leaf in leaves])
    assert res.loss == pytest.approx(float(loss.detach()), rel=1e-6)
    for n, g, h in zip(names, grads, hvps):
        assert h.abs().max() > 0
        torch.testing.assert_close(res.g[n].float(), g.detach(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(res.H[n].float(), h, rtol=1e-3, atol=1e-5 * float(h.abs().max()))


def test_roi_align_is_the_kernel_and_twice_differentiable():
    """The RoI pooling the loss uses: the kernel's values, and the dense Hessian of a loss through it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    corners = torch.rand(7, 2, dtype=torch.float64) * 60 - 8  # some boxes reach outside the 40x48 image
    rois = torch.cat([torch.tensor([0., 1., 0., 1., 1., 0., 1.], dtype=torch.float64)[:, None], corners,
                      corners + torch.rand(7, 2, dtype=torch.float64) * 40], 1)
    for ratio in (2, -1):
        with AnyOrderRoIAlign():
            ours = roi_align(x, rois, (3, 3), 1 / 8, ratio)
        assert torch.equal(ours, roi_align(x, rois, (3, 3), 1 / 8, ratio))
    # y = A x is linear: the Hessian of l(y) = Σ tanh(y)² in x is Aᵀ ∇²l A, A the kernel's own Jacobian
    A = torch.autograd.functional.jacobian(lambda v: roi_align(v, rois, (3, 3), 1 / 8, 2), x).reshape(-1, x.numel())
    y = A @ x.reshape(-1)
    dense = A.T @ torch.autograd.functional.hessian(lambda v: v.tanh().pow(2).sum(), y) @ A
    with AnyOrderRoIAlign():
        ours = torch.autograd.functional.hessian(
            lambda v: roi_align(v, rois, (3, 3), 1 / 8, 2).tanh().pow(2).sum(), x).reshape(x.numel(), -1)
    assert dense.abs().max() > 0.1
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="double backwards"):  # why the loss does not use the kernel directly
        v = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(roi_align(v, rois, (3, 3), 1 / 8, 2).pow(2).sum(), v, create_graph=True)
        torch.autograd.grad(g.sum(), v)


def test_bad_inputs_name_the_fix():
    det = fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None, num_classes=3,
                                            min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([1])}]
    with pytest.raises(TypeError, match="list of \\(3, H, W\\) tensors"):
        compress_backbone(det, torch.rand(1, 3, 64, 64), targets)
    with pytest.raises(ValueError, match="one dict per image"):
        compress_backbone(det, images + images, targets)
    with pytest.raises(ValueError, match="'boxes'"):
        compress_backbone(det, images, [{"labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="loss_fn="):
        compress_backbone(det, images, targets, loss_fn=lambda o, t: o)
    with pytest.raises(TypeError, match="no `transform` module"):
        compress_backbone(torch.nn.Linear(2, 2), images, targets)
