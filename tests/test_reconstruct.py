"""Least-squares reconstruction after pruning: the staged run (each part once, re-fitted
constants used downstream), the streamed normal equations against a direct solve, and the
re-fit of depthwise and grouped convs checked in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import edgec
from edgec import runtime, verify
from edgec.analysis.channels import find_groups
from edgec.builders import ALL_MODELS, GraphBuilder
from edgec import lstsq
from edgec.lstsq import LinearMap, NormalEquations, StagedRun, conv_patches, ridge_solve
from edgec.passes.prune_channels import apply_pruning, select
import edgec.passes.reconstruct as reconstruct_mod
from edgec.passes.reconstruct import RIDGE_STEPS, _residual_partner, reconstruct


def _pruned(model, ratio, seed=0):
    """(unpruned ONNX, pruned IR, kept map, pruned ONNX before any re-fit)."""
    ir = edgec.from_model(model)
    original = ir.to_onnx()
    groups = find_groups(ir)
    rng = np.random.default_rng(seed)
    scores = {g.id: rng.random(g.channels) for g in groups if g.prunable}
    kept = apply_pruning(ir, groups, select(groups, scores, ratio=ratio))
    return original, ir, kept, ir.to_onnx()


def _rel(reference, model, feeds) -> float:
    return runtime.output_error(reference, model, feeds)["rel_l2"]


# ---------------------------------------------------------------------------- normal equations
def test_normal_equations_match_a_direct_ridge_solve():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((500, 1, 12))
    Y = X[:, 0] @ rng.standard_normal((12, 5)) + 0.3 + 0.01 * rng.standard_normal((500, 5))
    held = np.arange(500) % 5 == 0
    ne = NormalEquations(1, 12, 5, chunk_bytes=8 * 13 * 37)  # several flushes
    for lo in range(0, 500, 70):
        ne.add(X[lo:lo + 70], Y[lo:lo + 70, None], held[lo:lo + 70])
    W, b = ne.solve(1e-3, True, train_only=False)
    sol = ridge_solve(X[:, 0], Y, 1e-3, True)
    np.testing.assert_allclose(W[0], sol[:-1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b[0], sol[-1], rtol=1e-8, atol=1e-10)
    Wt, bt = ne.solve(1e-3, True, train_only=True)
    sol = ridge_solve(X[~held, 0], Y[~held], 1e-3, True)
    np.testing.assert_allclose(Wt[0], sol[:-1], rtol=1e-8, atol=1e-10)
    direct = np.mean((X[held, 0] @ Wt[0] + bt[0] - Y[held]) ** 2)
    assert ne.mse(Wt, bt) == pytest.approx(direct, rel=1e-6)
    assert ne.rows.tolist() == [400, 100]


def _brute_force_fit(X, Y, held, ridge, steps, bias, scale_rows, prior=None):
    """The ridge step with the lowest held-out MSE (training rows only; lambda from the mean
    diagonal of ``scale_rows``' Gram matrix; the ridge pulls the weights towards ``prior``), and
    its solution on all rows with that lambda."""
    def design(x):
        return np.concatenate([x, np.ones((len(x), 1))], axis=1) if bias else x

    def solve(rows, lam):
        A = design(X[rows]).T @ design(X[rows])
        A[np.arange(k), np.arange(k)] += lam + 1e-12
        B = design(X[rows]).T @ Y[rows]
        if prior is not None:
            B[:k] += (lam + 1e-12) * prior
        return np.linalg.solve(A, B)

    k = X.shape[1]
    scale = np.mean(np.sum(X[scale_rows] ** 2, axis=0))
    errs = [np.mean((design(X[held]) @ solve(~held, ridge * step * scale) - Y[held]) ** 2) for step in steps]
    best = int(np.argmin(errs))
    return errs[best], ridge * steps[best], solve(slice(None), ridge * steps[best] * scale)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("noise", [0.05, 20.0])  # the smallest ridge wins / a larger one wins
@pytest.mark.parametrize("prior", [False, True])  # the ridge pulls towards zero / given weights
def test_held_out_update_fit_matches_a_brute_force_search(bias, noise, prior):
    """Fewer held-out rows than unknowns: the ridge step and the all-rows solution from one
    factorisation per step tried (held-out error slope, Woodbury update) equal a separate solve
    per step and a direct all-rows solve. The search starts at the second step and follows the
    slope: with little noise it takes two solves (the second step, then the first)."""
    rng = np.random.default_rng(3)
    n, k, no = 250, 80, 6
    X = rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) * 0.3
    Y = X @ rng.standard_normal((k, no)) * 0.1 + 0.2 + noise * rng.standard_normal((n, no))
    held = np.arange(n) % 5 == 0
    W0 = rng.standard_normal((k, no)) * 0.05 if prior else None
    ne = NormalEquations(1, k, no)
    ne.add(X[:, None], Y[:, None], held)
    assert ne.wide()
    steps = (1, 10, 100, 1000)
    err, lam, solves, all_rows = ne.fit(1e-3, steps, bias, prior=None if W0 is None else W0[None])
    want_err, want_lam, want = _brute_force_fit(X, Y, held, 1e-3, steps, bias, ~held, W0)
    assert lam == want_lam and err == pytest.approx(want_err, rel=1e-9)
    # the steps from the second to the chosen one and one beyond; with little noise (and the
    # bias fitted) the smallest ridge wins: the second step's slope points down, the first's up
    assert solves <= abs(steps.index(round(lam / 1e-3)) - 1) + 2
    if noise < 1 and bias and not prior:
        assert (lam, solves) == (1e-3, 2)
    if noise > 1:
        assert lam > 1e-3
    W, b = all_rows()
    np.testing.assert_allclose(W[0], want[:k], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(b[0], want[k] if bias else 0.0, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("prior", [False, True])
def test_direct_fit_matches_a_brute_force_search(prior):
    """More held-out rows than unknowns (and grouped maps): one training solve per step tried,
    lambda from the training rows, then one solve on all rows."""
    rng = np.random.default_rng(4)
    n, k, no = 400, 10, 3
    X = rng.standard_normal((n, k))
    Y = X @ rng.standard_normal((k, no)) + 3.0 * rng.standard_normal((n, no))
    held = np.arange(n) % 5 == 0
    W0 = rng.standard_normal((k, no)) if prior else None
    ne = NormalEquations(1, k, no)
    ne.add(X[:, None], Y[:, None], held)
    assert not ne.wide()
    err, lam, solves, all_rows = ne.fit(1e-3, (1, 10, 100, 1000), True, prior=None if W0 is None else W0[None])
    want_err, want_lam, _ = _brute_force_fit(X, Y, held, 1e-3, (1, 10, 100, 1000), True, ~held, W0)
    assert lam == want_lam and err == pytest.approx(want_err, rel=1e-9) and solves >= 2
    W, b = all_rows()
    Wd, bd = ne.solve(lam, True, train_only=False, prior=None if W0 is None else W0[None])
    np.testing.assert_array_equal(W, Wd)
    np.testing.assert_array_equal(b, bd)


def test_grouped_conv_rows_reproduce_the_conv():
    """A grouped conv as per-group linear maps: patches @ W + b gives ONNX Runtime's output."""
    b = GraphBuilder("g", seed=0)
    x = b.input("input", [2, 6, 7, 7])
    b.output(b.conv(x, 9, 3, stride=2, group=3), "output")
    model = b.build()
    ir = edgec.from_model(model)
    node = ir.nodes[0]
    lm = LinearMap.of(node, ir.const_value(node.inputs[1]), ir.const_value(node.inputs[2]), len(node.inputs))
    assert lm.W.shape == (3, 2 * 9, 3)
    feeds = verify.random_inputs(model, batch=2)
    y = verify.run(model, feeds)["output"]
    idx = lm.positions(y, 20, np.random.default_rng(0))
    X = lm.x_rows(feeds["input"], y.shape, idx)
    got = np.einsum("rgk,gko->rgo", X, lm.W) + lm.b[None]
    np.testing.assert_allclose(got, lm.y_rows(y, idx), rtol=1e-4, atol=1e-5)
    w = ir.const_value(node.inputs[1])
    assert np.array_equal(lm.tensors(lm.W, lm.b, w)[0], w)
    assert conv_patches(feeds["input"], node, w, (idx // 16, idx % 16 // 4, idx % 4)).shape == (20, 54)


@pytest.mark.parametrize("batch", [1, 3])
def test_patches_equal_a_direct_im2col(batch):
    """The im2col rows (gathered per channel plane) equal the patches read element by element,
    with stride, dilation and uneven padding, for one sample and for a batch."""
    import onnx_graphsurgeon as gs
    node = gs.Node(op="Conv", attrs={"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 3]})
    x = np.random.default_rng(1).standard_normal((batch, 5, 9, 8)).astype(np.float32)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 3)))
    ho, wo = (9 + 3 - 3) // 2 + 1, (8 + 3 - 5) + 1
    rng = np.random.default_rng(2)
    idx = rng.choice(batch * ho * wo, size=17, replace=False)
    n, rem = np.divmod(idx, ho * wo)
    oy, ox = np.divmod(rem, wo)
    want = np.stack([xp[a, :, b * 2:b * 2 + 3, c:c + 5:2].reshape(-1) for a, b, c in zip(n, oy, ox)])
    np.testing.assert_array_equal(lstsq.patches(x, node, (3, 3), (n, oy, ox)), want)


# ---------------------------------------------------------------------------- the staged run
def _chain_model():
    b = GraphBuilder("chain", seed=0)
    x = b.input("input", [1, 3, 8, 8])
    y = b.relu(b.conv(x, 4, 3))
    a = b.conv(y, 4, 1)                 # conv_1 and conv_2 both read y: one part
    c = b.conv(y, 4, 3)
    z = b.relu(b.add(a, c))
    b.output(b.conv(z, 2, 1), "output")  # conv_3 reads both: the next part
    return b.build()


def test_staged_run_values_and_parts():
    model = _chain_model()
    feeds = [verify.random_inputs(model, seed=s) for s in range(3)]
    names = [n.name for n in model.graph.node]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    layers = {n.name: n.input[0] for n in convs[1:]}
    staged = StagedRun(model, feeds, layers)
    waves = []
    for ready in staged.waves():
        waves.append(sorted(ready))
        for nm in ready:  # the input a layer sees equals the full model's value at that tensor
            want = [runtime.run_outputs(runtime.augment(model, [layers[nm]]), [f])[layers[nm]] for f in feeds]
            for got, exp in zip(staged.batches(layers[nm]), want):
                np.testing.assert_array_equal(got, exp)
    assert waves == [sorted([convs[1].name, convs[2].name]), [convs[3].name]]
    assert staged.parts == 2 and len(names) == 7


def test_staged_run_uses_replaced_constants_downstream():
    model = _chain_model()
    feeds = [verify.random_inputs(model, seed=s) for s in range(2)]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    staged = StagedRun(model, feeds, {c.name: c.input[0] for c in convs[1:]})
    it = staged.waves()
    first = next(it)
    for nm in first:  # zero weights and bias 1: both branch outputs are 1 everywhere
        staged.replace(nm, {1: np.zeros((4, 4) + ((1, 1) if nm == convs[1].name else (3, 3)), np.float32),
                            2: np.ones(4, np.float32)})
    second = next(it)
    assert second == [convs[3].name]
    for z in staged.batches(convs[3].input[0]):
        np.testing.assert_array_equal(z, np.full((1, 4, 8, 8), 2.0, np.float32))


def test_staged_run_allows_unnamed_and_repeated_names_outside_the_layers():
    """Only the re-fitted layers are looked up by name (PP-OCRv4's recogniser has unnamed nodes)."""
    model = _chain_model()
    feeds = [verify.random_inputs(model, seed=s) for s in range(2)]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    others = [n for n in model.graph.node if n.op_type != "Conv"]
    assert len(others) >= 2
    others[0].name, others[1].name = "", ""
    layers = {c.name: c.input[0] for c in convs[1:]}
    staged = StagedRun(model, feeds, layers)
    assert sorted(nm for wave in staged.waves() for nm in wave) == sorted(layers)
    convs[2].name = convs[1].name
    with pytest.raises(ValueError, match="unique node name"):
        StagedRun(model, feeds, {convs[1].name: convs[1].input[0]})


def test_staged_run_waits_for_needed_tensors_and_breaks_a_mutual_wait():
    """A layer with extra needs waits until they are final; two layers each needing the other's
    output (both operands of one Add) do not deadlock: the first goes without (``dropped``), and
    the second then sees the first's result."""
    model = _chain_model()
    feeds = [verify.random_inputs(model, seed=s) for s in range(2)]
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    a, c = convs[1], convs[2]
    layers = {n.name: n.input[0] for n in convs[1:]}
    staged = StagedRun(model, feeds, layers, {a.name: [c.output[0]], c.name: [a.output[0]]})
    waves = []
    for ready in staged.waves():
        waves.append(sorted(ready))
        if ready == [c.name]:  # a's output is final (and kept) when c is ready
            want = [runtime.run_outputs(runtime.augment(model, [a.output[0]]), [f])[a.output[0]] for f in feeds]
            for got, exp in zip(staged.batches(a.output[0]), want):
                np.testing.assert_array_equal(got, exp)
    assert waves == [[a.name], [c.name], [convs[3].name]] and staged.dropped == {a.name}
    staged = StagedRun(model, feeds, layers, {convs[3].name: [a.output[0]]})  # no conflict: nothing dropped
    assert [sorted(w) for w in staged.waves()] == [sorted([a.name, c.name]), [convs[3].name]]
    assert not staged.dropped


def test_residual_partner_through_batchnorm_bias_scale_and_transposes():
    """The partner of a layer whose output flows alone into a residual Add: through an inference
    BatchNormalization (its per-channel scale), a constant Add, and a channels-last MLP's
    Transposes with a layer-scale Mul (ConvNeXt: the partner's layout is the layer's permuted);
    none when the output has another reader or a constant varies along another axis."""
    b = GraphBuilder("partner", seed=0)
    x = b.input("input", [1, 4, 6, 6])
    y = b.add(b.bn(b.conv(x, 4, 3, bias=False)), x)
    z = b.conv(y, 4, 1)
    y2 = b.add(b.add(z, np.full((1, 4, 1, 1), 0.5, np.float32)), y)
    m = b.linear(b.transpose(y2, [0, 2, 3, 1]), 4)  # MatMul + bias Add, channels last
    layer_scale = np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1)
    y3 = b.add(b.mul(b.transpose(m, [0, 3, 1, 2]), layer_scale), y2)
    b.output(b.add(b.mul(b.conv(y3, 4, 1), np.ones((1, 1, 6, 1), np.float32)), y3), "out1")  # varies on H
    w = b.conv(y3, 4, 1)
    b.output(b.add(w, b.relu(w)), "out2")  # w is read twice: no partner
    model = b.build(value_info=True)
    ir = edgec.from_model(model)
    ir.infer_shapes()
    convs = [n for n in ir.nodes if n.op == "Conv"]
    bn = next(n for n in ir.nodes if n.op == "BatchNormalization")
    r, scale, perm = _residual_partner(ir, convs[0])
    g, v = (ir.const_value(bn.inputs[i]).astype(np.float64) for i in (1, 4))
    assert r == "input" and np.allclose(scale, g / np.sqrt(v + bn.attrs["epsilon"])) and perm == (0, 1, 2, 3)
    r, scale, perm = _residual_partner(ir, convs[1])
    assert r == convs[1].inputs[0].name and np.array_equal(scale, np.ones(4))
    matmul = next(n for n in ir.nodes if n.op == "MatMul")
    r, scale, perm = _residual_partner(ir, matmul)
    assert r == y2 and np.array_equal(scale, [1, 2, 3, 4]) and perm == (0, 3, 1, 2)
    assert _residual_partner(ir, convs[2]) is None and _residual_partner(ir, convs[3]) is None


def _residual_stack(blocks: int = 4):
    """``blocks`` residual blocks ``x + conv1x1(relu(conv3x3(x)))`` on an 8-channel stream (the
    graph input's channels: the stream is not pruned, the blocks' 16 inner channels are)."""
    b = GraphBuilder("residual_stack", seed=2)
    x = b.input("input", [1, 8, 8, 8])
    for _ in range(blocks):
        x = b.add(x, b.conv(b.relu(b.conv(x, 16, 3)), 8, 1))
    b.output(x, "output")
    return b.build()


def _fit_with_and_without_residual(model, feeds, held, seed, monkeypatch):
    """Prune ``model`` by half (random scores, ``seed``) and reconstruct it twice, with plain and
    with residual targets. Returns the relative output errors (fitted samples, held-out ones) per
    setting, the layers given residual targets per setting, the targets each layer was fitted to
    in the residual run (``_fit``'s ``ys``), the unpruned model and the residual run's IR."""
    errs, done, seen = {}, {}, {}
    real_fit = reconstruct_mod._fit

    def spy(lm, xs, ys, *a, **k):
        seen[lm.node.name] = ys
        return real_fit(lm, xs, ys, *a, **k)
    monkeypatch.setattr(reconstruct_mod, "_fit", spy)
    for residual in (False, True):
        original, ir, kept, _ = _pruned(model, 0.5, seed=seed)
        rep = reconstruct(ir, original, feeds, kept, residual=residual)
        errs[residual] = (_rel(original, ir.to_onnx(), feeds), _rel(original, ir.to_onnx(), held))
        done[residual] = [r["layer"] for r in rep if r.get("residual")]
    return errs, done, seen, original, ir


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_residual_targets_absorb_the_partners_error(seed, monkeypatch):
    """Each block's last conv is fitted to the unpruned sum less the pruned stream (the Add's
    other operand): its targets are exactly ``y_o + r_o - r_p`` at its sampled rows, and the
    pruned model's output error, on the fitted samples and on others, is below the plain fit's
    (which only matches each conv's own output, so the stream's error accumulates)."""
    model = _residual_stack()
    feeds = [verify.random_inputs(model, seed=s) for s in range(16)]
    held = [verify.random_inputs(model, seed=100 + s) for s in range(8)]
    errs, done, seen, original, ir = _fit_with_and_without_residual(model, feeds, held, seed, monkeypatch)
    assert done == {False: [], True: ["conv_1", "conv_3", "conv_5", "conv_7"]}
    # the targets of conv_3 (second block): its unpruned output plus the stream before it, less
    # the pruned stream there (block one's conv re-fitted), at the sampled rows
    node = next(n for n in ir.nodes if n.name == "conv_3")
    y = node.outputs[0].name
    r = next(t.name for t in node.outputs[0].outputs[0].inputs if t.name != y)
    orig = runtime.augment(original, [y, r])
    final = runtime.augment(ir.to_onnx(), [r])
    for f, (shape, idx, rows) in zip(feeds, seen["conv_3"]):
        o, p = runtime.run_outputs(orig, [f]), runtime.run_outputs(final, [f])
        n_, rem = np.divmod(idx, shape[2] * shape[3])
        oy, ox = np.divmod(rem, shape[3])
        want = o[y][n_, :, oy, ox] + o[r][n_, :, oy, ox] - p[r][n_, :, oy, ox]
        np.testing.assert_allclose(rows[:, 0], want, rtol=1e-5, atol=1e-5)
    print(f"\nseed {seed}: rel L2 fitted/held-out samples, plain {errs[False]}, residual targets {errs[True]}")
    assert errs[True][0] < errs[False][0] and errs[True][1] < errs[False][1]


def _channels_last_stack(blocks: int = 3):
    """ConvNeXt-style blocks: ``x + scale * T(MatMul(relu(MatMul(T(x)))))``, the MLP channels
    last between Transposes, a per-channel layer scale; the stream (the input's 8 channels) is
    not pruned, the MLPs' 24 inner channels are."""
    b = GraphBuilder("channels_last", seed=4)
    x = b.input("input", [1, 8, 6, 6])
    for k in range(blocks):
        h = b.linear(b.relu(b.linear(b.transpose(x, [0, 2, 3, 1]), 24, gain=2.0)), 8)
        x = b.add(x, b.mul(b.transpose(h, [0, 3, 1, 2]), np.linspace(0.5, 1.5, 8, dtype=np.float32).reshape(8, 1, 1)))
    b.output(x, "output")
    return b.build()


def test_residual_targets_through_transposes_and_a_layer_scale(monkeypatch):
    """Through the Transposes and the layer scale: each block's second MatMul is fitted to
    ``y_o + T^-1(r_o - r_p) / s`` at its rows (checked against both models' tensors), and the
    output ends closer to the unpruned one than with plain targets, on the fitted samples and
    on others."""
    model = _channels_last_stack()
    feeds = [verify.random_inputs(model, seed=s) for s in range(12)]
    held = [verify.random_inputs(model, seed=100 + s) for s in range(6)]
    errs, done, seen, original, ir = _fit_with_and_without_residual(model, feeds, held, 3, monkeypatch)
    assert done == {False: [], True: ["matmul_1", "matmul_3", "matmul_5"]}  # the ones reading pruned channels
    node = next(n for n in ir.nodes if n.name == "matmul_3")  # the second block's
    add = node.outputs[0].outputs[0]  # the bias Add, the Transpose, the Mul, the residual Add
    y = add.outputs[0].name  # the layer's output: the MatMul fits the bias its Add gives
    tr = add.outputs[0].outputs[0]
    mul = tr.outputs[0].outputs[0]
    res = mul.outputs[0].outputs[0]
    r = next(t.name for t in res.inputs if t is not mul.outputs[0])
    s = np.linspace(0.5, 1.5, 8)
    orig, final = runtime.augment(original, [y, r]), runtime.augment(ir.to_onnx(), [r])
    for f, (shape, idx, rows) in zip(feeds, seen["matmul_3"]):
        o, p = runtime.run_outputs(orig, [f]), runtime.run_outputs(final, [f])
        d = (o[r] - p[r]).transpose(0, 2, 3, 1).reshape(-1, 8)[idx]
        want = o[y].reshape(-1, 8)[idx] + d / s
        np.testing.assert_allclose(rows[:, 0], want, rtol=1e-5, atol=1e-5)
    print(f"\nchannels-last stack: rel L2 fitted/held-out, plain {errs[False]}, residual targets {errs[True]}")
    assert errs[True][0] < errs[False][0] and errs[True][1] < errs[False][1]


# ---------------------------------------------------------------------------- depthwise and grouped convs
def test_depthwise_convs_are_refitted_and_lower_the_error():
    model = ALL_MODELS["mobilenet_v2"](batch=4)
    calib = [verify.random_inputs(model, seed=s) for s in range(12)]
    held = [verify.random_inputs(model, seed=100 + s) for s in range(4)]
    original, ir, kept, plain = _pruned(model, 0.3)
    report = reconstruct(ir, original, calib, kept)
    dw = [r for r in report if r.get("groups", 1) > 1]
    # every depthwise conv whose input carries an error is re-fitted (the first one reads the
    # stem's surviving channels exactly as they were: nothing to fit)
    assert len(dw) >= 4 and all(r["refit"] or r["val_mse_before"] < 1e-9 for r in dw), dw
    assert all(r["val_mse_after"] < r["val_mse_before"] for r in dw if r["refit"])
    e_plain, e_rec = _rel(original, plain, held), _rel(original, ir.to_onnx(), held)
    print(f"\nmobilenet_v2 30%: rel L2 without reconstruction {e_plain:.4f}, with {e_rec:.4f} "
          f"({len(dw)} depthwise convs re-fitted)")
    assert e_rec < 0.3 * e_plain


def _revert(model, plain, layer):
    """``model`` with node ``layer``'s inputs and constants as in ``plain``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    node = next(n for n in m.graph.node if n.name == layer)
    old = next(n for n in plain.graph.node if n.name == layer)
    inits = {t.name: t for t in plain.graph.initializer}
    keep = [t for t in m.graph.initializer if t.name not in set(node.input) | set(old.input)]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + [inits[x] for x in old.input if x in inits])
    node.ClearField("input")
    node.input.extend(old.input)
    return m


def test_depthwise_refit_brings_its_output_closer_in_onnxruntime():
    """expand 1x1 -> depthwise 3x3 -> 1x1, pruned together. On held-out inputs in ONNX Runtime,
    the depthwise conv's output (its surviving channels) is closer to the unpruned model's with
    its per-channel fit than with its pruned weights on the same (re-fitted) input; and the whole
    reconstruction lowers the output error."""
    b = GraphBuilder("dw", seed=1)
    x = b.input("input", [4, 3, 10, 10])
    y = b.conv_bn(x, 12, 3)
    y = b.conv_bn(y, 24, 1, act="relu6")
    y = b.conv_bn(y, 24, 3, group=24, act="relu6")
    y = b.conv_bn(y, 12, 1, act=None)
    b.output(b.classifier(y, 5), "output")
    model = b.build()
    calib = [verify.random_inputs(model, seed=s, batch=4) for s in range(8)]
    held = [verify.random_inputs(model, seed=50 + s, batch=4) for s in range(3)]
    original, ir, kept, plain = _pruned(model, 0.5)
    report = reconstruct(ir, original, calib, kept)
    dw = [r for r in report if r.get("groups", 1) > 1]
    assert len(dw) == 1 and dw[0]["refit"] and dw[0]["groups"] == 12, report
    rec = ir.to_onnx()
    without = _revert(rec, plain, dw[0]["layer"])  # upstream fits unchanged, downstream irrelevant
    out = next(n.output[0] for n in rec.graph.node if n.name == dw[0]["layer"])
    axis, pos = kept[out]

    def err(m):
        ref = runtime.run_outputs(runtime.augment(original, [out]), held)[out]
        got = runtime.run_outputs(runtime.augment(m, [out]), held)[out]
        return float(np.linalg.norm(got - np.take(ref, pos, axis=axis)) / np.linalg.norm(ref))

    e_fit, e_pruned = err(rec), err(without)
    print(f"\ndepthwise output rel L2: pruned weights {e_pruned:.4f}, per-channel fit {e_fit:.4f}")
    assert e_fit < e_pruned  # measured: 0.474 -> 0.452 (a per-channel fit cannot undo much of its input's error)
    assert _rel(original, rec, held) < 0.5 * _rel(original, plain, held)


def test_grouped_conv_is_refitted_per_group():
    b = GraphBuilder("grouped", seed=2)
    x = b.input("input", [2, 3, 10, 10])
    y = b.conv_bn(x, 16, 3)
    y = b.conv_bn(y, 16, 1)  # re-fitted: the grouped conv's input carries an error to fit
    y = b.conv_bn(y, 16, 3, group=4)
    y = b.conv_bn(y, 8, 1)
    b.output(b.classifier(y, 5), "output")
    model = b.build()
    calib = [verify.random_inputs(model, seed=s, batch=2) for s in range(12)]
    held = [verify.random_inputs(model, seed=60 + s, batch=2) for s in range(4)]
    original, ir, kept, plain = _pruned(model, 0.25)
    report = reconstruct(ir, original, calib, kept)
    grouped = [r for r in report if r.get("groups", 1) > 1]  # whole groups go: group 4 -> 3
    assert len(grouped) == 1 and grouped[0]["groups"] == 3 and grouped[0]["refit"] and grouped[0]["val_mse_after"] < grouped[0]["val_mse_before"]
    assert _rel(original, ir.to_onnx(), held) < 0.7 * _rel(original, plain, held)


def test_ridge_towards_the_current_weights():
    """``prior="current"``: the ridge pulls towards the pruned weights, not zero. With a huge ridge
    a re-fitted layer keeps its current weights (only its bias moves), where the zero prior
    shrinks them; an unknown prior is refused."""
    model = ALL_MODELS["resnet_basic"](batch=2)
    calib = [verify.random_inputs(model, seed=s) for s in range(6)]
    fits = {}
    for prior in ("zero", "current"):
        original, ir, kept, plain = _pruned(model, 0.3)
        report = reconstruct(ir, original, calib, kept, ridge=1e6, prior=prior)
        refit = [r for r in report if r["refit"] and r.get("groups", 1) == 1]
        assert refit, report
        pw = {t.name: onnx.numpy_helper.to_array(t) for t in plain.graph.initializer}
        node = {n.name: n for n in plain.graph.node}
        new = {n.name: n for n in ir.nodes}
        r = refit[0]["layer"]
        fits[prior] = (pw[node[r].input[1]], ir.const_value(new[r].inputs[1]))
    w0, w = fits["current"]
    np.testing.assert_allclose(w, w0, rtol=1e-3, atol=1e-6)
    w0, w = fits["zero"]
    assert np.linalg.norm(w) < 0.1 * np.linalg.norm(w0)
    original, ir, kept, _ = _pruned(model, 0.3)
    with pytest.raises(ValueError, match="ridge prior"):
        reconstruct(ir, original, calib, kept, prior="mean")


def test_layers_too_wide_for_a_closed_form_fit_are_left_as_pruned(monkeypatch):
    """A layer with more inputs per output than MAX_UNKNOWNS is not re-fitted (VGG-19's first
    fully connected layer would need a system about 17,600 wide after 30% pruning); the
    report says why, the narrower layers are still re-fitted, and the model still runs."""
    from edgec.passes import reconstruct as rec_mod
    model = ALL_MODELS["resnet_bottleneck"](batch=1)
    calib = [verify.random_inputs(model, seed=s) for s in range(8)]
    original, ir, kept, plain = _pruned(model, 0.3)
    full = {r["layer"]: r for r in reconstruct(ir.copy(), original, calib, kept)}
    sizes = {}
    for n in ir.nodes:
        if n.name in full and n.op == "Conv":
            w = ir.const_value(n.inputs[1])
            sizes[n.name] = int(np.prod(w.shape[1:])) + 1
    limit = sorted(sizes.values())[len(sizes) // 2]
    monkeypatch.setattr(rec_mod, "MAX_UNKNOWNS", limit)
    report = {r["layer"]: r for r in reconstruct(ir, original, calib, kept)}
    wide = [n for n, k in sizes.items() if k > limit]
    assert wide and all(not report[n]["refit"] and "too wide to re-fit" in report[n]["reason"] for n in wide)
    assert any(r["refit"] for n, r in report.items() if n not in wide)
    # the narrower layers' re-fit still brings the output closer than pruning alone
    assert runtime.output_error(original, ir.to_onnx(), calib)["rel_l2"] < runtime.output_error(original, plain, calib)["rel_l2"]


# ---------------------------------------------------------------------------- the ridge's prior, chosen per layer
@pytest.mark.parametrize("wide", [False, True])
def test_fit_priors_is_the_better_of_the_single_prior_fits_at_no_more_factorisations(wide):
    """``fit_priors`` with the zero and the current prior gives what the better of two separate
    :meth:`fit` calls gives (held-out error, ridge, all-rows solution), names it, and shares
    their factorisations: each search starts at the same step, so at least the first is shared,
    and a step both reach is solved once."""
    rng = np.random.default_rng(7)
    n, k, no = (250, 80, 6) if wide else (400, 10, 3)
    X = rng.standard_normal((n, k)) @ rng.standard_normal((k, k)) * 0.3
    W_true = rng.standard_normal((k, no)) * 0.1
    Y = X @ W_true + 0.2 + 0.5 * rng.standard_normal((n, no))
    held = np.arange(n) % 5 == 0
    chosen = set()
    for W0 in (W_true + 0.01 * rng.standard_normal((k, no)), rng.standard_normal((k, no))):
        ne = NormalEquations(1, k, no)
        ne.add(X[:, None], Y[:, None], held)
        assert ne.wide() == wide
        single = {nm: ne.fit(1e-3, RIDGE_STEPS, True, prior=p) for nm, p in (("zero", None), ("current", W0[None]))}
        err, lam, solves, all_rows, name = ne.fit_priors(1e-3, RIDGE_STEPS, True, {"zero": None, "current": W0[None]})
        want = min(single, key=lambda nm: single[nm][0])
        assert name == want and lam == single[want][1] and err == pytest.approx(single[want][0], rel=1e-9)
        assert max(s[2] for s in single.values()) <= solves <= sum(s[2] for s in single.values()) - 1
        for got, exp in zip(all_rows(), single[want][3]()):
            np.testing.assert_allclose(got, exp, rtol=1e-7, atol=1e-10)
        chosen.add(name)
    assert chosen == {"zero", "current"}  # a prior near the truth wins, a random one loses


# ---------------------------------------------------------------------------- layers after a global pool
def _duplicated_channels_model(pool: str):
    """conv (16 channels, 8..15 repeating 0..7) -> ReLU -> pool -> Gemm, the pool a GAP then
    Flatten (``flatten``) or Reshape (``reshape``), or a ReduceMean over H, W without keepdims
    (``reducemean``, as TensorFlow exports a global pool)."""
    b = GraphBuilder("dup", seed=5)
    x = b.input("input", [1, 3, 12, 12])
    y = b.relu(b.conv(x, 16, 3))
    if pool == "reducemean":
        b.output(b.gemm(b.op("ReduceMean", [y], [1, 16], axes=[2, 3], keepdims=0), 10, gain=1.0), "output")
    else:
        b.output(b.classifier(y, 10, reshape=pool == "reshape"), "output")
    m = b.build()
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    for t in m.graph.initializer:
        if t.name in conv.input[1:]:
            a = onnx.numpy_helper.to_array(t).copy()
            a[8:] = a[:8]
            t.CopyFrom(onnx.numpy_helper.from_array(a, t.name))
    return m


@pytest.mark.parametrize("pool", ["flatten", "reshape", "reducemean"])
def test_a_layer_after_a_global_pool_is_fitted_on_the_pools_input_positions(pool):
    """Pruning the 8 repeated channels loses nothing a re-fit cannot restore (the Gemm's weights of
    a removed channel move to its twin). On 4 calibration samples the head has 4 pooled rows for
    9 unknowns per output, and the per-sample fit stays far off; fitted on the 12x12 positions
    before the pool (pool_rows, the default) it has 576 rows and restores the output, measured
    in ONNX Runtime on held-out inputs."""
    m = _duplicated_channels_model(pool)
    assert {"flatten": "Flatten", "reshape": "Reshape", "reducemean": "ReduceMean"}[pool] in {n.op_type for n in m.graph.node}
    calib = [verify.random_inputs(m, seed=s) for s in range(4)]
    held = [verify.random_inputs(m, seed=50 + s) for s in range(8)]
    errors = {}
    for pixels in (False, True):
        ir = edgec.from_model(m)
        original = ir.to_onnx()
        groups = find_groups(ir)
        scores = {g.id: np.r_[np.ones(8), np.zeros(8)] for g in groups if g.prunable}
        kept = apply_pruning(ir, groups, select(groups, scores, ratio=0.5))
        plain = ir.to_onnx()
        (entry,) = reconstruct(ir, original, calib, kept, pool_rows=pixels)
        assert entry["op"] == "Gemm" and entry["refit"]
        if pixels:
            assert entry["rows"] == 4 * 12 * 12 and "before the global pool" in entry["rows_of"]
            assert entry["val_rel_l2"] < 1e-2  # on held-out pixels, relative to the layer's output
        else:
            assert entry["rows"] == 4 and "rows_of" not in entry
        errors[pixels] = _rel(original, ir.to_onnx(), held)
    e_plain = _rel(original, plain, held)
    print(f"\n{pool}: rel L2 pruned {e_plain:.4f}, per-sample fit {errors[False]:.4f}, "
          f"per-position fit {errors[True]:.6f}")
    assert errors[True] < 1e-3 < 0.05 < errors[False] < e_plain


def test_two_heads_on_one_pool_of_a_refitted_conv():
    """Two Gemm heads read the same pooled vector, pooled straight from a conv that is itself
    re-fitted: both heads are fitted on that conv's pixels after its own re-fit (the staged run
    orders them), and the pruned model's outputs get closer to the original's in ONNX Runtime."""
    b = GraphBuilder("two_heads", seed=2)
    x = b.input("input", [1, 3, 12, 12])
    y = b.relu(b.conv(b.relu(b.conv(x, 16, 3)), 16, 3))
    y = b.conv(y, 16, 1)
    p = b.flatten(b.gap(y))
    b.output(b.gemm(p, 10, gain=1.0), "out1")
    b.output(b.gemm(p, 5, gain=1.0), "out2")
    model = b.build()
    calib = [verify.random_inputs(model, seed=s) for s in range(8)]
    held = [verify.random_inputs(model, seed=40 + s) for s in range(8)]
    original, ir, kept, plain = _pruned(model, 0.3)
    report = {r["layer"]: r for r in reconstruct(ir, original, calib, kept)}
    heads = [r for r in report.values() if r["op"] == "Gemm"]
    assert len(heads) == 2 and all(r["refit"] and "before the global pool" in r["rows_of"] for r in heads), report
    pool_in = next(n.inputs[0].name for n in ir.nodes if n.op == "GlobalAveragePool")
    producer = next(n.name for n in ir.nodes if n.outputs[0].name == pool_in)
    assert producer in report and all(r["part"] > report[producer]["part"] for r in heads)
    assert all(pool_in in r["rows_of"] for r in heads)
    assert _rel(original, ir.to_onnx(), held) < 0.5 * _rel(original, plain, held)


def _linear_ffn():
    """A transformer FFN as exporters write ``nn.Linear``: MatMul then Add(bias), on [1, 16, 8]
    tokens; the 32 hidden features after a ReLU carry large means (bias +2)."""
    h = onnx.helper
    rng = np.random.default_rng(3)
    arrays = {"w1": rng.standard_normal((8, 32)) * 0.3, "b1": np.full(32, 2.0), "w2": rng.standard_normal((32, 8)) * 0.3,
              "b2": rng.standard_normal(8) * 0.1}
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [h.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"), h.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_bias"),
             h.make_node("Relu", ["a1"], ["r"], name="relu"),
             h.make_node("MatMul", ["r", "w2"], ["m2"], name="fc2"), h.make_node("Add", ["b2", "m2"], ["y"], name="fc2_bias")]
    g = h.make_graph(nodes, "ffn", [h.make_tensor_value_info("x", 1, [1, 16, 8])],
                     [h.make_tensor_value_info("y", 1, [1, 16, 8])], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 17)])


def test_a_matmul_refits_the_bias_its_add_gives(monkeypatch):
    """A MatMul followed by a bias Add is fitted with that bias (written back into the Add): the
    removed features' means move into it. In ONNX Runtime, on the fitted samples and others, the
    output is closer than with the MatMul's weights alone re-fitted."""
    model = _linear_ffn()
    feeds = [verify.random_inputs(model, seed=s) for s in range(8)]
    held = [verify.random_inputs(model, seed=100 + s) for s in range(8)]
    errs, biases = {}, {}
    for with_bias in (True, False):
        if not with_bias:
            monkeypatch.setattr(reconstruct_mod, "bias_add", lambda ir, node: None)
        original, ir, kept, plain = _pruned(model, 0.5)
        assert "r" in kept and "a1" in kept
        rep = {r["layer"]: r for r in reconstruct(ir, original, feeds, kept)}
        assert rep["fc2"]["refit"]
        out = ir.to_onnx()
        biases[with_bias] = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
        fc2_bias = next(n for n in out.graph.node if n.name == "fc2_bias")
        biases[with_bias] = biases[with_bias][fc2_bias.input[0]]
        errs[with_bias] = (_rel(original, out, feeds), _rel(original, out, held), _rel(original, plain, held))
    b2 = onnx.numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "b2"))
    assert biases[True].shape == b2.shape and not np.allclose(biases[True], b2)  # fitted
    np.testing.assert_array_equal(biases[False], b2)  # left alone without it
    print(f"\nFFN at 50%: rel L2 pruned {errs[True][2]:.4f}; re-fitted with the bias {errs[True][1]:.4f}, "
          f"without {errs[False][1]:.4f} (held out)")
    assert errs[True][0] < errs[False][0] and errs[True][1] < errs[False][1]


