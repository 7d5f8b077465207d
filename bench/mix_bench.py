"""Per-batch cost of fastai_mix's mixers against the references and the memory floors.

Every mixer runs as fastai runs it: a `Learner` whose training events are fired by hand around a
fixed prediction, `before_batch`, `after_pred`, the loss call, `after_loss`, `after_batch` (what
`Learner._do_one_batch` does, minus the model). References that are not fastai callbacks (timm,
torchvision) are wrapped in the smallest callback that mixes `xb`/`yb` in `before_batch`, with the
soft-target loss their documentation pairs them with. The floors are single PyTorch ops that move
the fewest bytes the mix needs, given a ready-made partner batch.

Timing: all methods of one configuration are run round-robin (interleaved), in a new random order
each round, after warm-up; each sample is one batch, the report is the median. Every method cycles
through a pool of input batches larger than the caches. On CUDA three figures are kept per method:
`wall` (launch to finish, synchronised), `gpu` (the time the GPU is busy with the batch, measured with
events while a `torch.cuda._sleep` ahead of it lets the CPU queue the whole batch first, as it does in
training) and the host syncs per batch (`torch.cuda.set_sync_debug_mode`).

    python bench/mix_bench.py                       # CPU: main table and scaling table
    python bench/mix_bench.py --device cuda --resnet  # CUDA, plus resnet18 training-step overhead

On CUDA with Triton, the fused kernels of `fastai_mix.kernels` (opt-in) are measured too, as the rows
`... fused`; elsewhere they are left out, with the reason on stderr.
"""
from __future__ import annotations
import argparse, itertools, json, math, platform, random, statistics, sys, time, warnings
from functools import partial
import torch, torch.nn as nn, torch.nn.functional as F
import fastai, fastai_mix
from fastai.learner import Learner
from fastai.callback.core import Callback, TrainEvalCallback
import fastai.callback.mixup as fmix
from fastai_mix import MixUp, CutMix, ResizeMix, cutmix_box, resize_box
from fastai_mix.test_utils import synth_dls

N_CLASSES = 10

# ---------------------------------------------------------------- references as fastai callbacks
class FnMix(Callback):
    "Mix `xb`/`yb` in `before_batch` with a function `f(x, y) -> (x, y)` (timm, torchvision)"
    run_valid, order = False, 80
    def __init__(self, f): self.f = f
    def before_batch(self):
        x, y = self.f(self.learn.xb[0], self.learn.yb[0])
        self.learn.xb, self.learn.yb = (x,), (y,)

def references() -> dict:
    "name -> (group, callback factory) for the references that import here"
    refs = {'fastai MixUp': ('mixup', lambda: fmix.MixUp()), 'fastai CutMix': ('cutmix', lambda: fmix.CutMix())}
    try:
        from timm.data import Mixup
        def timm(mix, mode):
            a = dict(mixup_alpha=.4, cutmix_alpha=0.) if mix == 'mixup' else dict(mixup_alpha=0., cutmix_alpha=1.)
            return lambda: FnMix(Mixup(**a, mode=mode, label_smoothing=0., num_classes=N_CLASSES))
        for mix, mode in itertools.product(('mixup', 'cutmix'), ('batch', 'elem')):
            refs[f'timm {mix} {mode}'] = (mix if mode == 'batch' or mix == 'mixup' else 'cutmix per sample', timm(mix, mode))
    except ImportError as e: print(f'timm not available ({e}): left out', file=sys.stderr)
    try:
        from torchvision.transforms import v2
        refs['torchvision MixUp'] = ('mixup', lambda: FnMix(v2.MixUp(alpha=.4, num_classes=N_CLASSES)))
        refs['torchvision CutMix'] = ('cutmix', lambda: FnMix(v2.CutMix(alpha=1., num_classes=N_CLASSES)))
    except ImportError as e: print(f'torchvision not available ({e}): left out', file=sys.stderr)
    return refs

OURS = {'fastai_mix MixUp': ('mixup', MixUp), 'fastai_mix CutMix': ('cutmix', CutMix),
        'fastai_mix CutMix per_sample': ('cutmix per sample', partial(CutMix, per_sample=True)),
        'fastai_mix CutMix inplace': ('cutmix', partial(CutMix, inplace=True)),
        'fastai_mix ResizeMix': ('resizemix', ResizeMix),
        'fastai_mix ResizeMix inplace': ('resizemix', partial(ResizeMix, inplace=True)),
        'fastai_mix ResizeMix per_sample': ('resizemix per sample', partial(ResizeMix, per_sample=True))}

