"""Partner policies (issue 23): who mixes with whom (`partner=`), the samples left alone, Remix's labels, on every mixer.
The statistical checks draw from seeded generators, with tolerances of several standard errors computed from the exact law."""
import json, math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_eq as eq_, test_close as close_
from fastai.losses import MSELossFlat
from fastai.torch_core import set_seed
from fastai_mix import (MixUp, CutMix, ResizeMix, MixChoice, FMix, ManifoldMixup, OutputMixup, MixCollate, mixup, cutmix, resizemix, fmix,
                        draw_partners, partner_logits, remix_shares, kernel_sigma, train_class_counts, paste_resized, resize_into_boxes,
                        paste_box, paste_boxes, lerp_mix, boxes_mask, draw_boxes)
from fastai_mix.fmix import paste_mask
from fastai_mix.test_utils import synth_learner, synth_dls, MixSpy
import test_draws

def own(perm): return perm == torch.arange(len(perm))

# ---------------------------------------------------------------- the draws follow each policy
Y_REG = torch.tensor([0., .1, .3, .7, 1.5, 2., 2.2, 3.5, 5., 6.])

def expected_distance(y, sigma):
    "The exact mean |y_i - y_partner| under the kernel, and the standard deviation of one draw's batch mean"
    P = partner_logits(y, 'kernel', sigma).softmax(1)
    d = (y[:, None] - y[None]).abs()
    m = (P * d).sum(1) # each row's expected distance
    v = (P * d.square()).sum(1) - m.square()
    return m.mean().item(), v.sum().sqrt().item() / len(y)

def test_kernel_matches_its_law():
    "Monte-Carlo mean distance of the partners = the kernel's exact expectation (within 6 standard errors), and it falls with sigma"
    g, k = torch.Generator().manual_seed(0), 500
    exact, mc, tol = [], [], []
    for sigma in (5., 1., .3):
        m, sd = expected_distance(Y_REG, sigma)
        got = torch.stack([(Y_REG - Y_REG[draw_partners(len(Y_REG), Y_REG, 'kernel', sigma, generator=g)]).abs().mean() for _ in range(k)]).mean().item()
        assert abs(got - m) < 6 * sd / math.sqrt(k), (sigma, got, m)
        exact.append(m); mc.append(got); tol.append(6 * sd / math.sqrt(k))
    assert exact[0] - exact[1] > tol[0] + tol[1] and exact[1] - exact[2] > tol[1] + tol[2] # the tolerances cannot make the order flake
    assert mc[0] > mc[1] > mc[2], (exact, mc)

def test_kernel_rows_follow_the_weights():
    "Each sample's partner frequencies against exp(-d^2 / 2 sigma^2), normalised over every j, i itself included (C-Mixup's rates)"
    y, g, k = Y_REG[:5].view(5, 1), torch.Generator().manual_seed(1), 1500
    perms = torch.stack([draw_partners(5, y, 'kernel', .5, generator=g) for _ in range(k)])
    d2 = (y - y.T).square()
    w = torch.exp(-d2 / (2 * .5**2))
    P = w / w.sum(1, keepdim=True)
    freq = torch.stack([torch.bincount(perms[:, i], minlength=5) for i in range(5)]).double() / k
    assert (freq.diagonal() > 0).all() # itself, drawn
    assert ((freq - P).abs() <= 6 * (P * (1 - P) / k).sqrt() + 1e-9).all(), (freq, P)

def test_sigma_auto_and_kernel_sigma():
    "'auto' is Silverman's rule on the batch's targets; `kernel_sigma` computes it from any targets, and scales with them"
    y = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 10
    s = kernel_sigma(y.numpy())
    close_(s, 1.06 * y.std().item() * 64 ** -.2, eps=1e-4)
    close_(kernel_sigma(y * 3, 64), 3 * s, eps=1e-4)
    close_(partner_logits(y, 'kernel').softmax(1), partner_logits(y, 'kernel', s).softmax(1), eps=1e-4)
    eq_(partner_logits(torch.ones(4), 'kernel').softmax(1)[0], torch.full((4,), 1/4)) # equal targets: uniform (itself included), no NaN

def test_same_and_other_class_exact():
    "same_class: always the same class, alone exactly where the class has one sample; other_class: never the same class"
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        y = torch.randint(0, 6, (12,), generator=g)
        perm = draw_partners(12, y, 'same_class', generator=g)
        lone = torch.bincount(y, minlength=6)[y] == 1
        eq_(y[perm], y); eq_(own(perm), lone)
        perm = draw_partners(12, y, 'other_class', generator=g)
        assert (y[perm] != y).all()
    y = torch.full((5,), 2)
    eq_(draw_partners(5, y, 'other_class', generator=g), torch.arange(5)) # one class: everyone alone
    eq_(draw_partners(1, torch.tensor([.5]), 'kernel', generator=g), torch.tensor([0])) # a batch of one

