"""C3D (Tran et al., 2015) with the parameter names of the original checkpoints."""
import torch
import torch.nn as nn

from .fusion import relu_after
from .links import Link

CONVS = ('conv1', 'conv2', 'conv3a', 'conv3b', 'conv4a', 'conv4b', 'conv5a', 'conv5b')


class C3D(nn.Module):
    """C3D for `N x 3 x T x H x W` clips; fc6's input size follows the clip geometry."""

    def __init__(self, num_classes=101, num_frames=16, crop_size=112, dropout=0.5):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=3, padding=1)
        self.pool1 = nn.MaxPool3d(kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.conv2 = nn.Conv3d(64, 128, kernel_size=3, padding=1)
        self.pool2 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv3a = nn.Conv3d(128, 256, kernel_size=3, padding=1)
        self.conv3b = nn.Conv3d(256, 256, kernel_size=3, padding=1)
        self.pool3 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv4a = nn.Conv3d(256, 512, kernel_size=3, padding=1)
        self.conv4b = nn.Conv3d(512, 512, kernel_size=3, padding=1)
        self.pool4 = nn.MaxPool3d(kernel_size=2, stride=2)
        self.conv5a = nn.Conv3d(512, 512, kernel_size=3, padding=1)
        self.conv5b = nn.Conv3d(512, 512, kernel_size=3, padding=1)
        self.pool5 = nn.MaxPool3d(kernel_size=2, stride=2, padding=(0, 1, 1))

        self.fc6 = nn.Linear(self._flat_features(num_frames, crop_size), 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.dropout = nn.Dropout(p=dropout)
        self.relu = nn.ReLU(inplace=True)
        self._init_weights()

    def _init_weights(self):
        # PyTorch's default init shrinks activations layer by layer; eight plain conv layers
        # without normalisation then train from scratch only with He initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.fc8.weight, std=0.01)     # start from near-uniform predictions

    @staticmethod
    def _flat_features(num_frames, crop_size):
        # Each pool floors its input; pool5 pads H and W by one. 16x112x112 gives 512*1*4*4 = 8192.
        t, s = num_frames, crop_size // 2          # pool1 (1, 2, 2)
        for _ in range(3):                          # pool2, pool3, pool4
            t, s = t // 2, s // 2
        if t < 2 or s < 1:
            raise ValueError(
                f"C3D needs clips of at least 16 frames of 16x16 pixels; got {num_frames}x{crop_size}x{crop_size}")
        t, s = t // 2, s // 2 + 1                   # pool5 pads H and W by one
        return 512 * t * s * s

    # The ReLU after each conv, which a compiled conv of the fast form applies itself (models.fusion),
    # and pool1 after conv1's, which it pools as it stores its outputs.
    fusable_relus = tuple((name, None) for name in CONVS)
    fusable_pools = (('conv1', 'pool1'),)

    def conv_relu(self, conv, x):
        return relu_after(conv, conv(x), self.relu)

    def features(self, x):
        x = self.pool1(self.conv_relu(self.conv1, x))
        x = self.pool2(self.conv_relu(self.conv2, x))
        x = self.pool3(self.conv_relu(self.conv3b, self.conv_relu(self.conv3a, x)))
        x = self.pool4(self.conv_relu(self.conv4b, self.conv_relu(self.conv4a, x)))
        x = self.pool5(self.conv_relu(self.conv5b, self.conv_relu(self.conv5a, x)))
        return torch.flatten(x, 1)

    def forward(self, x):
        x = self.features(x)
        x = self.dropout(self.relu(self.fc6(x)))
        x = self.dropout(self.relu(self.fc7(x)))
        return self.fc8(x)


def channel_links(model):
    """The channel links of a C3D (models.links): a chain of convs, then pool5 flattened into fc6."""
    convs = list(CONVS)
    links = [Link([(a, ['relu'])], [(b, 1)]) for a, b in zip(convs, convs[1:])]
    per_channel = model.fc6.in_features // model.conv5b.out_channels    # fc6 reads the flattened pool5
    links.append(Link([('conv5b', ['relu'])], [('fc6', per_channel)]))
    links += [Link([('fc6', ['relu'])], [('fc7', 1)]), Link([('fc7', ['relu'])], [('fc8', 1)])]
    return links
