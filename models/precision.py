"""bf16 autocast that stays correct where a backend is not.

On the CPU, PyTorch 2.14's oneDNN computes wrong bf16 conv3d gradients for some shapes (on this
project's AMD EPYC build machine: C3D's conv5a / conv5b at 16x112x112, 512 channels at 2x7x7 or
smaller, off by orders of magnitude; fp32 and the reference kernels are right). `find_wrong_bf16`
measures every Conv3d of a model at the input shape it sees, and `run_in_float32` takes the ones
that fail out of autocast.
"""
import torch
import torch.nn.functional as F


def conv3d_inputs(model, clip_shape, device):
    """`{name: (module, input shape)}` of every Conv3d for clips of `clip_shape` (one no-grad pass)."""
    seen, hooks = {}, []

    def record(name):
        def hook(module, args):
            seen.setdefault(name, (module, tuple(args[0].shape)))     # returns None: the input is untouched
        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv3d):
            hooks.append(module.register_forward_pre_hook(record(name)))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(clip_shape, device=device))
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return seen


def find_wrong_bf16(model, clip_shape, device, tolerance=0.05):
    """Names of the Conv3d layers whose bf16 output or gradients (input and weight), at the input
    shape they see for `clip_shape` clips, differ from float32 by more than `tolerance` of the
    float32 result's largest magnitude."""
    wrong = []
    generator = torch.Generator(device=device).manual_seed(0)
    for name, (conv, shape) in conv3d_inputs(model, clip_shape, device).items():
        x = torch.randn(shape, generator=generator, device=device)
        results = []
        for dtype in (None, torch.bfloat16):
            xi = x.clone().requires_grad_()
            w = conv.weight.detach().clone().requires_grad_()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = F.conv3d(xi, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
            if not results:
                grad_out = torch.randn(out.shape, generator=generator, device=device)
            gx, gw = torch.autograd.grad(out, (xi, w), grad_out.to(out.dtype))
            results.append((out.float(), gx.float(), gw.float()))
        for exact, approx in zip(*results):
            scale = exact.abs().max().clamp(min=1e-12)
            if not torch.isfinite(approx).all() or (approx - exact).abs().max() > tolerance * scale:
                wrong.append(name)
                break
    return wrong


class _Float32:
    """Forward hooks that run a module outside autocast, its inputs cast to float32."""

    def __init__(self, device_type):
        self.device_type, self.open = device_type, []

    def before(self, module, args):
        context = torch.autocast(self.device_type, enabled=False)
        context.__enter__()
        self.open.append(context)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def after(self, module, args, output):
        self.open.pop().__exit__(None, None, None)


def run_in_float32(model, names, device_type):
    """Make the named submodules compute in float32 under autocast; returns the hook handles."""
    modules = dict(model.named_modules())
    handles = []
    for name in names:
        hooks = _Float32(device_type)
        handles += [modules[name].register_forward_pre_hook(hooks.before),
                    modules[name].register_forward_hook(hooks.after)]
    return handles