def test_balanced_by_frequency():
    "balanced: the partner's class is drawn with weight (its samples in the batch) / (its training count)"
    counts = torch.tensor([100., 20., 4.])
    y = torch.tensor([0] * 10 + [1] * 4 + [2] * 2)
    g, k = torch.Generator().manual_seed(0), 1000
    hits = torch.zeros(3)
    for _ in range(k): hits += torch.bincount(y[draw_partners(16, y, 'balanced', class_counts=counts, generator=g)][:10], minlength=3) # rows of class 0
    w = torch.tensor([9 / 100, 4 / 20, 2 / 4]) # from a class-0 sample: 9 others of class 0
    P, n = w / w.sum(), 10 * k
    freq = hits / n
    assert ((freq - P).abs() < 6 * (P * (1 - P) / n).sqrt()).all(), (freq, P)
    assert freq[2] > freq[1] > freq[0] # the rarest class is the most drawn, though fewest in the batch

def test_random_is_todays_draws():
    "partner='random' given explicitly draws exactly what the previous release drew (the recorded fixture), through a learner"
    fixture = json.loads(test_draws.FIXTURE.read_text())
    for name, mk in [('resizemix-per-sample', lambda: ResizeMix(per_sample=True, partner='random'))]: # tests/test_draws.py checks the defaults, on every mixer
        test_draws.MIXERS[name + '-explicit'] = mk
        try: eq_(test_draws.record_draws(name + '-explicit'), fixture[name])
        finally: del test_draws.MIXERS[name + '-explicit']

def test_random_core_unchanged():
    "In the core too: the options at their defaults leave every function's draws and results as they were"
    x, y = torch.rand(8, 3, 6, 6), torch.randint(0, 3, (8,))
    for f, kw in [(mixup, {}), (cutmix, {}), (cutmix, dict(per_sample=True)), (resizemix, {}), (fmix, dict(per_sample=True))]:
        a = f(x, y=y, generator=torch.Generator().manual_seed(3), **kw)
        b = f(x, y=y, generator=torch.Generator().manual_seed(3), partner='random', **kw)
        eq_(a[1], b[1]); eq_(a[0][0], b[0][0]); eq_(a[2], b[2])

# ---------------------------------------------------------------- Remix
def test_remix_hand_computed():
    "The paper's rule on a hand-made batch: counts 90/30/10, kappa=3, tau=0.5 (ratios of exactly kappa count; a share of exactly tau does not)"
    counts = torch.tensor([90., 30., 10.])
    y = torch.tensor([0, 2, 0, 1, 0, 1, 2, 0])
    perm = torch.tensor([1, 0, 3, 0, 2, 6, 5, 7])
    lam = torch.tensor([.4, .8, .2, .5, .3, .6, .45, .3])
    # 0: 90 vs 10, own .4 < .5 -> 0 | 1: 10 vs 90, partner's share .2 < .5 -> 1 | 2: 90 vs 30 (exactly 3), .2 -> 0
    # 3: 30 vs 90, partner's share .5, not < .5 -> .5 | 4: same class -> .3 | 5: 30 vs 10 (3), own .6 -> .6 | 6: 10 vs 30, partner's .55 -> .45 | 7: itself -> .3
    eq_(remix_shares(lam, y, perm, counts, 3., .5), torch.tensor([0., 1., 0., .5, .3, .6, .45, .3]))
    close_(remix_shares(.4, y[:2], perm[:2], counts), torch.tensor([0., .4])) # one share for the batch: the partner's .6 is not below tau

def test_remix_through_the_core_and_a_learner():
    "The core returns the label shares (the inputs keep theirs); a learner's loss uses them"
    x, y, counts = torch.rand(8, 3, 8, 8), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1]), [60, 2]
    (xm, _), perm, lam_x = cutmix(x, y=y, generator=torch.Generator().manual_seed(0))
    (xr, _), perm_r, lam_y = cutmix(x, y=y, generator=torch.Generator().manual_seed(0), remix=(3, .5), class_counts=counts)
    eq_(perm, perm_r); eq_(xm, xr) # the same draws and pixels
    eq_(lam_y, remix_shares(lam_x, y, perm, torch.tensor(counts).float(), 3, .5))
    spy = MixSpy()
    learn = synth_learner(cbs=[CutMix(remix=(3, .5), class_counts=[60, 2]), spy], n=32, bs=16, c=2)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0)
    c, hit = torch.tensor([60., 2.]), 0
    for r in spy.records: # one box per batch: its share read from the pixels that moved
        pix = 1 - (r['xm'] != r['x']).flatten(2).any(1).any(0).float().mean()
        close_(r['lam'], remix_shares(pix, r['y'][0], r['perm'], c, 3, .5), eps=1e-6)
        hit += int(((r['lam'] == 0) | (r['lam'] == 1)).sum())
    assert hit > 0 # the rule acted

