"""The model's numbers, pinned to values computed another way.

Everywhere else a gradient mode is checked against another mode of the same code, which shares its
constants (``ops.BN_EPS``, the ``n - 1`` of the unbiased variance, the initialisation scales, the
schedule, the mean of the loss): change one of those and every mode moves together. Here jaxbirds is
compared with numbers WRITTEN IN as literals, which come from outside it:

* the cross-entropy, batch-norm and whole-model values and gradients were computed once, in float64,
  by a separate plain-numpy implementation of the tutorial's formulas (reproduced at the bottom of
  this file), its gradients by complex-step differentiation (``f'(x) = Im f(x + ih) / h``, ``h =
  1e-30``: no subtraction, so exact to float64 roundoff) and, for cross-entropy, also by the closed
  form ``(softmax - onehot) / n`` (the two agree to 1e-15);
* the initialisation is pinned by its statistics, with tolerances from the sample sizes;
* the schedule and the recipe are the tutorial's own numbers (``lr = 0.1 if i < 100000 else 0.01``);
* the first losses of the seeded default run can only be recorded from this code: they pin the
  whole pipeline (data order, PRNG streams, initialisation, the step) against drift, and the first
  is also checked against an independent Monte Carlo expectation.

The data pipeline's figures (28 characters + ``.``, split sizes 172,427 / 21,478 / 21,599) are pinned
in ``tests/test_data.py``.

Tolerances are normwise: ``max|got - want| <= rtol * max|want| + atol``. In float64 ``rtol = 1e-12``
(jaxbirds and the reference round differently, by a few units of 1e-16 of the largest terms: the
largest difference measured is 3e-16 relative); in float32, the same inputs rounded to float32,
``rtol = 1e-6``, about 8 units of float32 roundoff (the largest measured: 1.9e-7). Either is orders
of magnitude below what a changed constant does: ``eps = 1e-3`` instead of 1e-5 moves the batch-norm
output by 0.28 in the small-variance column and by 1e-4 in the other, the biased variance by 15 %.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxbirds import jvp, manual, model, ops, train, vjp

FLOAT64, FLOAT32 = (jnp.float64, 1e-12), (jnp.float32, 1e-6)
DTYPES = pytest.mark.parametrize("dtype, rtol", [FLOAT64, FLOAT32], ids=["float64", "float32"])


def assert_pinned(got, want, rtol: float, atol: float = 0.0, name: str = ""):
    """``max|got - want| <= rtol * max|want| + atol``, in float64."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err, allowed = float(np.max(np.abs(got - want))), rtol * float(np.max(np.abs(want))) + atol
    assert err <= allowed, f"{name}: max |got - want| = {err:.3e} > {allowed:.3e}\ngot  {got.tolist()}\nwant {want}"


# --------------------------------------------------------------------------- #
# Cross-entropy, 2 x 3                                                        #
# --------------------------------------------------------------------------- #

#: name -> (logits, labels, loss, dlogits = (softmax - onehot) / 2). By hand, e.g. "plain":
#: loss = (log(e^1 + e^2 + e^0.5) - 1 + log(e^-1 + e^0 + e^3) - 3) / 2. "tied": a row with two equal
#: maxima and a row of three. "large": logits near 1000, where exp overflows unless the row maximum is
#: subtracted first (row 2 also has a tied maximum).
CROSS_ENTROPY_CASES = {
    "plain": (
        [[1.0, 2.0, 0.5], [-1.0, 0.0, 3.0]],
        [0, 2],
        0.765126343932687,
        [
            [-0.38438805118892544, 0.3142658596058812, 0.07012219158304424],
            [0.008573912772760196, 0.02330631128898695, -0.031880224061747134],
        ],
    ),
    "tied": (
        [[2.0, 2.0, -1.0], [0.5, 0.5, 0.5]],
        [1, 2],
        0.9081741036674063,
        [
            [0.24392777558018416, -0.2560722244198158, 0.012144448839631604],
            [0.16666666666666669, 0.16666666666666669, -0.3333333333333333],
        ],
    ),
    "large": (
        [[1000.0, 999.0, 990.0], [998.0, 1000.0, 1000.0]],
        [1, 0],
        2.035959276327541,
        [
            [0.3655171577975664, -0.36553375225085744, 1.6594453290992606e-05],
            [-0.4683105308334812, 0.2341552654167406, 0.2341552654167406],
        ],
    ),
}
#: Row 2's label has probability e^-2000, below the smallest float: its loss is 1000 - (-1000) = 2000
#: exactly. The compact rules work with ``logsumexp(l - m) - (l_y - m)`` and get it; the tutorial's
#: atomic steps take ``log(probs)``, which is ``log(0) = -inf`` there, so they are left out of this
#: case (they serve the atomic manual pass and the gradient checker, never training).
EXTREME_CASE = (
    [[1000.0, 999.0, 990.0], [-1000.0, 1000.0, 0.0]],
    [1, 0],
    1000.6566474384878,
    [[0.3655171577975664, -0.36553375225085744, 1.6594453290992606e-05], [-0.5, 0.5, 0.0]],
)
CROSS_ENTROPY_RULES = {
    "ops.cross_entropy": ops.cross_entropy,
    "ops.cross_entropy_steps": ops.cross_entropy_steps,
    "vjp.cross_entropy": vjp.cross_entropy,
    "jvp.cross_entropy": jvp.cross_entropy,
}
#: The rules that have forward mode (a ``custom_vjp`` function has reverse mode only).
FORWARD_MODE = ("ops.cross_entropy", "ops.cross_entropy_steps", "jvp.cross_entropy")


