"""The fused kernels of `fastai_mix.kernels` against the PyTorch path of `fastai_mix.core`, bit for bit
(the comparison has 0 tolerance; it takes any NaN for NaN, and 0.0 for -0.0, as `torch.equal` does).

On the CPU the kernels run under Triton's interpreter. It must be switched on (TRITON_INTERPRET=1)
before triton is imported, and it would then stay on for every test that follows, so this process
never switches it on: `test_interpreter` runs this file again in a child process with it set, and
there (`CHILD`) the interpreter tests below are defined and run. The tests marked `cuda` run the
compiled kernels in this process, on the GPU.
"""
import os, re, subprocess, sys
from pathlib import Path
import pytest, torch
from fastcore.test import test_eq as eq_

triton = pytest.importorskip('triton', reason='the fused kernels need Triton')
CHILD = os.environ.get('TRITON_INTERPRET') == '1'

from fastai_mix import core
from fastai_mix.core import lerp_mix, paste_box, paste_boxes, draw_boxes, boxes_mask, mixup, cutmix
from fastai_mix import kernels as K
from fastai_mix.kernels import fused_lerp_mix, fused_paste_box, fused_paste_boxes, use_fused_kernels, why_not_fused

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, layout): 1 to 3 spatial dims, contiguous and channels last ('cl1' is a signal stored (N, L, C))
LAYOUTS = {'1d': ((5, 3, 11), None), 'cl1': ((5, 3, 11), 'cl1'), '2d': ((5, 3, 6, 7), None), 'cl2': ((5, 3, 6, 7), torch.channels_last),
           '3d': ((5, 2, 3, 4, 5), None), 'cl3': ((5, 2, 3, 4, 5), torch.channels_last_3d)}

def batch(shape, layout, dtype, device='cpu', seed=0):
    "A seeded batch of `shape` in `layout`"
    g = torch.Generator().manual_seed(seed)
    if layout == 'cl1': return torch.randn(shape[0], shape[2], shape[1], generator=g).to(dtype).permute(0, 2, 1).to(device)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    return x if layout is None else x.contiguous(memory_format=layout)

def same(a, b):
    "Equal values (0 tolerance, NaN where NaN), with the same dtype, shape, strides (memory format) and type"
    assert type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), (type(a), a.dtype, a.stride(), type(b), b.dtype, b.stride())
    torch.testing.assert_close(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor), rtol=0, atol=0, equal_nan=True)

def shares(n, seed=1, device='cpu'):
    "MixUp shares (>= 0.5), with the special ones: 1 (a sample left alone), 0.5 (the branch edge), 0.3 (lerp's other branch)"
    lam = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    lam = torch.maximum(lam, 1 - lam)
    lam[:3] = torch.tensor([1., .5, .3])
    return lam.to(device)

def check_kernels(x, perm, g, box=None):
    "Each kernel against the PyTorch path on `x`: the blend (per-sample and one share), the paste into a new tensor and in place, the per-sample paste"
    size, lam = x.shape[2:], shares(len(x), device=x.device)
    xi = x.clone(memory_format=torch.preserve_format) # infinities in a sample left alone (share 1) and in a mixed one
    xi[0][(0,) * (x.ndim - 1)], xi[0][(1,) * (x.ndim - 1)], xi[3][(0,) * (x.ndim - 1)] = float('inf'), -float('inf'), float('inf')
    for exact in (True, False): same(fused_lerp_mix(xi, perm, lam, exact), lerp_mix(xi, perm, lam, exact))
    same(fused_lerp_mix(x, perm, .7), lerp_mix(x, perm, .7))
    same(fused_lerp_mix(x, perm, 1.), lerp_mix(x, perm, 1.))
    box = box or tuple(slice(1, s - 1) if s > 2 else slice(0, s) for s in size)
    same(fused_paste_box(x, perm, box), paste_box(x, perm, box))
    xa, xb = x.clone(memory_format=torch.preserve_format), x.clone(memory_format=torch.preserve_format)
    res = fused_paste_box(xa, perm, box, inplace=True)
    assert res is xa
    same(xa, paste_box(xb, perm, box, inplace=True))
    lo, hi = draw_boxes(len(x), size, device=x.device, generator=g)
    mask = boxes_mask(lo, hi, size)
    same(fused_paste_boxes(x, perm, mask), paste_boxes(x, perm, mask))

