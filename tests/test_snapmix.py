"SnapMix: the label weights against the official formula from hand-made CAMs and Grad-CAMs, read back from the pixels; the two-weight loss; the learner contract"
import copy, pickle, random
import numpy as np
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders, Datasets
from fastai.data.transforms import ItemGetter
from fastai.layers import ConvLayer
from fastai.learner import Learner, load_learner
from fastai.losses import CrossEntropyLossFlat
from fastai.torch_core import no_random
from fastai.vision.learner import create_head
from fastai_mix import SnapMix, MixChoice, CutMix, mix_loss, mix_title
from fastai_mix.snapmix import cam_parts, class_maps, normalise_maps, resize_boxes, resize_box_into, CamParts
from fastai_mix.core import draw_boxes
from fastai_mix.test_utils import synth_learner

C, SIZE = 3, (12, 12)

def coord_dls(n=16, bs=8, c=C, seed=0):
    "Images whose channels are the row, the column, the sample's id and noise: a paste tells the partner's box and the box it went into"
    g = torch.Generator().manual_seed(seed)
    H, W = SIZE
    x = torch.stack([torch.arange(H).float().view(H, 1).expand(H, W), torch.arange(W).float().view(1, W).expand(H, W)])
    x = torch.cat([x.expand(n, 2, H, W), torch.arange(n).float().view(n, 1, 1, 1).expand(n, 1, H, W), torch.randn(n, 1, H, W, generator=g)], 1)
    y = torch.randint(0, c, (n,), generator=g)
    dsets = Datasets(list(zip(x, y)), tfms=[[ItemGetter(0)], [ItemGetter(1)]], splits=[list(range(n)), list(range(n))])
    return dsets.dataloaders(bs=bs, drop_last=False)

def linear_cnn(c=C, bn=True):
    "Conv layers, global average pooling, flatten, one Linear: the classic CAM's model"
    torch.manual_seed(0)
    return nn.Sequential(ConvLayer(4, 8, stride=2, norm_type=None if not bn else 1), ConvLayer(8, 8, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, c))

class ResNetLike(nn.Module):
    "children ending in a global pooling and a Linear, with a flatten in `forward` (torchvision's ResNet): the feature map is read by a hook"
    def __init__(self, c=C):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.layer4, self.avgpool, self.fc = ConvLayer(4, 8, stride=2), ConvLayer(8, 8, stride=2), nn.AdaptiveAvgPool2d(1), nn.Linear(8, c)
    def forward(self, x): return self.fc(torch.flatten(self.avgpool(self.layer4(self.stem(x))), 1))

def learner_like(c=C):
    "fastai's vision_learner model: Sequential(body, create_head(...)), the head not linear"
    torch.manual_seed(0)
    return nn.Sequential(nn.Sequential(ConvLayer(4, 8, stride=2), ConvLayer(8, 8, stride=2)), create_head(8, c))

class Rec(Callback):
    "Before the mixer: the unmixed batch and a copy of the model as the maps see it; at the loss: the mixer's partners, two weights, prediction and loss"
    order, run_valid = SnapMix.order - 1, False
    def __init__(self, mixer): self.mixer = mixer
    def before_fit(self): self.records = []
    def before_batch(self): self.x0, self.y0, self.model0 = self.learn.xb[0].clone(), self.learn.yb[0].clone(), copy.deepcopy(self.learn.model)
    def after_loss(self):
        m = self.mixer
        self.records.append(dict(x=self.x0, xm=self.learn.xb[0].detach().clone(), y=self.y0, perm=m.perm, lam=m.lam, lam1=m.lam1,
                                 pred=self.learn.pred.detach(), loss=self.learn.loss.detach(), model=self.model0))

def hand_cam(model, x, y):
    "The official `get_spm`: the class's Linear weights over the rectified last feature map, plus the bias (eval mode), upsampled, shifted to 0, summing to 1"
    model.eval()
    with torch.no_grad():
        if isinstance(model, ResNetLike): fm, lin = model.layer4(model.stem(x)), model.fc
        else: fm, lin = model[:2](x), model[4]
        out = F.conv2d(F.relu(fm), lin.weight.view(*lin.weight.shape, 1, 1), bias=lin.bias)
    maps = F.interpolate(out[torch.arange(len(y)), y][:, None], SIZE, mode='bilinear', align_corners=False)[:, 0]
    for i in range(len(y)): maps[i] -= maps[i].min(); maps[i] /= maps[i].sum()
    return maps

