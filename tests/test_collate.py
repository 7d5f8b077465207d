"`MixCollate`, the `collate_fn` that mixes in a plain PyTorch `DataLoader`: labels made soft, masks, its generator in worker processes (forked and spawned)"
import multiprocessing
from functools import partial
import pytest, torch, torch.nn.functional as F
from fastcore.test import test_close as close_, test_eq as eq_
from torch.utils.data import DataLoader, TensorDataset
from fastai_mix.core import mixup, cutmix, resizemix, MixCollate

def gen(seed=0, device='cpu'): return torch.Generator(device).manual_seed(seed)

def test_mixcollate():
    "Labels made soft in forked workers, mixup's (x, y, y[perm], lam), masks pasted as they are"
    ds = TensorDataset(torch.rand(64, 3, 16, 16), torch.randint(0, 10, (64,)))
    for kw in [dict(), dict(per_sample=True), dict(mix=resizemix, p=.5)]:
        for x, y in DataLoader(ds, batch_size=16, collate_fn=MixCollate(num_classes=10, **kw), num_workers=2):
            eq_(y.shape, (16, 10)); close_(y.sum(1), torch.ones(16))
    x, y, y1, lam = next(iter(DataLoader(ds, batch_size=16, collate_fn=MixCollate(mixup))))
    eq_(x.shape, (16, 3, 16, 16)); eq_(lam.shape, (16,)); eq_(sorted(y1.tolist()), sorted(y.tolist()))
    seg = TensorDataset(torch.rand(32, 3, 8, 8), torch.randint(0, 3, (32, 8, 8)))
    x, m = next(iter(DataLoader(seg, batch_size=8, collate_fn=MixCollate())))
    eq_(m.shape, (8, 8, 8))

# ---- its generator in worker processes ----

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

@pytest.mark.slow
def test_mixcollate_spawned_workers():
    """Workers started by spawn (macOS, Windows, notebook runners) get the generator too (given to MixCollate and inside
    a partial), and draw differently, reproducibly: exactly what forked workers draw, which the test above finds
    reproducible. A spawned worker that lost the generator would draw from its own global stream, which differs; one
    that could not rebuild it would fail. (One spawned run, held to a forked one: spawning costs two fresh processes.)"""
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    def run(ctx): return [lam for x, y, y1, lam in DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=ctx, generator=gen(0),
                                                               collate_fn=MixCollate(partial(mixup, alpha=.4, generator=gen(1)), generator=gen(0)))]
    a = run('spawn')
    assert not torch.equal(a[0], a[1])
    b = run('fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
    eq_(len(a), len(b))
    for la, lb in zip(a, b): eq_(la, lb)

def test_mixcollate_generator_in_partial():
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    dl = DataLoader(ds, batch_size=8, num_workers=2, generator=gen(0), collate_fn=MixCollate(partial(mixup, generator=gen(0))))
    lams = [lam for x, y, y1, lam in dl]
    assert not torch.equal(lams[0], lams[1])

def test_mixcollate_main_process_uses_generator():
    "Without workers the generator is used as given: the first batch is its first draw"
    ds = TensorDataset(torch.rand(32, 3, 8, 8), torch.arange(32))
    lams = [lam for x, y, y1, lam in DataLoader(ds, batch_size=8, collate_fn=MixCollate(mixup, generator=gen(3)))]
    eq_(lams[0], mixup(ds.tensors[0][:8], generator=gen(3))[2])

# ---- num_classes: (N, 1) labels one-hot, int one-hot labels taken as they are ----

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
