"""The GPU-decoding reader of streamed folders, run on the CPU: nvJPEG (torchvision, absent in
CI) is replaced by pillow decoding the same bytes, so what is tested is everything around it:
which files go to the decoder, the boxes and flips (the pillow reader's), the tensor resize,
and the batches' order and labels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_stream import SIZE, coordinate_image, write_folder

from ticketctl.data import load_dataset
from ticketctl.data.gpu_decode import TensorBatchReader, nvjpeg_available, resized_crop
from ticketctl.data.stream import BatchReader, StreamedSplit, step_indices
from ticketctl.data.transforms import crop_box, epoch_order, read_eval, read_train, sample_rng
from ticketctl.errors import TicketctlError

CPU = torch.device("cpu")


class PillowDecode:
    """Stands in for nvJPEG: decodes the bytes it is given and remembers how many."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, datas, device):
        self.seen += len(datas)
        return [torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy())
                .permute(2, 0, 1).to(device) for d in datas]


def test_only_jpegs_reach_the_decoder_and_batches_keep_their_order(tmp_path):
    folder = write_folder(tmp_path / "f")  # half PNG, half JPEG, mixed sizes
    decode = PillowDecode()
    ds = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4,
                      reader=TensorBatchReader(CPU, workers=2, decode=decode))
    plain = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4,
                         stats=(ds.mean, ds.std))
    decode.seen = 0  # (measuring the statistics decoded some too)
    ours = list(ds.train_batches(3, 2, 2, 8))
    theirs = list(plain.train_batches(3, 2, 2, 8))
    order = epoch_order(len(ds.train), 3, 2)
    rows = [r for b in range(2) for r in step_indices(order, b, 8)]
    assert decode.seen == sum(ds.train.files[r].endswith(".jpg") for r in rows) > 0
    for (x, y), (px, py) in zip(ours, theirs, strict=True):
        assert torch.equal(y, py)  # the same images, in the same order
        assert x.shape == px.shape == (8, SIZE, SIZE, 3) and x.dtype == torch.uint8
    # the network input is built from them as from the pillow reader's
    assert ds.to_input(ours[0][0]).shape == (8, 3, SIZE, SIZE)


def test_training_crops_match_the_pillow_reader_on_a_linear_image(tmp_path):
    """On R = x, G = y every linear filter returns the source position it averages, so both
    resizes of the same integer box agree up to rounding (1 level) away from the edges, where
    the antialiasing windows are clipped differently."""
    path = coordinate_image(tmp_path / "c.png")
    split = StreamedSplit((str(path),), torch.zeros(1, dtype=torch.long))
    reader = TensorBatchReader(CPU, workers=1, decode=PillowDecode())
    flips = 0
    for epoch in range(1, 33):
        (x, _), = reader.batches(split, [np.array([0])], 16, train=True, seed=5, epoch=epoch)
        ref = read_train(path, 16, seed=5, epoch=epoch, index=0)
        diff = (x[0].numpy().astype(int) - ref.astype(int))[2:-2, 2:-2]
        assert np.abs(diff).max() <= 1, epoch
        r = x[0, :, :, 0].numpy().astype(int)  # R = the source column: it runs backwards
        flipped = bool((r[:, 0] > r[:, -1]).all())  # in a mirrored crop
        assert flipped or (r[:, 0] < r[:, -1]).all()
        rng = sample_rng(5, epoch, 0)
        crop_box(rng, 200, 200)
        assert flipped == (rng.random() < 0.5)  # the pillow reader's draw
        flips += flipped
    assert 0 < flips < 32  # both directions were exercised


def test_evaluation_crops_the_centre(tmp_path):
    a = np.zeros((200, 400, 3), np.uint8)
    a[..., 1] = 255
    a[5:195, 100:300] = (255, 0, 0)
    Image.fromarray(a).save(tmp_path / "wide.png")
    split = StreamedSplit((str(tmp_path / "wide.png"),), torch.zeros(1, dtype=torch.long))
    reader = TensorBatchReader(CPU, workers=1, decode=PillowDecode())
    (x, _), = reader.batches(split, [np.array([0])], 64, train=False)
    assert x.shape == (1, 64, 64, 3)
    # the box is widened to whole pixels (at most one source pixel, 2.7 output pixels of
    # margin are red in the pillow reader's test too): red only, as there
    assert (x[0] == torch.tensor([255, 0, 0], dtype=torch.uint8)).all()
    assert np.array_equal(x[0].numpy(), read_eval(tmp_path / "wide.png", 64))


def test_resized_crop_is_an_exact_copy_at_scale_one():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    out = resized_crop(image, (4, 3, 14, 13), 10)
    assert torch.equal(out, image[:, 3:13, 4:14].permute(1, 2, 0))
    flipped = resized_crop(image, (4, 3, 14, 13), 10, flip=True)
    assert torch.equal(flipped, out.flip(1))


def test_an_unreadable_file_is_one_clear_error(tmp_path):
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    split = StreamedSplit((str(tmp_path / "bad.jpg"),), torch.zeros(1, dtype=torch.long))
    reader = TensorBatchReader(CPU, workers=1, decode=PillowDecode())
    with pytest.raises(TicketctlError, match="not a readable image"):
        list(reader.batches(split, [np.array([0])], 8, train=False))


def test_nvjpeg_is_only_offered_on_a_gpu():
    assert nvjpeg_available(CPU) is False


def test_a_batch_the_gpu_decoder_refuses_is_decoded_by_pillow(tmp_path):
    folder = write_folder(tmp_path / "f", mixed=False)

    def refuse(datas, device):
        raise RuntimeError("nvjpeg: unsupported JPEG")

    ds = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4, stream=True,
                      reader=TensorBatchReader(CPU, workers=1, decode=refuse))
    plain = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4, stream=True,
                         stats=(ds.mean, ds.std), reader=BatchReader(workers=1))
    (x, y), = ds.train_batches(1, 1, 1, 8)
    (px, py), = plain.train_batches(1, 1, 1, 8)
    assert torch.equal(y, py) and x.shape == px.shape == (8, SIZE, SIZE, 3)


def test_statistics_are_measured_through_the_reader_as_the_pillow_reader_measures_them(
        tmp_path):
    """Images of one size (12 x 10) shown at 8: both readers resize the same boxes; the
    per-channel means agree within the resampling difference (at most a level or two of
    255 per pixel, averaged)."""
    folder = write_folder(tmp_path / "f", mixed=False)
    a = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4, stream=True,
                     reader=TensorBatchReader(CPU, workers=1, decode=PillowDecode()))
    b = load_dataset("imagefolder", folder, image_size=SIZE, val_size=4, stream=True,
                     reader=BatchReader(workers=1))
    assert np.allclose(a.mean, b.mean, atol=2 / 255)