def fused(cls):
    "`cls` mixing with the fused kernels of `fastai_mix.kernels` on (opt-in there)"
    from fastai_mix.kernels import use_fused_kernels
    class Fused(cls):
        def mix(self, xb, yb, inplace=None):
            with use_fused_kernels(): return super().mix(xb, yb, inplace)
    Fused.__name__ = f'{cls.__name__}Fused'
    return Fused

FUSED = {'fastai_mix MixUp fused': ('mixup', lambda: fused(MixUp)()), 'fastai_mix CutMix fused': ('cutmix', lambda: fused(CutMix)()),
         'fastai_mix CutMix inplace fused': ('cutmix', lambda: fused(CutMix)(inplace=True)),
         'fastai_mix CutMix per_sample fused': ('cutmix per sample', lambda: fused(CutMix)(per_sample=True))}

def fused_unavailable(x) -> str|None:
    "Why the fused kernels would not run on batches like `x` (no Triton, not CUDA...), or None"
    try: from fastai_mix.kernels import why_not_fused
    except ImportError as e: return str(e)
    return why_not_fused(x, torch.arange(len(x), device=x.device))

# ---------------------------------------------------------------- drivers
def ce_loss():
    "One loss for every method: PyTorch's cross-entropy takes class indices and probabilities; `y_int` tells fastai's MixUp it has class indices"
    lf = nn.CrossEntropyLoss()
    lf.y_int = True
    return lf

def bench_learner(cb) -> Learner:
    "A `Learner` with only `TrainEvalCallback` and `cb`, set up as `fit` leaves it before the first batch"
    learn = Learner(synth_dls(n=8, bs=4), nn.Linear(1, 1), loss_func=ce_loss(), cbs=cb)
    learn.cbs = learn.cbs.filter(lambda o: isinstance(o, TrainEvalCallback) or o is cb)
    learn.n_epoch, learn.n_iter, learn.epoch = 1, 10**9, 0
    learn('before_fit'); learn('before_epoch'); learn('before_train')
    return learn

def event_step(learn, pool, y, pred):
    "One training batch as `Learner._do_one_batch` runs it, with `pred` in place of the model's output"
    it = itertools.cycle(pool)
    def step():
        learn.xb, learn.yb = (next(it),), (y,)
        learn('before_batch')
        learn.pred = pred
        learn('after_pred')
        learn.loss_grad = learn.loss_func(learn.pred, *learn.yb)
        learn.loss = learn.loss_grad.clone()
        learn('after_loss')
        learn('after_batch')
    return step

def floors(pool) -> dict:
    "name -> (group, step): the fewest bytes each mix must move, as one op with a ready-made partner batch"
    n, size, dev = len(pool[0]), tuple(pool[0].shape[2:]), pool[0].device
    lam = torch.rand(n, device=dev).clamp(min=.5).to(pool[0].dtype).view(n, 1, 1, 1)
    g = torch.Generator().manual_seed(0) # 64 boxes of each kind, drawn as the mixers draw them (alpha=1: lam uniform)
    cut = [cutmix_box(size, torch.rand((), generator=g).item(), g) for _ in range(64)]
    res = [resize_box(size, .1 + .7 * torch.rand((), generator=g).item(), g) for _ in range(64)] # lam in [.1, .8]
    k, i = len(pool), itertools.count()
    def copy(): return pool[next(i) % k].clone()
    def lerp():
        j = next(i); return torch.lerp(pool[(j + 1) % k], pool[j % k], lam)
    def box():
        j = next(i); b = (..., *cut[j % len(cut)])
        pool[j % k][b] = pool[(j + 1) % k][b]
    def resize():
        j = next(i); b = res[j % len(res)]
        pool[j % k][(..., *b)] = F.interpolate(pool[(j + 1) % k], size=[s.stop - s.start for s in b], mode='bilinear', align_corners=False)
    return {'floor: copy': ('copy', copy), 'floor: one lerp pass': ('mixup', lerp),
            'floor: one box copy': ('cutmix', box), 'floor: resize + box copy': ('resizemix', resize)}

