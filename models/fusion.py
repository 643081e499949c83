"""The ReLU a model's `forward` applies to a conv's output, which the fast form may fold into the conv.

A module lists such pairs in `fusable_relus`: `(conv attribute, attribute of the module between them or
None)`, and its forward applies the ReLU through `relu_after`. `models.slim.fuse_relu` then sets `relu`
on a compiled conv of the list (`CompiledKGSConv3d`: the kernel applies the ReLU as it stores its
outputs) where nothing but an `nn.Identity` (a folded BatchNorm) lies between, and `relu_after` leaves
that output as it is: one pass over the activations fewer. Any other conv keeps the forward's ReLU.
Likewise `fusable_pools`: `(conv attribute, pool attribute)` where the forward applies a max pool of
kernel and stride (1, 2, 2) to the conv's output right after that ReLU (C3D's conv1 and pool1);
`models.slim.fuse_pool` has the compiled conv pool as it stores, and sets the pool to `nn.Identity`.
"""


def relu_after(conv, y, relu):
    """`relu(y)`, `y` being `conv`'s output (through what lies between), unless `conv` applies the ReLU."""
    return y if getattr(conv, 'relu', False) is True else relu(y)