@jax.jit
def cross_entropy_results(logits, labels):
    """rule -> (loss, ``jax.grad``, ``jax.jacfwd`` or None where the rule has no forward mode), every
    rule in one compiled program (one compile per dtype rather than an op-by-op dispatch per primitive)."""
    results = {}
    for rule, fn in CROSS_ENTROPY_RULES.items():
        loss, dlogits = jax.value_and_grad(fn)(logits, labels)
        results[rule] = loss, dlogits, jax.jacfwd(fn)(logits, labels) if rule in FORWARD_MODE else None
    return results


def check_cross_entropy(rule, case, dtype, rtol):
    logits_in, labels_in, want_loss, want_dlogits = case
    with jax.enable_x64(dtype == jnp.float64):
        logits, labels = jnp.asarray(logits_in, dtype), jnp.asarray(labels_in, jnp.int32)
        loss, dlogits, dlogits_forward = cross_entropy_results(logits, labels)[rule]
        assert loss.dtype == dtype and dlogits.dtype == dtype
        assert_pinned(loss, want_loss, rtol, name="loss")
        assert_pinned(dlogits, want_dlogits, rtol, name="dlogits (reverse mode)")
        if dlogits_forward is not None:
            assert_pinned(dlogits_forward, want_dlogits, rtol, name="dlogits (forward mode)")


@DTYPES
@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES)
@pytest.mark.parametrize("rule", CROSS_ENTROPY_RULES)
def test_cross_entropy_loss_and_gradient_equal_the_hand_computed_values(rule, case, dtype, rtol):
    """Every rule set's loss and ``jax.grad`` (and ``jax.jacfwd`` where forward mode exists) against
    the literal loss and ``(softmax - onehot) / n``, computed once with numpy (see the module docstring)."""
    check_cross_entropy(rule, CROSS_ENTROPY_CASES[case], dtype, rtol)


@DTYPES
@pytest.mark.parametrize("rule", [rule for rule in CROSS_ENTROPY_RULES if rule != "ops.cross_entropy_steps"])
def test_the_compact_cross_entropy_rules_survive_an_underflowing_probability(rule, dtype, rtol):
    check_cross_entropy(rule, EXTREME_CASE, dtype, rtol)


# --------------------------------------------------------------------------- #
# Batch norm, n = 4, H = 2                                                    #
# --------------------------------------------------------------------------- #

