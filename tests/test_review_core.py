"Issue 13, the core's side: regression tests for items 6, 7, 8, 11, 12, 13, 14 and 16 of the adversarial review"
import math
import numpy as np
import pytest, torch, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.torch_core import TensorMask
from torch.utils.data import DataLoader, TensorDataset
from fastai_mix.core import (mixup, cutmix, resizemix, is_mask, draw_boxes, check_alpha, check_share, check_minmax,
                             check_lam_range, check_interpolation, MixCollate)

def gen(seed=0, device='cpu'): return torch.Generator(device).manual_seed(seed)
def bits(t): return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16) # NaN-safe, sign-of-zero-safe

# 6: a float (N, L) target of a 1-D signal: a plain tensor is dense (blended), a fastai `TensorMask` is a mask (pasted)
@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_float_1d_mask_marked_by_tensormask(fn, per_sample):
    x, m = torch.rand(16, 2, 24), torch.rand(16, 24)
    assert is_mask(TensorMask(m), 16, (24,)) and not is_mask(m, 16, (24,))
    (xm, ym), perm, lam = fn(x, y=m, per_sample=per_sample, generator=gen(1)) # plain: dense, blended with the share
    w = lam.view(-1, 1) if per_sample else lam
    close_(ym, m[perm] * (1 - w) + m * w)
    (xm, ym), perm, lam = fn(x, y=TensorMask(m), per_sample=per_sample, interpolation='nearest', generator=gen(1)) \
        if fn is resizemix else fn(x, y=TensorMask(m), per_sample=per_sample, generator=gen(1))
    inbox = (xm != x).any(1)
    assert inbox.any()
    eq_(ym[~inbox], m[~inbox]) # outside the box: the original's mask, not a blend
    for i in range(16): assert torch.isin(ym[i][inbox[i]], m[perm[i]]).all() # inside: the partner's values, not blended

def test_mask_rules_kept():
    "Backward compatible: (N, 1, L) float and int (N, L) are masks; float (N, L), class indices and other shapes are not"
    n, size = 4, (12,)
    eq_([is_mask(t, n, size) for t in (torch.rand(4, 1, 12), torch.randint(0, 3, (4, 12)), torch.rand(4, 12),
                                       torch.zeros(4).long(), TensorMask(torch.rand(4, 13)), TensorMask(torch.zeros(4).long()))],
        [True, True, False, False, False, False])
    eq_(is_mask(TensorMask(torch.rand(4, 8, 8)), 4, (8, 8)), True)

# 7: MixUp with p < 1 leaves the other samples bit for bit, whatever their partners hold
def test_mixup_unmixed_samples_exact():
    x = torch.randn(64, 3, 5)
    x[::3] = float('inf'); x[1::3, 0] = float('nan'); x[2::3, 1, 0] = -0.
    y = x[:, 0].clone() # dense float targets: the same guarantee
    (xm, ym), perm, lam = mixup(x, p=.5, y=y, generator=gen())
    keep = lam == 1
    assert 10 < keep.sum() < 54 and (perm[keep] != torch.arange(64)[keep]).any()
    eq_(bits(xm[keep]), bits(x[keep])); eq_(bits(ym[keep]), bits(y[keep]))

def test_mixup_share_one_exact():
    "A share of exactly 1 (Beta draws round to 1 often with a small alpha, or in half precision) keeps its sample exactly"
    x = torch.randn(64, 4); x[x[:, 0] > 0] = float('inf')
    fin = torch.isfinite(x).all(1)
    x[fin, 1] = -0.
    xm, perm, lam = mixup(x, alpha=.01, generator=gen())
    keep = (lam == 1) & fin # finite samples whose partner may hold inf
    assert keep.sum() > 5 and (~torch.isfinite(x[perm[keep]])).any()
    eq_(bits(xm[keep]), bits(x[keep]))

# 8: MixCollate with a seeded generator and worker processes
def _collated(loader_seed, epochs=1, persistent=False):
    ds = TensorDataset(torch.rand(64, 3, 8, 8), torch.arange(64))
    dl = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=persistent, generator=gen(loader_seed),
                    collate_fn=MixCollate(mixup, generator=gen(0)))
    return [(y1 - y, lam) for _ in range(epochs) for x, y, y1, lam in dl] # each batch's perm and shares

