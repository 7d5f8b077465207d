"""The CUDA promise, checked on the CPU: the mixers and the mixed loss never make the host wait for the GPU, and never copy to it.

The README promises that every mixer works on the batch's device without host-device syncs. CI has no GPU, so this
probe checks that promise on the CPU, on every run (`pytest -m sync_probe` runs it alone). On a GPU machine, the `cuda`
tests confirm it with `torch.cuda.set_sync_debug_mode('error')`.

How `SyncProbe` works:

- **Which tensors are on the device.** A `TorchFunctionMode` (`_Functions`) tags the tensors that live on the device:
  the batch, the model's parameters and buffers, whatever a factory makes with `device=` the batch's device, and every
  result of an op that reads a tagged tensor. The tags live in a `WeakIdKeyDictionary`. Every other tensor is a
  host tensor.
- **The library thinks the batch is on CUDA.** A tagged tensor reports `.device` as `cuda:0` and `.is_cuda` as True. So
  wherever the library branches on the device, it takes the CUDA branch: `torch._assert_async` instead of a host check,
  a 0-d share kept on the device, `fork_rng` over the GPU's stream, the class counts cached per device. A factory
  given `device=` that device runs on the CPU and its result is tagged. The CUDA random-state and autocast queries
  answer for the CPU (`_pretend_cuda`), so fastai's `to_bf16` autocasts here too.
- **What would make the host wait for the GPU, or copy to it**, recorded when it touches a device tensor:
  - at the dispatch level (a `TorchDispatchMode`, `_Dispatch`, which also sees inside composite ops):
    `_local_scalar_dense` (`.item()`, `bool`/`int`/`float` of a tensor), `nonzero` (`argwhere`, one-argument
    `where`), boolean indexing, `masked_select`, `unique`, `repeat_interleave` without `output_size`, `multinomial`,
    `bincount`, `equal`, `is_nonzero`;
  - at the Python level (no aten op shows these): `.tolist()`, `.cpu()`, `.numpy()`, `.to('cpu')`, a `copy_` into a
    host tensor, printing;
  - host-to-device copies: `torch.tensor`/`as_tensor`/`asarray`/`new_tensor` of host data (numbers too) onto the
    device, `.to(device)` or a `copy_` of a host tensor;
  - a host tensor of one or more dims (made without `device=`) meeting device tensors in an op. On CUDA that is a
    device-mismatch error, or a hidden copy for an index. 0-d host tensors and Python numbers are fine there: CUDA
    takes them as scalars.
- **Only the mixers' own work.** An event counts when the Python stack holds a frame of the mixers' modules
  (`MIXER_FILES`): a mixer's callback events, the mixed loss (and the user's loss that it calls), the hooks in the
  forward pass, the functions. fastai's loop, the optimiser and the model's own forward pass don't count, but a
  forward pass the library runs itself (SnapMix's maps, ManifoldMixup's check of its places) does. Each event names
  the innermost of those frames: file, line and function.
- **What is allowed** is listed in `ALLOWED`, each entry with its reason, matched by file, function and kind.
  `'first'` entries may happen only up to the first training batch (once per fit). `'any'` entries are reads the
  user asks for. Anything else fails the test, naming the library's file and line.

The controls at the end plant an `.item()` on the batch, and a tensor made without `device=`, into `mixup` and
`cutmix` (compiled into `fastai_mix/core.py`'s own lines), and check that the probe fails on each, naming that line.
"""
import sys, re, importlib, inspect, linecache, contextlib, functools
from pathlib import Path
from typing import NamedTuple
from unittest import mock
import numpy as np
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary
import fastai.callback.fp16 as fastai_fp16
import fastai.callback.progress # Learner.no_bar
from fastai.callback.core import Callback
from fastai.data.core import Datasets
from fastai.data.transforms import ItemGetter
from fastai.layers import ConvLayer, ResBlock
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, BCEWithLogitsLossFlat, MSELossFlat
from fastai.vision.learner import create_head
from fastai_mix import (MixUp, CutMix, ResizeMix, FMix, TransMix, SnapMix, ManifoldMixup, OutputMixup, MixChoice, MixHandler,
                        mixup, cutmix, resizemix, fmix, mix_loss, MixCollate)

pytestmark = pytest.mark.sync_probe
aten = torch.ops.aten

GPU = torch.device('cuda', 0) # the device the batch pretends to be on
_MIXER_MODULES = ('core', 'callback', 'fmix', 'manifold', 'transmix', 'snapmix', 'kernels') # the mixers' code (not show, demo, data, calibration, test_utils)
core, callback = (importlib.import_module(f'fastai_mix.{m}') for m in ('core', 'callback'))
MIXER_FILES = {importlib.import_module(f'fastai_mix.{m}').__file__: f"fastai_mix/{m}.py" for m in _MIXER_MODULES}

class Allowed(NamedTuple):
    kind:str # 'sync' or 'copy'
    when:str # 'first': up to the first training batch (once per fit); 'any': a read the user asks for
    why:str

