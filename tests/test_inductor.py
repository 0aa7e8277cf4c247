"""torch.compile with the inductor backend (not only aot_eager) over all three ops on CPU,
forward and backward, with no graph breaks."""
import torch
from torch import nn

import convops
from conftest import assert_close


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = convops.DepthwiseSeparableConv2d(8, 8, 3, padding=1)
        self.dcn = convops.ModulatedDeformConv2dPack(8, 8, 3, padding=1)
        self.aspp_like = convops.DilatedConv2d(8, 4, 3, padding=2, dilation=2)

    def forward(self, x):
        return self.aspp_like(torch.relu(self.dcn(torch.relu(self.dw(x)))))


def test_inductor_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Block()
    nn.init.normal_(model.dcn.conv_offset.weight, std=0.1)
    x = torch.randn(2, 8, 12, 12, requires_grad=True)
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    out = compiled(x)
    ref = model(x)
    assert_close(out, ref.double(), torch.float32, "inductor forward")
    grads = torch.autograd.grad(out.square().sum(), [x] + list(model.parameters()))
    ref_grads = torch.autograd.grad(ref.square().sum(), [x] + list(model.parameters()))
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg.double(), torch.float32, "inductor backward")


def test_torchscript_scripts_every_module():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    off = torch.randn(2, 18, 12, 12)
    mask = torch.rand(2, 9, 12, 12)
    cases = [
        (convops.DepthwiseConv2d(8, 3, padding="same", depth_multiplier=2), (x,)),
        (convops.DepthwiseSeparableConv2d(8, 4, 5, padding=2), (x,)),
        (convops.DilatedConv2d(8, 4, 3, padding=2, dilation=2, groups=2), (x,)),
        (convops.ASPP(8, out_channels=4, rates=(1, 2)).eval(), (x,)),
        (convops.DeformConv2d(8, 4, 3, padding=1), (x, off)),
        (convops.DeformConv2d(8, 4, 3, padding=1), (x, off, mask)),
        (convops.ModulatedDeformConv2d(8, 4, 3, padding=1), (x, off, mask)),
        (convops.DeformConv2dPack(8, 4, 3, padding=1), (x,)),
        (convops.ModulatedDeformConv2dPack(8, 4, 3, padding=1), (x,)),
    ]
    for module, args in cases:
        scripted = torch.jit.script(module)
        assert_close(scripted(*args), module(*args).double(), torch.float32,
                     type(module).__name__)
