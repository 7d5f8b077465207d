"The mixers' options: p, per_sample, minmax, stop_pct, schedules and masks, read back from the pixels (MixChoice: tests/test_mixchoice.py, MixCollate: tests/test_collate.py)"
import math, re
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.callback.schedule import ParamScheduler, SchedNo, SchedLin, SchedCos
import fastai.callback.schedule  # noqa: F401  (fit_one_cycle)
from fastai.torch_core import no_random
from fastai_mix import MixHandler, MixUp, CutMix, ResizeMix, MixChoice, mixup, cutmix, resizemix, draw_boxes, boxes_share
from fastai_mix.test_utils import synth_learner, synth_seg_learner, MixSpy, paste_shares, blend_shares

def gen(seed=0): return torch.Generator().manual_seed(seed)
def moved(perm): return perm != torch.arange(len(perm))
def losses(cbs, **kw):
    with no_random(0): learn = synth_learner(cbs=cbs, **kw)
    with no_random(1): learn.fit(1)
    return learn.recorder.losses

ALL = [MixUp, CutMix, ResizeMix, lambda **kw: CutMix(per_sample=True, **kw), lambda **kw: ResizeMix(per_sample=True, **kw),
       lambda **kw: MixChoice([MixUp(), CutMix()], **kw), lambda **kw: MixChoice([MixUp(), ResizeMix()], per_sample=True, **kw)]
IDS = ['mixup', 'cutmix', 'resizemix', 'cutmix-ps', 'resizemix-ps', 'choice', 'choice-ps']

@pytest.mark.parametrize('mixer', ALL, ids=IDS)
def test_p0_is_no_callback(mixer):
    eq_(losses([mixer(p=0.)]), losses([]))
    eq_(losses([mixer(), ParamScheduler({'mix_p': SchedNo(0., 0.)})]), losses([]))

@pytest.mark.parametrize('mixer', ALL, ids=IDS)
def test_stop_pct(mixer):
    spy = MixSpy()
    learn = synth_learner(cbs=[mixer(stop_pct=.25), spy], n=64, bs=8)
    learn.fit(2, lr=0)
    eq_([r['lam'] is not None for r in spy.records], [True] * 4 + [False] * 12)
    assert all(torch.equal(r['x'], r['xm']) for r in spy.records[4:])

@pytest.mark.parametrize('p', [.2, .5, .9])
def test_p_per_sample_share(p):
    x = torch.rand(4000, 2, 6)
    for f in (lambda: mixup(x, p=p, generator=gen()), lambda: cutmix(x, p=p, per_sample=True, minmax=(.5, .5), generator=gen()),
              lambda: resizemix(x, p=p, per_sample=True, generator=gen())):
        _, perm, lam = f()
        assert abs((lam < 1).float().mean().item() - p) < .03

def test_p_per_batch_share():
    x, n = torch.rand(8, 3, 6, 6), 2000
    mixed = sum(cutmix(x, p=.3, generator=g)[2] < 1 for g in [gen(0)] for _ in range(n))
    assert abs(mixed / n - .3) < .04

@pytest.mark.parametrize('shape', [(2, 40), (3, 20, 24), (2, 8, 10, 12)], ids=['1d', '2d', '3d'])
@pytest.mark.parametrize('minmax', [None, (.2, .7)])
def test_per_sample_cutmix_pixel_shares(shape, minmax):
    x = torch.rand(64, *shape)
    xm, perm, lam = cutmix(x, per_sample=True, minmax=minmax, generator=gen())
    close_(paste_shares(x, xm, perm)[moved(perm)], lam[moved(perm)], eps=1e-6)
    assert lam.std() > 0.01 # one box per sample
    inbox = (xm != x).any(1)
    assert torch.equal(xm.masked_select(~inbox.unsqueeze(1).expand_as(x)), x.masked_select(~inbox.unsqueeze(1).expand_as(x)))

@pytest.mark.parametrize('shape', [(2, 40), (3, 20, 24), (2, 8, 10, 12)], ids=['1d', '2d', '3d'])
def test_per_sample_resizemix_is_the_batch_resize_per_box(shape):
    "Each sample's paste equals F.interpolate of its partner into its own box (the batch-mode resize)"
    from fastai_mix.core import paste_resized
    x = torch.rand(16, *shape)
    xm, perm, lam = resizemix(x, per_sample=True, generator=gen(1))
    lo, hi = draw_boxes(16, shape[1:], 1., (.1, .8), None, 1., None, gen(1)) # the same draws
    for i in range(16):
        box = tuple(slice(int(a[i]), int(b[i])) for a, b in zip(lo, hi))
        ref = paste_resized(x[torch.tensor([i, int(perm[i])])], torch.tensor([1, 0]), box)[0]
        close_(xm[i], ref, eps=1e-5)
    close_(lam, boxes_share(lo, hi, shape[1:]))
    assert (.1 - .1 <= lam).all() and (lam <= .8 + .1).all()