# ---------------------------------------------------------------- every mixer, non-permutation partners, samples left alone
NON_PERM = torch.tensor([0, 0, 3, 1, 1, 5]) # repeats, a fixed point, samples nobody takes

def test_consumers_take_non_permutations():
    "Every function that reads `perm` gives, for partners that are not a permutation, what a loop over the samples gives"
    g = torch.Generator().manual_seed(0)
    x, perm = torch.randn(6, 2, 8, 10, generator=g), NON_PERM
    lam = torch.rand(6, generator=g)
    close_(lerp_mix(x, perm, lam), torch.stack([torch.lerp(x[perm[i]], x[i], lam[i]) for i in range(6)]), eps=1e-6)
    box = (slice(2, 6), slice(1, 9))
    out = x.clone(); out[:, :, 2:6, 1:9] = x[perm][:, :, 2:6, 1:9]
    eq_(paste_box(x, perm, box), out); eq_(paste_box(x.clone(), perm, box, inplace=True), out)
    lo, hi = draw_boxes(6, (8, 10), generator=g)
    m = boxes_mask(lo, hi, (8, 10))
    eq_(paste_boxes(x, perm, m), torch.where(m[:, None], x[perm], x))
    eq_(paste_mask(x, perm, m), torch.where(m[:, None], x, x[perm])) # its mask marks the original's positions
    ref = x.clone()
    for i in range(6): ref[i, :, 2:6, 1:9] = F.interpolate(x[perm[i]][None], size=(4, 8), mode='bilinear', align_corners=False)[0]
    close_(paste_resized(x, perm, box), ref, eps=1e-6)
    close_(paste_resized(x.clone(), perm, box, inplace=True), ref, eps=1e-6)
    alone = own(perm)
    eq_(paste_resized(x, perm, box, alone=alone)[alone], x[alone]) # left as they are
    res = resize_into_boxes(x, perm, lo, hi)
    for i in range(6):
        h, w = (hi[0][i] - lo[0][i]).item(), (hi[1][i] - lo[1][i]).item()
        if h and w: close_(res[i, :, lo[0][i]:hi[0][i], lo[1][i]:hi[1][i]], F.interpolate(x[perm[i]][None], size=(h, w), mode='bilinear', align_corners=False)[0], eps=1e-5)

MIXERS = {'mixup': lambda **k: MixUp(**k), 'cutmix': lambda **k: CutMix(**k), 'cutmix-ps': lambda **k: CutMix(per_sample=True, **k),
          'resizemix': lambda **k: ResizeMix(**k), 'resizemix-ps': lambda **k: ResizeMix(per_sample=True, **k),
          'fmix': lambda **k: FMix(**k), 'fmix-ps': lambda **k: FMix(per_sample=True, **k),
          'manifold': lambda **k: ManifoldMixup(module_list=['1'], **k), 'output': lambda **k: OutputMixup(**k),
          'choice-ps': lambda **k: MixChoice([MixUp(), CutMix()], per_sample=True, **k)}

@pytest.mark.parametrize('name', list(MIXERS))
def test_every_mixer_same_class(name):
    "Through a learner: partners of the same class only (so not a permutation), the samples without one left exactly as they were and counted"
    spy = MixSpy()
    set_seed(0)
    mixer = MIXERS[name](partner='same_class')
    learn = synth_learner(cbs=[mixer, spy], n=24, bs=12, c=5)
    learn.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 5)) # a hidden place '1' for ManifoldMixup
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0)
    n_alone = 0
    for r in spy.records:
        y, perm = r['y'][0], r['perm']
        eq_(y[perm], y)
        lone = torch.bincount(y, minlength=5)[y] == 1
        eq_(own(perm), lone)
        n_alone += int(lone.sum())
        if lone.any() and name not in ('manifold', 'output'): eq_(r['xm'][lone], r['x'][lone]) # left exactly as they were
        if isinstance(r['lam'], torch.Tensor) and name != 'choice-ps': assert (r['lam'][lone] == 1).all()
    assert n_alone > 0 # the case is exercised
    eq_(mixer.left_alone(), n_alone)