def test_a_pooled_matmul_keeps_the_bias_its_add_gives():
    """Conv -> ReLU -> global pool -> MatMul -> Add(bias): the MatMul is fitted on the pooled rows
    with its bias (not on the pool's input positions, where the unpruned map would leave the bias
    out), so the Add's large bias survives and the re-fit lowers the error."""
    h = onnx.helper
    rng = np.random.default_rng(3)
    arrays = {"wc": rng.standard_normal((16, 3, 3, 3)) * 0.3, "bc": rng.standard_normal(16) * 0.1,
              "wm": rng.standard_normal((16, 4)) * 0.3, "bm": np.array([5.0, -3.0, 2.0, 4.0])}
    inits = [onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items()]
    nodes = [h.make_node("Conv", ["x", "wc", "bc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("Relu", ["c"], ["r"], name="relu"), h.make_node("GlobalAveragePool", ["r"], ["p"], name="gap"),
             h.make_node("Flatten", ["p"], ["f"], name="flat"), h.make_node("MatMul", ["f", "wm"], ["mm"], name="fc"),
             h.make_node("Add", ["mm", "bm"], ["y"], name="fc_bias")]
    g = h.make_graph(nodes, "pooled_linear", [h.make_tensor_value_info("x", 1, [2, 3, 8, 8])],
                     [h.make_tensor_value_info("y", 1, [2, 4])], inits)
    model = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    feeds = [verify.random_inputs(model, seed=s) for s in range(8)]
    original, ir, kept, plain = _pruned(model, 0.25)
    rep = {r["layer"]: r for r in reconstruct(ir, original, feeds, kept)}
    assert rep["fc"]["refit"] and "rows_of" not in rep["fc"]
    out = ir.to_onnx()
    add = next(n for n in out.graph.node if n.name == "fc_bias")
    bias = next(onnx.numpy_helper.to_array(i) for i in out.graph.initializer if i.name == add.input[1])
    assert np.allclose(bias, arrays["bm"], atol=1.0)  # re-fitted near the original, not wiped out
    assert _rel(original, out, feeds) < 0.5 * _rel(original, plain, feeds)


@pytest.mark.parametrize("layer, samples", [("conv", 12), ("matmul", 12), ("pooled", 12), ("conv", 6)])
def test_held_out_rows_are_whole_samples(layer, samples, monkeypatch):
    """The rows that pick the ridge and decide whether a re-fit is kept are whole samples (every
    fifth), not every fifth row: the pixels of one image are not independent of each other, so a
    fit that learnt that image's rows would pass a test on its other rows. With fewer than
    ``HOLDOUT_MIN_SAMPLES`` samples it falls back to every fifth row."""
    b = GraphBuilder("holdout", seed=0)
    x = b.input("input", [1, 5, 6] if layer == "matmul" else [1, 4, 6, 6])
    if layer == "matmul":
        b.output(b.linear(b.relu(b.linear(x, 6)), 3), "output")
    else:
        h = b.relu(b.conv(x, 6, 3))
        b.output(b.conv(b.gap(h), 3, 1) if layer == "pooled" else b.conv(h, 3, 3), "output")
    model = b.build()
    original, ir, kept, _ = _pruned(model, 0.5)
    seen = []
    add = NormalEquations.add

    def spy(self, X, Y, held_out):
        seen.append((len(X), np.asarray(held_out, bool).copy()))
        return add(self, X, Y, held_out)

    monkeypatch.setattr(NormalEquations, "add", spy)
    feeds = [verify.random_inputs(model, seed=s) for s in range(samples)]
    layers = reconstruct(ir, original, feeds, kept)
    assert [r for r in layers if r.get("rows")] and seen
    held = [h for _, h in seen]
    if samples >= reconstruct_mod.HOLDOUT_MIN_SAMPLES:  # batch j is sample j: held out when j % 5 == 0
        for j, h in enumerate(held[:samples]):
            assert h.all() if j % 5 == 0 else not h.any(), (j, h)
    else:
        rows = np.concatenate(held[:samples])
        assert rows.any() and not rows.all()
        assert np.array_equal(rows, np.arange(len(rows)) % 5 == 0)


def _deep_chain():
    """Four convs in a chain (ReLUs between); only the first one's output channels are pruned
    (the test scores that group alone), so conv_1 reads pruned channels and conv_2 and conv_3
    only read tensors computed from them."""
    b = GraphBuilder("deep_chain", seed=3)
    x = b.input("input", [1, 6, 10, 10])
    for width, k in ((16, 3), (16, 3), (16, 3)):
        x = b.relu(b.conv(x, width, k))
    b.output(b.conv(x, 8, 1), "output")
    return b.build()


@pytest.mark.parametrize("seed", [0, 1])
def test_layers_downstream_of_the_pruning_are_refitted_too(seed):
    """A layer that reads no pruned channel but a tensor pruning changed (conv_2, conv_3 after
    conv_1's re-fit, a ReLU between) is fitted to its unpruned output too (``downstream``, the
    default): conv_1's re-fit cannot make its output exact, and what is left passes through a
    nonlinearity that conv_2's fit can partly undo. The output error on held-out samples is
    below the fit of conv_1 alone (``downstream=False``), and the layers not re-fitted are the
    ones whose fit did not beat their weights on the held-out rows."""
    model = _deep_chain()
    feeds = [verify.random_inputs(model, seed=s) for s in range(24)]
    held = [verify.random_inputs(model, seed=200 + s) for s in range(8)]
    errs, layers = {}, {}
    for downstream in (False, True):
        ir = edgec.from_model(model)
        original = ir.to_onnx()
        groups = [g for g in find_groups(ir) if g.prunable]
        first = next(g for g in groups if any(o.node == "conv_0" for o in g.origins))
        scores = {first.id: np.random.default_rng(seed).random(first.channels)}
        kept = apply_pruning(ir, groups, select(groups, scores, ratio=0.5))
        rep = reconstruct(ir, original, feeds, kept, downstream=downstream)
        layers[downstream] = [r["layer"] for r in rep]
        assert all(r.get("refit") or r["val_mse_after"] >= r["val_mse_before"] for r in rep)
        errs[downstream] = _rel(original, ir.to_onnx(), held)
    print(f"\nseed {seed}: held-out rel L2, conv_1 alone {errs[False]:.4f}, downstream too {errs[True]:.4f}")
    assert layers == {False: ["conv_1"], True: ["conv_1", "conv_2", "conv_3"]}
    assert errs[True] < errs[False]


@pytest.mark.parametrize("via", ["reconstruct", "compile"])
def test_padding_copies_of_a_fixed_batch_are_left_out_of_the_fit(via, monkeypatch):
    """A fixed-batch model's last calibration batch is padded with copies of its samples. Those
    copies are left out of the re-fit (``n_samples``; ``compile`` passes the count it was
    given): a copy of a held-out sample among the training rows would let a fit that learnt the
    sample pass the held-out test. With a 4x4 output every position is a row, so a copy's rows
    are the held-out sample's rows exactly; with the count left out they do leak."""
    b = GraphBuilder("fixed_batch", seed=1)
    x = b.input("input", [4, 3, 4, 4])
    b.output(b.conv(b.relu(b.conv(x, 8, 3)), 3, 3), "output")
    model = b.build()
    data = np.random.default_rng(0).standard_normal((22, 3, 4, 4)).astype(np.float32)
    padded = np.concatenate([data, data[20:22]])  # the last batch: samples 20, 21 and their copies
    feeds = [{"input": padded[i:i + 4]} for i in range(0, 24, 4)]
    seen = []
    add = NormalEquations.add

    def spy(self, X, Y, held_out):
        seen.append((np.asarray(X).copy(), np.asarray(held_out, bool).copy()))
        return add(self, X, Y, held_out)

    monkeypatch.setattr(NormalEquations, "add", spy)

    def leaked() -> bool:
        train = {r.tobytes() for X, h in seen for r in X[~h]}
        held = [r.tobytes() for X, h in seen for r in X[h]]
        assert held and train
        return any(r in train for r in held)

    if via == "compile":
        edgec.compile(model, None, prune=0.5, calib={"input": data}, prune_mode="uniform", importance="l1",
                      round_to=1)
        assert not leaked()
        return
    for n_samples, leaks in ((None, True), (22, False)):
        seen.clear()
        original, ir, kept, _ = _pruned(model, 0.5)
        layers = reconstruct(ir, original, feeds, kept, n_samples=n_samples)
        assert [r for r in layers if r.get("rows")]
        assert leaked() == leaks


@pytest.mark.parametrize("build", ["chain", "ffn", "pooled"])
def test_unnamed_layers_are_refitted_as_named_ones(build):
    """Exporters may leave nodes unnamed (or share a name), and the staged run finds the layers by
    name: such layers (and a MatMul's bias Add) are given unique names, and the re-fit is the one
    the same model with named nodes gets, weight for weight. (Before, pruning such a model with
    calibration data failed: "StagedRun: each layer needs a unique node name".)"""
    model = {"chain": _deep_chain, "ffn": _linear_ffn, "pooled": lambda: _duplicated_channels_model("flatten")}[build]()
    unnamed = onnx.ModelProto()
    unnamed.CopyFrom(model)
    for n in unnamed.graph.node:
        n.name = ""
    feeds = [verify.random_inputs(model, seed=s) for s in range(12)]
    fitted = {}
    for key, m in (("named", model), ("unnamed", unnamed)):
        original, ir, kept, _ = _pruned(m, 0.5)
        rep = reconstruct(ir, original, feeds, kept)
        out = ir.to_onnx()
        layers = [r["layer"] for r in rep]
        assert all(layers) and all([n.name for n in out.graph.node].count(nm) == 1 for nm in layers)
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in out.graph.initializer}
        fitted[key] = ([r["refit"] for r in rep],
                       [inits[x] for n in out.graph.node if n.op_type in ("Conv", "Gemm", "MatMul", "Add")
                        for x in n.input if x in inits])
    assert any(fitted["named"][0]) and fitted["unnamed"][0] == fitted["named"][0]
    assert len(fitted["unnamed"][1]) == len(fitted["named"][1])
    for a, b in zip(*(fitted[k][1] for k in ("named", "unnamed"))):
        np.testing.assert_array_equal(a, b)