@pytest.mark.parametrize('per_sample', [False, True])
@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_minmax_sides_and_borders(fn, per_sample):
    x, hits = torch.rand(32, 1, 20, 30), torch.zeros(4)
    for s in range(100 if not per_sample else 10):
        xm, perm, lam = fn(x, minmax=(.3, .5), per_sample=per_sample, generator=gen(s))
        box = (xm != x).any(1) | ~moved(perm).view(-1, 1, 1) # unmoved samples: no read-back
        for b in box[moved(perm)]:
            rows, cols = b.any(1).nonzero().flatten(), b.any(0).nonzero().flatten()
            if len(rows) == 0: continue
            h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
            assert 6 - 1 <= h <= 10 + 1 and 9 - 1 <= w <= 15 + 1, (h, w)
            hits += torch.tensor([rows[0] == 0, rows[-1] == 19, cols[0] == 0, cols[-1] == 29]).float()
    assert (hits > 0).all() # the boxes reach every border

def test_two_mixers_point_to_mixchoice():
    learn = synth_learner(cbs=[MixUp(), CutMix()]) # two on the learner (one given to a fit replaces the learner's: tests/test_callback.py)
    with pytest.raises(ValueError, match=r'MixChoice\(\[MixUp\(\), CutMix\(\)\]\)'): learn.fit(1)
    eq_(len(learn.cbs.filter(lambda o: isinstance(o, MixHandler))), 2)

@pytest.mark.parametrize('mixer', [CutMix, ResizeMix, lambda: CutMix(per_sample=True), lambda: ResizeMix(per_sample=True, interpolation='nearest')])
@pytest.mark.parametrize('size', [(12,), (8, 8), (4, 6, 6)], ids=['1d', '2d', '3d'])
def test_masks_pasted_loss_not_mixed(mixer, size):
    spy = MixSpy()
    with no_random(0): learn = synth_seg_learner(cbs=[mixer(), spy], size=size)
    lf = learn.loss_func
    with no_random(1): learn.fit(1, lr=0)
    assert learn.loss_func is lf
    for r in spy.records:
        inbox = (r['xm'] != r['x']).any(1)
        assert torch.equal(r['ym'][0][~inbox], r['y'][0][~inbox]) # outside the boxes the mask is the original's
        close_(r['loss'], lf(r['pred'], *r['ym'])) # the plain loss, on the mixed mask

@pytest.mark.parametrize('interpolation', ['bilinear', 'nearest', 'area'])
def test_resized_mask_sampled_where_the_image_is(interpolation):
    "A mask is resized at the pixel centres its image is: with an integer scale, both read the same source pixels"
    n, L = 8, 12
    x = torch.arange(L).float().expand(n, 1, L).contiguous() # each pixel holds its own position
    (xm, mm), perm, lam = resizemix(x, lam_min=2/3, lam_max=2/3, interpolation=interpolation, y=torch.arange(L).expand(n, L), generator=gen())
    inbox = xm[:, 0] != x[:, 0]
    assert inbox.any(1).all() # a box of 12/3 = 4 pixels in every sample
    eq_(mm[inbox], xm[:, 0][inbox].long())

def test_mask_with_channel_and_float_masks():
    x, m = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16, 1, 8, 8))
    (xm, mm), perm, lam = cutmix(x, y=m, generator=gen())
    inbox = (xm != x).any(1, keepdim=True)
    assert torch.equal(mm[inbox], m[perm][inbox]) and torch.equal(mm[~inbox], m[~inbox])
    soft = torch.rand(16, 4, 8, 8)
    (xm, sm), perm, lam = mixup(x, y=soft, generator=gen()) # a soft mask is blended with the image
    close_(sm, soft[perm].lerp(soft, lam.view(-1, 1, 1, 1)))
    with pytest.raises(ValueError, match='use CutMix or ResizeMix for segmentation'): mixup(x, y=m)
    with pytest.raises(ValueError, match='a target has batch size 15 but the inputs have 16'): cutmix(x, y=m[:15])

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('fn', [cutmix, resizemix])
def test_cuda_per_sample_no_sync(fn):
    x, m = torch.rand(32, 3, 32, 32, device='cuda'), torch.randint(0, 3, (32, 32, 32), device='cuda')
    torch.cuda.set_sync_debug_mode('error')
    try:
        for kw in [dict(per_sample=True), dict(per_sample=True, minmax=(.2, .6), p=.5)]: fn(x, y=m, **kw)
        MixChoice([MixUp(), CutMix()], per_sample=True, p=.8).mix((x,), (torch.zeros(32, device='cuda').long(),))
    finally: torch.cuda.set_sync_debug_mode('default')

