"""What TransMix's hook costs per training step next to CutMix's, on the demo's small ViT (timm, patches of 4 px).

    .venv/bin/python bench/transmix_cost.py            # CPU, one thread
    .venv/bin/python bench/transmix_cost.py --cuda     # on a GPU

A training step (forward, mixed loss, backward, optimizer step) of a fastai `Learner` on one fixed batch, with CutMix,
with TransMix (class token: the last block's attention run once more, unfused and without gradients, for its matrix) and
with TransMix on the same ViT pooled by the mean of its tokens (no class token: the mean of the patch tokens' rows). The mixers alternate in rounds, so a
change of the machine's load falls on all of them; the report gives the median step time of each and its ratio to
CutMix's. On the CPU the time is the process's CPU time (one torch thread), so a shared machine's load does not count;
on a GPU it is the wall time between synchronisations. Report: bench/results/transmix_cost.md."""
import argparse, statistics, time, platform
from pathlib import Path
import torch
from fastai.learner import Learner
from fastai.data.core import DataLoaders
from fastai.losses import CrossEntropyLossFlat
from fastai.callback.core import Callback, CancelBatchException
from fastai.torch_core import set_seed
from fastai_mix import CutMix, TransMix
from fastai_mix.demo import small_vit

class Steps(Callback):
    "Time `n` training steps on the learner's first batch, then stop the fit"
    order = 100
    def __init__(self, n, sync): self.n, self.sync, self.times = n, sync, []
    def before_batch(self):
        if self.sync: torch.cuda.synchronize()
        self.t = self.clock()
    def after_batch(self):
        if self.sync: torch.cuda.synchronize()
        self.times.append(self.clock() - self.t)
    def clock(self): return time.perf_counter() if self.sync else time.process_time() # on the CPU, the process's CPU time: a loaded machine's waits left out

def step_times(mixer, pooled, x, y, n, dev):
    "Seconds per training step of the small ViT with `mixer`, over `n` steps (after one warm-up step)"
    set_seed(0)
    model = small_vit(10, x.shape[1], x.shape[-1]) if not pooled else small_vit_pooled(10, x.shape[1], x.shape[-1])
    items = [(x[i], y[i]) for i in range(len(x))]
    dls = DataLoaders.from_dsets(items * (n + 1), items[:len(x)], bs=len(x), shuffle=False, device=dev)
    learn = Learner(dls, model.to(dev), loss_func=CrossEntropyLossFlat(), cbs=mixer)
    cb = Steps(n + 1, dev.type == 'cuda')
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3, cbs=cb)
    return cb.times[1:]

def small_vit_pooled(n_out, n_in, size):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=size, patch_size=4, in_chans=n_in, num_classes=n_out, embed_dim=64, depth=4, num_heads=4,
                             global_pool='avg', class_token=False)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--cuda', action='store_true'); p.add_argument('--bs', type=int, default=64); p.add_argument('--size', type=int, default=28)
    p.add_argument('--steps', type=int, default=20); p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--out', type=Path, default=Path(__file__).parent/'results'/'transmix_cost.md')
    a = p.parse_args()
    dev = torch.device('cuda' if a.cuda else 'cpu')
    if not a.cuda: torch.set_num_threads(1)
    import fastai.callback.progress # noqa: F401  Learner.no_bar
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(a.bs, 1, a.size, a.size, generator=g), torch.randint(0, 10, (a.bs,), generator=g)
    arms = {'CutMix': (CutMix, False), 'TransMix': (TransMix, False), 'CutMix, pooled ViT': (CutMix, True), 'TransMix, pooled ViT': (TransMix, True)}
    res = {k: [] for k in arms}
    for r in range(a.rounds):
        for k, (m, pooled) in arms.items(): res[k] += step_times(m(), pooled, x, y, a.steps, dev)
    med = {k: statistics.median(v) for k, v in res.items()}
    rows = [f"| {k} | {1000 * med[k]:.2f} | {med[k] / med['CutMix' + (', pooled ViT' if 'pooled' in k else '')]:.3f} |" for k in arms]
    where = torch.cuda.get_device_name() if a.cuda else f"CPU ({platform.processor() or platform.machine()}), 1 thread"
    text = (f"# TransMix's cost per training step\n\n`python bench/transmix_cost.py{' --cuda' if a.cuda else ''}` on {where}, torch {torch.__version__}: "
            f"the demo's small ViT (timm, {a.size} px, patches of 4 px: {(a.size // 4) ** 2} patches, width 64, 4 blocks of 4 heads), "
            f"batch {a.bs}, a fastai training step (forward, mixed loss, backward, Adam step), {'wall time' if a.cuda else 'CPU time of the process'}; median of {a.rounds} rounds × {a.steps} steps, "
            "the mixers alternating.\n\n| mixer | ms per step | vs CutMix on the same ViT |\n|---|---:|---:|\n" + '\n'.join(rows) + "\n\n"
            "TransMix's extra work: the hook on the last block's attention module runs it once more without gradients and unfused, to read "
            "the attention matrix the model computes (the class token's row; for the pooled ViT, the mean over the patch queries), weighs "
            "the patches by the pixels pasted, and `cutmix` pastes an int32 map of each pixel's sample along with the images, to read the box back.\n")
    a.out.parent.mkdir(parents=True, exist_ok=True); a.out.write_text(text)
    print(text)
