"""Model zoo for the oba_fx pruning benchmarks.

Small-image models from the OBA paper's experiments, all traceable by
``torch.fx.symbolic_trace``:

* ``resnet20`` / ``resnet32`` / ``resnet56``: CIFAR ResNets with 1x1
  projection shortcuts (:mod:`models_zoo.cifar_resnet`).
* ``vgg19_bn``: CIFAR VGG-19 with BN and a linear classifier
  (:mod:`models_zoo.vgg`); ``vgg_small``: a 6-conv VGG for Fashion-MNIST.
* ``vit_small``: patch-4 ViT, dim 192, depth 6, 3 heads (:mod:`models_zoo.vit`).

``trained(name)`` returns a model trained on Fashion-MNIST by this project
(cached; see :mod:`models_zoo.checkpoints`); nothing is downloaded.

Every torchvision classification model is also available by name, always
without pretrained weights::

    import models_zoo
    model = models_zoo.create("resnet20", in_channels=1, num_classes=10)
    model = models_zoo.create("vit_small", img_size=28, in_channels=1)
    model = models_zoo.create("resnet18", num_classes=10)
    models_zoo.names()  # zoo names, then torchvision names
"""
from .cifar_resnet import BasicBlock, CifarResNet, resnet20, resnet32, resnet56
from .registry import ZOO, create, names
from .checkpoints import trained
from .vgg import VGG, vgg19_bn, vgg_small
from .vit import Attention, Block, Mlp, PatchEmbed, TorchAttention, VisionTransformer, vit_small

__all__ = [
    "create", "names", "ZOO",
    "CifarResNet", "BasicBlock", "resnet20", "resnet32", "resnet56",
    "VGG", "vgg19_bn", "vgg_small", "trained",
    "VisionTransformer", "PatchEmbed", "Attention", "TorchAttention", "Mlp", "Block", "vit_small",
]
