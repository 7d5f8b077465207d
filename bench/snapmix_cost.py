"""What SnapMix's extra forward pass costs: the time of a training step (mixing, forward, loss, backward, optimizer step)
with SnapMix against CutMix and no mixing, for a CAM model (the demo's small CNN; torchvision's resnet18, whose
`layer4` is read by a hook) and a Grad-CAM one (resnet18's body under fastai's `create_head`, as `vision_learner` builds).

    .venv/bin/python bench/snapmix_cost.py                  # the CPU, one torch thread
    .venv/bin/python bench/snapmix_cost.py --device cuda    # a GPU

Each setting trains on random images for `--steps` steps per mixer after 3 warm-up steps, the mixers taking turns
round by round; on the CPU the time is the process's CPU time (one torch thread), which other jobs do not change, on a
GPU the wall time. The table gives the median step time and the ratio to CutMix. Report: bench/results/snapmix_cost.md."""
import argparse, statistics, time
import torch, torch.nn as nn
from fastai.callback.core import Callback
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.vision.learner import create_head
from torchvision.models import resnet18
from fastai_mix import CutMix, SnapMix
from fastai_mix.demo import small_cnn, torch_threads

def clock(cuda:bool) -> float:
    "Wall time on a GPU (after a sync); on the CPU this process's CPU time, which other jobs on the machine do not change (one torch thread)"
    if cuda: torch.cuda.synchronize(); return time.perf_counter()
    return time.process_time()

class StepTime(Callback):
    "The time of each training step, from before the mixer to after the optimizer step"
    order, run_valid = -10, False
    def before_fit(self): self.times = []
    def before_batch(self): self.t = clock(self.learn.dls.device.type == 'cuda')
    def after_batch(self): self.times.append(clock(self.learn.dls.device.type == 'cuda') - self.t)

def models(c:int):
    def body18():
        m = resnet18(weights=None)
        return nn.Sequential(*list(m.children())[:-2])
    return {'small CNN (CAM), 1×28×28, bs 64': (lambda: small_cnn(c, 1), (1, 28, 28), 64),
            'resnet18 (CAM, hook on layer4), 3×64×64, bs 32': (lambda: resnet18(weights=None, num_classes=c), (3, 64, 64), 32),
            'resnet18 body + fastai head (Grad-CAM), 3×64×64, bs 32': (lambda: nn.Sequential(body18(), create_head(512, c)), (3, 64, 64), 32)}

MIXERS = {'none': lambda: None, 'CutMix': CutMix, 'SnapMix': SnapMix, 'SnapMix(cam_every=4)': lambda: SnapMix(cam_every=4)}

def bench(make, shape, bs, steps, rounds, device, c=10):
    g = torch.Generator().manual_seed(0)
    n = bs * steps
    items = list(zip(torch.randn(n, *shape, generator=g), torch.randint(0, c, (n,), generator=g)))
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=True, drop_last=True), DataLoader(items[:bs], bs=bs), device=device)
    times = {k: [] for k in MIXERS}
    learners = {}
    for k, mixer in MIXERS.items():
        torch.manual_seed(0)
        cb = mixer()
        learners[k] = Learner(dls, make().to(device), loss_func=CrossEntropyLossFlat(), cbs=[StepTime()] + ([cb] if cb else []))
        with learners[k].no_bar(), learners[k].no_logging(): learners[k].fit(1, 1e-3) # warm-up (the first steps allocate)
    for _ in range(rounds):
        for k, learn in learners.items():
            with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
            times[k] += learn.step_time.times[3:]
    return {k: statistics.median(v) for k, v in times.items()}

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cpu'); p.add_argument('--steps', type=int, default=8); p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--threads', type=int, default=1)
    a = p.parse_args()
    rows = []
    with torch_threads(a.threads if a.device == 'cpu' else None):
        for name, (make, shape, bs) in models(10).items():
            t = bench(make, shape, bs, a.steps, a.rounds, torch.device(a.device))
            rows.append((name, t))
            print(f"{name}: " + ', '.join(f"{k} {1e3 * v:.1f} ms" for k, v in t.items()), flush=True)
    print(f"\n| model | none, ms | CutMix, ms | SnapMix, ms | SnapMix / CutMix | SnapMix(cam_every=4), ms | / CutMix |\n|---|---:|---:|---:|---:|---:|---:|")
    for name, t in rows:
        print(f"| {name} | {1e3 * t['none']:.1f} | {1e3 * t['CutMix']:.1f} | {1e3 * t['SnapMix']:.1f} | {t['SnapMix'] / t['CutMix']:.2f} | "
              f"{1e3 * t['SnapMix(cam_every=4)']:.1f} | {t['SnapMix(cam_every=4)'] / t['CutMix']:.2f} |")