def test_mixcollate_workers_draw_differently():
    a = _collated(0, epochs=2)
    (p0, l0), (p1, l1) = a[0], a[1] # batch 0 comes from worker 0, batch 1 from worker 1
    assert not torch.equal(l0, l1) and not torch.equal(p0, p1)
    assert not torch.equal(a[0][1], a[8][1]) # and the next epoch draws new mixes
    b = _collated(0, epochs=2)
    for (pa, la), (pb, lb) in zip(a, b): eq_(pa, pb); eq_(la, lb) # same loader seed, same mixes
    c = _collated(1)
    assert not torch.equal(a[0][1], c[0][1])
    d = _collated(0, epochs=2, persistent=True)
    assert not torch.equal(d[0][1], d[1][1]) and not torch.equal(d[0][1], d[8][1])

def test_mixcollate_spawned_workers():
    "Workers started by spawn (macOS, Windows, notebook runners) get the generator too, and draw differently, reproducibly"
    from functools import partial
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    def run(): return [lam for x, y, y1, lam in DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context='spawn', generator=gen(0),
                                                            collate_fn=MixCollate(partial(mixup, alpha=.4, generator=gen(1)), generator=gen(0)))]
    a, b = run(), run()
    assert not torch.equal(a[0], a[1])
    for la, lb in zip(a, b): eq_(la, lb)

def test_mixcollate_generator_in_partial():
    from functools import partial
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    dl = DataLoader(ds, batch_size=8, num_workers=2, generator=gen(0), collate_fn=MixCollate(partial(mixup, generator=gen(0))))
    lams = [lam for x, y, y1, lam in dl]
    assert not torch.equal(lams[0], lams[1])

def test_mixcollate_main_process_uses_generator():
    "Without workers the generator is used as given: the first batch is its first draw"
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    lams = [lam for x, y, y1, lam in DataLoader(ds, batch_size=8, collate_fn=MixCollate(mixup, generator=gen(3)))]
    eq_(lams[0], mixup(ds.tensors[0][:8], generator=gen(3))[2])

# 11: p = 0 gives per-sample shares as a tensor, where a tensor is promised
@pytest.mark.parametrize('fn,kw', [(mixup, {}), (cutmix, dict(per_sample=True)), (resizemix, dict(per_sample=True))])
def test_p0_per_sample_share_is_tensor(fn, kw):
    x, y = torch.rand(6, 3, 8, 8), torch.arange(6)
    (xm, ym), perm, lam = fn(x, p=0., y=y, **kw)
    assert isinstance(lam, torch.Tensor) and xm is x and ym is y
    eq_(lam, torch.ones(6)); eq_(lam.dtype, torch.float32); eq_(lam.device, x.device); eq_(perm, torch.arange(6))
    lam.view(-1, 1, 1, 1) # what an annealing loop does with it

@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_p0_batch_share_stays_float(fn):
    xm, perm, lam = fn(torch.rand(6, 3, 8, 8), p=0.)
    assert isinstance(lam, float) and lam == 1.

# 12: MixCollate(num_classes=...) one-hots (N, 1) labels and takes int one-hot labels as they are
@pytest.mark.parametrize('labels', [torch.randint(0, 10, (64, 1)), F.one_hot(torch.randint(0, 10, (64,)), 10),
                                    F.one_hot(torch.randint(0, 10, (64,)), 10).bool()], ids=['n1', 'onehot-int', 'onehot-bool'])
def test_mixcollate_num_classes_label_shapes(labels):
    ds = TensorDataset(torch.rand(64, 3, 8, 8), labels)
    for xb, yb in DataLoader(ds, batch_size=16, collate_fn=MixCollate(num_classes=10, generator=gen())):
        eq_(yb.shape, (16, 10)); assert yb.is_floating_point(); close_(yb.sum(1), torch.ones(16))