ALLOWED = { # (file, function): the one host-device event it may make, when, and why
    ('fastai_mix/callback.py', 'MixHandler._class_counts'): Allowed('copy', 'first',
        "A mixer's class counts (given, or counted in the training data) go to the device once per fit, at `before_fit` "
        "(`_prime_counts`, on `dls.device`). Every batch reads the kept table."),
    ('fastai_mix/core.py', '_class_table'): Allowed('copy', 'first',
        "Class counts given to the functions as numbers (a list, what the error message asks for) go to the batch's "
        "device at the first call. Later calls with the same counts and device reuse that table."),
    ('fastai_mix/manifold.py', '_same'): Allowed('sync', 'first',
        "ManifoldMixup checks its places once per model, at the first batch: forward passes on two samples, compared "
        "on the host (`probe_places`)."),
    ('fastai_mix/callback.py', 'MixHandler.left_alone'): Allowed('sync', 'any',
        "`left_alone()` is a count the user reads, after an epoch. Its docstring says that reading it waits for the GPU."),
}

# ---------------------------------------------------------------- the probe
def _tensors(o, out:list) -> list:
    "The tensors in `o`, through tuples, lists and dicts"
    if isinstance(o, Tensor): out.append(o)
    elif isinstance(o, (tuple, list)):
        for v in o: _tensors(v, out)
    elif isinstance(o, dict):
        for v in o.values(): _tensors(v, out)
    return out

def _name(func) -> str:
    "What code calls `func`: `Tensor.add`, `torch.where`, `F.cross_entropy`"
    q = getattr(func, '__qualname__', '') or repr(func)
    if q.startswith(('TensorBase.', 'Tensor.')): return 'Tensor.' + q.split('.', 1)[1]
    return f"{'F' if getattr(func, '__module__', None) == 'torch.nn.functional' else 'torch'}.{getattr(func, '__name__', q)}"

def _cuda(d) -> bool:
    "Whether `d` (a device, or its name) is a CUDA device"
    if isinstance(d, torch.device): return d.type == 'cuda'
    return isinstance(d, str) and d.split(':')[0] == 'cuda'

_DESC = {n: torch._C.TensorBase.__dict__[n] for n in ('device', 'is_cuda', 'is_cpu')}
_HOST_READS = {Tensor.tolist: '.tolist()', Tensor.cpu: '.cpu()', Tensor.numpy: '.numpy()', Tensor.__array__: 'numpy.asarray()',
               Tensor.__repr__: 'printing', Tensor.__format__: 'formatting'} # reads of the values that no aten op shows
_FROM_DATA = {torch.tensor: 'torch.tensor', torch.as_tensor: 'torch.as_tensor', torch.asarray: 'torch.asarray'}
_SYNC_OPS = {aten._local_scalar_dense: ".item() (or bool, int, float of a tensor)", aten.nonzero: "nonzero (argwhere, where(cond))",
             aten.masked_select: "masked_select", aten._unique: "unique", aten._unique2: "unique", aten.unique_dim: "unique",
             aten.unique_consecutive: "unique_consecutive", aten.unique_dim_consecutive: "unique_consecutive",
             aten.multinomial: "multinomial", aten.bincount: "bincount", aten.equal: "torch.equal", aten.is_nonzero: "is_nonzero"}
_INDEX_OPS = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)

def _DEVICE_CACHES() -> list[dict]: return [d for d in (getattr(core, '_count_tables', None),) if d is not None] # what the library keeps on the device between calls (`_class_table`'s class counts)

def _allowed(where:str, name:str) -> tuple:
    "(key, rule) of `ALLOWED` for the function called `name` in `where`, matched by its own name (Python 3.10 has no `co_qualname`), or (None, None)"
    return next(((k, r) for k, r in ALLOWED.items() if k[0] == where and k[1].rsplit('.', 1)[-1] == name), (None, None))

class Event(NamedTuple):
    kind:str; what:str; where:str; line:int; func:str # `func`: the qualified name where Python gives it (3.11+)
    def __str__(self):
        src = linecache.getline(next(f for f, w in MIXER_FILES.items() if w == self.where), self.line).strip()
        return f"{self.where}:{self.line} in {self.func}: {self.kind}: {self.what}\n        {src}"

class SyncProbe:
    "Pretend the batch is on a GPU, and record what the mixers do that would make the host wait for it or copy to it (see the module's docstring)"
    def __init__(self):
        self.tags, self.events, self.allowed, self.batch, self.quiet, self.believed, self.autocast = WeakIdKeyDictionary(), {}, {}, 0, 0, 0, None
        self._stack = None

    def on(self, t) -> bool: return isinstance(t, Tensor) and t in self.tags
    def tag(self, *objs):
        for t in _tensors(objs, []): self.tags[t] = True
        return objs[0] if len(objs) == 1 else objs

    def event(self, kind:str, what:str):
        "Record `what` when the mixers' code made it: at the innermost frame of `MIXER_FILES`, unless `ALLOWED` allows it"
        f = sys._getframe(1)
        while f is not None and f.f_code.co_filename not in MIXER_FILES: f = f.f_back
        if f is None: return # not the mixers' work: fastai's loop, the optimiser, the model
        code = f.f_code
        ev = Event(kind, what, MIXER_FILES[code.co_filename], f.f_lineno, getattr(code, 'co_qualname', code.co_name))
        rule = _allowed(ev.where, code.co_name)[1]
        ok = rule is not None and rule.kind == kind and (rule.when == 'any' or self.batch <= 1)
        book = self.allowed if ok else self.events
        book.setdefault(ev, []).append(self.batch)

    def offences(self) -> list[str]:
        return [f"{ev}    (batch {', '.join(map(str, sorted(set(bs))))}{f', {len(bs)} times' if len(bs) > 1 else ''})" for ev, bs in self.events.items()]

    def check(self):
        "Fail, naming each offence's file and line, unless the mixers' work made none"
        off = self.offences()
        assert not off, "The mixers would make the host wait for the GPU, or copy to it, on CUDA:\n  " + "\n  ".join(off)

    def __enter__(self):
        self._stack = st = contextlib.ExitStack()
        st.enter_context(_pretend_cuda())
        for cache in _DEVICE_CACHES(): st.enter_context(mock.patch.dict(cache, clear=True)) # this probe's device starts empty
        for name in ('as_subclass', *_NEW): st.enter_context(mock.patch.object(Tensor, name, functools.partialmethod(_unseen, self, name)))
        st.enter_context(_Functions(self))
        st.enter_context(_Dispatch(self))
        return self
    def __exit__(self, *exc): self._stack.close()