def make_pool(shape, dtype, device, budget=256 * 2**20) -> list:
    "Enough random batches of `shape` to exceed the caches (`budget` bytes, at least 2)"
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return [torch.randn(shape, device=device).to(dtype) for _ in range(max(2, math.ceil(budget / nbytes)))]

def methods(shape, dtype, device, which=None) -> dict:
    "name -> (group, step) for one configuration"
    pool = make_pool(shape, dtype, device)
    n = shape[0]
    y, pred = torch.randint(0, N_CLASSES, (n,), device=device), torch.randn(n, N_CLASSES, device=device)
    res = dict(floors(pool))
    res['no mixer (events + loss)'] = ('copy', event_step(bench_learner(Callback()), pool, y, pred))
    for name, (g, cls) in OURS.items(): res[name] = (g, event_step(bench_learner(cls()), pool, y, pred))
    why = fused_unavailable(pool[0])
    if why: print(f'fused kernels not measured: {why}', file=sys.stderr)
    else:
        for name, (g, mk) in FUSED.items(): res[name] = (g, event_step(bench_learner(mk()), pool, y, pred))
    for name, (g, mk) in references().items(): res[name] = (g, event_step(bench_learner(mk()), pool, y, pred))
    return {k: v for k, v in res.items() if which is None or k in which or k.startswith('floor')}

# ---------------------------------------------------------------- timing
def sleep_cycles_per_ms() -> float:
    torch.cuda._sleep(10**6); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record(); torch.cuda._sleep(10**7); b.record(); torch.cuda.synchronize()
    return 10**7 / a.elapsed_time(b)

def count_syncs(step) -> int:
    "Host-device synchronisations in one call of `step`"
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        torch.cuda.set_sync_debug_mode('warn')
        try: step()
        finally: torch.cuda.set_sync_debug_mode('default')
    return sum('called a synchronizing' in str(o.message) for o in w)

def run(ms: dict, device, reps, warmup) -> dict:
    "Interleaved medians: name -> dict(wall, gpu, syncs, error) in ms"
    cuda = device.type == 'cuda'
    res, ok = {}, {}
    for name, (g, step) in ms.items(): # warm-up, and set aside what fails
        try:
            for _ in range(warmup): step()
            if cuda: torch.cuda.synchronize()
            ok[name] = step
            res[name] = dict(group=g, wall=[], gpu=[], syncs=count_syncs(step) if cuda else None, error=None)
        except Exception as e:
            res[name] = dict(group=g, wall=[], gpu=[], syncs=None, error=f"{type(e).__name__}: {' '.join(str(e).split()[-12:])}") # the cause, after fastai's prefix
    if cuda: # a sleep long enough for the CPU to queue a whole batch ahead of the GPU
        cpm = sleep_cycles_per_ms()
        disp = {}
        for name, step in ok.items():
            t = time.perf_counter(); step(); disp[name] = (time.perf_counter() - t) * 1e3; torch.cuda.synchronize()
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    order = list(ok)
    for _ in range(reps):
        random.shuffle(order)
        for name in order:
            step = ok[name]
            if cuda:
                torch.cuda.synchronize(); t = time.perf_counter(); step(); torch.cuda.synchronize()
                res[name]['wall'].append((time.perf_counter() - t) * 1e3)
                torch.cuda._sleep(int(cpm * (2 * disp[name] + .2))); ev[0].record(); step(); ev[1].record(); torch.cuda.synchronize()
                res[name]['gpu'].append(ev[0].elapsed_time(ev[1]))
            else:
                t = time.perf_counter(); step(); res[name]['wall'].append((time.perf_counter() - t) * 1e3)
    for r in res.values():
        for k in ('wall', 'gpu'): r[k] = statistics.median(r[k]) if r[k] else None
    return res

# ---------------------------------------------------------------- reports
FLOOR = {'copy': 'floor: copy', 'mixup': 'floor: one lerp pass', 'cutmix': 'floor: one box copy', 'cutmix per sample': 'floor: one box copy',
         'resizemix': 'floor: resize + box copy', 'resizemix per sample': 'floor: resize + box copy'}

def fmt(v): return '' if v is None else f'{v:.3f}' if v < 10 else f'{v:.1f}'

