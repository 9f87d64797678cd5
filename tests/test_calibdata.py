"""Calibration data sources: files, folders, images, batching and the errors users see."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgec import calibdata
from edgec.errors import UserError


def _model(shape=("n", 3, 4, 4), inputs=("x",)):
    vis = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(shape)) for n in inputs]
    nodes = [helper.make_node("Identity", [n], [n + "_y"]) for n in inputs]
    outs = [helper.make_tensor_value_info(n + "_y", TensorProto.FLOAT, list(shape)) for n in inputs]
    m = helper.make_model(helper.make_graph(nodes, "m", vis, outs), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _all(cs):
    batches = list(cs)
    return batches, {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def test_npz_keyed_by_name_batches_and_max_samples(tmp_path):
    x = np.random.default_rng(0).standard_normal((70, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    cs = calibdata.load_calibration(tmp_path / "c.npz", _model(), batch_size=32)
    batches, data = _all(cs)
    assert [len(b["x"]) for b in batches] == [32, 32, 6]
    np.testing.assert_array_equal(data["x"], x)
    assert cs.num_samples == 70
    cs = calibdata.load_calibration(tmp_path / "c.npz", _model(), batch_size=32, max_samples=40)
    batches, data = _all(cs)
    assert [len(b["x"]) for b in batches] == [32, 8] and cs.num_samples == 40
    assert list(cs) and len(list(cs)) == 2  # re-iterable


def test_single_input_model_takes_any_single_key_and_npy(tmp_path):
    x = np.ones((5, 3, 4, 4), np.float32)
    np.savez(tmp_path / "any.npz", whatever=x)
    np.save(tmp_path / "x.npy", x)
    for src in (tmp_path / "any.npz", tmp_path / "x.npy"):
        _, data = _all(calibdata.load_calibration(src, _model()))
        np.testing.assert_array_equal(data["x"], x)


def test_multi_input_npz_needs_names(tmp_path):
    m = _model(inputs=("a", "b"))
    np.savez(tmp_path / "ok.npz", a=np.zeros((4, 3, 4, 4), np.float32), b=np.ones((4, 3, 4, 4), np.float32))
    _, data = _all(calibdata.load_calibration(tmp_path / "ok.npz", m))
    assert data["b"].sum() == data["b"].size
    np.savez(tmp_path / "bad.npz", a=np.zeros((4, 3, 4, 4), np.float32), c=np.ones((4, 3, 4, 4), np.float32))
    with pytest.raises(UserError, match="'c' is not an input"):
        calibdata.load_calibration(tmp_path / "bad.npz", m)
    with pytest.raises(UserError, match="one-input model"):
        calibdata.load_calibration(_npy(tmp_path), m)


def _npy(tmp_path):
    p = tmp_path / "one.npy"
    np.save(p, np.zeros((2, 3, 4, 4), np.float32))
    return p


def test_directory_of_samples_and_batches(tmp_path):
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal((3, 4, 4)).astype(np.float32) for _ in range(5)]
    for i, s in enumerate(samples):
        np.save(tmp_path / f"s{i:02d}.npy", s)  # one sample per file (no batch axis)
    np.savez(tmp_path / "z99.npz", x=np.zeros((3, 3, 4, 4), np.float32))  # a batch of 3
    cs = calibdata.load_calibration(tmp_path, _model(), batch_size=4)
    batches, data = _all(cs)
    assert [len(b["x"]) for b in batches] == [4, 4]
    np.testing.assert_array_equal(data["x"][:5], np.stack(samples))
    assert not data["x"][5:].any()


def test_fixed_batch_models_get_exact_batches():
    m = _model(shape=(2, 3, 4, 4))
    x = np.arange(5 * 48, dtype=np.float32).reshape(5, 3, 4, 4)
    batches = list(calibdata.load_calibration({"x": x}, m, batch_size=32))
    assert [b["x"].shape[0] for b in batches] == [2, 2, 2]


def test_wrong_shape_and_dtype_name_the_input_and_expected_shape(tmp_path):
    with pytest.raises(UserError, match=r"input 'x' has shape \[4, 3, 5, 5\], the model expects \[n, 3, 4, 4\]"):
        list(calibdata.load_calibration({"x": np.zeros((4, 3, 5, 5), np.float32)}, _model()))
    with pytest.raises(UserError, match="input 'x' has shape"):
        list(calibdata.load_calibration({"x": np.zeros((4, 4), np.float32)}, _model()))
    with pytest.raises(UserError, match="input 'x' has dtype bool"):
        list(calibdata.load_calibration({"x": np.zeros((4, 3, 4, 4), bool)}, _model()))
    with pytest.raises(UserError, match="no such calibration"):
        calibdata.load_calibration(tmp_path / "missing.npz", _model())
    with pytest.raises(UserError, match="positive"):
        calibdata.load_calibration({"x": np.zeros((4, 3, 4, 4), np.float32)}, _model(), max_samples=0)


def test_random_only_by_name():
    cs = calibdata.load_calibration("random", _model(), max_samples=10, seed=3)
    _, data = _all(cs)
    assert data["x"].shape == (10, 3, 4, 4) and data["x"].std() > 0.5


# ------------------------------------------------------------------ images
def _write_ppm(path, img):
    h, w = img.shape[:2]
    if img.ndim == 3:
        path.write_bytes(b"P6\n# a comment\n%d %d\n255\n" % (w, h) + img.astype(np.uint8).tobytes())
    else:
        path.write_bytes(b"P5\n%d %d\n255\n" % (w, h) + img.astype(np.uint8).tobytes())


def test_ppm_pgm_decoding(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3)).astype(np.uint8)
    gray = rng.integers(0, 256, (4, 6)).astype(np.uint8)
    _write_ppm(tmp_path / "a.ppm", rgb)
    _write_ppm(tmp_path / "b.pgm", gray)
    np.testing.assert_array_equal(calibdata.read_pnm(tmp_path / "a.ppm"), rgb)
    np.testing.assert_array_equal(calibdata.read_pnm(tmp_path / "b.pgm"), gray)
    (tmp_path / "c.ppm").write_bytes(b"P3\n2 1\n255\n1 2 3 4 5 6\n")
    np.testing.assert_array_equal(calibdata.read_pnm(tmp_path / "c.ppm"), [[[1, 2, 3], [4, 5, 6]]])
    (tmp_path / "bad.ppm").write_bytes(b"GIF89a")
    with pytest.raises(UserError, match="not a PPM/PGM"):
        calibdata.read_pnm(tmp_path / "bad.ppm")


def test_resize_nearest_and_bilinear_against_references():
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    # nearest 2x downsample with half-pixel centres picks odd rows/cols; upsample repeats
    np.testing.assert_array_equal(calibdata.resize(img, (2, 2), "nearest"), img[1::2, 1::2])
    np.testing.assert_array_equal(calibdata.resize(img[:2, :2], (4, 4), "nearest"),
                                  np.repeat(np.repeat(img[:2, :2], 2, 0), 2, 1))
    # bilinear 2x downsample with half-pixel centres = mean of each 2x2 block
    ref = img.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(calibdata.resize(img, (2, 2), "bilinear"), ref)
    # bilinear of a linear ramp stays a linear ramp inside
    ramp = np.tile(np.arange(8, dtype=np.float32), (3, 1))
    up = calibdata.resize(ramp, (3, 16), "bilinear")
    np.testing.assert_allclose(np.diff(up[0, 1:-1]), 0.5, atol=1e-6)


def test_image_folder_preprocessing(tmp_path):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 256, (8, 8, 3)).astype(np.uint8) for _ in range(3)]
    for i, im in enumerate(imgs):
        _write_ppm(tmp_path / f"{i}.ppm", im)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pre = calibdata.Preprocess(resize="nearest", channels="BGR", mean=mean, std=std)
    cs = calibdata.load_calibration(tmp_path, _model(shape=("n", 3, 4, 4)), preprocess=pre)
    _, data = _all(cs)
    ref = np.stack([((im[1::2, 1::2, ::-1] / 255.0 - mean) / std).transpose(2, 0, 1) for im in imgs])
    np.testing.assert_allclose(data["x"], ref.astype(np.float32), rtol=1e-5, atol=1e-5)
    # NHWC layout, RGB, bilinear
    pre = calibdata.Preprocess(layout="NHWC", resize="bilinear", scale=1.0)
    _, data = _all(calibdata.load_calibration(tmp_path, _model(shape=("n", 4, 4, 3)), preprocess=pre))
    ref = np.stack([im.astype(np.float32).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3)) for im in imgs])
    np.testing.assert_allclose(data["x"], ref, rtol=1e-5)


def test_npy_images_and_png_without_pillow(tmp_path, monkeypatch):
    np.save(tmp_path / "a.npy", np.full((4, 4), 255, np.uint8))
    pre = calibdata.Preprocess(channels="GRAY")
    _, data = _all(calibdata.load_calibration(tmp_path, _model(shape=("n", 1, 4, 4)), preprocess=pre))
    np.testing.assert_allclose(data["x"], 1.0)
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n")
    import builtins

    real_import = builtins.__import__

    def no_pil(name, *a, **k):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(UserError, match="need Pillow"):
        calibdata.load_calibration(tmp_path, _model(shape=("n", 1, 4, 4)), preprocess=pre)


def test_cli_flag_parsers():
    assert calibdata.parse_size("224x200") == (224, 200)
    assert calibdata.parse_floats("0.485,0.456,0.406") == (0.485, 0.456, 0.406)
    with pytest.raises(UserError):
        calibdata.parse_size("big")


def test_measuring_subsets_are_spread_over_a_sorted_set_and_nest(tmp_path):
    """A folder read in order is often grouped by class: a measuring subset of it is whole
    batches drawn at seeded positions over the whole set, not its first batches; smaller
    subsets are part of larger ones (the float outputs captured once serve all), and a set
    that fits is measured whole, in order."""
    x = np.repeat(np.arange(40, dtype=np.float32), 8)[:, None, None, None] * np.ones((1, 3, 4, 4), np.float32)
    np.savez(tmp_path / "sorted.npz", x=x)  # 320 samples, "class" k at rows 8k..8k+7
    cs = calibdata.load_calibration(tmp_path / "sorted.npz", _model(), batch_size=8)
    whole = list(cs)
    big, small = calibdata.subset(cs, 128), calibdata.subset(cs, 32)
    assert (big.count, big.samples, small.count, small.samples) == (16, 128, 4, 32)
    assert set(small.positions) <= set(big.positions)
    assert big.positions != tuple(range(16)) and max(big.positions) >= 32  # not the first 128 samples
    classes = {int(b["x"][0, 0, 0, 0]) for b in big.batches}
    assert classes == set(big.positions)  # the batches are the ones at those positions, in order
    for i, b in zip(big.positions, big.batches):  # read again (kept in memory): the same arrays
        np.testing.assert_array_equal(b["x"], whole[i]["x"])
    assert small.pick(list(big.positions), big) == list(small.positions)
    assert calibdata.subset(cs, 128).positions == big.positions  # seeded: the same on every run
    everything = calibdata.subset(cs, 512)
    assert everything.positions == tuple(range(40)) and everything.samples == 320
    # a list of batches (the Python API's calibration data): the same draw
    listed = calibdata.subset(whole, 128)
    assert listed.positions == big.positions and all(b is whole[i] for i, b in zip(listed.positions, listed.batches))
    # a set whose length is unknown before reading (a folder of .npy files): its first batches
    for k in range(4):
        np.save(tmp_path / f"s{k}.npy", x[k * 80:(k + 1) * 80])
    folder = calibdata.load_calibration(tmp_path, _model(), batch_size=8)
    first = calibdata.subset(folder, 32)
    assert first.positions == (0, 1, 2, 3) and [int(b["x"][0, 0, 0, 0]) for b in first.batches] == [0, 1, 2, 3]
    # ... with --calib-samples above its length: still its first batches, none past its end
    capped = calibdata.subset(calibdata.load_calibration(tmp_path, _model(), batch_size=8, max_samples=5000), 128)
    assert capped.positions == tuple(range(16)) and len(list(capped.batches)) == 16
    # a short last batch drawn first does not crowd out the full ones
    uneven = [{"x": np.zeros((32, 3, 4, 4), np.float32)}, {"x": np.ones((32, 3, 4, 4), np.float32)},
              {"x": np.ones((1, 3, 4, 4), np.float32)}]
    assert calibdata.subset(uneven, 32).samples == 32 and calibdata.subset(uneven, 8).samples == 32


def test_inputs_whose_first_axes_disagree_are_named_with_their_counts(tmp_path):
    """A recurrent state laid out [layers, batch, hidden] (silero-vad's [2, 1, 128]) beside a
    batch-first input: 'different sample counts [1, 2]' named neither input nor the reason. Each
    input's count is named now, and why edgec needs the batch first."""
    m = _model(inputs=("a", "b"))
    np.savez(tmp_path / "c.npz", a=np.zeros((4, 3, 4, 4), np.float32), b=np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(UserError, match=r"along their first axis \('a' 4, 'b' 2\).*batch-first"):
        list(calibdata.load_calibration(tmp_path / "c.npz", m))
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "s0.npz", a=np.zeros((1, 3, 4, 4), np.float32), b=np.ones((2, 3, 4, 4), np.float32))
    with pytest.raises(UserError, match=r"\('a' 1, 'b' 2\)"):
        list(calibdata.load_calibration(tmp_path / "d", m))