@contextlib.contextmanager
def _pretend_cuda():
    "The CUDA random-state and autocast calls the library makes for a batch on 'cuda', answered for the CPU it runs on"
    host = lambda d: 'cpu' if _cuda(d) else d
    is_on, dtype_of, autocast = torch.is_autocast_enabled, torch.get_autocast_dtype, torch.amp.autocast
    with mock.patch.object(torch.cuda, 'get_rng_state', lambda device='cuda': torch.get_rng_state()), \
         mock.patch.object(torch.cuda, 'set_rng_state', lambda new_state, device='cuda': None), \
         mock.patch.object(torch, 'is_autocast_enabled', lambda *a: is_on(*map(host, a))), \
         mock.patch.object(torch, 'get_autocast_dtype', lambda d: dtype_of(host(d))), \
         mock.patch.object(torch, 'autocast', lambda device_type, *a, **kw: autocast(host(device_type), *a, **kw)), \
         mock.patch.object(fastai_fp16, 'autocast', lambda device_type, *a, **kw: autocast(host(device_type), *a, **kw)), \
         mock.patch.object(fastai_fp16, 'GradScaler', lambda device='cuda', **kw: torch.amp.GradScaler('cpu', **kw)):
        yield

_NEW = ('new_tensor', 'new_empty', 'new_zeros', 'new_ones', 'new_full') # with `as_subclass`: methods that make a tensor which `__torch_function__` never sees

def _unseen(t:Tensor, probe:SyncProbe, name:str, *args, **kwargs):
    "`t.<name>(...)`: tagged as the ops are; `new_tensor` of host data on the device is a copy to it"
    to_gpu = name in _NEW and (_cuda(kwargs.get('device')) or 'device' not in kwargs and probe.on(t))
    if _cuda(kwargs.get('device')): kwargs = {**kwargs, 'device': 'cpu'}
    if name == 'new_tensor' and to_gpu and not probe.on(args[0] if args else kwargs.get('data')): probe.event('copy', ".new_tensor(host data) of a device tensor")
    out = getattr(torch._C.TensorBase, name)(t, *args, **kwargs)
    return probe.tag(out) if to_gpu or name == 'as_subclass' and probe.on(t) else out

class _Functions(TorchFunctionMode):
    "The device model: tags, `.device` and `.is_cuda`, `device=` the GPU, copies to and from it, host tensors meeting device ones"
    def __init__(self, probe): super().__init__(); self.p = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        p, kwargs = self.p, kwargs or {}
        desc = getattr(func, '__self__', None)
        if desc is _DESC['device']:
            if not p.on(args[0]): return func(*args)
            if sys._getframe(1).f_code.co_filename in MIXER_FILES: p.believed += 1
            return GPU
        if desc is _DESC['is_cuda']: return p.on(args[0]) or func(*args)
        if desc is _DESC['is_cpu']: return not p.on(args[0]) and func(*args)
        if func is Tensor.get_device: return 0 if p.on(args[0]) else func(*args)
        if func in (Tensor.to, Tensor.cuda): return self._to(func, args, kwargs)
        to_gpu = _cuda(kwargs.get('device'))
        if to_gpu: kwargs = {**kwargs, 'device': 'cpu'}
        ins = _tensors((args, kwargs), [])
        dev = [t for t in ins if p.on(t)]
        host = [t for t in ins if not p.on(t) and t.dim() > 0]
        if dev and func in _HOST_READS: p.event('sync', f"{_HOST_READS[func]} of a device tensor")
        if to_gpu and func in _FROM_DATA and not (args and p.on(args[0])): p.event('copy', f"{_FROM_DATA[func]}(host data, device=the batch's device)")
        if func is Tensor.copy_ and p.on(args[0]) != p.on(args[1]):
            p.event(*(('copy', "copy_ of a host tensor into a device one") if p.on(args[0]) else ('sync', "copy_ of a device tensor into a host one")))
        elif dev and host and func not in _HOST_READS:
            p.event('host', f"{_name(func)}: a host tensor {tuple(host[0].shape)} {host[0].dtype}, made without device=, meets the batch's tensors")
        quiet = func is F.one_hot and (args[1] if len(args) > 1 else kwargs.get('num_classes', -1)) >= 0 # the CPU kernel checks the classes with .item(); CUDA's leaves it to a device assert
        p.quiet += quiet
        try: out = func(*args, **kwargs)
        finally: p.quiet -= quiet
        if func in _HOST_READS or not (to_gpu or dev): return out
        if func is Tensor.copy_ and not p.on(args[0]): return out # a copy to the host stays there
        if to_gpu and isinstance(out, Tensor) and any(out is t for t in ins): out = out.clone() # made from a host tensor as it was: the host one stays a host one
        return p.tag(out)

    def _to(self, func, args, kwargs):
        "`.to(...)` and `.cuda()`: to the GPU, a copy from the host unless the tensor is there; to the host, a copy that waits for the GPU"
        p, t = self.p, args[0]
        kw = {k: v for k, v in kwargs.items() if k != 'copy'}
        if func is Tensor.cuda: target, dtype, non_blocking, fmt = GPU, None, kwargs.get('non_blocking', False), None
        else:
            target, dtype, non_blocking, fmt = torch._C._nn._parse_to(*args[1:], **kw)
            if len(args) > 1 and isinstance(args[1], Tensor): target = GPU if p.on(args[1]) else args[1].device # `.to(other)`: the other's device
        if target is None: # a dtype or a memory format: where it was
            out = func(*args, **kwargs)
            return p.tag(out) if p.on(t) else out
        opts = dict(dtype=dtype, non_blocking=non_blocking, copy=kwargs.get('copy', False) or (p.on(t) != _cuda(target)))
        if fmt is not None: opts['memory_format'] = fmt
        if _cuda(target):
            if not p.on(t): p.event('copy', f".to({target}) of a host tensor {tuple(t.shape)} {t.dtype}")
            return p.tag(t.to('cpu', **opts))
        if p.on(t): p.event('sync', f".to({target}) of a device tensor: a copy to the host")
        return t.to(target, **opts) # a host tensor: untagged

