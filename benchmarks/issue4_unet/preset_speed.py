"""Training-step speed of preset variants, alternately in one process (batch 64, AdamW)."""
import sys, statistics, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import unet_speed as us
from diffusekit.nn.unet import UNet, preset
torch.set_num_threads(1)
name = sys.argv[1]
variants = {"base": dict(norm_groups=32, time_scale_shift=False), "g8": dict(norm_groups=8, time_scale_shift=False),
            "ss": dict(norm_groups=32, time_scale_shift=True)}
class V:
    def __init__(self, over):
        torch.manual_seed(0)
        self.m = UNet(preset(name, **over)); c = self.m.config
        self.params = sum(p.numel() for p in self.m.parameters())
        x = torch.randn(64, c.in_channels, c.image_size, c.image_size); t = torch.rand(64) * 1000; tg = torch.randn_like(x)
        opt = torch.optim.AdamW(self.m.parameters(), lr=1e-4)
        def step():
            torch.nn.functional.mse_loss(self.m(x, t), tg).backward(); opt.step(); opt.zero_grad(set_to_none=True)
        self.train_step = step
vs = {k: V(o) for k, o in variants.items()}
r = us.interleaved(vs, "train_step", int(sys.argv[2]) if len(sys.argv) > 2 else 7, 1.0)
for k in vs:
    print(f"{name} {k:5s} params {vs[k].params:,} steps/s {statistics.median(r[k]):.2f}  ratio to base {us.paired_ratio(r[k], r['base']):.3f}")
