"""R(2+1)D-18 from torchvision, with the classifier resized to the dataset's classes."""
import os

import torch
import torch.nn as nn
from torchvision.models.video import R2Plus1D_18_Weights, r2plus1d_18


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