class _Dispatch(TorchDispatchMode):
    "The ops that make the host wait for the GPU, seen at the dispatch level (inside composite ops too); the tags carried through every op"
    def __init__(self, probe): super().__init__(); self.p = probe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        p, kwargs = self.p, kwargs or {}
        with torch._C.DisableTorchFunction():
            dev = any(p.on(t) for t in _tensors((args, kwargs), []))
            if dev and not p.quiet:
                pk, what = func.overloadpacket, _SYNC_OPS.get(func.overloadpacket)
                if func is aten.repeat_interleave.Tensor and kwargs.get('output_size') is None: what = "repeat_interleave without output_size"
                if pk in _INDEX_OPS and any(isinstance(i, Tensor) and i.dtype == torch.bool for i in (args[1] or ())): what = "boolean indexing"
                if what: p.event('sync', what)
            out = func(*args, **kwargs)
            if dev: p.tag(out)
        return out

# ---------------------------------------------------------------- fits under the probe
class _Batches(Callback):
    "Before the mixers: tag each batch as the device's, and count the training batches (`ALLOWED`'s 'first')"
    order = MixHandler.order - 1
    def __init__(self, probe): self.probe = probe
    def before_batch(self):
        self.probe.tag(self.learn.xb, self.learn.yb)
        if not self.training: return
        self.probe.batch += 1
        if torch.is_autocast_enabled('cpu'): self.probe.autocast = torch.get_autocast_dtype('cpu') # fastai's `to_bf16`, on the CPU under the probe

def probe_fit(learn, epochs:int=1) -> SyncProbe:
    "Fit `learn` with its model and its training batches on the pretend GPU, and fail on what the mixers do there that CUDA would wait for or copy"
    probe = SyncProbe()
    probe.tag([*learn.model.parameters(), *learn.model.buffers()])
    learn.dls._device = GPU # what `learn.dls.device` says (the mixers keep their class counts there); fastai moves nothing
    with probe, learn.no_bar(), learn.no_logging(): learn.fit(epochs, 1e-2, cbs=_Batches(probe))
    assert probe.believed, "the mixers never asked for the batch's device: the probe saw none of their work"
    probe.check()
    return probe

# ---------------------------------------------------------------- tiny data and models
C, N, BS = 4, 16, 8 # classes, training samples (2 batches), batch size

def _data(kind:str, n:int=N, seed:int=0) -> tuple:
    "Images (n, 3, 8, 8) and targets: 'index' class indices (imbalanced: 8, 4, 2, 2 of 16), 'multi' multi-hot floats, 'reg' floats (n, 1), 'seg' masks (n, 8, 8)"
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0] * 8 + [1] * 4 + [2] * 2 + [3] * 2)[torch.randperm(16, generator=g)].repeat(n // 16 + 1)[:n]
    x = torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1)
    if kind == 'multi': y = (torch.rand(n, C, generator=g) < .4).float()
    if kind == 'reg': y = x.mean((1, 2, 3))[:, None]
    if kind == 'seg': y = (x[:, 0] > x[:, 0].mean()).long()
    return x, y

def _dls(kind:str, bs:int=BS, n:int=N):
    "fastai `DataLoaders` of `_data(kind)`: every sample to train on, the first 4 to validate; loaded in this process"
    x, y = _data(kind, n)
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(min(4, n)))])
    return dsets.dataloaders(bs=bs, num_workers=0)

def cnn(c:int=C) -> nn.Module:
    "A fastai ResBlock (ManifoldMixup's default place), global average pooling and a Linear (SnapMix's CAM)"
    return nn.Sequential(ConvLayer(3, 8, stride=2), ResBlock(1, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))

def head_cnn(c:int=C) -> nn.Module:
    "fastai's vision_learner layout, (body, head): SnapMix reads Grad-CAMs through the head"
    return nn.Sequential(nn.Sequential(ConvLayer(3, 8, stride=2), ConvLayer(8, 8)), create_head(8, c))