def test_resizemix_alone_not_pasted_into_itself():
    "ResizeMix, one box for the batch: a sample without a partner keeps its pixels (its own resize is not pasted in)"
    x, y = torch.rand(4, 3, 12, 12), torch.tensor([0, 1, 1, 2])
    (xm, _), perm, lam = resizemix(x, y=y, partner='same_class', generator=torch.Generator().manual_seed(0))
    eq_(perm[[0, 3]], torch.tensor([0, 3])); eq_(xm[[0, 3]], x[[0, 3]])
    assert not torch.equal(xm[1], x[1])

# ---------------------------------------------------------------- a real fit per policy, the errors, the plumbing
def reg_learner(cbs, n=48):
    "A tiny regression learner: float targets (N, 1) that are a function of the inputs"
    from fastai.data.core import DataLoaders, Datasets
    from fastai.data.transforms import ItemGetter
    from fastai.learner import Learner
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x.sum(1, keepdim=True) ** 2
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(n))])
    return Learner(dsets.dataloaders(bs=16), nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)), loss_func=MSELossFlat(), cbs=cbs)

@pytest.mark.parametrize('mixer', [lambda: MixUp(partner='kernel'), lambda: ManifoldMixup(partner='kernel', sigma=.5, module_list=['1'])])
def test_fit_kernel(mixer):
    "A real fit with the kernel on regression targets: the partners' targets are closer than random ones"
    spy = MixSpy()
    learn = reg_learner([mixer(), spy])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.losses)
    d = torch.cat([(r['y'][0] - r['y'][0][r['perm']]).abs() for r in spy.records]).mean()
    d0 = torch.cat([(r['y'][0][:, None] - r['y'][0][None]).abs().mean((1, 2)) for r in spy.records]).mean() # a random partner's
    assert d < .7 * d0, (d, d0)

@pytest.mark.parametrize('kw', [dict(partner='balanced'), dict(partner='other_class', remix=(2, .5)), dict(partner='balanced', class_counts=[1, 1, 1, 10])])
def test_fit_class_policies(kw):
    "A real fit per class policy (and Remix), the counts read from the training data unless given"
    learn = synth_learner(cbs=CutMix(**kw), n=32, bs=16)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.losses)
    c = learn.cut_mix._counts[1]
    eq_(c, torch.tensor(kw['class_counts']).float() if 'class_counts' in kw else train_class_counts(learn.dls).float())

@pytest.mark.parametrize('kw,msg', [(dict(partner='nearest'), "partner must be one of"), (dict(partner='kernel', sigma=0), "sigma must be 'auto'"),
    (dict(partner='balanced', sigma=1.), "sigma=1.0 is the bandwidth of partner='kernel'"), (dict(remix=(3, .5), partner='kernel'), "do not go together"),
    (dict(remix=(.5, .5)), "remix must be None or (kappa, tau)"), (dict(remix=3), "remix must be None"), (dict(class_counts=[1, 2]), "they do nothing"),
    (dict(partner='balanced', class_counts=[0, 0]), "class_counts must be"), (dict(partner='balanced', class_counts='abc'), "class_counts must be")])
def test_refused_at_construction(kw, msg):
    for mk in (MixUp, CutMix, ResizeMix, FMix, ManifoldMixup, OutputMixup, lambda **k: MixChoice([MixUp()], **k)):
        with pytest.raises(ValueError, match=msg.replace('(', r'\(').replace(')', r'\)')): mk(**kw)

def test_refused_at_the_first_batch():
    "A policy that does not fit the targets: refused at the first batch, naming it and what fits; the learner left as it was"
    learn = synth_learner(cbs=MixUp(partner='kernel'))
    lf = learn.loss_func
    with pytest.raises(ValueError, match=r"partner='kernel' draws partners by the distance between dense float targets.*torch.int64"): learn.fit(1)
    assert learn.loss_func is lf
    with pytest.raises(ValueError, match=r"partner='balanced' pairs by class.*use partner='kernel'"): reg_learner(MixUp(partner='balanced')).fit(1)
    with pytest.raises(ValueError, match=r"remix pairs by class"): reg_learner(MixUp(remix=(3, .5), class_counts=[1, 2])).fit(1)
    with pytest.raises(ValueError, match="give class_counts="): MixUp(partner='balanced').mix((torch.rand(4, 3),), (torch.tensor([0, 1, 0, 1]),))