def table(res: dict, cuda: bool) -> str:
    "One markdown table: per group, the floor, then fastai_mix, then the references, each with its ratio to the floor"
    key = 'gpu' if cuda else 'wall'
    head = ('| method | wall ms | GPU ms | x floor (GPU) | syncs |\n|---|---:|---:|---:|---:|' if cuda else
            '| method | ms | x floor |\n|---|---:|---:|')
    rows = [head]
    for g in FLOOR:
        fl = res.get(FLOOR[g], {}).get(key)
        members = [(n, r) for n, r in res.items() if r['group'] == g and not (n.startswith('floor') and n != FLOOR[g])]
        if g.endswith('per sample'): members = [(n, r) for n, r in members if not n.startswith('floor')]
        for name, r in sorted(members,
                              key=lambda kv: (not kv[0].startswith('floor'), not kv[0].startswith('fastai_mix'), kv[0])):
            if r['error']: rows.append(f"| {name} | {r['error']} |" + ' |' * (3 if cuda else 1)); continue
            ratio = f"{r[key] / fl:.2f}" if fl and g != 'copy' or name == FLOOR[g] else ''
            bold = '**' if name.startswith('fastai_mix') else ''
            rows.append(f"| {bold}{name}{bold} | {fmt(r['wall'])} | {fmt(r['gpu'])} | {ratio} | {r['syncs']} |" if cuda else
                        f"| {bold}{name}{bold} | {fmt(r['wall'])} | {ratio} |")
    return '\n'.join(rows)

def summary(res: dict, cuda: bool) -> list:
    "Per fastai_mix mixer: ratio to its floor, and to the fastest reference of its group that ran"
    key, out = ('gpu' if cuda else 'wall'), []
    for name, r in res.items():
        if not name.startswith('fastai_mix') or r['error']: continue
        fl = res[FLOOR[r['group']]][key]
        refs = {n: o[key] for n, o in res.items() if o['group'] == r['group'] and not o['error'] and not n.startswith(('fastai_mix', 'floor'))}
        best = min(refs, key=refs.get) if refs else None
        out.append(dict(mixer=name, ms=r[key], floor_ratio=r[key] / fl, best_ref=best, ref_ratio=refs[best] / r[key] if best else None, syncs=r['syncs']))
    return out

def scaling(device, reps, warmup, dtype=torch.float32) -> str:
    "fastai_mix's mixers over batch sizes and image sizes: ms per batch and ns per KB of batch"
    rows = ['| batch | image | MB | MixUp ms | CutMix ms | ResizeMix ms | MixUp ns/KB | CutMix ns/KB | ResizeMix ns/KB |', '|' + '---:|' * 9]
    names = ['fastai_mix MixUp', 'fastai_mix CutMix', 'fastai_mix ResizeMix']
    for bs, sz in itertools.product((16, 64, 256), (32, 64, 128, 224)):
        shape = (bs, 3, sz, sz)
        res = run(methods(shape, dtype, device, which=names), device, reps, warmup)
        mb = math.prod(shape) * 4 / 2**20
        ms = [res[n]['gpu' if device.type == 'cuda' else 'wall'] for n in names]
        rows.append(f'| {bs} | {sz} | {mb:.1f} | ' + ' | '.join(fmt(m) for m in ms) + ' | ' + ' | '.join(f'{m * 1e6 / (mb * 1024):.1f}' for m in ms) + ' |')
        print(rows[-1], flush=True)
    return '\n'.join(rows)

