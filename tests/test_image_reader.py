"""The one image reader: the size from the header before any pixel, every refusal one error naming the file.

The files are written byte by byte here (PNG chunks with zlib and struct, a JPEG frame header), so
what each test expects is known without any decoder.
"""
import csv
import logging
import struct
import zlib

import numpy as np
import pytest
import torch

import test_model
from datasets import MixedRainDataset, SampleKey
from utils import images
from utils.errors import DataError

BIG = 50000  # 2.5 gigapixels: over OpenCV's limit (2^30 pixels) and Pillow's


# --------------------------------------------------------------------------- files, by hand
def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, rows: bytes = None, depth: int = 8, colour: int = 2, extra: bytes = b"") -> bytes:
    """A PNG file: IHDR, ``extra`` chunks, one IDAT of ``rows`` (filter byte + samples per row; a few
    zero bytes when None, which is all a header-only test needs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else bytes(64))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", data)
            + _chunk(b"IEND", b""))


def _rgb_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of uint8 (H,W,3)."""
    h, w, _ = pixels.shape
    return _png(w, h, b"".join(b"\x00" + pixels[y].tobytes() for y in range(h)))


def _jpeg_header(width: int, height: int) -> bytes:
    """The start of a baseline JPEG: SOI, a JFIF APP0 segment, a comment, a junk byte, then SOF0."""
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    comment = b"\xff\xfe" + struct.pack(">H", 2 + 5) + b"hello"
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 8 + 3 * 3, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x01\x03\x11\x01"
    return b"\xff\xd8" + app0 + comment + b"\x00" + sof0 + b"\xff\xd9"