def test_choice_passes_options_through():
    "MixChoice gives its options to the mixers left at the defaults, refuses a conflict, and counts the samples left alone"
    mu, cm = MixUp(), CutMix(partner='same_class')
    ch = MixChoice([mu, cm], partner='same_class')
    eq_((mu.partner, cm.partner), ('same_class', 'same_class'))
    with pytest.raises(ValueError, match=r"MixChoice\(partner='balanced'\) holds CutMix\(partner='same_class'\)"): MixChoice([MixUp(), CutMix(partner='same_class')], partner='balanced')
    with pytest.raises(ValueError, match="sigma"): MixChoice([MixUp(partner='same_class')], sigma=2.) # checked as each mixer ends up

def test_collate_and_show():
    "MixCollate passes the options to the function (and refuses num_classes with a class policy); show_batch titles the samples left alone"
    x, y = torch.rand(8, 3, 6, 6), torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    xb, yb, y1, lam = MixCollate(mixup, partner='same_class')(list(zip(x, y)))
    eq_(y1, yb); eq_(lam[7], 1.)
    with pytest.raises(ValueError, match="num_classes=3"): MixCollate(mixup, num_classes=3, partner='balanced', class_counts=[1, 2, 3])
    dls = synth_dls(n=16, bs=8, c=5)
    fig = MixUp(partner='same_class').show_batch(dls, max_n=8, seed=0, show=False)
    assert fig._suptitle.get_text().startswith("partner='same_class': ")
    assert any('left alone' in ax.get_title() for ax in fig.axes)
    fig = CutMix(partner='balanced', remix=(1, 1.)).show_batch(dls, max_n=8, seed=0, show=False) # counts read from `dls`, kappa 1: every mix to one label
    assert any('Remix' in ax.get_title() for ax in fig.axes)

# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_no_sync():
    "On the GPU, every policy and Remix draw and mix through a learner with no host-device sync in the batch, and the alone count too"
    from test_callback import fit_without_sync
    for name in ('mixup', 'cutmix', 'resizemix-ps', 'fmix', 'manifold', 'choice-ps'):
        for kw in (dict(partner='same_class'), dict(partner='balanced', remix=(3, .5)), dict(partner='other_class')):
            learn = synth_learner(cbs=MIXERS[name](**kw), n=32, bs=16)
            learn.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
            learn.dls.to('cuda'); learn.model.cuda()
            fit_without_sync(learn)
    learn = reg_learner(MixUp(partner='kernel'))
    learn.dls.to('cuda'); learn.model.cuda()
    fit_without_sync(learn)
    x, y = torch.rand(16, 3, 8, 8, device='cuda'), torch.randint(0, 4, (16,), device='cuda')
    torch.cuda.set_sync_debug_mode('error')
    try:
        for f in (mixup, cutmix, resizemix, fmix):
            f(x, y=y, partner='balanced', class_counts=torch.tensor([4., 3., 2., 1.], device='cuda'), remix=(3, .5))
            f(x, y=torch.rand(16, 2, device='cuda'), partner='kernel')
    finally: torch.cuda.set_sync_debug_mode('default')

# ---------------------------------------------------------------- issue 29: C-Mixup's self-pairs, any integer class dtype, MixCollate's partials, ArrayImages
def c_mixup_rates(y, bandwidth):
    "C-Mixup's own sample rates (huaxiuyao/C-Mixup, src/algorithm.py, `get_mixup_sample_rate`, use_kde): for each i a Gaussian KDE fit on y_i, scored on every y_j (itself included), normalised"
    import numpy as np
    from sklearn.neighbors import KernelDensity
    data = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1).numpy()
    rows = []
    for i in range(len(data)):
        each = np.exp(KernelDensity(kernel='gaussian', bandwidth=bandwidth).fit(data[i].reshape(-1, data.shape[1])).score_samples(data))
        rows.append(each / each.sum())
    return torch.tensor(np.array(rows))

@pytest.mark.parametrize('y,sigma', [(Y_REG, .5), (Y_REG, 2.), (Y_REG.view(5, 2), 1.), (torch.tensor([0., .1, .2, 9.]), .3)])
def test_kernel_rates_are_c_mixups(y, sigma):
    "partner='kernel' draws with C-Mixup's rates, the sample itself included (distance 0: its highest rate); 'auto' with Silverman's bandwidth"
    P = partner_logits(y, 'kernel', sigma).softmax(1).double()
    close_(P, c_mixup_rates(y, sigma), eps=1e-6)
    assert (P.diagonal() >= P.max(1).values - 1e-12).all() # itself, at the highest rate
    auto = kernel_sigma(y, len(y)) if y.ndim == 1 else None
    if auto is not None: close_(partner_logits(y, 'kernel').softmax(1).double(), c_mixup_rates(y, auto), eps=1e-5)

