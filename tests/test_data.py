"fastai_mix.data: IDX files, the search for Fashion-MNIST and its error message, and fastai batches of images held in memory"
import gzip, struct
import numpy as np, pytest, torch
from pathlib import Path
from fastcore.test import test_eq as eq_, test_fail as fail_
from fastai.torch_core import set_seed, TensorImage, TensorCategory
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai_mix import data as D
from fastai_mix.data import (read_idx, write_idx, idx_files, find_fashion_mnist, load_fashion_mnist, DataNotFoundError,
                             FASHION_MNIST_FILES, FASHION_MNIST_CLASSES, ArrayImages, array_dls)
from fastai_mix.callback import CutMix

def idx_bytes(a:np.ndarray, code:int) -> bytes:
    "An IDX file written by hand, as LeCun's page describes it: 0, 0, type code, number of dimensions, big-endian sizes, big-endian values"
    return struct.pack('>BBBB', 0, 0, code, a.ndim) + struct.pack(f'>{a.ndim}I', *a.shape) + a.astype(a.dtype.newbyteorder('>')).tobytes()

@pytest.mark.parametrize('gz', [False, True])
@pytest.mark.parametrize('a,code', [(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08), (np.array([7, 0, 9], dtype=np.uint8), 0x08),
                                    (np.array([[-3, 70000]], dtype=np.int32), 0x0C), (np.array([1.5, -2.25], dtype=np.float32), 0x0D),
                                    (np.array([-1, 2], dtype=np.int16), 0x0B), (np.array([0.1], dtype=np.float64), 0x0E)])
def test_read_idx(tmp_path, a, code, gz):
    raw = idx_bytes(a, code)
    f = tmp_path/'a-idx'
    f.write_bytes(gzip.compress(raw) if gz else raw) # gzipped or not whatever the name: told by the first bytes
    got = read_idx(f)
    eq_(got.dtype, a.dtype.newbyteorder('='))
    eq_(got, a)
    eq_(read_idx(write_idx(a, tmp_path/('w.gz' if gz else 'w'))), a)
    if not gz: eq_((tmp_path/'w').read_bytes(), raw) # write_idx writes what the format says

def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.zeros((3, 2, 2), np.uint8), 0x08)
    cases = {'png': (b'\x89PNG\r\n\x1a\n', 'is not an IDX file: it starts with 89504e47'),
             'type': (b'\0\0\x07\x01' + good[4:], 'is not an IDX file'),
             'empty': (b'', 'is not an IDX file: it starts with nothing'),
             'dims': (good[:6], 'is truncated: its magic number announces 3 dimensions'),
             'short': (good[:-1], 'holds 11 bytes of data where its header announces 12 (shape (3, 2, 2) of uint8): the file is truncated'),
             'long': (good + b'\0', 'the file is longer than its header says'),
             'gzip': (gzip.compress(good)[:-8], 'is a damaged gzip file')}
    for name, (content, msg) in cases.items():
        (tmp_path/name).write_bytes(content)
        fail_(read_idx, args=(tmp_path/name,), contains=msg)
        fail_(read_idx, args=(tmp_path/name,), contains=str(tmp_path/name))
    fail_(read_idx, args=(tmp_path/'missing',), contains='no IDX file at', exc=FileNotFoundError)
    fail_(write_idx, args=(np.zeros(2, np.int64), tmp_path/'x'), contains='got int64')

def write_fashion(folder:Path, n:int=(6, 4), gz:bool=True, seed:int=0) -> Path:
    "Fashion-MNIST's four files with `n` random training and test images, in `folder`"
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in zip(('train', 'test'), n):
        write_idx(rng.integers(0, 256, (k, 28, 28), dtype=np.uint8), folder/(FASHION_MNIST_FILES[f'{split}_images'] + '.gz' * gz))
        write_idx(np.arange(k, dtype=np.uint8) % 10, folder/(FASHION_MNIST_FILES[f'{split}_labels'] + '.gz' * gz))
    return folder

@pytest.fixture
def places(tmp_path, monkeypatch):
    "Debian's folder and fastai's home moved into `tmp_path`, and a download that fails as with no network"
    debian, home = tmp_path/'debian', tmp_path/'fastai_home'
    monkeypatch.setattr(D, 'DEBIAN_FASHION_MNIST', debian)
    monkeypatch.setenv('FASTAI_HOME', str(home))
    calls = []
    def no_network(root): calls.append(Path(root)); raise OSError('<urlopen error [Errno -2] Name or service not known>')
    monkeypatch.setattr(D, 'download_fashion_mnist', no_network)
    return debian, home/'data', calls

def test_search_order(tmp_path, places):
    debian, fastai_data, calls = places
    tv = write_fashion(fastai_data/'FashionMNIST'/'raw', gz=False) # torchvision's layout under fastai's folder, raw files
    eq_(find_fashion_mnist()['train_images'], tv/'train-images-idx3-ubyte')
    write_fashion(debian) # Debian's package comes first
    eq_(find_fashion_mnist()['test_labels'], debian/'t10k-labels-idx1-ubyte.gz')
    root = write_fashion(tmp_path/'mine'/'FashionMNIST'/'raw').parents[1] # a root given comes before both, in torchvision's layout...
    eq_(find_fashion_mnist(root)['train_labels'], root/'FashionMNIST'/'raw'/'train-labels-idx1-ubyte.gz')
    flat = write_fashion(tmp_path/'flat') # ... or holding the files itself
    eq_(set(find_fashion_mnist(flat).values()), {flat/(f + '.gz') for f in FASHION_MNIST_FILES.values()})
    both = write_fashion(tmp_path/'both', gz=True); write_fashion(both, gz=False) # torchvision keeps both: the raw file is read
    eq_(find_fashion_mnist(both)['test_images'], both/'t10k-images-idx3-ubyte')
    eq_(calls, [])
    (debian/'t10k-images-idx3-ubyte.gz').unlink() # three files out of four do not count
    eq_(find_fashion_mnist()['test_images'], tv/'t10k-images-idx3-ubyte')