def tiny_vit(c:int=C) -> nn.Module:
    "A timm ViT over the 8x8 images: 4 patches of 4x4 and a class token, one block of 2 heads (TransMix reads timm's own attention)"
    import timm
    return timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=c)

def tiny_eva(c:int=C) -> nn.Module:
    "A timm EVA with rotary position embeddings: TransMix reruns its attention with the model's own `rope`"
    from timm.models.eva import Eva
    return Eva(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=c, use_rot_pos_emb=True, ref_feat_shape=(2, 2))

_losses = dict(index=CrossEntropyLossFlat, multi=BCEWithLogitsLossFlat, reg=MSELossFlat, seg=lambda: CrossEntropyLossFlat(axis=1))
_models = dict(cnn=cnn, head=head_cnn, vit=tiny_vit, eva=tiny_eva)

def learner(mixer, kind:str='index', model:str='cnn', bs:int=BS, n:int=N, bf16:bool=False) -> Learner:
    torch.manual_seed(0)
    m = nn.Conv2d(3, 2, 1) if kind == 'seg' else _models[model](1 if kind == 'reg' else C)
    learn = Learner(_dls(kind, bs, n), m, loss_func=_losses[kind](), cbs=mixer)
    return learn.to_bf16() if bf16 else learn

# ---------------------------------------------------------------- every mixer, through a real fit
def _choice(mixers, **kw): return lambda: MixChoice([m() for m in mixers], **kw)

FITS = { # name: (mixer, learner options); every option that takes another code path
    'mixup': (MixUp, {}), 'mixup-p': (lambda: MixUp(p=.5), {}), 'mixup-dense': (MixUp, dict(kind='multi')),
    'mixup-union': (lambda: MixUp(label_mode='union'), dict(kind='multi')), 'mixup-decoupled': (lambda: MixUp(decoupled=.1), {}),
    'mixup-balanced': (lambda: MixUp(partner='balanced'), {}), # the counts read from the training data
    'mixup-balanced-list-remix': (lambda: MixUp(partner='balanced', class_counts=[8, 4, 2, 2], remix=(3, .5)), {}),
    'mixup-same': (lambda: MixUp(partner='same_class'), {}), 'mixup-other-remix': (lambda: MixUp(partner='other_class', remix=(2, .5)), {}),
    'mixup-kernel': (lambda: MixUp(partner='kernel'), dict(kind='reg')), 'mixup-kernel-sigma': (lambda: MixUp(partner='kernel', sigma=.5), dict(kind='reg')),
    'mixup-bf16': (MixUp, dict(bf16=True)), 'mixup-bs1': (MixUp, dict(bs=1, n=2)),
    'cutmix': (CutMix, {}), 'cutmix-p': (lambda: CutMix(p=.5), {}), 'cutmix-minmax': (lambda: CutMix(minmax=(.2, .6)), {}),
    'cutmix-inplace': (lambda: CutMix(inplace=True), {}), 'cutmix-mask': (CutMix, dict(kind='seg')), 'cutmix-union': (lambda: CutMix(label_mode='union'), dict(kind='multi')),
    'cutmix-decoupled': (lambda: CutMix(decoupled=.1), {}), 'cutmix-balanced-remix': (lambda: CutMix(partner='balanced', remix=(3, .5)), {}),
    'cutmix-ps': (lambda: CutMix(per_sample=True), {}), 'cutmix-ps-p': (lambda: CutMix(per_sample=True, p=.5), {}),
    'cutmix-ps-minmax': (lambda: CutMix(per_sample=True, minmax=(.2, .6)), {}), 'cutmix-ps-mask': (lambda: CutMix(per_sample=True), dict(kind='seg')),
    'cutmix-ps-same': (lambda: CutMix(per_sample=True, partner='same_class'), {}), 'cutmix-ps-kernel': (lambda: CutMix(per_sample=True, partner='kernel'), dict(kind='reg')),
    'cutmix-bf16': (lambda: CutMix(per_sample=True), dict(bf16=True)), 'cutmix-bs1': (CutMix, dict(bs=1, n=2)),
    'resizemix': (ResizeMix, {}), 'resizemix-mask': (ResizeMix, dict(kind='seg')), 'resizemix-nearest': (lambda: ResizeMix(interpolation='nearest'), {}),
    'resizemix-other': (lambda: ResizeMix(partner='other_class'), {}), 'resizemix-p': (lambda: ResizeMix(p=.5), {}),
    'resizemix-ps': (lambda: ResizeMix(per_sample=True), {}), 'resizemix-ps-mask': (lambda: ResizeMix(per_sample=True), dict(kind='seg')),
    'resizemix-ps-nearest': (lambda: ResizeMix(per_sample=True, interpolation='nearest'), {}),
    'resizemix-ps-balanced': (lambda: ResizeMix(per_sample=True, partner='balanced', p=.5), {}), 'resizemix-ps-bs1': (lambda: ResizeMix(per_sample=True), dict(bs=1, n=2)),
    'resizemix-ps-bf16': (lambda: ResizeMix(per_sample=True), dict(bf16=True)),
    'fmix': (FMix, {}), 'fmix-soft': (lambda: FMix(max_soft=.2), {}), 'fmix-mask': (FMix, dict(kind='seg')), 'fmix-same': (lambda: FMix(partner='same_class'), {}),
    'fmix-ps': (lambda: FMix(per_sample=True), {}), 'fmix-ps-soft-p': (lambda: FMix(per_sample=True, max_soft=.2, p=.5), {}),
    'fmix-ps-balanced-remix': (lambda: FMix(per_sample=True, partner='balanced', remix=(3, .5)), {}), 'fmix-ps-union': (lambda: FMix(per_sample=True, label_mode='union'), dict(kind='multi')),
    'fmix-bs1': (FMix, dict(bs=1, n=2)), 'fmix-bf16': (lambda: FMix(max_soft=.2), dict(bf16=True)),
    'transmix': (TransMix, dict(model='vit')), 'transmix-ps': (lambda: TransMix(per_sample=True), dict(model='vit')),
    'transmix-balanced': (lambda: TransMix(partner='balanced', p=.5), dict(model='vit')), 'transmix-dense': (TransMix, dict(model='vit', kind='multi')),
    'transmix-ps-decoupled': (lambda: TransMix(per_sample=True, decoupled=.1), dict(model='vit')), 'transmix-eva': (TransMix, dict(model='eva')),
    'transmix-bf16': (lambda: TransMix(per_sample=True), dict(model='vit', bf16=True)), 'transmix-bs1': (TransMix, dict(model='vit', bs=1, n=2)),
    'snapmix': (SnapMix, {}), 'snapmix-ps': (lambda: SnapMix(per_sample=True), {}), 'snapmix-gradcam': (SnapMix, dict(model='head')),
    'snapmix-ps-gradcam-same': (lambda: SnapMix(per_sample=True, partner='same_class'), dict(model='head')), 'snapmix-p': (lambda: SnapMix(p=.5, cam_every=2), {}),
    'snapmix-bf16': (lambda: SnapMix(per_sample=True), dict(bf16=True)), 'snapmix-bs1': (SnapMix, dict(bs=1, n=2)),
    'manifold': (ManifoldMixup, {}), # the default places, checked once per model (`ALLOWED`)
    'manifold-list': (lambda: ManifoldMixup(module_list=['1'], use_input_mixup=False), {}), 'manifold-p-balanced-remix': (lambda: ManifoldMixup(p=.5, partner='balanced', remix=(3, .5)), {}),
    'manifold-dense-union': (lambda: ManifoldMixup(label_mode='union', module_list=['1']), dict(kind='multi')),
    'manifold-kernel': (lambda: ManifoldMixup(partner='kernel', module_list=['1']), dict(kind='reg')), 'manifold-decoupled': (lambda: ManifoldMixup(decoupled=.1), {}),
    'manifold-bf16': (lambda: ManifoldMixup(module_list=['1'], use_input_mixup=False), dict(bf16=True)), 'manifold-bs1': (ManifoldMixup, dict(bs=1, n=2)),
    'output': (OutputMixup, {}), 'output-dense': (OutputMixup, dict(kind='multi')), 'output-other-remix': (lambda: OutputMixup(partner='other_class', remix=(2, .5)), {}),
    'output-bf16': (OutputMixup, dict(bf16=True)),
    'choice': (_choice([MixUp, CutMix, ResizeMix, FMix]), {}), 'choice-p-decoupled': (_choice([MixUp, CutMix], p=.5, decoupled=.1), {}),
    'choice-inside': (_choice([MixUp, ManifoldMixup, OutputMixup, SnapMix]), {}), 'choice-transmix': (_choice([CutMix, TransMix]), dict(model='vit')),
    'choice-ps': (_choice([MixUp, CutMix, ResizeMix, FMix, SnapMix], per_sample=True), {}),
    'choice-ps-balanced': (_choice([MixUp, lambda: CutMix(per_sample=True)], per_sample=True, partner='balanced', p=.5), {}),
    'choice-ps-union': (_choice([MixUp, FMix], per_sample=True, label_mode='union'), dict(kind='multi')),
    'choice-ps-bf16': (_choice([MixUp, SnapMix], per_sample=True), dict(bf16=True)),
}

