"""Does the time embedding reach the ResBlocks of the digits preset? Perturb each ResBlock's
time_emb_proj and see whether the network output changes; also grad norms."""
import torch
from diffusekit.nn.unet import UNet, preset
torch.manual_seed(0)
for name, over in [("digits", {}), ("digits", {"norm_groups": 8}), ("digits", {"time_scale_shift": True}), ("mnist", {})]:
    net = UNet(preset(name, **over))
    cfg = net.config
    x = torch.randn(8, 1, cfg.image_size, cfg.image_size)
    t = torch.rand(8) * 1000
    out = net(x, t)
    out.square().sum().backward()
    print(f"== {name} {over}")
    for n, m in net.named_modules():
        if n.endswith("time_emb_proj"):
            g = m.weight.grad.norm().item()
            with torch.no_grad():
                w = m.weight.clone(); b = m.bias.clone()
                m.weight.add_(torch.randn_like(w)); m.bias.add_(torch.randn_like(b) * 10)
                d = (net(x, t) - out).abs().max().item()
                m.weight.copy_(w); m.bias.copy_(b)
            print(f"  {n:40s} out={m.out_features:4d} grad|W|={g:.2e} max|dout| when perturbed={d:.2e}")
    # whole-network: does output depend on t at all through level 0 blocks? compare t vs other t