#: Column 0 has variance 7 (eps moves y by ~1e-6 relative: visible at float64 precision); column 1
#: has variance 5.7e-6, less than eps = 1e-5, so eps is most of the denominator. With n = 4 the
#: unbiased variance is 4/3 of the biased one.
BN_X = [[1.0, 0.003], [2.0, -0.001], [4.0, 0.002], [7.0, -0.002]]
BN_GAIN = [[1.5, -0.5]]
BN_BIAS = [[0.25, -1.0]]
BN_DY = [[0.3, -1.0], [-0.2, 0.5], [1.1, 0.25], [0.4, 2.0]]  # the cotangent pulled back
BN_Y = [
    [-1.1673657613808486, -1.3158069703999447],
    [-0.6004194568285091, -0.8105158177600332],
    [0.5334731522761698, -1.1894841822399669],
    [2.234312065933188, -0.6841930296000553],
]
BN_DX = [
    [0.044545636443016796, 128.67454219487107],
    [-0.27942362259245324, 23.853505211059655],
    [0.3766143598069875, -8.063156691062426],
    [-0.1417363736575511, -144.46489071486826],
]
BN_DGAIN = [[0.5669463045523394, -1.9895839135196511]]
BN_DBIAS = [[1.6, 1.75]]
BATCH_NORM_RULES = {
    "ops.batch_norm": ops.batch_norm,
    "ops.batch_norm_steps": ops.batch_norm_steps,
    "vjp.batch_norm": vjp.batch_norm,
    "jvp.batch_norm": jvp.batch_norm,
}
BN_FORWARD_MODE = ("ops.batch_norm", "ops.batch_norm_steps", "jvp.batch_norm")


@jax.jit
def batch_norm_results(x, gain, bias, dy):
    """rule -> (``y``, the pullback of ``dy``, the same three gradients from ``jax.jacfwd`` contracted
    with ``dy`` or None where the rule has no forward mode), every rule in one compiled program."""
    results = {}
    for rule, fn in BATCH_NORM_RULES.items():
        y, pullback = jax.vjp(fn, x, gain, bias)
        forward = None
        if rule in BN_FORWARD_MODE:
            jacobians = jax.jacfwd(fn, argnums=(0, 1, 2))(x, gain, bias)  # each (4, 2, *input shape)
            forward = tuple(jnp.tensordot(dy, jac, axes=2) for jac in jacobians)
        results[rule] = y, pullback(dy), forward
    return results


@DTYPES
@pytest.mark.parametrize("rule", BATCH_NORM_RULES)
def test_batch_norm_output_and_gradients_equal_the_numpy_values(rule, dtype, rtol):
    """``y`` and the pullback of ``BN_DY`` (``dx``, ``dgain``, ``dbias``) under every rule set, with
    eps = 1e-5 and the unbiased variance, against the numpy float64 reference (complex-step
    gradients); in forward mode too (``jacfwd`` contracted with ``dy``) where the rule has one."""
    with jax.enable_x64(dtype == jnp.float64):
        x, gain, bias, dy = (jnp.asarray(a, dtype) for a in (BN_X, BN_GAIN, BN_BIAS, BN_DY))
        y, reverse, forward = batch_norm_results(x, gain, bias, dy)[rule]
        assert y.dtype == dtype
        assert_pinned(y, BN_Y, rtol, name="y")
        for mode, grads in (("reverse", reverse), ("forward", forward)):
            if grads is None:
                continue
            for name, got, want in zip(("dx", "dgain", "dbias"), grads, (BN_DX, BN_DGAIN, BN_DBIAS), strict=True):
                assert_pinned(got, want, rtol, name=f"{name} ({mode} mode)")


#: Evaluation mode with given statistics: ``y = gain (x - mean) / sqrt(var + eps) + bias``; the
#: second column's variance 2e-5 is comparable to eps.
BN_EVAL_MEAN = [[3.0, 0.001]]
BN_EVAL_VAR = [[4.0, 2e-5]]
BN_EVAL_Y = [
    [-1.2499981250035155, -1.1825741858350554],
    [-0.49999906250175774, -0.8174258141649446],
    [0.9999990625017577, -1.0912870929175278],
    [3.249996250007031, -0.726138721247417],
]
BN_EVAL_DX = [
    [0.22499971875052732, 91.28709291752769],
    [-0.14999981250035155, -45.64354645876384],
    [0.8249989687519337, -22.82177322938192],
    [0.2999996250007031, -182.57418583505537],
]


@DTYPES
def test_batch_norm_eval_equals_the_numpy_values(dtype, rtol):
    with jax.enable_x64(dtype == jnp.float64):
        x, gain, bias, mean, var, dy = (
            jnp.asarray(a, dtype) for a in (BN_X, BN_GAIN, BN_BIAS, BN_EVAL_MEAN, BN_EVAL_VAR, BN_DY)
        )
        y, pullback = jax.vjp(lambda x: ops.batch_norm_eval(x, gain, bias, mean, var), x)  # 2 ops: eager is quick
        assert_pinned(y, BN_EVAL_Y, rtol, name="y")
        assert_pinned(pullback(dy)[0], BN_EVAL_DX, rtol, name="dx")