@pytest.mark.parametrize('name', FITS)
def test_fit(name):
    "Every mixer, per batch and per sample, with every option that takes another path: no host sync, no copy to the device"
    mixer, kw = FITS[name]
    probe = probe_fit(learner(mixer(), **kw), epochs=2 if kw.get('bs') == 1 else 1)
    if kw.get('bf16'): assert probe.autocast == torch.bfloat16

class OwnMix(Callback):
    "A user's own mixing callback on the functional core: CutMix with balanced partners (class counts as numbers), and the two-weight loss with numbers (SnapMix's form)"
    order, run_valid = MixHandler.order, False
    def before_fit(self): self.lf = self.learn.loss_func
    def before_batch(self):
        (xb, _), perm, lam = cutmix(self.learn.xb[0], y=self.learn.yb[0], partner='balanced', class_counts=[8, 4, 2, 2])
        y1 = self.learn.yb[0][perm]
        self.learn.xb, self.learn.loss_func = (xb,), lambda pred, y: mix_loss(self.lf, pred, (y,), (y1,), lam, lam1=.9 * (1 - lam))
    def after_batch(self): self.learn.loss_func = self.lf

def test_fit_with_the_functions():
    "The functions in a user's own callback: the class counts go to the device once in the fit, the loss's two weights are made there"
    probe = probe_fit(learner(OwnMix()), epochs=2)
    assert [(ev.where, ev.func) for ev in probe.allowed] == [('fastai_mix/core.py', '_class_table')] and list(probe.allowed.values()) == [[1]] # the one copy, at the first batch

