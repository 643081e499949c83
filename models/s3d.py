"""S3D: separable 3D Inception (GoogLeNet layout), parameter names as in the original S3D checkpoints."""
import torch
import torch.nn as nn

from .fusion import relu_after
from .links import Link


class BasicConv3d(nn.Module):
    """Conv3d (no bias) + BatchNorm3d (eps 1e-3) + ReLU."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv3d(in_planes, out_planes, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm3d(out_planes, eps=1e-3, momentum=0.001)
        self.relu = nn.ReLU(inplace=True)

    fusable_relus = (('conv', 'bn'),)      # models.fusion

    def forward(self, x):
        return relu_after(self.conv, self.bn(self.conv(x)), self.relu)


class STConv3d(nn.Module):
    """A k x k x k conv factored into a spatial 1 x k x k conv and a temporal k x 1 x 1 conv."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=None):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        self.conv = nn.Conv3d(in_planes, out_planes, (1, kernel_size, kernel_size), stride=(1, stride, stride),
                              padding=(0, padding, padding), bias=False)
        self.bn = nn.BatchNorm3d(out_planes, eps=1e-3, momentum=0.001)
        self.conv_t = nn.Conv3d(out_planes, out_planes, (kernel_size, 1, 1), stride=(stride, 1, 1),
                                padding=(padding, 0, 0), bias=True)
        self.bn_t = nn.BatchNorm3d(out_planes, eps=1e-3, momentum=0.001)
        self.relu = nn.ReLU(inplace=True)

    fusable_relus = (('conv', 'bn'), ('conv_t', 'bn_t'))      # models.fusion

    def forward(self, x):
        x = relu_after(self.conv, self.bn(self.conv(x)), self.relu)
        return relu_after(self.conv_t, self.bn_t(self.conv_t(x)), self.relu)


class Inception(nn.Module):
    """Four branches: 1x1; 1x1 then separable 3x3x3 (twice, different widths); max pool then 1x1."""

    def __init__(self, in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes):
        super().__init__()
        self.branch1 = BasicConv3d(in_planes, n1x1, 1)
        self.branch2 = nn.Sequential(BasicConv3d(in_planes, n3x3red, 1), STConv3d(n3x3red, n3x3, 3))
        self.branch3 = nn.Sequential(BasicConv3d(in_planes, n5x5red, 1), STConv3d(n5x5red, n5x5, 3))
        self.branch4 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1), BasicConv3d(in_planes, pool_planes, 1))

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class S3D(nn.Module):
    """S3D for `N x 3 x T x H x W` clips (16 x 224 x 224 by default).

    `without_t_stride=True` (how the original's S3D baselines were trained) keeps the temporal
    resolution through the network; otherwise the three inner pools also halve time.
    """

    def __init__(self, num_classes=101, dropout=0.5, without_t_stride=True, pooling_method='max'):
        super().__init__()
        if pooling_method not in ('max', 'avg'):
            raise ValueError(f"S3D pooling_method must be 'max' or 'avg', got {pooling_method!r}")
        pool = nn.MaxPool3d if pooling_method == 'max' else nn.AvgPool3d
        t = 1 if without_t_stride else 2

        self.conv1 = BasicConv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3))
        self.pool1 = pool((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.conv2 = BasicConv3d(64, 64, 1)
        self.conv3 = STConv3d(64, 192, 3)
        self.pool2 = pool(3, stride=(t, 2, 2), padding=1)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.pool3 = pool(3, stride=(t, 2, 2), padding=1)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.pool4 = pool(2, stride=(t, 2, 2))
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv3(self.conv2(x)))
        x = self.pool3(self.inception3b(self.inception3a(x)))
        for block in (self.inception4a, self.inception4b, self.inception4c, self.inception4d, self.inception4e):
            x = block(x)
        x = self.inception5b(self.inception5a(self.pool4(x)))
        # Average over space only, classify each remaining time step, then average the logits over time.
        x = nn.functional.adaptive_avg_pool3d(x, (x.shape[2], 1, 1)).flatten(2).transpose(1, 2)
        return self.fc(self.dropout(x)).mean(dim=1)


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * 3


def channel_links(model):
    """The channel links of an S3D (models.links): the inception branches concatenated into the next
    block's four branch inputs."""
    def out_of(unit, name):     # the conv making a BasicConv3d's or STConv3d's output, with its post-ops
        if hasattr(unit, 'conv_t'):
            return (f'{name}.conv_t', [f'{name}.bn_t', 'relu'])
        return (f'{name}.conv', [f'{name}.bn', 'relu'])

    def inputs_of(name):
        return [(f'{name}.branch1.conv', 1), (f'{name}.branch2.0.conv', 1), (f'{name}.branch3.0.conv', 1),
                (f'{name}.branch4.1.conv', 1)]

    def outputs_of(name, block):
        return [out_of(block.branch1, f'{name}.branch1'), out_of(block.branch2[1], f'{name}.branch2.1'),
                out_of(block.branch3[1], f'{name}.branch3.1'), out_of(block.branch4[1], f'{name}.branch4.1')]

    def exact(*pools):          # a max pool keeps a constant channel constant; a padded average pool does not
        return all(isinstance(p, nn.MaxPool3d) or not any(_triple(p.padding)) for p in pools)

    links = [Link([out_of(model.conv1, 'conv1')], [('conv2.conv', 1)], exact=exact(model.pool1)),
             Link([out_of(model.conv2, 'conv2')], [('conv3.conv', 1)]),
             Link([('conv3.conv', ['conv3.bn', 'relu'])], [('conv3.conv_t', 1)])]
    blocks = ['inception3a', 'inception3b', 'inception4a', 'inception4b', 'inception4c', 'inception4d',
              'inception4e', 'inception5a', 'inception5b']
    pools_before = {'inception3a': model.pool2, 'inception4a': model.pool3, 'inception5a': model.pool4}
    previous = [out_of(model.conv3, 'conv3')]
    for name in blocks:
        block = getattr(model, name)
        pools = [pools_before[name]] if name in pools_before else []
        links.append(Link(previous, inputs_of(name), exact=exact(*pools)))
        for branch in ('branch2', 'branch3'):
            links.append(Link([(f'{name}.{branch}.0.conv', [f'{name}.{branch}.0.bn', 'relu'])],
                              [(f'{name}.{branch}.1.conv', 1)]))
            links.append(Link([(f'{name}.{branch}.1.conv', [f'{name}.{branch}.1.bn', 'relu'])],
                              [(f'{name}.{branch}.1.conv_t', 1)]))
        previous = outputs_of(name, block)
    links.append(Link(previous, [('fc', 1)]))       # average pooling of a constant is that constant
    return links