# --------------------------------------------------------------------------- #
# The whole model: vocab 4, context 2, embedding 2, hidden 3, batch 5         #
# --------------------------------------------------------------------------- #

TINY = model.ModelConfig(vocab_size=4, context_size=2, embedding_dim=2, hidden=3)
TINY_PARAMS = {
    "C": [[0.5, -1.0], [1.5, 0.25], [-0.75, 0.5], [0.0, 2.0]],
    "W1": [[0.4, -0.3, 0.8], [0.1, 0.9, -0.5], [-0.6, 0.2, 0.3], [0.7, -0.4, -0.2]],
    "b1": [0.05, -0.1, 0.2],
    "W2": [[1.0, -0.5, 0.3, 0.2], [-0.8, 0.6, 0.1, -0.4], [0.5, 0.7, -0.9, 0.3]],
    "b2": [0.1, -0.2, 0.0, 0.3],
    "bngain1": [[1.2, 0.8, -1.1]],
    "bnbias1": [[0.1, -0.3, 0.2]],
}
TINY_X = [[0, 1], [1, 2], [2, 3], [3, 0], [1, 1]]  # context ids, (5, 2); row 4 uses C[1] twice
TINY_Y = [2, 0, 3, 1, 1]
TINY_LOSS = 1.1431660736061697
TINY_LOGITS = [
    [-0.3171127196114285, -0.7027066798109274, 0.2493840408695638, 0.27380374815962816],
    [1.4314809069464949, -1.1681912789566118, 0.3738420566450349, 0.6835801319081881],
    [1.7502118850553072, -0.23365595770029174, -0.6267907552207319, 0.9209057180042477],
    [-0.932427505520839, 1.2297743873702947, -0.8746918686957801, 0.06221073266389321],
    [-0.1919505463582961, -0.784487765176167, 0.5024048236307014, 0.19712186520703312],
]
TINY_GRADS = {
    "C": [
        [-0.0878839452414003, 0.020877002523528934],
        [0.06681981267492416, 0.01658703021424758],
        [0.03604318493588445, -0.04160140963469798],
        [-0.014979052369408318, 0.0041373768969214545],
    ],
    "W1": [
        [0.10601007052556528, -0.03431769813092792, 0.12376587106899133],
        [0.014029734068951917, 0.019020287595395525, 0.14832588290832985],
        [0.11792536794724065, -0.11877212130554322, -0.09315677261823921],
        [0.038496453050260046, 0.009148153955187917, -0.015486288324168734],
    ],
    "b1": [0.0, 0.0, 0.0],  # exactly: batch norm removes any shift of hprebn
    "W2": [
        [-0.034793003604129964, 0.10489992173916864, 0.10347747064320477, -0.17358438877824342],
        [-0.02383604903845626, -0.01847736811421579, 0.05068894363992162, -0.00837552648724959],
        [0.09025424413498924, 0.06452505780950041, 0.040337298962398294, -0.19511660090688793],
    ],
    "b2": [0.11827250727421236, -0.19856592216961202, 0.010301156669508723, 0.06999225822589102],
    "bngain1": [[-0.06103576091688806, -0.022978271128310725, 0.0025037648389217835]],
    "bnbias1": [[0.18868402237476511, -0.16558399285936956, -0.04057803558541605]],
}
#: The gradients are ~0.1: db1's exact zero comes out as rounding noise of sums of such terms.
TINY_GRAD_SCALE = 0.2


def tiny_case(dtype):
    params = {name: jnp.asarray(value, dtype) for name, value in TINY_PARAMS.items()}
    model.check_params(params, TINY)
    return params, jnp.asarray(TINY_X, jnp.int32), jnp.asarray(TINY_Y, jnp.int32)


def assert_tiny_grads(grads, rtol, how, expected=TINY_GRADS):
    assert set(grads) == set(expected)
    for name in expected:
        assert_pinned(grads[name], expected[name], rtol, atol=rtol * TINY_GRAD_SCALE, name=f"d{name} ({how})")