def resnet_overhead(device, steps=30, rounds=5) -> str:
    "resnet18 training steps at batch 256 (224 px) with and without each mixer, interleaved blocks: ms per step"
    from torchvision.models import resnet18
    from fastai.callback.fp16 import MixedPrecision
    torch.backends.cudnn.benchmark = True
    x = torch.randn(256, 3, 224, 224, device=device); y = torch.randint(0, N_CLASSES, (256,), device=device)
    rows = ['| precision | mixer | ms/step | overhead |', '|---|---|---:|---:|']
    for prec in ('float32', 'bf16 (MixedPrecision)'):
        model = resnet18(num_classes=N_CLASSES).to(device).to(memory_format=torch.channels_last)
        learns = {}
        mixers = [('none', Callback), ('MixUp', MixUp), ('CutMix', CutMix), ('ResizeMix', ResizeMix)]
        if not fused_unavailable(x): mixers += [('MixUp fused', fused(MixUp)), ('CutMix fused', fused(CutMix))]
        for name, mk in mixers:
            cbs = [mk()] + ([MixedPrecision(amp_mode='bf16')] if prec.startswith('bf16') else [])
            learn = Learner(synth_dls(n=8, bs=4), model, loss_func=ce_loss(), cbs=cbs)
            learn.cbs = learn.cbs.filter(lambda o: isinstance(o, TrainEvalCallback) or o in cbs) # no progress bar, no recorder
            learn.dls.device = device
            learn.create_opt(); learn.n_epoch, learn.n_iter, learn.epoch = 1, 10**9, 0
            learn('before_fit'); learn('before_epoch'); learn('before_train')
            learns[name] = learn
        def block(learn):
            torch.cuda.synchronize(); t = time.perf_counter()
            for i in range(steps): learn.one_batch(i, (x.clone(), y))
            torch.cuda.synchronize(); return (time.perf_counter() - t) * 1e3 / steps
        for l in learns.values(): block(l) # warm-up
        times = {k: [] for k in learns}
        for _ in range(rounds):
            for k in random.sample(list(learns), len(learns)): times[k].append(block(learns[k]))
        base = statistics.median(times['none'])
        for k, v in times.items():
            m = statistics.median(v)
            rows.append(f"| {prec} | {k} | {m:.2f} | {'' if k == 'none' else f'{(m - base) / base * 100:+.2f}%'} |")
        print('\n'.join(rows[-len(learns):]), flush=True)
    return '\n'.join(rows)

def machine(device) -> str:
    cpu = platform.processor() or platform.machine()
    try: cpu = next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except Exception: pass
    gpu = f', GPU {torch.cuda.get_device_name()}' if device.type == 'cuda' else ''
    return (f'CPU {cpu} ({torch.get_num_threads()} torch threads){gpu}; Python {platform.python_version()}, torch {torch.__version__}, '
            f'fastai {fastai.__version__}, fastai_mix {fastai_mix.__version__}' + ''.join(
                f', {m} {__import__(m).__version__}' for m in ('timm', 'torchvision') if __import__('importlib').util.find_spec(m)))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cpu')
    p.add_argument('--reps', type=int, default=None, help='timed batches per method (default 25 on CPU, 100 on CUDA)')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--shapes', default='64x3x224x224,256x3x32x32')
    p.add_argument('--dtypes', default='float32,bfloat16')
    p.add_argument('--no-scaling', action='store_true', help='skip the scaling table')
    p.add_argument('--resnet', action='store_true', help='resnet18 training-step overhead (CUDA)')
    p.add_argument('--out', default=None, help='write the report (markdown) and the raw figures (.json) here')
    a = p.parse_args(argv)
    device = torch.device(a.device)
    cuda = device.type == 'cuda'
    reps = a.reps or (100 if cuda else 25)
    torch.manual_seed(0); random.seed(0)
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*')
    report, raw = [f'Machine: {machine(device)}', f'Command: python bench/mix_bench.py {" ".join(sys.argv[1:] if argv is None else argv)}',
                   f'{reps} timed batches per method, interleaved, median'], {}
    for shape, dt in itertools.product(a.shapes.split(','), a.dtypes.split(',')):
        shape, dtype = tuple(int(s) for s in shape.split('x')), getattr(torch, dt)
        res = run(methods(shape, dtype, device), device, reps, a.warmup)
        raw[f'{shape} {dt}'] = dict(results=res, summary=summary(res, cuda))
        report += [f'\n### {device.type.upper()}, batch {tuple(shape)}, {dt}\n', table(res, cuda), '']
        for s in summary(res, cuda):
            report.append(f"- {s['mixer']}: {s['floor_ratio']:.2f}x its floor; " + (f"{s['ref_ratio']:.2f}x the speed of the fastest reference ({s['best_ref']})" if s['best_ref'] else 'no reference')
                          + (f"; {s['syncs']} syncs" if cuda else ''))
        print('\n'.join(report[-len(raw[f'{shape} {dt}']['summary']) - 3:]), flush=True)
    if not a.no_scaling: report += [f'\n### Scaling ({device.type.upper()}, float32)\n', scaling(device, max(5, reps // 3), a.warmup)]
    if a.resnet and cuda: report += ['\n### resnet18 training step, batch 256, 224 px, channels_last\n', resnet_overhead(device)]
    text = '\n'.join(report)
    print(text)
    if a.out:
        open(f'{a.out}.md', 'w').write(text + '\n')
        json.dump(raw, open(f'{a.out}.json', 'w'), indent=1, default=str)

if __name__ == '__main__': main()