def test_kernel_far_sample_stays_itself():
    "A sample far from every other mostly stays itself (C-Mixup), instead of being forced onto its nearest neighbour; the draws follow the rates"
    y, g, k = torch.tensor([0., .1, .2, .3, 9.]), torch.Generator().manual_seed(0), 2000
    perms = torch.stack([draw_partners(5, y, 'kernel', .3, generator=g) for _ in range(k)])
    eq_((perms[:, 4] == 4).all(), True) # exp(-8.7**2 / 0.18): never anyone else
    P = c_mixup_rates(y, .3)
    freq = torch.stack([torch.bincount(perms[:, i], minlength=5) for i in range(5)]).double() / k
    assert ((freq - P).abs() <= 6 * (P * (1 - P) / k).sqrt() + 1e-9).all(), (freq, P)

def reg_image_learner(cbs, n=24, bs=12):
    "Images with one-hot float targets (dense: the kernel reads them), cross-entropy on soft targets; a hidden place '1' for ManifoldMixup"
    learn = synth_learner(cbs=cbs, n=n, bs=bs, c=4, multi_label=True, loss_func=nn.CrossEntropyLoss())
    learn.model = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))
    return learn

@pytest.mark.parametrize('name', list(MIXERS))
def test_every_mixer_kernel_self_pairs(name):
    "Through a learner with partner='kernel': a sample drawn as its own partner is left exactly as it was (inputs and targets), with a share of 1, and counted"
    spy = MixSpy()
    set_seed(0)
    mixer = MIXERS[name](partner='kernel', sigma=.5)
    learn = reg_image_learner([mixer, spy])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, lr=0)
    n_alone = 0
    for r in spy.records:
        alone = own(r['perm'])
        n_alone += int(alone.sum())
        if name not in ('manifold', 'output'): eq_(r['xm'][alone], r['x'][alone])
        eq_(r['ym'][0][alone], r['y'][0][alone]) # a target blended with itself: its own
        if isinstance(r['lam'], torch.Tensor) and name != 'choice-ps': assert (r['lam'][alone] == 1).all()
    assert n_alone > 0 # C-Mixup draws a sample itself at its highest rate
    eq_(mixer.left_alone(), n_alone)

def test_kernel_refused_on_class_indices_snapmix_transmix():
    "SnapMix reads class indices only: partner='kernel' is refused when it is made; TransMix, on class indices, at the first batch, as every mixer"
    from fastai_mix import SnapMix, TransMix
    with pytest.raises(ValueError, match=r"SnapMix\(partner='kernel'\): SnapMix pairs images by their class index"): SnapMix(partner='kernel')
    with pytest.raises(ValueError, match="partner='kernel' draws partners by the distance"):
        TransMix(partner='kernel').mix((torch.rand(4, 3, 8, 8),), (torch.tensor([0, 1, 0, 1]),))

INT_DTYPES = [torch.uint8, torch.int8, torch.int16, torch.int32]

@pytest.mark.parametrize('dtype', INT_DTYPES)
def test_policies_take_any_integer_class_dtype(dtype):
    "Every policy and Remix take class indices of any integer dtype (fastai's tabular targets are int8): the same draws and shares as int64"
    y64, counts = torch.tensor([0, 0, 0, 0, 1, 1, 2, 0, 0, 1, 0, 2]), torch.tensor([60., 20., 5.])
    y = y64.to(dtype)
    for partner in ('balanced', 'same_class', 'other_class'):
        cc = counts if partner == 'balanced' else None
        eq_(partner_logits(y, partner, class_counts=cc), partner_logits(y64, partner, class_counts=cc))
        eq_(draw_partners(12, y, partner, class_counts=cc, generator=torch.Generator().manual_seed(1)),
            draw_partners(12, y64, partner, class_counts=cc, generator=torch.Generator().manual_seed(1)))
    perm, lam = torch.tensor([4, 0, 6, 1, 2, 3, 5, 8, 7, 11, 10, 9]), torch.linspace(.05, .95, 12)
    eq_(remix_shares(lam, y, perm, counts), remix_shares(lam, y64, perm, counts))
    x = torch.rand(12, 3, 6, 6)
    from fastai_mix.callback import mixes_loss
    assert mixes_loss((y,), (x,)) and mixes_loss((y,), (x[:, :, 0, 0],)) # class indices, for images and tables: their loss is mixed
    for f, kw in [(mixup, {}), (cutmix, {}), (cutmix, dict(per_sample=True)), (resizemix, {}), (fmix, dict(per_sample=True))]:
        for opts in (dict(partner='balanced', class_counts=[60, 20, 5]), dict(remix=(3, .5), class_counts=[60, 20, 5]), dict(partner='same_class')):
            a = f(x, y=y, generator=torch.Generator().manual_seed(2), **kw, **opts)
            b = f(x, y=y64, generator=torch.Generator().manual_seed(2), **kw, **opts)
            eq_(a[1], b[1]); eq_(a[0][0], b[0][0]); eq_(a[2], b[2]); eq_(a[0][1].dtype, dtype) # the targets come back as given
    a, b = (MixCollate(mixup, partner='balanced', class_counts=[60, 20, 5], remix=(3, .5), generator=torch.Generator().manual_seed(3))(list(zip(x, t)))
            for t in (y, y64))
    eq_(a[1].dtype, dtype); eq_(a[2].long(), b[2]); eq_(a[3], b[3]) # the partners' classes and Remix's shares as with int64