@jax.jit
def tiny_model_results(params, X, Y):
    """rules -> (logits, loss, ``jax.grad`` of the loss) for every rule set, and the two manual passes:
    ``"fused"`` -> ``manual.fused_backward``, ``"atomic"`` -> (``manual.forward_intermediates``,
    ``manual.atomic_backward``); all in one compiled program."""
    results = {}
    for rules in model.RULES:
        loss, grads = jax.value_and_grad(model.loss)(params, X, Y, rules=rules)
        results[rules] = model.logits(params, X, rules=rules), loss, grads
    values = manual.forward_intermediates(params, X, Y)
    results["fused"] = manual.fused_backward(params, X, Y)
    results["atomic"] = values, manual.atomic_backward(params, X, Y, values)
    return results


@DTYPES
@pytest.mark.parametrize("rules", model.RULES)
def test_the_tiny_model_loss_logits_and_jax_grad_equal_the_numpy_values(rules, dtype, rtol):
    """``model.loss``, ``model.logits`` and ``jax.grad`` of the loss, under every rule set, on the
    hand-written parameters above, against the numpy float64 reference (complex-step gradients)."""
    with jax.enable_x64(dtype == jnp.float64):
        logits, loss, grads = tiny_model_results(*tiny_case(dtype))[rules]
        assert loss.dtype == dtype
        assert_pinned(logits, TINY_LOGITS, rtol, name="logits")
        assert_pinned(loss, TINY_LOSS, rtol, name="loss")
        assert_tiny_grads(grads, rtol, f"jax.grad, {rules}")


@DTYPES
def test_the_manual_backward_passes_equal_the_numpy_values(dtype, rtol):
    """The fused pass (``manual.fused_backward``) and the atomic pass (``manual.atomic_backward`` over
    ``manual.forward_intermediates``), no ``jax.grad`` in either, against the same literals."""
    with jax.enable_x64(dtype == jnp.float64):
        results = tiny_model_results(*tiny_case(dtype))
        fused, (values, atomic) = results["fused"], results["atomic"]
        assert_pinned(fused.loss, TINY_LOSS, rtol, name="loss (fused)")
        assert_tiny_grads(fused.grads, rtol, "fused")
        assert_pinned(values["loss"], TINY_LOSS, rtol, name="loss (atomic)")
        assert_pinned(values["logits"], TINY_LOGITS, rtol, name="logits (atomic)")
        assert_tiny_grads({name: atomic[name] for name in TINY_PARAMS}, rtol, "atomic")


# --------------------------------------------------------------------------- #
# Two blocks: hidden 3 then 2, the same embedding and first block             #
# --------------------------------------------------------------------------- #

DEEP = model.ModelConfig(vocab_size=4, context_size=2, embedding_dim=2, hidden=(3, 2))
DEEP_PARAMS = {
    **{name: TINY_PARAMS[name] for name in ("C", "W1", "b1", "bngain1", "bnbias1")},
    "W2": [[0.9, -0.7], [-0.4, 0.5], [0.6, 0.8]],
    "b2": [-0.15, 0.25],
    "W3": [[1.0, -0.5, 0.3, 0.2], [-0.8, 0.6, 0.1, -0.4]],
    "b3": [0.1, -0.2, 0.0, 0.3],
    "bngain2": [[0.7, -1.3]],
    "bnbias2": [[-0.2, 0.05]],
}
DEEP_LOSS = 1.4592049352383036
DEEP_LOGITS = [
    [-0.8366877015697145, 0.3389407891258414, -0.1609915152912412, 0.02794613367687604],
    [-0.24058851399609302, 0.14445142659272853, 0.19389063411213162, 0.022893693687162875],
    [0.7185840406113091, -0.5079515027122432, 0.18785409209219214, 0.4221081870101681],
    [0.2828142112717019, -0.48556789672845363, -0.2752290814759141, 0.5695557915654637],
    [-0.9173632358372973, 0.42223327804032623, -0.11217114854433709, -0.03973463931347271],
]
DEEP_GRADS = {
    "C": [
        [-0.02872352561727053, 0.025466514342900853],
        [0.011044402808283633, -0.030008742375377272],
        [0.03662513269304856, -0.03276567063620337],
        [-0.018946009884061667, 0.03730789866867982],
    ],
    "W1": [
        [-0.08795611429730801, 0.04096005895716973, 0.032455698177513814],
        [0.08654297947106766, -0.008508353717791866, -0.033953899129726975],
        [-0.04745260638062504, 0.029309310791984875, -0.12697176412901717],
        [-0.002775922009033053, -0.0352088964416425, 0.02424940126889333],
    ],
    "b1": [0.0, 0.0, 0.0],  # exactly, as for one block
    "W2": [
        [-0.03723960108061898, -0.08863876409842929],
        [0.09433680542629307, 0.005629005539879844],
        [0.11874861368349524, -0.08107676814675074],
    ],
    "b2": [0.0, 0.0],  # exactly: block 2's batch norm removes any shift of its input too
    "W3": [
        [-0.07269067633689448, 0.1538048282484347, 0.10271522576725944, -0.18382937767879962],
        [-0.1782949758872751, 0.17466432694680034, -0.009668425923871488, 0.013299074864346224],
    ],
    "b3": [0.0176525072035175, -0.13857325870467357, 0.030014356466971155, 0.0909063950341849],
    "bngain1": [[0.023531290023184017, -0.02253461918931185, -0.013189764410430287]],
    "bnbias1": [[-0.02372107849037832, 0.0025244010618160895, -0.05008990146497119]],
    "bngain2": [[-0.17375868519733464, -0.01775772849896915]],
    "bnbias2": [[0.04276169054644786, -0.04001574809754543]],
}


