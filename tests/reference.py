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


def _batched_gather(planes, y, x, corners_abs=False):
    """bilinear_gather for a batch: planes (B, C, H, W), points y, x (B, T, Ho, Wo) ->
    (B, C, T, Ho, Wo). With corners_abs the four neighbours of floor(y), floor(x) are summed
    with weight one (planes is then |input|): an upper bound of every bilinear weight times
    its corner, for error bounds."""
    B, C, H, W = planes.shape
    inside = (y > -2) & (y < H + 1) & (x > -2) & (x < W + 1)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    if corners_abs:
        y, x = y.detach(), x.detach()
    y0, x0 = torch.floor(y), torch.floor(x)
    ly, lx = y - y0, x - x0
    b = torch.arange(B).view(B, 1, 1, 1).expand_as(y)
    flat = planes.permute(0, 2, 3, 1)  # (B, H, W, C): one index picks every channel
    out = planes.new_zeros(y.shape + (C,))
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx),
                        (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = (y0 + dy).long(), (x0 + dx).long()
        ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        if corners_abs:  # every point near the image (it may have an offset gradient)
            wgt = torch.ones_like(wgt)
        vals = flat[b, yy.clamp(0, H - 1), xx.clamp(0, W - 1)]
        out = out + torch.where(ok, wgt, torch.zeros_like(wgt)).unsqueeze(-1) * vals
    return out.permute(0, 4, 1, 2, 3)


def deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
                  dilation=(1, 1), mask=None, corners_abs=False):
    """Deformable convolution written out: every tap of every image sampled at once by the
    batched form of bilinear_gather (same rule), then a grouped matrix product.
    Differentiable by autograd; float64 throughout. corners_abs: see _batched_gather."""
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
    ky = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw).view(1, taps, 1, 1)
    kx = torch.arange(kw, dtype=torch.float64).repeat(kh).view(1, taps, 1, 1)
    base_y = (torch.arange(Ho, dtype=torch.float64) * sh - ph).view(1, 1, Ho, 1) + ky * dh
    base_x = (torch.arange(Wo, dtype=torch.float64) * sw - pw).view(1, 1, 1, Wo) + kx * dw
    off = offset.reshape(N * og, taps, 2, Ho, Wo)
    y, x = base_y + off[:, :, 0], base_x + off[:, :, 1]
    cols = _batched_gather(input.reshape(N * og, C // og, H, W), y, x, corners_abs)
    if mask is not None:  # (N*og, C/og, taps, Ho, Wo) * (N*og, 1, taps, Ho, Wo)
        cols = cols * mask.double().reshape(N * og, 1, taps, Ho, Wo)
    cols = cols.reshape(N, groups, cpg * taps, Ho * Wo)
    w = weight.reshape(1, groups, OC // groups, cpg * taps)
    out = torch.matmul(w, cols).reshape(N, OC, Ho, Wo)
    if bias is not None:
        out = out + bias.double().view(1, -1, 1, 1)
    return out


def conv_abs_terms(op, leaves, grad_output, **kwargs):
    """sum|terms| of a bilinear op's forward and of each gradient: op evaluated on |leaves|
    (float64), and its vector-Jacobian product with |grad_output|. Returns (forward, grads)."""
    absl = [t.detach().double().cpu().abs().requires_grad_() for t in leaves]
    out = op(*absl, **kwargs)
    grads = torch.autograd.grad(out, absl, grad_output.detach().double().cpu().abs())
    return out.detach(), [g.detach() for g in grads]


def deform_abs_terms(input, offset, weight, bias, stride, padding, dilation, mask,
                     grad_output):
    """sum|terms| for deform_conv2d's forward and gradients (conftest.py states the bound):
    every bilinear weight replaced by one (its fp32 error is absolute, ~u*|position|), so
    {forward, input, weight, mask, offset, bias} get sums of |w * m * corner| products."""
    ax = input.detach().double().abs().requires_grad_()
    aw = weight.detach().double().abs().requires_grad_()
    am = (mask.detach().double().abs() if mask is not None else
          torch.ones(offset.shape[0], offset.shape[1] // 2, *offset.shape[2:],
                     dtype=torch.float64)).requires_grad_()
    ab = bias.detach().double().abs() if bias is not None else None
    out = deform_conv2d(ax, offset.detach().double(), aw, ab, stride, padding, dilation, am,
                        corners_abs=True)
    go = grad_output.detach().double().abs()
    gx, gw, gm = torch.autograd.grad(out, [ax, aw, am], go)
    # d/d(offset) of one sample: sum over its channels of dcols * (+-weight slopes) * corners,
    # bounded by the mask gradient's terms times |mask|, for y and for x.
    goff = (gm * am.detach()).repeat_interleave(2, dim=1)
    return dict(forward=out.detach(), input=gx, weight=gw, mask=gm, offset=goff,
                bias=go.sum((0, 2, 3)))