# ---- a ParamScheduler's values count only in its own fit ----

def mixed_batches(recs): return sum(bool(moved(r['perm']).any()) for r in recs if r['perm'] is not None)

def test_schedule_does_not_outlive_its_fit(tmp_path):
    sched = lambda: ParamScheduler({'mix_alpha': SchedLin(.2, 1.), 'mix_p': SchedCos(1., 0.)})
    spy = MixSpy()
    learn = synth_learner(cbs=spy, n=128, bs=16)
    learn.fit_one_cycle(2, cbs=[CutMix(), sched()])
    assert learn.opt.hypers[-1]['mix_p'] < .01 # what the schedule left in the optimizer
    learn.fit_one_cycle(2, cbs=CutMix()) # a fresh mixer in the next fit
    eq_(mixed_batches(spy.records), 16) # every batch mixed: p=1, not the value left behind
    learn = synth_learner(cbs=[CutMix(), spy], n=128, bs=16) # a mixer on the learner, scheduled in one fit
    learn.fit_one_cycle(2, cbs=sched())
    eq_(learn.cut_mix.current('p'), 1.) # what show_batch reads
    learn.fit(1)
    eq_(mixed_batches(spy.records), 8)
    learn.save(tmp_path/'ckpt', with_opt=True)
    spy2 = MixSpy()
    fresh = synth_learner(cbs=[CutMix(), spy2], n=128, bs=16)
    fresh.load(tmp_path/'ckpt', with_opt=True)
    assert 'mix_p' in fresh.opt.hypers[-1]
    fresh.fit(1)
    eq_(mixed_batches(spy2.records), 8)

def test_schedule_still_counts_in_its_fit():
    class PSpy(Callback):
        order = MixHandler.order + 1
        def before_fit(self): self.seen = []
        def before_batch(self):
            if self.training: self.seen.append(self.learn.cut_mix.current('p'))
    learn = synth_learner(cbs=[CutMix(), PSpy()], n=64, bs=16)
    learn.fit(1, lr=0, cbs=ParamScheduler({'mix_p': SchedLin(1., 0.)}))
    close_(learn.p_spy.seen, [1., .75, .5, .25])

# ---- p = 0 trains exactly as without the callback, dropout and all ----

@pytest.mark.parametrize('mixer', [lambda: MixChoice([MixUp(), CutMix()], p=0), lambda: MixChoice([MixUp(), CutMix()], p=0, per_sample=True),
                                   lambda: MixUp(p=0), lambda: CutMix(p=0), lambda: ResizeMix(per_sample=True, p=0),
                                   lambda: MixChoice([MixUp(stop_pct=0), CutMix(stop_pct=0)])],
                         ids=['choice', 'choice-per-sample', 'mixup', 'cutmix', 'resizemix-per-sample', 'choice-all-stopped'])
def test_p0_is_no_callback_with_dropout(mixer):
    def losses(cbs):
        with no_random(0):
            learn = synth_learner(cbs=cbs)
            learn.model = nn.Sequential(nn.Flatten(), nn.Dropout(.5), nn.Linear(3 * 8 * 8, 4))
        with no_random(1): learn.fit(2)
        return learn.recorder.losses
    eq_(losses([mixer()]), losses([]))

# ---- per_sample is True or False ----

@pytest.mark.parametrize('make', [lambda v: CutMix(per_sample=v), lambda v: ResizeMix(per_sample=v), lambda v: MixChoice([MixUp()], per_sample=v)])
@pytest.mark.parametrize('v', ['False', 0, 1, None, 'yes'])
def test_per_sample_must_be_a_bool(make, v):
    with pytest.raises(TypeError, match=rf"per_sample must be True or False, got {re.escape(repr(v))}"): make(v)