def hand_grad_cam(model, x, y):
    "Grad-CAM by hand: the gradient of each target logit with respect to the body's output, through the head (eval mode), averaged over space"
    model.eval()
    with torch.no_grad(): fm = model[0](x)
    f = fm.clone().requires_grad_()
    logits = model[1](f)
    g, = torch.autograd.grad(logits[torch.arange(len(y)), y].sum(), f)
    cam = (g.mean((2, 3))[:, :, None, None] * f.detach()).sum(1)
    maps = F.interpolate(cam[:, None], SIZE, mode='bilinear', align_corners=False)[:, 0]
    maps = maps - maps.amin((1, 2), keepdim=True)
    return maps / maps.sum((1, 2), keepdim=True)

def boxes_back(r, i):
    "Sample i's pasted box and its partner's source box, read from the pixels: (rows, cols) slices of each, or None when a side is 1"
    inside = r['xm'][i, 2] != r['x'][i, 2] # the partner's id
    rows, cols = inside.any(1).nonzero().flatten(), inside.any(0).nonzero().flatten()
    a, b, c, d = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if b - a < 2 or d - c < 2: return None
    xm = r['xm'][i]
    sa, sb, sc, sd = (int(round(float(v))) for v in (xm[0, a, c], xm[0, b - 1, c], xm[1, a, c], xm[1, a, d - 1]))
    eq_(inside.sum().item(), (b - a) * (d - c)) # a box
    return (slice(a, b), slice(c, d)), (slice(sa, sb + 1), slice(sc, sd + 1))