def test_mixcollate_checks():
    for bad in (0, -1, 2.5, True, '10'):
        with pytest.raises(ValueError, match='num_classes must be None or an integer >= 1'): MixCollate(num_classes=bad)
    with pytest.raises(TypeError, match="bad_option"): MixCollate(mixup, bad_option=1)
    ds = TensorDataset(torch.rand(8, 3, 8, 8), torch.full((8,), 12))
    with pytest.raises(ValueError, match=r'num_classes=10.*12'): next(iter(DataLoader(ds, batch_size=8, collate_fn=MixCollate(num_classes=10))))
    ds = TensorDataset(torch.rand(8, 3, 8, 8), F.one_hot(torch.arange(8) % 4, 4))
    with pytest.raises(ValueError, match=r'num_classes=10.*\(8, 4\)'): next(iter(DataLoader(ds, batch_size=8, collate_fn=MixCollate(num_classes=10))))

def test_mixcollate_masks_always_pairs():
    "Segmentation batches are (x, mask) also when the mixer leaves a batch alone (p < 1), never (x, y, y[perm], lam)"
    ds = TensorDataset(torch.rand(64, 3, 8, 8), torch.randint(0, 3, (64, 8, 8)))
    for fn in (cutmix, resizemix):
        lens = [len(b) for b in DataLoader(ds, batch_size=4, collate_fn=MixCollate(fn, p=.5, generator=gen()))]
        eq_(set(lens), {2})

# 13: numbers as numpy or 0-d tensors, flags, bicubic on volumes, non-tensor inputs
def test_numpy_and_tensor_numbers_accepted():
    for v in (np.float32(.5), np.float64(.5), np.int64(1), torch.tensor(.5), torch.tensor(1), np.array(.5)):
        eq_(type(check_alpha(v)), float); eq_(type(check_share(v, 'p')), float); close_(check_share(v, 'p'), float(v))
    eq_(check_minmax(np.array([.2, .5])), (.2, .5)); eq_(check_minmax(torch.tensor([.25, .5])), (.25, .5))
    eq_(check_minmax((np.float32(.25), torch.tensor(.5))), (.25, .5))
    eq_(check_lam_range(np.float32(.25), torch.tensor(.5)), (.25, .5))
    x = torch.rand(4, 3, 8, 8)
    for fn in (mixup, cutmix, resizemix): fn(x, alpha=np.float32(1.), p=torch.tensor(.5), generator=gen())

@pytest.mark.parametrize('bad', [np.bool_(True), torch.tensor(True), float('nan'), torch.tensor(float('nan')), np.float64('nan'),
                                 torch.tensor([.5]), np.array([.5]), torch.tensor(.5+0j), '0.5', None])
def test_numbers_refused(bad):
    with pytest.raises(ValueError, match=r"p must be a number in \[0, 1\], got"): check_share(bad, 'p')
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0.*got"): check_alpha(bad)

def test_check_flag():
    from fastai_mix.core import check_flag
    eq_(check_flag(True, 'per_sample'), True); eq_(check_flag(np.bool_(False), 'per_sample'), False)
    assert type(check_flag(np.bool_(True), 'x')) is bool
    for bad in ('False', 'True', 1, 0, None, 1., torch.tensor(True)):
        with pytest.raises(TypeError, match=r"per_sample must be True or False, got"): check_flag(bad, 'per_sample')
    x = torch.rand(4, 3, 8, 8)
    for fn in (cutmix, resizemix):
        with pytest.raises(TypeError, match=r"per_sample must be True or False, got 'False'"): fn(x, per_sample='False')
        with pytest.raises(TypeError, match=r"inplace must be True or False, got 'no'"): fn(x, inplace='no')

@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('shape', [(4, 2, 20), (4, 2, 6, 8, 10)], ids=['1d', '3d'])
def test_bicubic_needs_images(shape, per_sample):
    g = gen(); state = g.get_state()
    with pytest.raises(ValueError, match=r"interpolation='bicubic' works on images \(2 spatial dims\) only, got 3 dims|got 1 dim"):
        resizemix(torch.rand(shape), interpolation='bicubic', per_sample=per_sample, generator=g)
    eq_(g.get_state(), state) # refused before anything was drawn
    with pytest.raises(ValueError, match=r"interpolation='bicubic' works on images"): check_interpolation('bicubic', ndim=len(shape) - 2)
    eq_(check_interpolation('bicubic', True, ndim=2), 'bicubic')