# ---------------------------------------------------------------- the functional core, called directly
def _on_gpu(probe:SyncProbe, kind:str, n:int=BS) -> tuple:
    "A batch of `_data(kind)` on the pretend GPU"
    x, y = _data(kind)
    return probe.tag(x[:n].clone(), y[:n].clone())

def _calls(probe:SyncProbe, f, times:int=3):
    "Call `f` once per batch, `times` batches: what the first batch may do once (`ALLOWED`) must not come back"
    for _ in range(times):
        probe.batch += 1
        f()

CALLS = { # name: (function, options, data); each called for 3 batches
    **{f"{f.__name__}{k}": (f, kw, d) for f in (mixup, cutmix, resizemix, fmix) for k, kw, d in (
        ('', {}, 'index'), ('-p', dict(p=.5), 'index'), ('-dense', {}, 'multi'), ('-union', dict(label_mode='union'), 'multi'),
        ('-balanced-list-remix', dict(partner='balanced', class_counts=[8, 4, 2, 2], remix=(3, .5)), 'index'), # class counts as numbers, what the error message asks for
        ('-balanced-array', dict(partner='balanced', class_counts=np.array([8, 4, 2, 2])), 'index'),
        ('-balanced-host-tensor', dict(partner='balanced', class_counts=torch.tensor([8, 4, 2, 2])), 'index'), # `train_class_counts`'s, on the host
        ('-same', dict(partner='same_class'), 'index'), ('-other-remix', dict(partner='other_class', remix=(2, .5), class_counts=(1, 1, 4, 4)), 'index'),
        ('-kernel', dict(partner='kernel'), 'reg'), ('-kernel-sigma', dict(partner='kernel', sigma=.5), 'reg'))},
    **{f"{f.__name__}{k}": (f, kw, d) for f in (cutmix, resizemix, fmix) for k, kw, d in (
        ('-ps', dict(per_sample=True), 'index'), ('-ps-p', dict(per_sample=True, p=.5), 'index'), ('-mask', {}, 'seg'), ('-ps-mask', dict(per_sample=True), 'seg'),
        ('-minmax', dict(minmax=(.2, .6)), 'index') if f is not fmix else ('-soft', dict(max_soft=.2), 'index'),
        ('-ps-balanced-list', dict(per_sample=True, partner='balanced', class_counts=[8, 4, 2, 2]), 'index'))},
    'cutmix-inplace': (cutmix, dict(inplace=True), 'index'), 'resizemix-nearest': (resizemix, dict(interpolation='nearest'), 'index'),
}

@pytest.mark.parametrize('name', CALLS)
def test_functions(name):
    "The functions on a batch on the device: class counts given as numbers go there once, not at every call"
    f, kw, kind = CALLS[name]
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, kind)
        _calls(probe, lambda: f(x.clone(), y=y, **kw))
    probe.check()
    assert probe.believed

def test_functions_class_counts_tensor():
    "Class counts given as a tensor on the batch's device, the integer counts `train_class_counts` gives: nothing is copied"
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, 'index')
        counts = probe.tag(torch.tensor([8, 4, 2, 2]))
        for f in (mixup, cutmix, resizemix, fmix): _calls(probe, lambda: f(x, y=y, partner='balanced', class_counts=counts, remix=(3, .5)))
    probe.check()
    assert not probe.allowed

def test_functions_several_inputs():
    "A model with several inputs: an image and a second float input of another dtype, mixed alike"
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, 'index')
        x2 = probe.tag(torch.rand(BS, 2, 8, 8, dtype=torch.bfloat16))
        for f, kw in ((mixup, {}), (cutmix, {}), (cutmix, dict(per_sample=True)), (resizemix, {}), (resizemix, dict(per_sample=True)), (fmix, dict(max_soft=.2))):
            _calls(probe, lambda: f((x, x2), y=y, **kw))
    probe.check()

LOSSES = { # name: (loss, share, partners' weight, decoupled); a share (or weight) 'n' is one number for the batch, 't' one per sample on the device
    'float': (CrossEntropyLossFlat, 'n', None, 0.), 'tensor': (CrossEntropyLossFlat, 't', None, 0.),
    'float-lam1': (CrossEntropyLossFlat, 'n', 'n', 0.), 'tensor-lam1': (CrossEntropyLossFlat, 't', 't', 0.), 'mixed-lam1': (CrossEntropyLossFlat, 't', 'n', 0.),
    'weighted-float-lam1': ('weighted', 'n', 'n', 0.), 'weighted-tensor': ('weighted', 't', None, 0.),
    'decoupled-float': (CrossEntropyLossFlat, 'n', None, .1), 'decoupled-tensor': (CrossEntropyLossFlat, 't', None, .1),
    'nn-ce-float-lam1': (nn.CrossEntropyLoss, 'n', 'n', 0.), 'none-tensor': (lambda: nn.CrossEntropyLoss(reduction='none'), 't', None, 0.),
}

@pytest.mark.parametrize('name', LOSSES)
def test_mix_loss(name):
    "The mixed loss on the device: a share or a weight given as one number is made there, not copied over at every call"
    loss, lam, lam1, eta = LOSSES[name]
    with SyncProbe() as probe:
        _, y = _on_gpu(probe, 'index')
        pred, perm = probe.tag(torch.randn(BS, C, requires_grad=True), torch.randperm(BS))
        lf = nn.CrossEntropyLoss(weight=probe.tag(torch.tensor([1., 2., 3., 4.]))) if loss == 'weighted' else loss()
        share = lambda k, v: v if k == 'n' else probe.tag(torch.full((BS,), v))
        _calls(probe, lambda: mix_loss(lf, pred, (y,), (y[perm],), share(lam, .7), decoupled=eta, lam1=None if lam1 is None else share(lam1, .4)).sum().backward())
    probe.check()