def test_not_found_message(tmp_path, places):
    debian, fastai_data, calls = places
    with pytest.raises(DataNotFoundError) as e: find_fashion_mnist()
    msg = str(e.value)
    for s in (f'{debian}/ and {debian}/FashionMNIST/raw/', f'{fastai_data}/ and {fastai_data}/FashionMNIST/raw/',
              f'the download through torchvision into {fastai_data}/FashionMNIST/raw failed: OSError: <urlopen error',
              'apt-get install dataset-fashion-mnist', 'pip install torchvision', '--root DIR', 'train-images-idx3-ubyte'):
        assert s in msg, (s, msg)
    eq_(calls, [fastai_data]) # the download goes into fastai's folder
    with pytest.raises(DataNotFoundError) as e: find_fashion_mnist(tmp_path/'given')
    assert f"{tmp_path/'given'}/ and {tmp_path/'given'}/FashionMNIST/raw/" in str(e.value) and str(debian) not in str(e.value).split('\nand ')[0]
    eq_(calls[-1], tmp_path/'given') # a root given: the download goes there, as torchvision's root
    with pytest.raises(DataNotFoundError) as e: find_fashion_mnist(download=False)
    assert 'and no download was asked for' in str(e.value)
    eq_(len(calls), 2)
    assert isinstance(e.value, FileNotFoundError)

def test_download_then_found(tmp_path, places, monkeypatch):
    debian, fastai_data, calls = places
    monkeypatch.setattr(D, 'download_fashion_mnist', lambda root: write_fashion(Path(root)/'FashionMNIST'/'raw', gz=False))
    eq_(find_fashion_mnist()['train_images'], fastai_data/'FashionMNIST'/'raw'/'train-images-idx3-ubyte')

def test_load_fashion_mnist(tmp_path):
    root = write_fashion(tmp_path/'fm', n=(6, 4))
    xt, yt, xv, yv = load_fashion_mnist(root, download=False)
    eq_((xt.shape, xt.dtype, yt.dtype, xv.shape, yv.tolist()), ((6, 28, 28), np.uint8, np.int64, (4, 28, 28), [0, 1, 2, 3]))
    write_idx(np.full(4, 10, np.uint8), root/'t10k-labels-idx1-ubyte.gz')
    fail_(load_fashion_mnist, args=(root,), kwargs=dict(download=False), contains='in 0..9, got uint8 (4, 28, 28) and uint8 (4,) up to 10')
    write_idx(np.zeros(3, np.uint8), root/'t10k-labels-idx1-ubyte.gz')
    fail_(load_fashion_mnist, args=(root,), kwargs=dict(download=False), contains='are not grey images and their classes')

@pytest.mark.skipif(not idx_files(D.DEBIAN_FASHION_MNIST), reason="Debian's dataset-fashion-mnist is not installed")
def test_debian_package():
    xt, yt, xv, yv = load_fashion_mnist(D.DEBIAN_FASHION_MNIST, download=False)
    eq_((xt.shape, yt.shape, xv.shape, yv.shape), ((60000, 28, 28), (60000,), (10000, 28, 28), (10000,)))
    eq_(np.bincount(yt).tolist(), [6000] * 10); eq_(np.bincount(yv).tolist(), [1000] * 10)
    eq_((FASHION_MNIST_CLASSES[yt[0]], FASHION_MNIST_CLASSES[yv[0]]), ('Ankle boot', 'Ankle boot')) # the first images of each file

def test_array_images_checks():
    fail_(ArrayImages, args=(np.zeros((2, 4, 4), np.float32), [0, 1], 'ab'), contains='x must be uint8 images')
    fail_(ArrayImages, args=(np.zeros((2, 4, 4), np.uint8), [0], 'ab'), contains='one class per image: 2 images')
    fail_(ArrayImages, args=(np.zeros((2, 4, 4), np.uint8), [0, 2], 'ab'), contains='in [0, 2)')
    tr = ArrayImages(np.zeros((10, 4, 4), np.uint8), [0] * 10, 'ab')
    fail_(array_dls, args=(tr, tr), kwargs=dict(bs=11), contains='bs=11 is more than the 10 training images')

def test_array_dls_learner():
    "A learner with CutMix trains on `array_dls` batches, and the same seed gives the same training"
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (80, 12, 12), dtype=np.uint8), rng.integers(0, 3, 80)
    def fit():
        set_seed(0)
        dls = array_dls(ArrayImages(x[:64], y[:64], 'abc'), ArrayImages(x[64:], y[64:], 'abc'), bs=16, device='cpu')
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 3))
        learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), cbs=CutMix())
        with learn.no_logging(), learn.no_bar(): learn.fit(1, 1e-2)
        return learn
    learn = fit()
    eq_(len(learn.recorder.losses), 4)
    xb, yb = learn.dls.one_batch()
    assert isinstance(xb, TensorImage) and isinstance(yb, TensorCategory) and xb.shape == (16, 1, 12, 12)
    eq_(fit().recorder.losses, learn.recorder.losses)
    fig = learn.cut_mix.show_batch(max_n=4, show=False) # the mixer's show_batch decodes these batches, titled with the class names
    assert all(any(c in ax.get_title() for c in 'abc') for ax in fig.axes)