def test_non_tensor_input_named():
    with pytest.raises(TypeError, match=r"x\[1\] is a list"): mixup((torch.rand(4, 3), [1, 2]))
    with pytest.raises(TypeError, match=r"x\[0\] is a numpy.ndarray"): cutmix([np.zeros((4, 3, 8, 8)), torch.rand(4, 3, 8, 8)])
    with pytest.raises(TypeError, match=r"x must be a tensor or a non-empty sequence of tensors, got an empty tuple"): mixup(())
    with pytest.raises(TypeError, match=r"x must be a tensor or a non-empty sequence of tensors, got a str"): mixup('abc')
    with pytest.raises(TypeError, match=r"y\[1\] is a str"): mixup(torch.rand(4, 3), y=(torch.zeros(4), 'a'))

# 14: memory formats kept by the per-sample paths
@pytest.mark.parametrize('fmt,shape', [(torch.channels_last, (6, 3, 10, 12)), (torch.channels_last_3d, (6, 3, 4, 6, 8))], ids=['2d', '3d'])
@pytest.mark.parametrize('fn,mode', [(cutmix, None), (resizemix, 'bilinear'), (resizemix, 'nearest')])
def test_per_sample_memory_format(fn, mode, fmt, shape):
    x = torch.rand(shape)
    kw = dict(per_sample=True) | (dict(interpolation=mode) if mode else {})
    xm, perm, lam = fn(x.contiguous(memory_format=fmt), generator=gen(), **kw)
    assert xm.is_contiguous(memory_format=fmt)
    close_(xm, fn(x, generator=gen(), **kw)[0])

# 16: resized masks and per-sample 'nearest' read the pixels F.interpolate reads into the same box
def _per_sample_boxes(n, size, lam_range, seed, device='cpu'):
    lo, hi = draw_boxes(n, size, 1., lam_range, None, 1., device, gen(seed, device)) # the draws resizemix makes first
    return [tuple(slice(int(a[i]), int(b[i])) for a, b in zip(lo, hi)) for i in range(n)]

def _check_boxes(out, src, perm, boxes, mode):
    "Each sample's box in `out` is exactly F.interpolate of its partner in `src` into the box"
    for i, box in enumerate(boxes):
        sides = [s.stop - s.start for s in box]
        if 0 in sides: continue
        part = src[perm[i]].float()
        part = part.view(-1, *part.shape[part.ndim - len(box):])[None] # (1, C, *size), also for a mask
        got = out[i][(Ellipsis, *box)]
        eq_(got, F.interpolate(part, size=sides, mode=mode)[0].to(src.dtype).view(got.shape))

def test_whole_number_scale_reads_every_other_pixel():
    "224 -> 112: per-sample 'nearest' reads 0, 2, 4, ... (as F.interpolate's 'nearest'), masks 1, 3, 5, ... ('nearest-exact')"
    n = 6
    pos = torch.arange(224.).expand(n, 1, 224).contiguous()
    (xm, mm), perm, lam = resizemix(pos, lam_min=.5, lam_max=.5, interpolation='nearest', per_sample=True, y=pos[:, 0].long(), generator=gen())
    (xb, mb), _, _ = resizemix(pos, lam_min=.5, lam_max=.5, per_sample=True, y=pos[:, 0].long(), generator=gen())
    boxes = _per_sample_boxes(n, (224,), (.5, .5), 0)
    for i, (b,) in enumerate(boxes):
        eq_(b.stop - b.start, 112)
        eq_(xm[i, 0, b], torch.arange(0., 224, 2)); eq_(mm[i, b], torch.arange(0, 224, 2)) # image and mask read alike
        eq_(mb[i, b], torch.arange(1, 224, 2)) # with 'bilinear', the mask reads the centres ('nearest-exact')