class count_kernels:
    "Turn the fused kernels on and count, per core function, the calls a kernel took (a hook that returns None left it to PyTorch)"
    def __enter__(self):
        self.ctx = use_fused_kernels().__enter__()
        self.n = {k: 0 for k in core._fused}
        def counted(k, f):
            def g(*args):
                res = f(*args)
                self.n[k] += res is not None
                return res
            return g
        self.hooks = dict(core._fused)
        core._fused.update({k: counted(k, f) for k, f in self.hooks.items()})
        return self
    def __exit__(self, *exc): self.ctx.__exit__(*exc); core._fused.update(self.hooks)

if CHILD: # ---------------------------------------------------------------- under the interpreter, on the CPU
    import numpy as np
    from triton.runtime import interpreter as _interp
    assert triton.knobs.runtime.interpret and K._interpreting()

    # The interpreter evaluates tl.fma as a*b + c in float32, rounding twice; a GPU rounds once, as PyTorch's lerp does on the
    # CPU (vectorised fmadd) and on CUDA. For a bit-for-bit comparison the interpreter gets a correctly rounded fma: the exact
    # float64 product and sum, rounded to odd (which makes the second rounding, to float32, exact).
    def _fma32(a, b, c):
        a, b, c = (np.asarray(t, np.float64) for t in (a, b, c))
        p = a * b # exact: 24 + 24 bits
        s = p + c
        bp = s - p
        err = (p - (s - bp)) + (c - bp) # what s lost (TwoSum)
        s = np.where((err != 0) & (s.view(np.int64) & 1 == 0), np.nextafter(s, np.where(err > 0, np.inf, -np.inf)), s)
        return s.astype(np.float32)
    _create_fma = _interp.InterpreterBuilder.create_fma
    def _exact_fma(self, x, y, z):
        return _interp.TensorHandle(_fma32(x.data, y.data, z.data), z.dtype.scalar) if z.data.dtype == np.float32 else _create_fma(self, x, y, z)
    _interp.InterpreterBuilder.create_fma = _exact_fma

    def test_exact_fma_is_pytorchs_lerp():
        "The fma given to the interpreter is what PyTorch's lerp computes on this CPU (and the plain a*b + c is not, so the test can tell)"
        g = torch.Generator().manual_seed(0)
        a, b, w = torch.randn(1000, generator=g), torch.randn(1000, generator=g), torch.rand(1000, generator=g) * .5 + .5
        ref = a.clone().lerp_(b, w)
        d = (b - a).numpy()
        assert np.array_equal(_fma32((w - 1).numpy(), d, b.numpy()), ref.numpy())
        assert not np.array_equal((w - 1).numpy() * d + b.numpy(), ref.numpy())

    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    @pytest.mark.parametrize('layout', LAYOUTS)
    def test_kernels_match_pytorch(layout, dtype):
        shape, fmt = LAYOUTS[layout]
        x, g = batch(shape, fmt, dtype), torch.Generator().manual_seed(2)
        check_kernels(x, torch.randperm(len(x), generator=g), g)

    @pytest.mark.parametrize('layout', ['2d', 'cl2'])
    def test_kernels_take_non_permutations(layout):
        "Partners drawn by a policy (issue 23) are not a permutation: repeats, a fixed point, samples nobody takes; the kernels give the PyTorch path's bits"
        shape, fmt = LAYOUTS[layout]
        x, g = batch(shape, fmt, torch.float32), torch.Generator().manual_seed(3)
        check_kernels(x, torch.tensor([0, 0, 3, 1, 1]), g)

    def test_mixers_with_a_policy_through_the_kernels():
        "mixup and cutmix with partner='same_class' go through the kernels, and match the PyTorch path"
        x, y = batch((6, 3, 6, 7), None, torch.float32), torch.tensor([0, 0, 0, 1, 1, 2])
        for f, kw in ((mixup, {}), (cutmix, {}), (cutmix, dict(per_sample=True))):
            ref = f(x, y=y, partner='same_class', generator=torch.Generator().manual_seed(0), **kw)
            with count_kernels() as c: got = f(x, y=y, partner='same_class', generator=torch.Generator().manual_seed(0), **kw)
            assert sum(c.n.values()) >= 1, c.n
            eq_(got[1], ref[1]); same(got[0][0], ref[0][0])
            eq_(got[0][0][5], x[5]) # the lone sample of class 2: left alone

    @pytest.mark.parametrize('layout', ['2d', 'cl2'])
    def test_boxes_at_the_edges(layout):
        "Whole, empty, border-touching and one-pixel boxes, and `slice(None)`"
        x, g = batch(*LAYOUTS[layout], torch.float32), torch.Generator().manual_seed(3)
        perm = torch.randperm(len(x), generator=g)
        for box in [(slice(0, 6), slice(0, 7)), (slice(None), slice(2, 3)), (slice(5, 6), slice(0, 1)), (slice(0, 1), slice(6, 7))]:
            check_kernels(x, perm, g, box)
        empty = (slice(2, 2), slice(0, 7))
        res = fused_paste_box(x, perm, empty)
        assert res is not x; same(res, x)
        assert fused_paste_box(x, perm, empty, inplace=True) is x

    def test_masks_and_other_dtypes():
        "The pastes move bits: masks of class indices (int64), bool masks, float64"
        g = torch.Generator().manual_seed(4)
        perm = torch.randperm(5, generator=g)
        box = (slice(1, 4), slice(2, 6))
        lo, hi = draw_boxes(5, (6, 7), generator=g)
        mask = boxes_mask(lo, hi, (6, 7))
        for m in (torch.randint(0, 9, (5, 6, 7), generator=g), torch.rand(5, 6, 7, generator=g) > .5, torch.rand(5, 2, 6, 7, generator=g).double()):
            same(fused_paste_box(m, perm, box), paste_box(m, perm, box))
            same(fused_paste_box(m.clone(), perm, box, inplace=True), paste_box(m.clone(), perm, box, inplace=True))
            same(fused_paste_boxes(m, perm, mask), paste_boxes(m, perm, mask))

    def test_fastai_tensor_types():
        "A fastai TensorImage stays one, as through the PyTorch path"
        from fastai.torch_core import TensorImage
        x, g = TensorImage(batch((4, 3, 6, 6), None, torch.float32)), torch.Generator().manual_seed(5)
        check_kernels(x, torch.randperm(4, generator=g), g)

    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    def test_mixers_through_the_kernels(dtype):
        "mixup and cutmix (per batch, in place, per sample, with a mask target) give the same bits with the kernels on, and the kernels ran"
        x, y = batch((6, 3, 8, 10), torch.channels_last, dtype), torch.randint(0, 4, (6, 8, 10), generator=torch.Generator().manual_seed(6))
        calls = [(mixup, dict(alpha=.4)), (mixup, dict(alpha=.4, p=.5)), (cutmix, dict(y=y)), (cutmix, dict(y=y, inplace=True)),
                 (cutmix, dict(y=y, per_sample=True)), (cutmix, dict(minmax=(.2, .6)))]
        for f, kw in calls:
            def run(): # fresh copies: in place writes them
                xi, yi = x.clone(memory_format=torch.preserve_format), y.clone()
                return f(xi, generator=torch.Generator().manual_seed(7), **{**kw, 'y': yi} if 'y' in kw else kw)
            ref = run()
            with count_kernels() as c: res = run()
            assert sum(c.n.values()) >= 1, (f.__name__, kw)
            for a, b in zip(res[0] if 'y' in kw else (res[0],), ref[0] if 'y' in kw else (ref[0],)): same(a, b)
            same(res[1], ref[1])
            if isinstance(ref[2], torch.Tensor): same(res[2], ref[2])
            else: assert res[2] == ref[2]
        with count_kernels() as c: mixup(x, y=torch.rand(6, 4))
        assert c.n['lerp_mix'] == 2 # the inputs, and the dense targets

    def test_left_to_pytorch():
        "What the kernels do not take goes to the PyTorch path, and the fused functions say why"
        x, perm = batch((4, 3, 6, 8), None, torch.float32), torch.randperm(4, generator=torch.Generator().manual_seed(8))
        box, lam = (slice(1, 3), slice(2, 6)), torch.full((4,), .7)
        mask = boxes_mask(*draw_boxes(4, (6, 8), generator=torch.Generator().manual_seed(9)), (6, 8))
        strided, xg = x[..., ::2], x.clone().requires_grad_()
        assert 'dense block' in why_not_fused(strided, perm) and 'requires grad' in why_not_fused(xg, perm)
        assert why_not_fused(x, perm[:3]).startswith('perm must be')
        with pytest.raises(ValueError, match='fused_lerp_mix cannot take this input: each sample of x must be one dense block'): fused_lerp_mix(strided, perm, lam)
        with pytest.raises(ValueError, match='float32, float16 or bfloat16'): fused_lerp_mix(x.double(), perm, lam)
        with pytest.raises(ValueError, match='step 1'): fused_paste_box(x, perm, (slice(0, 6, 2), slice(0, 8)))
        with pytest.raises(ValueError, match='mask must be boolean'): fused_paste_boxes(x, perm, mask.float())
        ref = lerp_mix(strided, perm, lam)
        with count_kernels() as c:
            same(lerp_mix(strided, perm, lam), ref)
            assert lerp_mix(xg, perm, lam, exact=False).requires_grad # (the PyTorch path's exact pass writes with out=, which autograd refuses)
            assert c.n['lerp_mix'] == 0
            with torch.no_grad(): lerp_mix(xg, perm, lam) # no autograd to record: the kernel takes it
            assert c.n['lerp_mix'] == 1

    def test_inplace_batch_limit(monkeypatch):
        "A batch larger than one in-place program holds goes to the PyTorch path"
        monkeypatch.setattr(K, '_MAX_INPLACE', 4)
        x, perm = batch((5, 3, 6, 7), None, torch.float32), torch.randperm(5, generator=torch.Generator().manual_seed(10))
        box = (slice(1, 4), slice(2, 6))
        with pytest.raises(ValueError, match='at most 4 samples'): fused_paste_box(x.clone(), perm, box, inplace=True)
        with count_kernels() as c: same(paste_box(x.clone(), perm, box, inplace=True), paste_box(x.clone(), perm, box, inplace=True))
        assert c.n['paste_box'] == 0

    def test_perm_with_any_strides():
        "A partner index that is a strided view (a column of an (n, 2) tensor) picks the right partners, through the fused functions and the core's"
        x, g = batch((5, 3, 6, 7), torch.channels_last, torch.float32), torch.Generator().manual_seed(11)
        idx = torch.stack([torch.randperm(5, generator=g), torch.randperm(5, generator=g)], 1)
        for perm in (idx[:, 1], idx.int()[:, 1], idx.repeat(1, 2)[:, 3]):
            assert not perm.is_contiguous() and why_not_fused(x, perm) is None
            check_kernels(x, perm, g)
            lam, box, mask = shares(5), (slice(1, 4), slice(2, 6)), boxes_mask(*draw_boxes(5, (6, 7), generator=g), (6, 7))
            calls = [(lerp_mix, (x, perm, lam)), (lerp_mix, (x, perm, .7)), (paste_box, (x, perm, box)), (paste_boxes, (x, perm, mask))]
            refs = [f(*a) for f, a in calls] + [paste_box(x.clone(), perm, box, inplace=True)]
            with count_kernels() as c:
                for (f, a), ref in zip(calls, refs): same(f(*a), ref)
                same(paste_box(x.clone(), perm, box, inplace=True), refs[-1])
            eq_(c.n, {'lerp_mix': 2, 'paste_box': 2, 'paste_boxes': 1})

    @pytest.mark.parametrize('bad', [5, 9, -1, -5])
    def test_partner_out_of_range(bad):
        "A partner index out of range raises IndexError, as on the PyTorch path, instead of reading outside the batch"
        x, g = batch((5, 3, 6, 7), None, torch.float32), torch.Generator().manual_seed(12)
        lam, box, mask = shares(5), (slice(1, 4), slice(2, 6)), boxes_mask(*draw_boxes(5, (6, 7), generator=g), (6, 7))
        for dt in (torch.int64, torch.int32):
            perm = torch.tensor([3, 4, 1, bad, 2], dtype=dt) # sample 3 (share > 0.5, not 1) has no partner
            msg = re.escape(f'perm must hold partner indices in [0, 5), got [{bad}]')
            for f, a in [(fused_lerp_mix, (x, perm, lam)), (fused_lerp_mix, (x, perm, .7)), (fused_paste_box, (x, perm, box)),
                         (fused_paste_box, (x.clone(), perm, box, True)), (fused_paste_box, (x.clone(), perm, (slice(2, 2), slice(0, 7)))),
                         (fused_paste_boxes, (x, perm, mask))]:
                with pytest.raises(IndexError, match=msg): f(*a)
            calls = [(lerp_mix, (x, perm, lam)), (lerp_mix, (x, perm, .7)), (paste_box, (x, perm, box)), (paste_box, (x.clone(), perm, box, True)),
                     (paste_boxes, (x, perm, mask))]
            for f, a in calls: # the PyTorch path raises (x[perm], index_select), and so do the kernels
                with pytest.raises(IndexError): f(*a)
            with count_kernels():
                for f, a in calls:
                    with pytest.raises(IndexError, match=msg): f(*a)
            alone = torch.tensor([1., .6, .7, 1., .8]) # a sample of share 1 does not read its partner, on either path
            ref = lerp_mix(x, perm, alone)
            with count_kernels() as c: same(lerp_mix(x, perm, alone), ref)
            assert c.n['lerp_mix'] == 1
            same(fused_lerp_mix(x, perm, 1.), x) # nor does a share of 1 for all

    def test_on_in_one_thread_only():
        "A `with` block turns the kernels on in its own thread: another thread's mixing keeps the PyTorch path"
        import threading
        x, perm = batch((4, 3, 6, 8), None, torch.float32), torch.randperm(4, generator=torch.Generator().manual_seed(13))
        ref, inside, leave, counts = lerp_mix(x, perm, .7), threading.Event(), threading.Event(), []
        def other():
            with count_kernels() as c:
                inside.set(); leave.wait(10)
                same(lerp_mix(x, perm, .7), ref)
            counts.append(c.n)
        t = threading.Thread(target=other); t.start()
        try:
            assert inside.wait(10) and not K.fused_kernels_on()
            same(lerp_mix(x, perm, .7), ref) # this thread has no block: the default (off)
        finally: leave.set(); t.join(10)
        assert counts == [{'lerp_mix': 1, 'paste_box': 0, 'paste_boxes': 0}], counts # the other thread's call only
        assert not K.fused_kernels_on()