def tabular_int8_dls(n=64, bs=16):
    "fastai tabular data with a categorical target, which fastai stores as int8 codes; 'rare' is a fifth of the rows"
    import pandas as pd
    from fastai.tabular.core import TabularPandas
    from fastai.data.block import CategoryBlock
    from fastai.tabular.core import Normalize, Categorify
    import numpy as np
    rng = np.random.default_rng(0)
    df = pd.DataFrame({'a': rng.normal(size=n), 'b': rng.normal(size=n), 'k': rng.choice(['u', 'v'], n),
                       'y': np.where(np.arange(n) % 5 == 0, 'rare', np.where(np.arange(n) % 2 == 0, 'even', 'odd'))})
    to = TabularPandas(df, procs=[Categorify, Normalize], cat_names=['k'], cont_names=['a', 'b'], y_names='y', y_block=CategoryBlock(),
                       splits=(list(range(n - 16)), list(range(n - 16, n))))
    return to.dataloaders(bs=bs)

@pytest.mark.parametrize('mixer', [lambda: MixUp(partner='balanced'), lambda: MixUp(remix=(3, .5)), lambda: MixUp(partner='other_class', remix=(2, .5)),
                                   lambda: MixUp(partner='same_class'), lambda: ManifoldMixup(partner='balanced', remix=(3, .5)),
                                   lambda: OutputMixup(partner='balanced'), lambda: OutputMixup(), lambda: ManifoldMixup(),
                                   lambda: MixChoice([MixUp(), ManifoldMixup()], partner='balanced')])
def test_tabular_int8_targets_fit(mixer):
    "A real TabularLearner whose categorical target fastai gives as int8: the policies, Remix, ManifoldMixup and OutputMixup fit, counting from the table"
    from fastai.tabular.learner import tabular_learner
    from fastai_mix.callback import mixes_loss, check_targets
    dls = tabular_int8_dls()
    _, _, yb = dls.one_batch()
    eq_(yb.dtype, torch.int8)
    assert mixes_loss((yb,), (torch.rand(len(yb), 2),)); check_targets((yb,))
    spy, m = MixSpy(), mixer()
    learn = tabular_learner(dls, layers=[8], cbs=[m, spy])
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.losses)
    assert spy.records and all(r['y'][0].dtype == torch.int8 for r in spy.records)
    if m.partner == 'balanced' or m.remix is not None:
        eq_(m._counts[1], torch.bincount(torch.as_tensor(dls.train_ds.ys['y'].values).long(), minlength=3).float())

def test_collate_partial_checked_when_made():
    "MixCollate checks a partial's partner options as it checks its own keyword arguments: when it is made, naming what the user gave"
    from functools import partial
    from torch.utils.data import DataLoader, TensorDataset
    for f, kw in [(mixup, dict(partner='balanced', class_counts=[1, 2, 3])), (cutmix, dict(remix=(3, .5), class_counts=[1, 2, 3])),
                  (resizemix, dict(partner='same_class'))]:
        with pytest.raises(ValueError, match=r"num_classes=3.*reads class indices"): MixCollate(partial(f, **kw), num_classes=3)
        with pytest.raises(ValueError, match=r"num_classes=3.*reads class indices"): MixCollate(f, num_classes=3, **kw)
    with pytest.raises(ValueError, match="partner must be one of"): MixCollate(partial(mixup, partner='nearest'))
    with pytest.raises(ValueError, match="partner must be one of"): MixCollate(mixup, partner='nearest')
    with pytest.raises(ValueError, match="they do nothing"): MixCollate(partial(cutmix, class_counts=[1, 2]))
    with pytest.raises(ValueError, match="do not go together"): MixCollate(partial(mixup, partner='kernel'), remix=(3, .5))
    ds = TensorDataset(torch.rand(16, 3, 6, 6), torch.tensor([0, 1, 2, 0] * 4))
    x, y, y1, lam = next(iter(DataLoader(ds, batch_size=8, collate_fn=MixCollate(partial(mixup, partner='balanced', class_counts=[4, 4, 4])))))
    eq_(y1.shape, y.shape) # without num_classes: (x, y, y[perm], lam)
    x, y = next(iter(DataLoader(ds, batch_size=8, collate_fn=MixCollate(partial(mixup, partner='kernel'), num_classes=3)))) # one-hot floats: the kernel reads them
    eq_(y.shape, (8, 3))

