import torch, time
import torch.nn.functional as F
torch.set_num_threads(1)
print(torch.backends.mkldnn.is_available(), torch.ops.mkldnn._is_mkldnn_bf16_supported())
def t(f, n=3):
    f(); s=time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter()-s)/n*1e3
a=torch.randn(1024,1024); ab=a.bfloat16()
print("mm fp32", t(lambda: a@a), "bf16", t(lambda: ab@ab))
x=torch.randn(16,64,32,32); w=torch.randn(64,64,3,3)
print("conv fp32", t(lambda: F.conv2d(x,w,padding=1)), "bf16", t(lambda: F.conv2d(x.bfloat16(),w.bfloat16(),padding=1)))
g=torch.nn.GroupNorm(32,64)
print("gn fp32", t(lambda: g(x)), "bf16", t(lambda: g.bfloat16()(x.bfloat16())))
g.float()
with torch.autocast("cpu", dtype=torch.bfloat16):
    print("autocast conv", t(lambda: F.conv2d(x,w,padding=1)), "gn", t(lambda: g(x)), "silu", t(lambda: F.silu(x)))
