"""A/B of unet.py changes: an old copy of diffusekit/nn/unet.py vs the current one vs diffusers, alternating.

    git show HEAD:src/diffusekit/nn/unet.py > /tmp/unet_old.py   # the code before the change; import made absolute:
    sed -i "s/from \\.\\._utils import/from diffusekit._utils import/" /tmp/unet_old.py
    REPS=7 OMP_NUM_THREADS=1 python benchmarks/issue4_unet/ab_against_old_unet.py small 1
"""
import sys, statistics, importlib.util, torch
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__))))
import unet_speed as us
spec = importlib.util.spec_from_file_location("unet_orig", __import__("os").environ.get("OLD_UNET", "/tmp/unet_old.py"))
orig = importlib.util.module_from_spec(spec); sys.modules["unet_orig"] = orig; spec.loader.exec_module(orig)
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
name = sys.argv[1]
bf16 = "bf16" in sys.argv
vs = {"diffusers": us.Variant(name, "diffusers"), "orig": us.Variant(name, "diffusekit", module=orig),
      "new": us.Variant(name, "diffusekit")}
if bf16:
    vs["new_bf16"] = us.Variant(name, "diffusekit", bf16=True)
    vs["diffusers_bf16"] = us.Variant(name, "diffusers", bf16=True)
reps = int(__import__("os").environ.get("REPS", 7))
for what in ("train_step", "forward"):
    r = us.interleaved(vs, what, reps, 1.0)
    print(what, {k: f"{statistics.median(v) * 16:.1f} img/s" for k, v in r.items()})
    for k in vs:
        if k != "diffusers":
            print(f"   {k}/diffusers = {us.paired_ratio(r[k], r['diffusers']):.3f}x")
    print(f"   new/orig = {us.paired_ratio(r['new'], r['orig']):.3f}x")