def _good(rng, side=16) -> np.ndarray:
    return rng.integers(0, 256, (side, side, 3), dtype=np.uint8)


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail if any decoder is asked for pixels: a refusal must come from the header alone."""
    def refuse(*a, **k):
        pytest.fail("an image was decoded before its size was checked")
    monkeypatch.setattr(images.cv2, "imread", refuse)
    monkeypatch.setattr(images, "_decode_pillow", refuse)


# --------------------------------------------------------------------------- the reader
def test_png_header_claiming_50000_squared_is_refused_before_decoding(tmp_path, no_decoding):
    path = tmp_path / "huge.png"
    path.write_bytes(_png(BIG, BIG))
    assert path.stat().st_size < 200
    header = images.read_header(str(path))
    assert (header.width, header.height, header.channels, header.sample_bytes) == (BIG, BIG, 3, 1)
    for read in (images.read_image, images.decode_native, images.read_rgb8):
        with pytest.raises(images.UnreadableImageError, match=r"huge\.png.*50000x50000 pixels.*OpenCV") as err:
            read(str(path))
        assert err.value.path == str(path) and "\n" not in str(err.value)


def test_png_refusal_without_the_header_check_is_opencvs_traceback_error(tmp_path):
    # What the header check prevents: OpenCV itself raises cv2.error, not the project's error.
    path = tmp_path / "huge.png"
    path.write_bytes(_png(BIG, BIG))
    import cv2

    with pytest.raises(cv2.error, match="CV_IO_MAX_IMAGE_PIXELS"):
        cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    with pytest.raises(images.UnreadableImageError):
        images.read_image(str(path))


def test_jpeg_frame_header_claiming_a_huge_size_is_refused_before_decoding(tmp_path, no_decoding):
    path = tmp_path / "huge.jpg"
    path.write_bytes(_jpeg_header(60000, 40000))
    header = images.read_header(str(path))
    assert (header.width, header.height, header.channels, header.format) == (60000, 40000, 3, "JPEG")
    with pytest.raises(images.UnreadableImageError, match=r"huge\.jpg.*60000x40000 pixels.*Pillow"):
        images.read_image(str(path))


def test_jpeg_header_parser_agrees_with_pillow_on_a_real_file(tmp_path):
    from PIL import Image

    path = str(tmp_path / "real.jpg")
    exif = Image.Exif()
    exif[0x010E] = "a description long enough to matter " * 20  # an APP1 segment before the frame header
    Image.fromarray(_good(np.random.default_rng(0), 8).repeat(3, 0)[:, :5]).save(path, exif=exif, quality=90)
    with Image.open(path) as img:
        expected = img.size
    header = images.read_header(path)
    assert (header.width, header.height) == expected == (5, 24)


def test_budget_refusal_names_the_file_its_size_and_max_memory(tmp_path, no_decoding):
    path = tmp_path / "wide.png"
    path.write_bytes(_png(20000, 10000))  # 200 megapixels: under OpenCV's limit
    # 8-bit RGB as decoded (3 B/px) plus its float32 RGB copy (12 B/px): 3 GB
    assert images.read_header(str(path)).decoded_bytes == 20000 * 10000 * (3 + 12)
    with pytest.raises(images.UnreadableImageError) as err:
        images.read_image(str(path), max_memory=2 * 2 ** 30)
    message = str(err.value)
    assert "wide.png" in message and "20000x10000" in message and "--max_memory 2.0 GiB" in message
    assert "2.8 GiB" in message  # 3e9 bytes


def test_without_a_budget_the_memory_available_is_the_limit(tmp_path, monkeypatch, no_decoding):
    path = tmp_path / "wide.png"
    path.write_bytes(_png(20000, 10000))
    monkeypatch.setattr(images, "available_memory", lambda: 2 ** 30)
    with pytest.raises(images.UnreadableImageError, match=r"wide\.png.*20000x10000.*1\.0 GiB of memory available"):
        images.decode_native(str(path))


@pytest.mark.parametrize("name", ["notes.png", "notes.jpg"])
def test_text_file_with_an_image_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("not an image at all\n" * 3)
    with pytest.raises(images.UnreadableImageError, match=name.replace(".", r"\.")):
        images.read_image(str(path))


def test_truncated_png_and_a_zero_size_header(tmp_path):
    whole = _rgb_png(_good(np.random.default_rng(1)))
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) - 30])  # IDAT cut short, no IEND
    with pytest.raises(images.UnreadableImageError, match=r"cut\.png"):
        images.read_image(str(tmp_path / "cut.png"))
    (tmp_path / "empty.png").write_bytes(_png(0, 7))
    with pytest.raises(images.UnreadableImageError, match=r"empty\.png.*0x7"):
        images.read_image(str(tmp_path / "empty.png"))


def test_16bit_png_reads_its_exact_values(tmp_path):
    rng = np.random.default_rng(2)
    values = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(5))
    path = tmp_path / "deep.png"
    path.write_bytes(_png(6, 5, rows, depth=16, colour=2))
    assert images.read_header(str(path)).sample_bytes == 2
    expected = torch.from_numpy(values.astype(np.float64) / 65535).permute(2, 0, 1).float()
    assert torch.equal(images.read_image(str(path)), expected)


@pytest.mark.parametrize("with_alpha", [False, True])
def test_palette_png_reads_its_palette_colours(tmp_path, with_alpha):
    palette = np.array([[255, 0, 0], [0, 128, 255], [12, 34, 56]], np.uint8)
    index = np.array([[0, 1, 2, 1], [2, 2, 0, 1], [1, 0, 0, 2]], np.uint8)
    rows = b"".join(b"\x00" + index[y].tobytes() for y in range(3))
    extra = _chunk(b"PLTE", palette.tobytes()) + (_chunk(b"tRNS", bytes([255, 0, 128])) if with_alpha else b"")
    path = tmp_path / "palette.png"
    path.write_bytes(_png(4, 3, rows, depth=8, colour=3, extra=extra))
    got = images.read_image(str(path))
    expected = torch.from_numpy(palette[index].astype(np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(got, expected)  # alpha (tRNS) dropped, colours kept


def test_decoder_output_with_an_unsupported_channel_count(tmp_path, monkeypatch):
    path = tmp_path / "five.png"
    path.write_bytes(_rgb_png(_good(np.random.default_rng(3), 4)))
    monkeypatch.setattr(images, "_decode_png_opencv", lambda p: (np.zeros((4, 4, 5), np.uint8), "RGB"))
    with pytest.raises(images.UnreadableImageError, match=r"five\.png.*5 colour channels"):
        images.read_image(str(path))


def test_an_opencv_error_of_its_own_falls_back_to_pillow(tmp_path, monkeypatch):
    import cv2

    pixels = _good(np.random.default_rng(4), 6)
    path = tmp_path / "ok.png"
    path.write_bytes(_rgb_png(pixels))

    def refuse(*a, **k):
        raise cv2.error("a limit of OpenCV's own")
    monkeypatch.setattr(images.cv2, "imread", refuse)
    assert torch.equal(images.read_image(str(path)), torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)


# --------------------------------------------------------------------------- every caller
def _folder_with_one_bad(tmp_path, bad_name="bad.png", bad=None):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.png").write_bytes(_rgb_png(_good(np.random.default_rng(5), 24)))
    (folder / bad_name).write_bytes(bad if bad is not None else _png(BIG, BIG))
    return folder


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    from models import build_model

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.pth")
    torch.save({"model_name": "BRN", "model_hparams": {"inter_iter": 1},
                "model": build_model("BRN", inter_iter=1, dim_in=0).state_dict()}, path)
    return path


def _rows(path):
    with open(path, newline="") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("case", ["png", "jpeg", "text", "budget"])
def test_test_model_lists_the_refused_image_and_derains_the_other(tmp_path, untrained, capsys, case):
    bad_name, bad, extra = {
        "png": ("bad.png", _png(BIG, BIG), []),
        "jpeg": ("bad.jpg", _jpeg_header(60000, 40000), []),
        "text": ("bad.png", b"hello\n", []),
        "budget": ("bad.png", _png(30000, 30000), ["--max_memory", "8G"]),  # 13.5 GB to read, under OpenCV's limit
    }[case]
    folder = _folder_with_one_bad(tmp_path, bad_name, bad)
    out = tmp_path / "out"
    code = test_model.main(["--test_model", untrained, "--test_dir", str(folder), "--save_path", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err  # test_model's exit code when some images could not be read
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: 1 image(s) could not be read") and bad_name in last
    assert (out / "good.png").is_file() and not (out / "bad.png").exists()
    rows = _rows(out / "results.csv")
    assert not rows["good.png"]["error"] and bad_name in rows["bad.png"]["error"]
    if case == "budget":
        assert "30000x30000" in rows["bad.png"]["error"] and "--max_memory 8.0 GiB" in rows["bad.png"]["error"]
    elif case != "text":
        assert "x".join(["50000"] * 2 if case == "png" else ["60000", "40000"]) in rows["bad.png"]["error"]


def test_datasets_check_reports_the_refused_image(tmp_path, capsys):
    from utils.data import cli as dataset_cli

    root = tmp_path / "root"
    folder = root / "RealInt"
    folder.mkdir(parents=True)
    (folder / "good.png").write_bytes(_rgb_png(_good(np.random.default_rng(6))))
    (folder / "huge.png").write_bytes(_png(BIG, BIG))
    (folder / "notes.jpg").write_text("text")
    for fast in ([], ["--fast"]):
        assert dataset_cli.main(["check", str(root), "--ignore_counts", *fast]) == 1
        out = capsys.readouterr().out
        assert "2 unreadable" in out
        lines = [ln for ln in out.splitlines() if "huge.png" in ln]
        assert len(lines) == 1 and "50000x50000 pixels" in lines[0]
        assert "notes.jpg" in out and "good.png" not in out


def _pairs(tmp_path, n=3):
    root = tmp_path / "set"
    rng = np.random.default_rng(7)
    for sub in ("rain", "norain"):
        (root / sub).mkdir(parents=True)
        for i in range(n):
            (root / sub / f"{i}.png").write_bytes(_rgb_png(_good(rng)))
    return root


def test_training_skips_the_refused_image_or_stops_under_strict(tmp_path, caplog):
    root = _pairs(tmp_path)
    (root / "rain" / "1.png").write_bytes(_png(BIG, BIG))
    ds = MixedRainDataset([str(root)], crop_size=8)
    with caplog.at_level(logging.WARNING, logger="datasets"):
        item = ds[SampleKey(1, 4)]
    assert ds.skipped == 1 and "1.png" in caplog.text
    following = ds[SampleKey(2, 4)]  # the next pair, with the same crop and flip
    assert torch.equal(item.rain, following.rain) and torch.equal(item.clean, following.clean)
    cached = MixedRainDataset([str(root)], crop_size=8)
    cached.cache_images(progress=False)
    assert torch.equal(cached[SampleKey(1, 4)].rain, following.rain) and cached.skipped == 1
    strict = MixedRainDataset([str(root)], crop_size=8, strict=True)
    with pytest.raises(DataError, match=r"1\.png.*50000x50000.*strict"):
        strict[SampleKey(1, 4)]


def test_metric_cli_scores_the_others_and_names_the_refused_image(tmp_path, capsys):
    from utils.eval.metric_cli import main

    folder = _folder_with_one_bad(tmp_path)
    assert main(["niqe", str(folder), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.png" in err.strip().splitlines()[-1]
    rows = _rows(folder / "niqe_y.csv")
    assert "50000x50000" in rows["bad.png"]["error"] and not rows["good.png"]["error"]


def test_analysis_encoding_leaves_the_refused_image_out(tmp_path):
    from analysis.common import encode_images
    from models import build_encoder

    folder = _folder_with_one_bad(tmp_path)
    encoder = build_encoder(width=4, dim=8).eval()
    paths = [str(folder / "bad.png"), str(folder / "good.png")]
    with pytest.raises(images.UnreadableImageError, match=r"bad\.png"):
        encode_images(encoder, paths, torch.device("cpu"))
    unreadable = []
    kept = encode_images(encoder, paths, torch.device("cpu"), unreadable=unreadable)
    assert unreadable == [paths[0]]
    torch.testing.assert_close(kept, encode_images(encoder, paths[1:], torch.device("cpu")))
