import torch, time, statistics
import torch.nn.functional as F
torch.set_num_threads(1)
shapes = [(16,32,32,16),(16,64,32,16),(16,64,64,8),(16,128,64,8),(16,96,32,16),(16,64,64,16)]
def conv_mkldnn(x,w,b): return F.conv2d(x,w,b,padding=1)
def conv_thnn(x,w,b):
    return torch.ops.aten._slow_conv2d_forward(x,w,(3,3),b,(1,1),(1,1)) if False else torch._C._nn.thnn_conv2d(x,w,(3,3),b,(1,1),(1,1))
def conv_unfold(x,w,b):
    B,C,H,W = x.shape
    cols = F.unfold(x,3,padding=1)  # B, C9, HW
    out = torch.matmul(w.reshape(w.shape[0],-1), cols) + b[:,None]
    return out.reshape(B,-1,H,W)
fns = dict(mkldnn=conv_mkldnn, thnn=conv_thnn, unfold=conv_unfold)
for (B,cin,cout,s) in shapes:
    x = torch.randn(B,cin,s,s,requires_grad=True); w = torch.randn(cout,cin,3,3,requires_grad=True); b=torch.randn(cout,requires_grad=True)
    g = torch.randn(B,cout,s,s)
    ref = conv_mkldnn(x,w,b)
    res = {k:[] for k in fns}
    for r in range(7):
        for k,f in fns.items():
            t0=time.perf_counter()
            for _ in range(5):
                y=f(x,w,b); y.backward(g); x.grad=w.grad=b.grad=None
            res[k].append((time.perf_counter()-t0)/5)
    err = {k:(f(x,w,b)-ref).abs().max().item() for k,f in fns.items()}
    fl = 3*2*B*s*s*cin*cout*9
    print((B,cin,cout,s), " ".join(f"{k}={statistics.median(v)*1e3:.2f}ms({fl/statistics.median(v)/1e9:.0f}GF)" for k,v in res.items()), err)