@pytest.mark.parametrize('name,kw', [('mixup-balanced-list', dict(mix=mixup, partner='balanced', class_counts=[8, 4, 2, 2])), ('cutmix', {}),
    ('cutmix-num-classes', dict(num_classes=C)), ('resizemix-ps', dict(mix=resizemix, per_sample=True)),
    ('fmix-remix', dict(mix=fmix, remix=(3, .5), class_counts=[8, 4, 2, 2]))])
def test_mix_collate(name, kw):
    "`MixCollate` mixing batches that its `collate_fn` put on the device"
    from torch.utils.data import default_collate
    with SyncProbe() as probe:
        x, y = _data('index')
        mc = MixCollate(collate_fn=lambda samples: probe.tag(*default_collate(samples)), **kw)
        _calls(probe, lambda: mc(list(zip(x[:BS], y[:BS]))))
    probe.check()

# ---------------------------------------------------------------- the allowed list, and the probe's own controls
def test_allowed_entries_each_happen():
    "Each entry of `ALLOWED` is one the library makes (none is stale), and it happens in the first batch only"
    seen = {}
    learn = learner(MixUp(partner='balanced'))
    probe = probe_fit(learn)
    with probe: learn.mix_up.left_alone() # the user's read, after the fit
    seen.update(probe.allowed)
    seen.update(probe_fit(learner(ManifoldMixup())).allowed)
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, 'index')
        _calls(probe, lambda: cutmix(x, y=y, partner='balanced', class_counts=[8, 4, 2, 2]))
    probe.check()
    seen.update(probe.allowed)
    rules = {ev: _allowed(ev.where, ev.func.rsplit('.', 1)[-1]) for ev in seen}
    assert {k for k, _ in rules.values()} == set(ALLOWED), (rules, set(ALLOWED))
    assert all(r.kind == ev.kind for ev, (_, r) in rules.items())
    assert all(b <= 1 for ev, bs in seen.items() if rules[ev][1].when == 'first' for b in bs)

def test_allowed_first_means_once():
    "A copy allowed at the first batch fails when it comes back at a later one: the kept class counts dropped between batches are copied again"
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, 'index')
        def f():
            for cache in _DEVICE_CACHES(): cache.clear()
            mixup(x, y=y, partner='balanced', class_counts=[8, 4, 2, 2])
        _calls(probe, f, times=2)
    with pytest.raises(AssertionError, match=r"fastai_mix/core.py:\d+ in _class_table: copy: .*\(batch 2\)"): probe.check()

def _planted(fn, after:str, code:str) -> tuple:
    "`fn`, a function of `fastai_mix.core`, with the line `code` after its line that starts with `after`, compiled as `core.py`'s own code: (the function, the planted line's number, core.py's lines with it)"
    lines, start = inspect.getsourcelines(fn)
    i = next(k for k, l in enumerate(lines) if l.strip().startswith(after))
    lines = lines[:i + 1] + [lines[i][:len(lines[i]) - len(lines[i].lstrip())] + code + '\n'] + lines[i + 1:]
    ns = {}
    exec(compile('\n' * (start - 1) + ''.join(lines), core.__file__, 'exec', flags=__import__('__future__').annotations.compiler_flag, dont_inherit=True), core.__dict__, ns)
    with open(core.__file__) as f: src = f.readlines()
    return ns[fn.__name__], start + i + 1, src[:start - 1] + lines + src[start - 1 + len(lines) - 1:]

PLANTS = {'item': ('ref.max().item()', 'sync'), # a read of the batch
          'arange': ('torch.arange(len(ref)) + ref.flatten(1)[:, 0]', 'host')} # a tensor made without device=, meeting the batch

@pytest.mark.parametrize('fn,mixer', [(mixup, MixUp), (cutmix, CutMix)], ids=['mixup', 'cutmix'])
@pytest.mark.parametrize('plant', PLANTS)
def test_probe_fails_on_a_planted_sync(fn, mixer, plant, monkeypatch):
    "The probe's controls: an `.item()` on the batch, or a tensor made without `device=`, planted in `mixup` or `cutmix`, fails it, naming core.py and the line"
    code, kind = PLANTS[plant]
    planted, line, src = _planted(fn, 'xs, single, ref = _inputs(', code)
    for mod in (core, callback): monkeypatch.setattr(mod, fn.__name__, planted)
    monkeypatch.setitem(linecache.cache, core.__file__, (None, None, src, core.__file__)) # the message shows the planted line
    where = rf"fastai_mix/core.py:{line} in {fn.__name__}: {kind}: .*\n\s+{re.escape(code)}"
    with pytest.raises(AssertionError, match=where): probe_fit(learner(mixer())) # through the callback's fit
    with SyncProbe() as probe:
        x, y = _on_gpu(probe, 'index')
        _calls(probe, lambda: planted(x, y=y))
    with pytest.raises(AssertionError, match=where): probe.check() # called directly
    monkeypatch.undo()
    probe_fit(learner(mixer())) # and the library as it is passes