def deep_case(dtype):
    params = {name: jnp.asarray(value, dtype) for name, value in DEEP_PARAMS.items()}
    model.check_params(params, DEEP)
    return params, jnp.asarray(TINY_X, jnp.int32), jnp.asarray(TINY_Y, jnp.int32)


@DTYPES
def test_two_blocks_every_mode_equals_the_numpy_values(dtype, rtol):
    """Every gradient mode (jax.grad under each rule set, both passes by hand) on a model of two
    blocks, against plain numpy float64 (complex-step gradients; the script at the bottom)."""
    from jaxbirds import modes

    with jax.enable_x64(dtype == jnp.float64):
        params, X, Y = deep_case(dtype)
        assert_pinned(model.logits(params, X), DEEP_LOGITS, rtol, name="logits")
        results = jax.jit(lambda p: {name: m.loss_and_grads(p, X, Y) for name, m in modes.MODES.items()})(params)
        for name, (loss, grads) in results.items():
            assert_pinned(loss, DEEP_LOSS, rtol, name=f"loss ({name})")
            assert_tiny_grads(grads, rtol, name, expected=DEEP_GRADS)


# --------------------------------------------------------------------------- #
# Initialisation and the recipe                                               #
# --------------------------------------------------------------------------- #

#: The tutorial's scales: C ~ N(0, 1), W1 ~ N(0, 1) (5/3) / sqrt(fan_in), b1, W2, b2, bnbias ~ 0.1 N(0, 1),
#: bngain ~ 1 + 0.1 N(0, 1). name -> (mean, std).
INIT_SCALES = {
    "C": (0.0, 1.0),
    "W1": (0.0, (5 / 3) / math.sqrt(30)),
    "b1": (0.0, 0.1),
    "W2": (0.0, 0.1),
    "b2": (0.0, 0.1),
    "bngain1": (1.0, 0.1),
    "bnbias1": (0.0, 0.1),
}


def test_initialisation_has_the_tutorials_scales():
    """The default model (fan-in 30, hidden 200), initialised with 16 keys split from ``key(0)`` (the
    entries themselves depend on JAX's PRNG; their statistics do not). For N samples of N(m, s^2) the
    sample mean has standard error s / sqrt(N) and the sample std a relative one of 1 / sqrt(2N);
    each is allowed 5 standard errors. The smallest sample, b2 (16 x 29 = 464 values), then allows
    16 % on its std, W1 (96,000 values) 1.1 %: a gain of 1 or 2 instead of 5/3 is 40 % or 20 % off, a
    scale of 1 or 0.2 instead of 0.1 is 900 % or 100 % off, a gain mean of 0 or 2 instead of 1 is over
    500 standard errors off."""
    config = model.ModelConfig(vocab_size=29)
    keys = jax.random.split(jax.random.key(0), 16)
    params = jax.vmap(lambda key: model.init_params(key, config))(keys)
    for name, (mean, std) in INIT_SCALES.items():
        values = np.asarray(params[name], np.float64).ravel()
        n = values.size
        assert abs(values.mean() - mean) <= 5 * std / math.sqrt(n), (name, values.mean(), mean)
        assert abs(values.std() / std - 1) <= 5 / math.sqrt(2 * n), (name, values.std(), std)