else: # ---------------------------------------------------------------- this process: the interpreter in a child, CUDA here
    @pytest.mark.slow
    def test_interpreter():
        "The interpreter tests of this file, in a child process with TRITON_INTERPRET=1 (it must be set before triton is imported)"
        root = Path(__file__).parents[1]
        env = {**os.environ, 'TRITON_INTERPRET': '1', 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
        env.pop('PYTEST_ADDOPTS', None)
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-m', 'not cuda', __file__],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-6000:]
        m = re.search(r'(\d+) passed', out)
        assert m and int(m.group(1)) >= 20 and 'skipped' not in out, out[-3000:]

    def test_off_by_default():
        "The PyTorch path is the default: nothing routes through the kernels until asked"
        assert core._fused == {} and not K.fused_kernels_on()

    def test_blocks_ending_out_of_order():
        "Two `with` blocks that end in the other order than they began: the kernels are off once both have ended"
        a = use_fused_kernels(); a.__enter__()
        b = use_fused_kernels(); b.__enter__()
        try:
            assert K.fused_kernels_on()
            a.__exit__(None, None, None); assert K.fused_kernels_on() # b has not ended
            b.__exit__(None, None, None); assert not K.fused_kernels_on()
            a = use_fused_kernels(); a.__enter__()
            b = use_fused_kernels(False); b.__enter__(); assert not K.fused_kernels_on() # the newest block decides
            a.__exit__(None, None, None); assert not K.fused_kernels_on()
            b.__exit__(None, None, None); assert not K.fused_kernels_on()
            use_fused_kernels() # on from now on: the blocks come back to it
            a = use_fused_kernels(False); a.__enter__()
            b = use_fused_kernels(); b.__enter__()
            a.__exit__(None, None, None); assert K.fused_kernels_on()
            b.__exit__(None, None, None); assert K.fused_kernels_on()
            with use_fused_kernels(False): assert not K.fused_kernels_on()
            assert K.fused_kernels_on()
        finally:
            use_fused_kernels(False)
        assert not K.fused_kernels_on()

    def test_blocks_in_two_threads():
        "A `with` block in each of two threads, ended in the order they began: each thread sees its own, the others the default (off)"
        import threading
        both_in, checked, seen = threading.Barrier(3, timeout=10), threading.Barrier(3, timeout=10), {}
        def first():
            with use_fused_kernels():
                seen['first'] = K.fused_kernels_on()
                both_in.wait(); checked.wait()
        def second(t):
            with use_fused_kernels():
                seen['second'] = K.fused_kernels_on()
                both_in.wait(); checked.wait()
                t.join(10) # the first block ends before this one
                seen['second, after the first ended'] = K.fused_kernels_on()
        t1 = threading.Thread(target=first); t2 = threading.Thread(target=second, args=(t1,))
        t1.start(); t2.start()
        both_in.wait()
        seen['main'] = K.fused_kernels_on()
        checked.wait()
        t2.join(10)
        assert seen == {'first': True, 'second': True, 'main': False, 'second, after the first ended': True}, seen
        assert not K.fused_kernels_on()

    def test_the_default_holds_in_every_thread():
        "`use_fused_kernels()` as a call sets the default for the process, which a new thread sees"
        import threading
        seen = []
        try:
            use_fused_kernels()
            t = threading.Thread(target=lambda: seen.append(K.fused_kernels_on())); t.start(); t.join(10)
            use_fused_kernels(False)
            t = threading.Thread(target=lambda: seen.append(K.fused_kernels_on())); t.start(); t.join(10)
        finally: use_fused_kernels(False)
        assert seen == [True, False] and not K.fused_kernels_on()

    # The interpreter does not check what only the GPU compiler checks (types, layouts, the barrier): each kernel is compiled
    # here, without a GPU, for an H100 (sm_90) by Triton's own compiler and ptxas, and its PTX is read.
    I32 = lambda names: {n: 'i32' for n in names.split()}
    VARIANTS = {
        'lerp-bf16': (lambda: K._lerp_kernel, dict(x='*bf16', perm='*i64', lam='*fp32', out='*bf16', w='fp32', **I32('M n_jb')),
                      dict(PER_SAMPLE=True, EXACT=True, KIND=2, BLOCK=1024), ['fma.rn.f32']),
        'lerp-fp16-float': (lambda: K._lerp_kernel, dict(x='*fp16', perm='*i64', lam='*fp16', out='*fp16', w='fp32', **I32('M n_jb')),
                            dict(PER_SAMPLE=False, EXACT=False, KIND=1, BLOCK=1024), ['fma.rn.f32']),
        'lerp-fp32': (lambda: K._lerp_kernel, dict(x='*fp32', perm='*i64', lam='*fp32', out='*fp32', w='fp32', **I32('M n_jb')),
                      dict(PER_SAMPLE=True, EXACT=False, KIND=0, BLOCK=1024), ['fma.rn.f32']),
        'paste': (lambda: K._paste_kernel, dict(x='*i32', perm='*i64', out='*i32', mask='*i32', **I32('M R L S1 S2 LO0 HI0 LO1 HI1 LO2 HI2 LO3 HI3 MS MS0 MS1 MS2 MSL n_rb n_lb')),
                  dict(MASKED=False, INNER=1, BLOCK_R=16, BLOCK_L=256), []),
        'paste-mask': (lambda: K._paste_kernel, dict(x='*i16', perm='*i64', out='*i16', mask='*u8', **I32('M R L S1 S2 LO0 HI0 LO1 HI1 LO2 HI2 LO3 HI3 MS MS0 MS1 MS2 MSL n_rb n_lb')),
                       dict(MASKED=True, INNER=3, BLOCK_R=16, BLOCK_L=256), []),
        'paste-inplace': (lambda: K._paste_inplace_kernel, dict(x='*i32', perm='*i64', **I32('N M B1 B2 LO0 LO1 LO2 ST0 ST1 ST2 LOL W n_jb')),
                          dict(BLOCK_N=64, BLOCK_J=128), ['bar.sync']),
    }

    @pytest.mark.parametrize('variant', VARIANTS)
    def test_kernels_compile_for_the_gpu(variant, monkeypatch, tmp_path):
        "Each kernel compiles for sm_90; the blend has its single-rounding fma, the in-place paste its barrier"
        from triton.compiler import ASTSource
        from triton.backends.compiler import GPUTarget
        monkeypatch.setenv('TRITON_CACHE_DIR', str(tmp_path)) # nothing lands in $HOME
        fn, sig, const, expect = VARIANTS[variant]
        k = triton.compile(ASTSource(fn(), {**sig, **{c: 'constexpr' for c in const}}, const), target=GPUTarget('cuda', 90, 32))
        assert k.asm.get('cubin'), 'ptxas made no binary'
        for e in expect: assert e in k.asm['ptx'], e

    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

    @pytest.mark.cuda
    @cuda
    @pytest.mark.parametrize('dtype', DTYPES, ids=str)
    @pytest.mark.parametrize('layout', LAYOUTS)
    def test_cuda_kernels_match_pytorch(layout, dtype):
        "The compiled kernels, on the test shapes and on a training-size batch, bit for bit"
        shape, fmt = LAYOUTS[layout]
        g = torch.Generator('cuda').manual_seed(0)
        for n, scale in ((5, 1), (64, 4)):
            x = batch((n, shape[1], *[s * scale for s in shape[2:]]), fmt, dtype, 'cuda')
            check_kernels(x, torch.randperm(n, device='cuda', generator=g), g)

    @pytest.mark.cuda
    @cuda
    @pytest.mark.parametrize('n', [1, 257, 2048])
    def test_cuda_inplace_whole_batch(n):
        "The in-place paste with one program per stretch of the box: partners read before written, at any batch size it takes"
        x = batch((n, 3, 20, 24), torch.channels_last, torch.bfloat16, 'cuda')
        perm = torch.randperm(n, device='cuda', generator=torch.Generator('cuda').manual_seed(1))
        box = (slice(3, 17), slice(0, 19))
        same(fused_paste_box(x.clone(), perm, box, inplace=True), paste_box(x.clone(), perm, box, inplace=True))

    @pytest.mark.cuda
    @cuda
    def test_cuda_mixers_through_the_kernels():
        "The callbacks' functions on the GPU: the same bits with the kernels on, and the kernels ran"
        x = batch((32, 3, 64, 64), torch.channels_last, torch.bfloat16, 'cuda')
        for f, kw in [(mixup, {}), (cutmix, {}), (cutmix, dict(per_sample=True))]:
            ref = f(x, generator=torch.Generator('cuda').manual_seed(0), **kw)
            with count_kernels() as c: res = f(x, generator=torch.Generator('cuda').manual_seed(0), **kw)
            assert sum(c.n.values()) == 1
            same(res[0], ref[0])
