"""An independent re-statement of the published forward (fixed x2/x8 upsampling, the
authors' manual channels-first LayerNorm, avgpool head), written with functional ops on
a model's parameters. Used to check our modules compute exactly the published math."""

import torch
import torch.nn.functional as F


def ln_cf(x, norm, eps=1e-6):
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return norm.weight[:, None, None] * x + norm.bias[:, None, None]


def convnext(b, x):
    y = F.conv2d(x, b.dwconv.weight, b.dwconv.bias, padding=b.dwconv.padding, groups=x.shape[1])
    y = y.permute(0, 2, 3, 1)
    y = F.layer_norm(y, (y.shape[-1],), b.norm.weight, b.norm.bias, 1e-6)
    y = F.linear(F.gelu(F.linear(y, b.pwconv1.weight, b.pwconv1.bias)), b.pwconv2.weight, b.pwconv2.bias)
    return x + (b.gamma * y).permute(0, 3, 1, 2)


def up(u, x, ratio):
    lin, norm = u.channel_reschedule
    x = x.permute(0, 2, 3, 1)
    x = F.layer_norm(F.linear(x, lin.weight, lin.bias), (lin.out_features,), norm.weight, norm.bias, 1e-6)
    return F.interpolate(x.permute(0, 3, 1, 2), scale_factor=2**ratio, mode="nearest")


def down(fusion, x):
    conv, norm = fusion.down
    return ln_cf(F.conv2d(x, conv.weight, conv.bias, stride=2), norm)


def level(col, l, first, huge, *args):
    lv = getattr(col, f"level{l}")
    fu = lv.fusion
    if l == 0:
        x, c1, c3 = args
        if first:
            y = x
        elif huge:
            y = x + up(fu.up, c1, 1) + up(fu.up2, c3, 3)
        else:
            y = up(fu.up, c1, 1) + x
    elif l == 3:
        y = down(fu, args[0])
    else:
        c_down, c_up = args
        y = down(fu, c_down) if first else up(fu.up, c_up, 1) + down(fu, c_down)
    for b in lv.blocks:
        y = convnext(b, y)
    return y


def published_alpha(a):
    a = a.detach().clone()
    s = a.sign()
    return a.abs().clamp(1e-3) * s


def column(col, x, c, first, huge):
    a = [published_alpha(getattr(col, f"alpha{l}")) for l in range(4)]
    c0, c1, c2, c3 = c
    c0 = a[0] * c0 + level(col, 0, first, huge, x, c1, c3)
    c1 = a[1] * c1 + level(col, 1, first, huge, c0, c2)
    c2 = a[2] * c2 + level(col, 2, first, huge, c1, c3)
    c3 = a[3] * c3 + level(col, 3, first, huge, c2)
    return c0, c1, c2, c3


def classifier(h, c3):
    x = F.adaptive_avg_pool2d(c3, 1).flatten(1)
    norm, lin = h.classifier
    return F.linear(F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, 1e-6), lin.weight, lin.bias)


def decoder(d, c3):
    x = c3
    for proj, blocks in zip(d.proj_layers, d.normal_layers):
        conv, norm, _ = proj
        x = F.gelu(ln_cf(F.conv2d(x, conv.weight, conv.bias), norm))
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        x = convnext(blocks[0], x)
    conv = d.projback[0]
    return F.pixel_shuffle(F.conv2d(x, conv.weight, conv.bias), 4)


def sim_decoder(d, c3):
    norm, conv, _ = d.projback
    return F.pixel_shuffle(F.conv2d(ln_cf(c3, norm), conv.weight, conv.bias), 32)


def published_forward(model, images):
    """(class outputs, image outputs) as the published FullNet returns them (drop path off)."""
    cfg = model.config
    stem_conv, stem_norm = model.stem
    x = ln_cf(F.conv2d(images, stem_conv.weight, stem_conv.bias, stride=4), stem_norm)
    c = (0, 0, 0, 0)
    cls_out, img_out = [], []
    interval = cfg.num_columns // 4
    for i, col in enumerate(model.columns):
        c = column(col, x, c, i == 0, cfg.level0_up2)
        if cfg.inter_supv and (i + 1) % interval == 0:
            cls_out.append(classifier(model.heads[i // interval], c[3]))
            if i != cfg.num_columns - 1:
                dec = model.decoders[i // interval]
                img_out.append(decoder(dec, c[3]) if cfg.num_classes <= 1000 else sim_decoder(dec, c[3]))
    if not cfg.inter_supv:
        cls_out.append(classifier(model.heads[0], c[3]))
    return cls_out, img_out, c