def test_the_default_recipe_and_schedule_are_the_tutorials():
    """``lr = 0.1 if i < 100000 else 0.01`` over 200,000 steps of batch 32 (the tutorial's loop)."""
    config = train.TrainConfig()
    assert (config.steps, config.batch_size, config.optimizer) == (200_000, 32, "sgd")
    schedule = config.schedule()
    for step, lr in ((0, 0.1), (1, 0.1), (99_999, 0.1), (100_000, 0.01), (100_001, 0.01), (199_999, 0.01)):
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6), step


# --------------------------------------------------------------------------- #
# The first steps of the seeded default run                                   #
# --------------------------------------------------------------------------- #

#: Recorded once from this code (JAX 0.10.2 on a CPU, float32), so they pin against drift, not against
#: an outside truth: the training split's order, the seed's three PRNG streams, the initialisation, the
#: batches drawn, the loss and the SGD step at lr 0.1. Given to 6 significant digits and compared with
#: rtol 1e-5, room for float32 reductions reordered by another XLA version or backend. Measured: a
#: learning rate of 0.11 moves them by 5e-3 relative (from the second step on), a batch of 33 by
#: 8e-3, another seed by 8e-2.
FIRST_LOSSES = [3.60352, 3.76229, 3.60089, 3.50032, 3.42738]
#: Outside expectation for the first loss, from a numpy Monte Carlo over 2,000 independent
#: initialisations of the tutorial's recipe (the script at the bottom of this file): mean 3.753, std
#: 0.161. At initialisation the logits do not depend on the labels, and every class is initialised
#: alike, so the expectation holds for any label distribution, the real one included.
INITIAL_LOSS_MEAN, INITIAL_LOSS_STD = 3.753, 0.161


def test_the_first_five_losses_of_the_seeded_default_run(dataset):
    config = train.TrainConfig(steps=5, chunk_size=5)  # the default recipe and seed
    state = train.init_state(model.ModelConfig(vocab_size=dataset.vocab.size), config)
    result = train.train(dataset.train.X, dataset.train.Y, config, state)
    np.testing.assert_allclose(result.losses, FIRST_LOSSES, rtol=1e-5)
    first = float(result.losses[0])
    assert math.log(29) < first, "the tutorial's model starts worse than uniform (ln 29 = 3.3673)"
    assert abs(first - INITIAL_LOSS_MEAN) < 4 * INITIAL_LOSS_STD


# --------------------------------------------------------------------------- #
# How the literals were computed (run once; plain numpy float64, no jaxbirds) #
# --------------------------------------------------------------------------- #
#
# import numpy as np
#
# def cs_grad(f, x, h=1e-30):  # complex step: exact to roundoff
#     g = np.zeros_like(x)
#     for idx in np.ndindex(x.shape):
#         xc = x.astype(complex); xc[idx] += 1j * h; g[idx] = f(xc).imag / h
#     return g
#
# def ce(logits, labels):  # shift by the (real) row max, a constant
#     z = logits - logits.real.max(axis=1, keepdims=True)
#     return np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(labels)), labels])
#
# def bn(x, gain, bias, eps=1e-5):
#     d = x - x.sum(axis=0) / len(x)
#     return gain * d / np.sqrt((d * d).sum(axis=0) / (len(x) - 1) + eps) + bias
#
# cross-entropy: ce(logits, labels), cs_grad(lambda z: ce(z, labels), logits), also checked against
#     (softmax(logits) - eye(3)[labels]) / 2 to 1e-15.
# batch norm: bn(x, gain, bias), cs_grad of sum(bn(...) * dy) for x, gain and bias in turn.
# eval: gain * (x - mean) / sqrt(var + 1e-5) + bias, and its cs_grad for x.
# model: logits = tanh(bn(C[X].reshape(n, -1) @ W1 + b1, bngain1, bnbias1)) @ W2 + b2, loss = ce(logits, Y),
#     cs_grad of the loss for each parameter in turn.
# two blocks: h = C[X].reshape(n, -1); then for l in (1, 2): h = tanh(bn(h @ Wl + bl, bngainl, bnbiasl));
#     logits = h @ W3 + b3; the loss and its cs_grad for each parameter in turn, as above.
# first loss: 2,000 draws of (C, W1, b1, W2, b2, bngain, bnbias) by the tutorial's recipe with
#     np.random.default_rng(0), each on 32 random contexts and labels; the mean and std of the loss.
