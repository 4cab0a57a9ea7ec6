"""The shared preprocessing contract: greyscale and RGB, any size, stretch or crop, per-channel
normalisation; specs saved before channels/height/width existed load and behave exactly as before."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from flywheel.contracts.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InvalidImage,
    PreprocessSpec,
    convert_channels,
    decode_image,
    encode_png,
    resize,
    to_array,
    to_tensor,
)

# A model's preprocess spec as flywheel wrote it before this change (flywheel_spec.json / manifest).
OLD_SPEC_JSON = '{"image_size": 28, "mean": 0.286, "std": 0.353, "invert": false, "max_bytes": 4194304, ' \
                '"max_pixels": 16777216}'
# sha256 of to_array's float32 output for the first 8 Fashion-MNIST test images, computed with the
# implementation before this change (commit d56a64c): the greyscale path must not move a bit.
OLD_DIGEST_28 = "2cfd7dded1e278b251d738ac249f6d47efbccd1849b3b850f27b7ea806039681"
OLD_DIGEST_32_INVERT = "d91a54800f11be9aa6c7b619cc6bc3088dbdaf374a239b2a5afd00c44ca86f30"  # image_size 32, invert
# decode_image of a random 50x40 RGB PNG under the old spec (greyscale conversion + resize to 28).
OLD_DIGEST_RGB_PNG_TO_GREY = "6b80447d9126cc455bcd9aa79e8ee59c8fdfc70909580c1cce469fb40a2099b0"


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def fashion8() -> np.ndarray:
    from flywheel.core.data import load_splits

    return load_splits("fashion-mnist").test.images[:8]


def _file(array: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ backwards compatible
def test_old_spec_json_loads_and_gives_the_same_arrays(fashion8):
    spec = PreprocessSpec.from_dict(json.loads(OLD_SPEC_JSON))
    assert (spec.channels, spec.height, spec.width, spec.image_size) == (1, 28, 28, 28)
    assert spec.mean == (0.286,) and spec.std == (0.353,) and spec.resize == "stretch"
    assert spec == PreprocessSpec(image_size=28, mean=0.286, std=0.353)
    assert _sha(to_array(fashion8, spec)) == OLD_DIGEST_28
    from_png = np.stack([decode_image(encode_png(img), spec) for img in fashion8])
    assert _sha(to_array(from_png, spec)) == OLD_DIGEST_28
    old32 = PreprocessSpec.from_dict(dict(json.loads(OLD_SPEC_JSON), image_size=32, invert=True))
    assert to_array(fashion8, old32).shape == (8, 1, 32, 32)
    assert _sha(to_array(fashion8, old32)) == OLD_DIGEST_32_INVERT
    assert _sha(decode_image(_file(_rgb(40, 50)), spec)) == OLD_DIGEST_RGB_PNG_TO_GREY
    # the hand formula, in float32, bit for bit
    hand = ((fashion8.astype(np.float32) / np.float32(255) - np.float32(0.286)) / np.float32(0.353))[:, None]
    assert np.array_equal(to_array(fashion8, spec), hand)
    # the defaults are the old defaults
    default = PreprocessSpec()
    assert (default.channels, default.image_size, default.invert) == (1, 28, False)
    assert _sha(to_array(fashion8)) == OLD_DIGEST_28


def test_spec_round_trips_through_json_and_old_readers_still_find_the_size():
    for spec in (PreprocessSpec(), PreprocessSpec(channels=3, height=64, width=48, mean=IMAGENET_MEAN,
                                                  std=IMAGENET_STD, resize="crop", invert=True)):
        data = json.loads(json.dumps(spec.to_dict()))
        assert PreprocessSpec.from_dict(data) == spec
    square = PreprocessSpec(channels=3, height=32, width=32).to_dict()
    assert square["image_size"] == 32 and square["mean"] == [0.286] * 3  # scalar broadcast per channel
    assert "image_size" not in PreprocessSpec(height=24, width=40).to_dict()
    assert PreprocessSpec.from_dict(dict(square, future_field="ignored")).channels == 3
    import dataclasses

    assert dataclasses.replace(PreprocessSpec(), channels=3).mean == (0.286,) * 3


# ------------------------------------------------------------------------------ colour handling
def test_rgb_png_and_jpeg_decode_to_height_width_3():
    spec = PreprocessSpec(channels=3, height=40, width=50)
    rgb = _rgb(40, 50)
    assert np.array_equal(decode_image(_file(rgb), spec), rgb)  # PNG: exact, no resize needed
    smooth = np.zeros((40, 50, 3), np.uint8)
    smooth[..., 0], smooth[..., 1], smooth[..., 2] = 200, np.arange(50, dtype=np.uint8)[None] * 4, 30
    jpeg = decode_image(_file(smooth, "JPEG", quality=95), spec)
    assert jpeg.shape == (40, 50, 3) and jpeg.dtype == np.uint8
    assert np.abs(jpeg.astype(int) - smooth).mean() < 3  # lossy, but still the same colours
    small = decode_image(_file(rgb), PreprocessSpec(channels=3, height=20, width=25))
    assert small.shape == (20, 25, 3)


def test_greyscale_file_to_rgb_spec_and_rgb_file_to_greyscale_spec():
    grey = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    as_rgb = decode_image(encode_png(grey), PreprocessSpec(channels=3))
    assert as_rgb.shape == (28, 28, 3) and all(np.array_equal(as_rgb[..., c], grey) for c in range(3))
    rgb = _rgb(28, 28)
    as_grey = decode_image(encode_png(rgb), PreprocessSpec(channels=1))
    assert as_grey.shape == (28, 28)
    assert np.array_equal(as_grey, np.asarray(Image.fromarray(rgb).convert("L")))
    # arrays follow the same conversions, so a dataset of the other layout trains as serving decodes
    assert np.array_equal(convert_channels(rgb[None], 1)[0], as_grey)
    assert np.array_equal(convert_channels(grey[None], 3)[0], as_rgb)
    assert np.array_equal(to_array(rgb[None], PreprocessSpec()), to_array(as_grey[None], PreprocessSpec()))
    assert np.array_equal(to_array(grey, PreprocessSpec(channels=3)), to_array(as_rgb, PreprocessSpec(channels=3)))


def test_palette_and_transparent_images_are_flattened_onto_the_background():
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[:, :5] = (200, 40, 10)
    alpha = np.full((10, 10), 255, np.uint8)
    alpha[:, 5:] = 0  # right half transparent, hiding bright pixels
    rgba = np.dstack([rgb, alpha])
    rgba[:, 5:, :3] = 250
    spec = PreprocessSpec(channels=3, height=10, width=10)
    out = decode_image(_file(rgba), spec)
    assert (out[:, :5] == (200, 40, 10)).all() and (out[:, 5:] == 0).all()  # black: light-on-dark data
    inverted = decode_image(_file(rgba), PreprocessSpec(channels=3, height=10, width=10, invert=True))
    assert (inverted[:, 5:] == 255).all()  # dark-on-light data: white background
    opaque = np.dstack([rgb, np.full((10, 10), 255, np.uint8)])
    assert np.array_equal(decode_image(_file(opaque), spec), rgb)
    palette = io.BytesIO()
    Image.fromarray(rgb).quantize(colors=2).save(palette, format="PNG")  # 2 colours: the palette is exact
    assert np.array_equal(decode_image(palette.getvalue(), spec), rgb)
    grey = decode_image(_file(rgba), PreprocessSpec(height=10, width=10))
    assert grey.shape == (10, 10) and (grey[:, 5:] == 0).all()
    la = decode_image(_file(rgba, mode="LA"), spec)
    assert la.shape == (10, 10, 3) and (la[:, 5:] == 0).all()


# ------------------------------------------------------------------------------ size policies
def _striped(h: int, w: int, axis: int) -> np.ndarray:
    """Green in the central half along `axis` (1: columns, 0: rows), red in the outer quarters."""
    img = np.zeros((h, w, 3), np.uint8)
    img[...] = (255, 0, 0)
    n = img.shape[axis]
    sl = [slice(None), slice(None)]
    sl[axis] = slice(n // 4, n - n // 4)
    img[tuple(sl)] = (0, 255, 0)
    return img


def test_crop_keeps_aspect_and_takes_the_centre():
    wide = _striped(32, 64, axis=1)  # 64 wide, 32 high: the centred 32x32 is all green
    crop = PreprocessSpec(channels=3, height=32, width=32, resize="crop")
    out = decode_image(_file(wide), crop)
    assert out.shape == (32, 32, 3) and (out == (0, 255, 0)).all()
    assert np.array_equal(resize(wide[None], 32, 32, "crop")[0], out)
    stretched = resize(wide[None], 32, 32, "stretch")[0]  # squeezed: the red quarters stay in
    assert (stretched[:, :6] == (255, 0, 0)).all() and (stretched[:, 12:20] == (0, 255, 0)).all()
    tall = _striped(64, 32, axis=0)  # scaled by 1/2 as well: the filter blends the crop's edge rows
    small = resize(tall[None], 16, 16, "crop")[0]  # with their neighbours, as scaling all, then cropping would
    assert (small[1:-1] == (0, 255, 0)).all() and (small[[0, -1], :, 1] > 200).all()
    # greyscale batches and non-square targets: scale so the image covers, then centre-crop
    grey = wide[..., 1]
    assert (resize(grey[None], 32, 32, "crop")[0] == 255).all()
    out = to_array(grey[None], PreprocessSpec(height=16, width=16, resize="crop", mean=0, std=1))
    assert out.shape == (1, 1, 16, 16) and np.allclose(out[..., 1:-1], 1.0)  # edge columns: blended, as above
    # crop of a square image to a square size is the stretch
    square = _rgb(40, 40)
    assert np.array_equal(resize(square[None], 20, 20, "crop"), resize(square[None], 20, 20, "stretch"))


def test_non_square_sizes():
    spec = PreprocessSpec(channels=3, height=24, width=40, resize="crop")
    img = decode_image(_file(_rgb(100, 70)), spec)
    assert img.shape == (24, 40, 3)
    assert to_array(np.stack([img, img]), spec).shape == (2, 3, 24, 40) == (2, *spec.shape)
    assert to_array(_rgb(60, 60), spec).shape == (1, 3, 24, 40)  # one (H, W, 3) image, any size
    with pytest.raises(ValueError, match="image_size"):
        _ = spec.image_size
    assert resize(np.zeros((0, 10, 10, 3), np.uint8), 5, 7).shape == (0, 5, 7, 3)


# ------------------------------------------------------------------------------ normalisation
def test_per_channel_normalisation_matches_a_hand_computation():
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.25, 0.5)
    img = np.zeros((2, 3, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 0, 51, 255
    x = to_array(img, PreprocessSpec(channels=3, height=2, width=3, mean=mean, std=std))
    assert x.shape == (1, 3, 2, 3) and x.dtype == np.float32
    for c, value in enumerate((0, 51, 255)):
        assert np.allclose(x[0, c], (value / 255 - mean[c]) / std[c], atol=1e-6)
    inv = to_array(img, PreprocessSpec(channels=3, height=2, width=3, mean=mean, std=std, invert=True))
    for c, value in enumerate((0, 51, 255)):
        assert np.allclose(inv[0, c], (1 - value / 255 - mean[c]) / std[c], atol=1e-6)


def test_to_tensor_equals_to_array():
    rgb_spec = PreprocessSpec(channels=3, height=20, width=30, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    batch = np.stack([_rgb(20, 30, s) for s in range(4)])
    assert np.array_equal(to_tensor(batch, rgb_spec).numpy(), to_array(batch, rgb_spec))
    grey = batch[..., 0]
    assert np.array_equal(to_tensor(grey, PreprocessSpec(image_size=24)).numpy(),
                          to_array(grey, PreprocessSpec(image_size=24)))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, field", [
    ({"channels": 2}, "channels"),
    ({"channels": True}, "channels"),
    ({"channels": 3, "mean": (0.1, 0.2)}, "mean"),
    ({"channels": 3, "std": [0.1, 0.2, 0.3, 0.4]}, "std"),
    ({"std": 0}, "std"),
    ({"channels": 3, "std": (0.2, -0.1, 0.2)}, "std"),
    ({"mean": "grey"}, "mean"),
    ({"mean": float("nan")}, "mean"),
    ({"height": 0}, "height"),
    ({"width": -5}, "width"),
    ({"height": 2.5}, "height"),
    ({"image_size": 0}, "image_size"),
    ({"image_size": 28, "height": 32}, "image_size"),
    ({"resize": "pad"}, "resize"),
    ({"invert": "yes"}, "invert"),
    ({"max_bytes": 0}, "max_bytes"),
    ({"max_pixels": -1}, "max_pixels"),
])
def test_invalid_specs_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as err:
        PreprocessSpec(**kwargs)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=field):  # the same from JSON
        PreprocessSpec.from_dict(kwargs)


def test_positional_arguments_are_refused():
    """`PreprocessSpec(28)` once meant image_size=28; now it would be read as channels, so it fails."""
    with pytest.raises(TypeError):
        PreprocessSpec(28)  # type: ignore[misc]


# ------------------------------------------------------------------------------ encoding
def test_encode_png_is_lossless_for_rgb_and_greyscale():
    rgb = _rgb(33, 47)
    data = encode_png(rgb)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGB"
    assert np.array_equal(decode_image(data, PreprocessSpec(channels=3, height=33, width=47)), rgb)
    grey = rgb[..., 0]
    assert np.array_equal(decode_image(encode_png(grey), PreprocessSpec(height=33, width=47)), grey)
    assert np.array_equal(decode_image(encode_png(grey[..., None]), PreprocessSpec(height=33, width=47)), grey)
    with pytest.raises(ValueError, match="shape"):
        encode_png(np.zeros((4, 4, 4), np.uint8))


def test_limits_apply_to_rgb_too():
    spec = PreprocessSpec(channels=3, max_pixels=99 * 99)
    with pytest.raises(InvalidImage) as err:
        decode_image(encode_png(np.zeros((100, 100, 3), np.uint8)), spec)
    assert err.value.status == 413


def test_shifts_keep_the_rgb_layout():
    from flywheel.core.shifts import SHIFTS, shift_images

    batch = np.stack([_rgb(24, 32, s) for s in range(2)])
    for kind in SHIFTS:
        out = shift_images(batch, kind)
        assert out.shape == batch.shape and out.dtype == np.uint8 and not np.array_equal(out, batch), kind


# ------------------------------------------------------------------------------ handler → capture → snapshot
def test_rgb_request_through_the_handler_is_captured_and_snapshotted_as_rgb(tmp_path):
    """The handler's decode, batching and capture with a 3-channel spec (no TorchServe: the methods
    that touch request bytes), then `data snapshot` of that capture: RGB all the way."""
    from flywheel.contracts.capture import CaptureWriter, answers, iter_captures, write_feedback
    from flywheel.monitoring.snapshot import take_snapshot
    from flywheel.serving.handler import FlywheelHandler

    spec = PreprocessSpec(channels=3, height=32, width=48, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize="crop")
    h = FlywheelHandler()
    h.spec = PreprocessSpec.from_dict(json.loads(json.dumps(spec.to_dict())))  # as the manifest carries it
    h.class_names, h.top_k, h.max_images = ["cat", "dog"], 2, 4
    h.model_label, h.version, h.context = "rgb-model", "1", None
    images = [_rgb(64, 96, 0), _rgb(40, 30, 1)]
    body = {"images": [base64.b64encode(_file(img)).decode() for img in images]}
    batch = h.preprocess([{"body": body}, {"data": bytearray(_file(images[0], "JPEG"))}])
    assert batch.inputs.shape == (3, 3, 32, 48) and batch.inputs.dtype == np.float32
    assert np.array_equal(batch.inputs[:2], to_array(np.stack([decode_image(_file(i), spec) for i in images]), spec))

    store = tmp_path / "captures"
    h.capture = CaptureWriter(str(store), flush_every=1)
    probs = np.array([0.3, 0.7], np.float32)
    (pred,) = answers("rgb-model", "1", h.class_names, probs[None], 2)  # what postprocess answers
    h._capture_answer(pred, batch.images[0], np.zeros(4, np.float32), probs, None)
    h.capture.close()
    (cap,) = list(iter_captures(str(store), "rgb-model"))
    assert np.array_equal(decode_image(cap.image_png, spec), batch.images[0])
    write_feedback(str(store), "rgb-model", [(pred["prediction_id"], "dog")])
    snap = take_snapshot(str(store), "rgb-model", tmp_path / "snapshots", class_names=("cat", "dog"))
    (png,) = list((snap.path / "dog").iterdir())
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.size == (48, 32)
        assert np.array_equal(np.asarray(img), batch.images[0])



def test_a_request_already_a_png_in_the_models_layout_is_captured_as_sent_and_others_re_encoded(tmp_path):
    """Capture keeps a request's bytes when they already are a PNG of the pixels the model saw (its
    mode and size); a JPEG, another size or another mode is captured as encode_png of the decoded
    pixels. Every captured PNG decodes to exactly what the model saw."""
    from flywheel.contracts.capture import CaptureWriter, iter_captures
    from flywheel.contracts.preprocessing import decode_image_and_png
    from flywheel.serving.handler import FlywheelHandler

    spec = PreprocessSpec(channels=3, height=32, width=48)
    as_model_sees = _file(_rgb(32, 48, 0), compress_level=1)  # not the bytes encode_png writes
    assert as_model_sees != encode_png(_rgb(32, 48, 0))
    other = {"jpeg": _file(_rgb(32, 48, 1), "JPEG"), "size": _file(_rgb(40, 30, 2)),
             "mode": _file(_rgb(32, 48, 3), mode="L"), "pillow-only": _file(_rgb(32, 48, 4), optimize=True,
                                                                                 pnginfo=_text_chunk())}
    assert decode_image_and_png(as_model_sees, spec)[1] is as_model_sees
    assert all(decode_image_and_png(data, spec)[1] is None for data in other.values())
    # decoded as is, but not stored as is: bytes after IEND, a wrong image-data CRC (a strict reader refuses it)
    idat_crc = as_model_sees.index(b"IDAT") + 4 + int.from_bytes(as_model_sees[as_model_sees.index(b"IDAT") - 4:][:4], "big")
    bad_crc = as_model_sees[:idat_crc] + bytes([as_model_sees[idat_crc] ^ 1]) + as_model_sees[idat_crc + 1:]
    for data in (as_model_sees + b"bytes after IEND", bad_crc):
        pixels, png = decode_image_and_png(data, spec)
        assert png is None and np.array_equal(pixels, decode_image(as_model_sees, spec))

    h = FlywheelHandler()
    h.spec, h.class_names, h.top_k, h.max_images = spec, ["cat", "dog"], 2, 4
    h.model_label, h.version, h.context = "rgb-model", "1", None
    h._predictions_seen, h._capture_reported = 0, {}  # as initialize() leaves them
    h.capture = CaptureWriter(str(tmp_path), flush_every=1)
    requests = [as_model_sees, *other.values()]
    batch = h.preprocess([{"body": bytearray(data)} for data in requests])
    probs = np.tile(np.array([0.3, 0.7], np.float32), (len(requests), 1))
    h.postprocess((batch, probs, np.zeros((len(requests), 4), np.float32)))
    h.capture.close()
    caps = sorted(iter_captures(str(tmp_path), "rgb-model"), key=lambda c: c.ts)
    assert len(caps) == len(requests)
    assert caps[0].image_png == as_model_sees
    for cap, data, pixels in zip(caps, requests, batch.images, strict=True):
        assert np.array_equal(decode_image(cap.image_png, spec), pixels)
        if data is not as_model_sees:
            assert cap.image_png == encode_png(pixels) != data
    # a request refused on its second image keeps nothing of its first: PNGs stay aligned with images
    mixed = h.preprocess([{"body": {"images": [base64.b64encode(other["jpeg"]).decode(), "@@"]}},
                          {"body": bytearray(as_model_sees)}])
    assert len(mixed.images) == len(mixed.pngs) == 1 and mixed.pngs[0] == as_model_sees


def _text_chunk():
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("comment", "a tEXt chunk: not a plain PNG, so Pillow decodes it")
    return info


def _outcome(decode, data: bytes, spec: PreprocessSpec):
    try:
        return "ok", decode(data, spec)
    except InvalidImage as exc:
        return "error", (exc.status, str(exc))


def _png_with(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG from (name, payload) chunks, each with its correct CRC."""
    import struct
    import zlib

    return b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(body)) + name + body
                                            + struct.pack(">I", zlib.crc32(name + body)) for name, body in chunks)


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    import struct

    out, pos = [], 8
    while pos < len(png):
        length, name = struct.unpack_from(">I4s", png, pos)
        out.append((name, png[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def test_plain_pngs_decode_by_libspng_to_pillows_pixels_and_errors(fashion8):
    """decode_image hands plain 8-bit greyscale/RGB PNGs to libspng (pyspng, a serving dependency)
    and everything else to Pillow. Whatever the bytes, the answer is Pillow's: the same pixels, or
    the same InvalidImage (status and message), for every byte of a PNG flipped three ways, every
    truncation, and variants whose chunks carry valid CRCs (changed header fields, extra chunks)."""
    from flywheel.contracts import preprocessing as pp

    grey, rgb = encode_png(fashion8[0]), _file(_rgb(9, 7, seed=3))
    assert pp._spng is not None, "pyspng is not installed: pip install the serve extra"
    assert pp._plain_png(grey, 10**6) is not None and pp._plain_png(rgb, 10**6) is not None  # the fast path
    assert not pp._plain_png(grey, 10**6).flags.writeable  # read-only, as Pillow's pixels
    header = dict(_chunks(grey))[b"IHDR"]
    variants = [
        *(_png_with([(b"IHDR", header[:i] + bytes([v]) + header[i + 1:]), *_chunks(grey)[1:]])
          for i in range(13) for v in (0, 1, 2, 3, 4, 6, 16, 255)),  # sizes, depths, colour types, interlace
        _png_with([(b"IHDR", header), (b"gAMA", b"\x00\x00\xb1\x8f"), (b"sRGB", b"\x00"),
                   (b"pHYs", bytes(9)), *_chunks(grey)[1:]]),  # info chunks: still the fast path
        _png_with([(b"IHDR", header), (b"gAMA", b"\x00\x00"), *_chunks(grey)[1:]]),  # one Pillow may refuse
        _png_with([(b"IHDR", header), (b"tRNS", b"\x00\x00"), *_chunks(grey)[1:]]),  # transparency
        _png_with([(b"IHDR", header), (b"tEXt", b"a\x00b"), *_chunks(grey)[1:]]),
        _png_with([*_chunks(grey)[:-1], (b"tEXt", b"a\x00b"), (b"IEND", b"")]),
        _png_with([*_chunks(grey)[:-1]]) + b"trailing",  # no IEND
        grey + b"trailing bytes",
    ]
    for png in (grey, rgb):
        variants += [png[:n] for n in range(1, len(png))]
        variants += [png[:i] + bytes([png[i] ^ x]) + png[i + 1:] for i in range(len(png)) for x in (0x01, 0x80, 0xFF)]
    specs = [PreprocessSpec(), PreprocessSpec(channels=3, height=9, width=7), PreprocessSpec(max_pixels=100)]
    fast = 0
    for data in variants:
        for spec in specs:
            got, want = _outcome(decode_image, data, spec), _outcome(pp._decode_pillow, data, spec)
            assert got[0] == want[0], (data, spec, got, want)
            if got[0] == "ok":
                assert got[1].dtype == want[1].dtype and np.array_equal(got[1], want[1]), data
            else:
                assert got[1] == want[1]
        fast += pp._plain_png(data, 10**6) is not None
    assert fast > 50  # the comparison did exercise libspng, not only Pillow