def test_collate_first_batch_error_names_num_classes():
    "A mix function MixCollate cannot read (here a lambda) that refuses the one-hot targets num_classes made: the error says MixCollate made them"
    x, y = torch.rand(8, 3, 6, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    mc = MixCollate(lambda x, y, **k: mixup(x, y=y, partner='balanced', class_counts=[1, 2, 3], **k), num_classes=3)
    with pytest.raises(ValueError, match=r"MixCollate\(num_classes=3\) turned the batch's class indices \(torch.int64, shape \(8,\)\) into one-hot float targets \(8, 3\)") as e:
        mc(list(zip(x, y)))
    assert "partner='balanced' pairs by class" in str(e.value)

def array_images(n, c=3, seed=0, size=8):
    "Imbalanced ArrayImages: class k holds about twice as many images as class k+1"
    from fastai_mix.data import ArrayImages
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(([0] * 4 + [1] * 2 + [2]) * (n // 7 + 1))[:n]
    return ArrayImages(torch.randint(0, 256, (n, size, size), generator=g, dtype=torch.uint8), y, [f'c{i}' for i in range(c)])

def test_train_class_counts_array_images(monkeypatch):
    "train_class_counts reads the project's ArrayImages (what --data fashion-mnist trains on) from its label tensor, without loading an image"
    from fastai_mix.data import ArrayImages, array_dls
    train, valid = array_images(70), array_images(14, seed=1)
    dls = array_dls(train, valid, bs=16, device='cpu')
    monkeypatch.setattr(ArrayImages, '__getitem__', lambda self, i: pytest.fail('an image was loaded'))
    expected = torch.bincount(train.y.as_subclass(torch.Tensor), minlength=3)
    eq_(train_class_counts(dls), expected); eq_(train_class_counts(dls.train), expected)
    eq_(type(train_class_counts(dls)), torch.Tensor)
    empty = ArrayImages(torch.zeros(4, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ['a', 'b', 'c']) # a class with no image still counts
    eq_(train_class_counts(array_dls(empty, valid, bs=2, device='cpu')), torch.tensor([2, 2, 0]))

def test_fit_balanced_on_array_dls():
    "A Learner on array_dls fits with CutMix(partner='balanced') without class_counts: the counts come from the training images' labels"
    from fastai.learner import Learner
    from fastai_mix.data import array_dls
    train, valid = array_images(70), array_images(14, seed=1)
    dls = array_dls(train, valid, bs=16, device='cpu')
    learn = Learner(dls, nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), cbs=CutMix(partner='balanced'))
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-2)
    assert all(math.isfinite(v) for v in learn.recorder.losses)
    eq_(learn.cut_mix._counts[1], torch.bincount(train.y.as_subclass(torch.Tensor), minlength=3).float())

def test_show_batch_kernel_self_pairs():
    "show_batch says a sample the kernel drew as its own partner was left alone as its own partner, not for want of one"
    dls = synth_dls(n=16, bs=8, c=4, multi_label=True)
    fig = MixUp(partner='kernel', sigma=.5).show_batch(dls, max_n=8, seed=0, show=False)
    assert "left alone (drawn as their own partner)" in fig._suptitle.get_text()
    assert any('its own partner: left alone' in ax.get_title() for ax in fig.axes)

def test_collate_class_counts_needed_when_made():
    "partner='balanced' and Remix weigh by the class counts, which a collate function has no training data to read: MixCollate refuses them "
    "without class_counts when it is made (given to it or to the partial), not at the first batch"
    from functools import partial
    for mix, kw in [(mixup, dict(partner='balanced')), (cutmix, dict(remix=(3, .5))), (partial(resizemix, partner='balanced'), {}),
                    (partial(cutmix, remix=(3, .5), partner='same_class'), {})]:
        with pytest.raises(ValueError, match=r"MixCollate: (partner='balanced'|remix=\(3(\.0)?, 0?\.5\)) weighs by the training data's class counts.*give class_counts"):
            MixCollate(mix, **kw)
    MixCollate(mixup, partner='balanced', class_counts=[4, 4, 4]); MixCollate(partial(cutmix, remix=(3, .5)), class_counts=[1, 2]) # given: taken
