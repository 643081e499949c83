"""R(2+1)D-18 from torchvision, with the classifier resized to the dataset's classes."""
import os

import torch
import torch.nn as nn
from torchvision.models.video import R2Plus1D_18_Weights, r2plus1d_18

from .links import Link


def r2plus1d(num_classes=101, pretrained=False):
    """torchvision's `r2plus1d_18`; `pretrained=True` starts from its Kinetics-400 weights."""
    model = r2plus1d_18()
    if pretrained:
        model.load_state_dict(_kinetics_state_dict())
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _kinetics_state_dict():
    weights = R2Plus1D_18_Weights.KINETICS400_V1
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(weights.url))
    if os.path.isfile(cached):
        return torch.load(cached, map_location='cpu', weights_only=True)
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # offline machines land here: say how to proceed instead of a socket traceback
        raise RuntimeError(
            f"r2+1d-pretrained needs torchvision's Kinetics-400 weights, which could not be downloaded ({exc}).\n"
            f"Copy {weights.url} to {cached} from a machine that can reach it, or use --arch r2+1d "
            f"(random initialisation), or load a baseline checkpoint with --load-path.") from exc


def channel_links(model):
    """The channel links of an R(2+1)D-18 (models.links): the (2+1)D factors, and the residual streams
    that keep their width."""
    links = [Link([('stem.0', ['stem.1', 'relu'])], [('stem.3', 1)]), Link([('stem.3', ['stem.4'])], residual=True)]
    for layer in ('layer1', 'layer2', 'layer3', 'layer4'):
        for i, block in enumerate(getattr(model, layer)):
            b = f'{layer}.{i}'
            links += [Link([(f'{b}.conv1.0.0', [f'{b}.conv1.0.1', 'relu'])], [(f'{b}.conv1.0.3', 1)]),
                      Link([(f'{b}.conv1.0.3', [f'{b}.conv1.1', 'relu'])], [(f'{b}.conv2.0.0', 1)]),
                      Link([(f'{b}.conv2.0.0', [f'{b}.conv2.0.1', 'relu'])], [(f'{b}.conv2.0.3', 1)]),
                      Link([(f'{b}.conv2.0.3', [f'{b}.conv2.1'])], residual=True)]
            if block.downsample is not None:
                links.append(Link([(f'{b}.downsample.0', [f'{b}.downsample.1'])], residual=True))
    return links
