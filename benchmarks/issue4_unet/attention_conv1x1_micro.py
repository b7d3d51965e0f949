import torch, time, statistics
import torch.nn.functional as F
torch.set_num_threads(1)
def bench(fns, make, reps=9, inner=5):
    res = {k: [] for k in fns}
    for r in range(reps):
        for k, f in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
            args = make()
            t0 = time.perf_counter()
            for _ in range(inner):
                y = f(*args); y.backward(torch.ones_like(y))
            res[k].append((time.perf_counter() - t0) / inner)
    return {k: statistics.median(v) * 1e3 for k, v in res.items()}
# 1x1 conv
def c_conv(x, w, b): return F.conv2d(x, w, b)
def c_mm(x, w, b):
    B, C, H, W = x.shape
    return torch.addmm(b[:,None].expand(-1,1), w.view(w.shape[0], C), x.reshape(B, C, H*W)) if False else (torch.matmul(w.view(w.shape[0], C), x.reshape(B, C, H*W)) + b[:, None]).view(B, -1, H, W)
def c_bmm(x, w, b):
    B, C, H, W = x.shape
    return torch.baddbmm(b[None, :, None], w.view(w.shape[0], C).expand(B, -1, -1), x.reshape(B, C, H*W)).view(B, -1, H, W)
for B, ci, co, s in []:
    def make():
        return (torch.randn(B,ci,s,s,requires_grad=True), torch.randn(co,ci,1,1,requires_grad=True), torch.randn(co,requires_grad=True))
    a = make(); print((B,ci,co,s), (c_conv(*a)-c_mm(*a)).abs().max().item(), (c_conv(*a)-c_bmm(*a)).abs().max().item(), bench(dict(conv=c_conv, mm=c_mm, bmm=c_bmm), make))
# attention
def a_sdpa(q,k,v): return F.scaled_dot_product_attention(q,k,v)
def a_math(q,k,v): return torch.softmax(q @ k.transpose(-1,-2) * q.shape[-1]**-0.5, -1) @ v
def a_math2(q,k,v):
    b,h,n,d=q.shape
    s = torch.baddbmm(q.new_empty(1,1,1).expand(b*h,n,n), q.reshape(b*h,n,d), k.reshape(b*h,n,d).transpose(1,2), beta=0, alpha=d**-0.5)
    return s.softmax(-1).bmm(v.reshape(b*h,n,d)).view(b,h,n,d)
for shape in [(16,8,64,8),(16,1,256,64)]:
    def make(): return tuple(torch.randn(*shape, requires_grad=True) for _ in range(3))
    a = make(); print(shape, (a_sdpa(*a)-a_math(*a)).abs().max().item(), (a_sdpa(*a)-a_math2(*a)).abs().max().item(), bench(dict(sdpa=a_sdpa, math=a_math, math2=a_math2), make))