def official_weights(maps, y, perm, i, box, src):
    "The official `snapmix` weights of sample i, line for line"
    area = (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    lam_a = 1 - maps[i][box].sum() / (maps[i].sum() + 1e-8)
    lam_b = maps[perm[i]][src].sum() / (maps[perm[i]].sum() + 1e-8)
    if y[i] == y[perm[i]]: lam_a, lam_b = lam_a + lam_b, lam_b + lam_a
    keep = 1 - area / (SIZE[0] * SIZE[1])
    return (keep if lam_a.isnan() else lam_a), (1 - keep if lam_b.isnan() else lam_b)

def check_weights(recs, maps_fn):
    n_checked = 0
    for r in recs:
        perm, y = r['perm'], r['y']
        maps = maps_fn(r['model'], r['x'], y)
        for i in range(len(perm)):
            if perm[i] == i or (bb := boxes_back(r, i)) is None: continue
            lam, lam1 = official_weights(maps, y, perm, i, *bb)
            close_(r['lam'][i], lam, eps=1e-4); close_(r['lam1'][i], lam1, eps=1e-4)
            n_checked += 1
        ce = F.cross_entropy(r['pred'], y, reduction='none'), F.cross_entropy(r['pred'], y[perm], reduction='none')
        close_(r['loss'], (r['lam'] * ce[0] + r['lam1'] * ce[1]).mean(), eps=1e-5)
    assert n_checked > 4

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
@pytest.mark.parametrize('arch', ['sequential', 'resnet'])
def test_weights_are_the_official_cam_shares(per_sample, arch):
    "The weights the loss gets are the official code's, from a CAM computed by hand, with both boxes read back from the pixels"
    m = SnapMix(per_sample=per_sample)
    rec = Rec(m)
    model = linear_cnn() if arch == 'sequential' else ResNetLike()
    learn = Learner(coord_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    with no_random(0): learn.fit(1, lr=1e-2)
    eq_(m.cam_parts().kind, 'CAM')
    check_weights(rec.records, hand_cam)

def test_grad_cam_on_a_vision_learner_head():
    "fastai's vision_learner head: Grad-CAM through the head only, against autograd by hand; the head's parameters get no gradient from it"
    m = SnapMix(per_sample=True)
    rec = Rec(m)
    learn = Learner(coord_dls(), learner_like(), loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    with no_random(0): learn.fit(1, lr=1e-2)
    eq_(m.cam_parts().kind, 'Grad-CAM')
    check_weights(rec.records, hand_grad_cam)
    model, x, y = learn.model, rec.records[0]['x'], rec.records[0]['y']
    model.zero_grad(set_to_none=True)
    class_maps(model, (x,), y, cam_parts(model))
    assert all(p.grad is None for p in model.parameters())

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_flat_maps_give_the_kept_areas(per_sample):
    "With a constant feature map there is no evidence anywhere: the image's weight is the share it keeps, the partner's the rest"
    model = linear_cnn(bn=False)
    for conv in (model[0][0], model[1][0]): nn.init.zeros_(conv.weight)
    nn.init.constant_(model[1][0].bias, .5) if model[1][0].bias is not None else None
    m = SnapMix(per_sample=per_sample)
    rec = Rec(m)
    learn = Learner(coord_dls(), model, loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    with no_random(0): learn.fit(1, lr=0)
    for r in rec.records:
        moved = r['perm'] != torch.arange(len(r['perm']))
        keep = (r['xm'][:, 2] == r['x'][:, 2]).flatten(1).float().mean(1)
        close_(r['lam'][moved], keep[moved]); close_(r['lam1'][moved], 1 - keep[moved])

def test_grad_cam_equals_cam_on_a_linear_head():
    "Over a rectified feature map, Grad-CAM through a linear head gives the classic CAM's normalised maps"
    model, x, y = linear_cnn(), torch.randn(6, 4, *SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    cam = class_maps(model, (x,), y, cam_parts(model))
    grad = class_maps(model, (x,), y, CamParts(model[1], None, model[2:], model[:2]))
    close_(normalise_maps(grad, SIZE), normalise_maps(cam, SIZE), eps=1e-5)
    close_(normalise_maps(cam, SIZE), hand_cam(model, x, y), eps=1e-6)

def test_per_sample_resize_is_the_batch_resize():
    "One grid_sample with a box per sample resizes as the official F.interpolate(align_corners=True) of one box"
    g = torch.Generator().manual_seed(0)
    x, perm = torch.randn(5, 3, 16, 20, generator=g), torch.tensor([1, 2, 3, 4, 0])
    box, src = (slice(2, 11), slice(5, 17)), (slice(0, 7), slice(3, 19))
    full = lambda b: ([torch.full((5,), b[0].start), torch.full((5,), b[1].start)], [torch.full((5,), b[0].stop), torch.full((5,), b[1].stop)])
    close_(resize_boxes(x, perm, *full(src), *full(box)), resize_box_into(x, perm, src, box), eps=1e-5)
    lo, hi = draw_boxes(5, (16, 20), 1., generator=g)
    out = resize_boxes(x, perm, lo, hi, lo, hi) # same boxes: a plain paste
    mask = torch.zeros(5, 16, 20, dtype=torch.bool)
    for i in range(5): mask[i, lo[0][i]:hi[0][i], lo[1][i]:hi[1][i]] = True
    close_(out, torch.where(mask[:, None], x[perm], x), eps=1e-5)

# ---- the two-weight loss ----

def test_mix_loss_lam1():
    "lam1=None is the one-weight loss; given, the hand formula, with cross-entropy's weighted mean generalised"
    g = torch.Generator().manual_seed(0)
    pred, y, perm = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([1, 0, 3, 2, 5, 4])
    lam, lam1 = torch.tensor([.9, .6, .7, .5, 1., .2]), torch.tensor([.3, .0, .1, .9, 0., .2])
    w = torch.tensor([1., 5., .2])
    for lf in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=w), CrossEntropyLossFlat(), nn.CrossEntropyLoss(reduction='sum')):
        for l in (lam, .75): eq_(mix_loss(lf, pred, (y,), (y[perm],), l, lam1=None), mix_loss(lf, pred, (y,), (y[perm],), l))
    nll, nll1 = F.cross_entropy(pred, y, reduction='none'), F.cross_entropy(pred, y[perm], reduction='none')
    close_(mix_loss(nn.CrossEntropyLoss(), pred, (y,), (y[perm],), lam, lam1=lam1), (lam * nll + lam1 * nll1).mean())
    close_(mix_loss(nn.CrossEntropyLoss(reduction='sum'), pred, (y,), (y[perm],), lam, lam1=lam1), (lam * nll + lam1 * nll1).sum())
    close_(mix_loss(nn.CrossEntropyLoss(reduction='none'), pred, (y,), (y[perm],), lam, lam1=lam1), lam * nll + lam1 * nll1)
    wy, wy1 = w[y], w[y[perm]]
    exp = (lam * wy * nll + lam1 * wy1 * nll1).sum() / ((lam * wy + lam1 * wy1).sum() * 6 / (lam + lam1).sum())
    close_(mix_loss(nn.CrossEntropyLoss(weight=w), pred, (y,), (y[perm],), lam, lam1=lam1), exp)
    for lf in (nn.CrossEntropyLoss(weight=w), nn.CrossEntropyLoss(ignore_index=1)): # lam1 = 1-lam: the one-weight normalisation
        close_(mix_loss(lf, pred, (y,), (y[perm],), lam, lam1=1 - lam), mix_loss(lf, pred, (y,), (y[perm],), lam))
    ones = torch.ones(6)
    eq_(mix_loss(nn.CrossEntropyLoss(weight=w), pred, (y,), (y[perm],), ones, lam1=0 * ones), F.cross_entropy(pred, y, weight=w)) # left alone: the loss itself

# ---- the learner contract ----

class Watch(Callback):
    "Right after the mixer's before_batch: no hook on the model, every module in training mode, BatchNorm's statistics as the spy before saw them"
    order, run_valid = SnapMix.order + 1, False
    def before_fit(self): self.n = 0
    def before_batch(self):
        model = self.learn.model
        assert all(m.training for m in model.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        now = {k: v.clone() for k, v in model.state_dict().items() if 'running' in k or 'num_batches' in k}
        eq_(set(now), set(self.learn.stats.before)); [eq_(now[k], self.learn.stats.before[k]) for k in now]
        self.n += 1

class Stats(Callback):
    "Right before the mixer: BatchNorm's statistics"
    order, run_valid = SnapMix.order - 1, False
    def before_batch(self):
        self.before = {k: v.clone() for k, v in self.learn.model.state_dict().items() if 'running' in k or 'num_batches' in k}

@pytest.mark.parametrize('model', [linear_cnn, ResNetLike, learner_like], ids=['cam', 'hook', 'grad-cam'])
def test_fit_leaves_the_learner_and_the_model_as_found(model, tmp_path):
    "A real fit: the CAM pass changes no mode, no BatchNorm statistic, leaves no hook; the loss is put back; export keeps no state"
    lf = CrossEntropyLossFlat()
    m = SnapMix()
    learn = Learner(coord_dls(), model(), loss_func=lf, cbs=[Stats(), m, Watch()])
    learn.fit(1)
    assert learn.watch.n > 0 and learn.loss_func is lf
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in learn.model.modules())
    eq_((m.perm, m.lam, m.lam1), (None, None, None))
    learn.export(tmp_path/'l.pkl')
    assert 'CamParts' not in str(pickle.dumps(m)) and load_learner(tmp_path/'l.pkl').snap_mix.lam1 is None

class CPUMixedPrecision(MixedPrecision):
    "fastai's `MixedPrecision`, autocasting on the CPU (fastai's own autocasts on CUDA only)"
    def before_fit(self):
        super().before_fit()
        self.autocast = torch.autocast('cpu', dtype=torch.bfloat16 if str(self.amp_mode).lower().endswith('bf16') else torch.float16)
        self.learn.scaler = torch.amp.GradScaler('cpu', enabled=False)

@pytest.mark.parametrize('mode,model', [('fp16', linear_cnn), ('bf16', learner_like)], ids=['cam-fp16', 'grad-cam-bf16'])
def test_autocast_cpu(mode, model):
    try:
        with torch.autocast('cpu', dtype=torch.float16 if mode == 'fp16' else torch.bfloat16): F.linear(torch.ones(1, 2), torch.ones(3, 2))
    except RuntimeError as e: pytest.skip(f'this PyTorch cannot autocast to {mode} on the CPU: {e}')
    m = SnapMix(per_sample=True)
    rec = Rec(m)
    learn = Learner(coord_dls(), model(), loss_func=CrossEntropyLossFlat(), cbs=[CPUMixedPrecision(mode), m, rec])
    learn.fit(1)
    for r in rec.records:
        assert r['lam'].dtype == torch.float32 and r['lam'].isfinite().all() and r['lam1'].isfinite().all()
        ce = F.cross_entropy(r['pred'].float(), r['y'], reduction='none'), F.cross_entropy(r['pred'].float(), r['y'][r['perm']], reduction='none')
        close_(r['loss'].float(), (r['lam'] * ce[0] + r['lam1'] * ce[1]).mean(), eps=1e-2)

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_batch_of_one(per_sample):
    "A sample is its own partner: same label, so both weights are their sum (the official rule); the loss is finite"
    m = SnapMix(per_sample=per_sample)
    rec = Rec(m)
    learn = Learner(coord_dls(n=2, bs=1), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    learn.fit(1)
    for r in rec.records:
        eq_(r['perm'], torch.tensor([0])); close_(r['lam'], r['lam1']); assert r['loss'].isfinite()

@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_in_mix_choice(per_sample):
    "MixChoice holding SnapMix passes its two weights to the loss (the other pick's partners get 1 - lam)"
    choice = MixChoice([SnapMix(), CutMix()], per_sample=per_sample)
    rec = Rec(choice)
    learn = Learner(coord_dls(n=48), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[choice, rec])
    with no_random(1): learn.fit(1)
    assert any(r['lam1'] is not None for r in rec.records)
    for r in rec.records:
        lam = torch.as_tensor(r['lam']).expand(len(r['perm']))
        lam1 = 1 - lam if r['lam1'] is None else r['lam1']
        ce = F.cross_entropy(r['pred'], r['y'], reduction='none'), F.cross_entropy(r['pred'], r['y'][r['perm']], reduction='none')
        close_(r['loss'], (lam * ce[0] + lam1 * ce[1]).mean(), eps=1e-5)

def test_cam_every():
    "cam_every=2: the batches between get the kept areas as weights, the others the maps' shares"
    m = SnapMix(cam_every=2, per_sample=True)
    rec = Rec(m)
    learn = Learner(coord_dls(n=32), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    learn.fit(1)
    for k, r in enumerate(rec.records):
        moved = r['perm'] != torch.arange(len(r['perm']))
        keep = (r['xm'][:, 2] == r['x'][:, 2]).flatten(1).float().mean(1)
        by_area = torch.allclose(r['lam'][moved], keep[moved]) and torch.allclose(r['lam1'][moved], 1 - keep[moved])
        eq_(by_area, k % 2 == 1)

def test_show_batch_titles_the_two_weights():
    "show_batch gives both weights; the model's modes, BatchNorm statistics and the random states are left as they were"
    learn = Learner(coord_dls(), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=SnapMix())
    learn.model.eval(); learn.model[0].train() # mixed modes, to see them kept
    modes, stats = [m.training for m in learn.model.modules()], copy.deepcopy(learn.model.state_dict())
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    fig = learn.snap_mix.show_batch(max_n=4, seed=0, show=False)
    titles = [ax.get_title() for ax in fig.axes]
    assert all(' + ' in t or t.isdigit() for t in titles) and any('%)' in t for t in titles)
    eq_([m.training for m in learn.model.modules()], modes)
    for k, v in learn.model.state_dict().items(): eq_(v, stats[k])
    eq_(random.getstate(), states[0]); eq_(np.random.get_state()[1], states[1]); eq_(torch.get_rng_state(), states[2])
    eq_(learn.snap_mix.lam1, None)
    fig2 = learn.snap_mix.show_batch(max_n=4, seed=0, show=False)
    eq_([ax.get_title() for ax in fig2.axes], titles) # seeded: the same batch, maps and boxes

def test_errors():
    with pytest.raises(ValueError, match='cam_every must be a positive int'): SnapMix(cam_every=0)
    with pytest.raises(TypeError, match='feature_module must be None, a module'): SnapMix(feature_module=3)
    with pytest.raises(ValueError, match='alpha must be'): SnapMix(alpha=0)
    with pytest.raises(ValueError, match=r"SnapMix\(decoupled=0.1\).*use decoupled=0 with SnapMix"): SnapMix(decoupled=.1)
    with pytest.raises(ValueError, match=r"MixChoice\(decoupled=0.1\) gives decoupled to every mixer it holds, but SnapMix"): MixChoice([SnapMix()], decoupled=.1)
    choice = MixChoice([SnapMix()])
    choice.decoupled = .1 # set after the choice was made: refused at the first batch
    learn = Learner(coord_dls(), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=choice)
    with pytest.raises(ValueError, match=r"MixChoice\(decoupled=0.1\)"): learn.fit(1)
    with pytest.raises(ValueError, match='use decoupled=0 with them'): mix_loss(nn.CrossEntropyLoss(), torch.randn(2, 3), (torch.tensor([0, 1]),), (torch.tensor([1, 0]),), torch.ones(2), decoupled=.1, lam1=torch.zeros(2))
    with pytest.raises(ValueError, match="give it to a learner"): SnapMix().show_batch(coord_dls())
    learn = synth_learner(cbs=SnapMix(), shape=(4, *SIZE), multi_label=True)
    learn.model = linear_cnn(c=4)
    with pytest.raises(TypeError, match='needs class-index targets'): learn.fit(1)
    learn = Learner(coord_dls(), nn.Sequential(nn.Flatten(), nn.Linear(4 * 144, C)), loss_func=CrossEntropyLossFlat(), cbs=SnapMix())
    with pytest.raises(ValueError, match=r'SnapMix\(feature_module=\.\.\., head=\.\.\.\)'): learn.fit(1)
    assert isinstance(learn.loss_func, CrossEntropyLossFlat)
    learn = Learner(coord_dls(), ResNetLike(), loss_func=CrossEntropyLossFlat(), cbs=SnapMix(feature_module='layer5', head='fc'))
    with pytest.raises(ValueError, match="no module of that name"): learn.fit(1)
    learn = Learner(coord_dls(), ResNetLike(), loss_func=CrossEntropyLossFlat(), cbs=SnapMix(feature_module='layer4', head='fc'))
    learn.fit(1) # named: the same parts as found
    eq_(learn.snap_mix.cam_parts().kind, 'CAM')

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
@pytest.mark.parametrize('model', [linear_cnn, learner_like], ids=['cam', 'grad-cam'])
@pytest.mark.parametrize('per_sample', [False, True], ids=['batch', 'sample'])
def test_cuda_no_host_sync(model, per_sample):
    from test_callback import fit_without_sync
    learn = Learner(coord_dls(n=48, bs=16), model(), loss_func=CrossEntropyLossFlat(), cbs=SnapMix(per_sample=per_sample))
    learn.dls.to('cuda'); learn.model.cuda()
    fit_without_sync(learn)
    learn.to_fp16()
    fit_without_sync(learn)

def test_p_and_schedules():
    "Per sample with p < 1, a sample left alone keeps its label only; a mix_p schedule reaches SnapMix (stop_pct and p=0 are MixHandler's, as for every mixer)"
    m = SnapMix(p=.5, per_sample=True)
    rec = Rec(m)
    learn = Learner(coord_dls(bs=16), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    with no_random(0): learn.fit(1)
    alone = torch.cat([((r['xm'] == r['x']).flatten(1).all(1)) for r in rec.records])
    assert 0 < alone.sum() < len(alone)
    eq_(torch.cat([r['lam'] for r in rec.records])[alone], torch.ones(int(alone.sum())))
    eq_(torch.cat([r['lam1'] for r in rec.records])[alone], torch.zeros(int(alone.sum())))
    from fastai.callback.schedule import ParamScheduler, SchedLin
    m = SnapMix(); rec = Rec(m)
    learn = Learner(coord_dls(), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=[m, rec])
    learn.fit(1, cbs=ParamScheduler({'mix_p': SchedLin(0., 0.)}))
    eq_([r['lam'] for r in rec.records], [None] * 2)

def test_snapmix_in_the_demo(tmp_path):
    "`--mix snapmix` runs in the demo's paired experiment (the small CNN), with its picture titled with both weights"
    from fastai_mix.demo import main
    main(['demo', '--epochs', '1', '--n-train', '64', '--size', '16', '--bs', '32', '--jobs', '1', '--seeds', '1', '--noise', '0.25',
          '--mix', 'snapmix', '--out', str(tmp_path)])
    import json
    res = json.loads((tmp_path/'results.json').read_text())
    eq_([r['mixer'] for r in res['runs']], ['snapmix'])
    assert 0 <= res['runs'][0]['accuracy'] <= 1 and (tmp_path/'batch_snapmix.png').stat().st_size > 1000

@pytest.mark.parametrize('per_sample', [False, True])
def test_partner_policies(per_sample):
    "partner='same_class' pairs within a class, the lone samples left alone (weights 1 and 0, pixels as they were); remix is refused"
    m = SnapMix(per_sample=per_sample, partner='same_class')
    learn = Learner(coord_dls(), linear_cnn(), loss_func=CrossEntropyLossFlat(), cbs=m)
    rec = Rec(m); learn.add_cb(rec)
    with no_random(0): learn.fit(1, lr=0)
    for r in rec.records:
        y, perm, alone = r['y'], r['perm'], r['perm'] == torch.arange(len(r['perm']))
        eq_(y[perm], y)
        for i in alone.nonzero().flatten().tolist():
            assert (y == y[i]).sum() == 1 # the only one of its class in the batch
            eq_(r['lam'][i].item(), 1.); eq_(r['lam1'][i].item(), 0.); eq_(r['xm'][i], r['x'][i])
    with pytest.raises(ValueError, match=r'remix=None'): SnapMix(remix=(3, .5))