PS_CASES = [(size, mode) for size in [(37,), (23, 30), (7, 9, 11)] for mode in ['bilinear', 'nearest', 'bicubic']
            if mode != 'bicubic' or len(size) == 2]

@pytest.mark.parametrize('size,interpolation', PS_CASES, ids=[f'{len(s)}d-{m}' for s, m in PS_CASES])
def test_per_sample_nearest_and_masks_are_interpolate_per_box(size, interpolation, device='cpu'):
    n = 12
    x, m = torch.rand(n, 2, *size, device=device), torch.randint(0, 1000, (n, *size), device=device)
    (xm, mm), perm, lam = resizemix(x, y=m, per_sample=True, interpolation=interpolation, generator=gen(2, device))
    boxes = _per_sample_boxes(n, size, (.1, .8), 2, device)
    mask_mode = 'nearest' if interpolation == 'nearest' else 'nearest-exact'
    _check_boxes(mm, m, perm, boxes, mask_mode)
    if interpolation == 'nearest': _check_boxes(xm, x, perm, boxes, 'nearest')

@pytest.mark.parametrize('size', [(37,), (23, 30), (7, 9, 11)], ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest', 'area'])
def test_batch_masks_are_interpolate_per_box(size, interpolation):
    from fastai_mix.core import resize_box, beta_sample
    n = 8
    x, m = torch.rand(n, 2, *size), torch.randint(0, 1000, (n, *size))
    for seed in range(5):
        (xm, mm), perm, lam = resizemix(x, y=m, interpolation=interpolation, generator=gen(seed))
        g = gen(seed)
        lam0 = .1 + .7 * beta_sample(1., 1, generator=g).item(); torch.randperm(n, generator=g)
        box = resize_box(size, lam0, g)
        _check_boxes(mm, m, perm, [box] * n, 'nearest' if interpolation == 'nearest' else 'nearest-exact')

@pytest.mark.parametrize('exact', [True, False], ids=['nearest-exact', 'nearest'])
def test_nearest_index_is_interpolate(exact):
    "Every box side of several sizes: the index map is the one F.interpolate reads with"
    from fastai_mix.core import nearest_index
    for s in (7, 30, 97, 224, 501):
        pos, sides = torch.arange(float(s)).view(1, 1, s), torch.arange(1, s + 1)
        idx = nearest_index(torch.zeros_like(sides), sides, s, exact)
        for side in range(1, s + 1):
            eq_(idx[side - 1, :side], F.interpolate(pos, size=side, mode='nearest-exact' if exact else 'nearest')[0, 0].long())

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_nearest_boxes_and_no_sync():
    "On the GPU too, per-sample nearest boxes are F.interpolate's, and the new paths make no host-device sync"
    for size, mode in PS_CASES: test_per_sample_nearest_and_masks_are_interpolate_per_box(size, mode, device='cuda')
    x, m = torch.rand(32, 3, 16, 16, device='cuda'), torch.randint(0, 3, (32, 16, 16), device='cuda')
    torch.cuda.set_sync_debug_mode('error')
    try:
        resizemix(x, y=m, per_sample=True, interpolation='nearest', p=.5)
        mixup(x, p=.5, y=torch.rand(32, 4, device='cuda')); mixup(x, p=0.); cutmix(x, per_sample=True, p=0.)
    finally: torch.cuda.set_sync_debug_mode('default')

def test_lerp_mix_exact_under_autograd():
    "The exact pass (a sample of share 1 copied back) works on a tensor in the autograd graph, and its gradient is the blend's"
    from fastai_mix import lerp_mix
    x = torch.randn(4, 3, requires_grad=True)
    lam, perm = torch.tensor([1., .6, .7, 1.]), torch.tensor([1, 0, 3, 2])
    y = lerp_mix(x * 1, perm, lam)
    y.sum().backward()
    exp = lam.clone() # each sample's own share, plus its share as the partner of the sample that took it
    for i, j in enumerate(perm.tolist()):
        if lam[i] < 1: exp[j] += 1 - lam[i]
    torch.testing.assert_close(x.grad, exp[:, None].expand(4, 3))
