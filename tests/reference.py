"""Pure-PyTorch references, independent of the kernels under test (float64)."""
import torch
import torch.nn.functional as F


def depthwise_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1):
    """Depthwise conv via aten's grouped convolution, computed in float64."""
    out = F.conv2d(input.double(), weight.double(), None if bias is None else bias.double(),
                   stride, padding, dilation, groups=input.shape[1])
    return out


def bilinear_gather(plane, y, x):
    """Bilinear samples of plane (C, H, W) at float64 points y, x (any equal shapes), with
    torchvision's rule: out-of-image corners are zero (so the value is zero unless
    -1 < y < H and -1 < x < W). Points farther out (and NaN/Inf) are masked before indexing;
    the mask is wider than the image so that autograd gives torchvision's one-sided slope at
    exactly y = -1 or x = -1."""
    C, H, W = plane.shape
    inside = (y > -2) & (y < H + 1) & (x > -2) & (x < W + 1)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    out = plane.new_zeros((C,) + y.shape)
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                        (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = (y0 + dy).long(), (x0 + dx).long()
        ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        vals = plane[:, yy.clamp(0, H - 1), xx.clamp(0, W - 1)]
        out = out + torch.where(ok, wgt, torch.zeros_like(wgt)) * vals
    return out


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None):
    """Deformable convolution written out: sample every tap with bilinear_gather, then a
    grouped matrix product. Differentiable by autograd; float64 throughout."""
    input, offset, weight = input.double(), offset.double(), weight.double()
    N, C, H, W = input.shape
    OC, cpg, kh, kw = weight.shape
    groups, taps = C // cpg, kh * kw
    og = offset.shape[1] // (2 * taps)
    Ho, Wo = offset.shape[2:]
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    if N == 0:  # an empty batch: an empty result that still depends on every argument
        deps = input.sum((1, 2, 3)) + offset.sum((1, 2, 3)) + weight.sum() * 0
        if mask is not None:
            deps = deps + mask.double().sum((1, 2, 3))
        out = (deps * 0).view(0, 1, 1, 1).expand(0, OC, Ho, Wo)
        return out if bias is None else out + bias.double().view(1, -1, 1, 1)
    base_y = (torch.arange(Ho, dtype=torch.float64) * sh - ph).view(Ho, 1)
    base_x = (torch.arange(Wo, dtype=torch.float64) * sw - pw).view(1, Wo)
    outs = []
    for n in range(N):
        cols = []  # (C, taps, Ho, Wo)
        for c0 in range(0, C, C // og):
            g = c0 // (C // og)
            per_tap = []
            for tap in range(taps):
                ky, kx = divmod(tap, kw)
                y = base_y + ky * dh + offset[n, 2 * (g * taps + tap)]
                x = base_x + kx * dw + offset[n, 2 * (g * taps + tap) + 1]
                v = bilinear_gather(input[n, c0:c0 + C // og], y, x)
                if mask is not None:
                    v = v * mask[n, g * taps + tap].double()
                per_tap.append(v)
            cols.append(torch.stack(per_tap, 1))
        cols = torch.cat(cols, 0).reshape(groups, cpg * taps, Ho * Wo)
        w = weight.reshape(groups, OC // groups, cpg * taps)
        outs.append(torch.bmm(w, cols).reshape(OC, Ho, Wo))
    out = torch.stack(outs)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    return out
