"""The neural steps of QINCo (v1 and QINCo2) as Flax (linen) modules, and their initialisers.

Both step kinds share one interface: codeword_part (per codeword, computed once for the K codewords),
vector_part (per partial reconstruction), blocks (the residual blocks) and finish (the outer skip, if
any). step_delta and candidate_deltas evaluate f(c, xhat) through it; the parameter layout is in
qinco_jax.model.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def torch_uniform(fan_in: int):
    """PyTorch's default nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def kaiming_uniform(fan_in: int):
    """Kaiming-uniform with ReLU gain, fan_in mode (QINCo2): U(-sqrt(6/fan_in), sqrt(6/fan_in))."""
    bound = math.sqrt(6.0 / fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _initializer(kind: str, fan_in: int):
    if kind == "torch":
        return torch_uniform(fan_in)
    if kind == "kaiming":
        return kaiming_uniform(fan_in)
    return nn.initializers.zeros


class Linear(nn.Module):
    """y = x @ kernel (+ bias); init "torch" (nn.Linear's default), "kaiming" or "zeros" (bias: 0
    unless torch)."""

    features: int
    fan_in: int
    use_bias: bool = True
    init: str = "torch"

    def setup(self):
        self.kernel = self.param("kernel", _initializer(self.init, self.fan_in), (self.fan_in, self.features))
        if self.use_bias:
            bias_init = "torch" if self.init == "torch" else "zeros"
            self.bias = self.param("bias", _initializer(bias_init, self.fan_in), (self.features,))

    def __call__(self, x):
        y = x @ self.kernel
        return y + self.bias if self.use_bias else y


class ResBlock(nn.Module):
    """z + W2 relu(W1 z), no biases. QINCo2 initialises W1 Kaiming-uniform and W2 to zero."""

    d: int
    h: int
    qinco2: bool = False

    def setup(self):
        self.up = Linear(self.h, self.d, use_bias=False, init="kaiming" if self.qinco2 else "torch")
        self.down = Linear(self.d, self.h, use_bias=False, init="zeros" if self.qinco2 else "torch")

    def __call__(self, z):
        return z + self.down(nn.relu(self.up(z)))


class QincoStep(nn.Module):
    """One QINCo v1 step: f(c, xhat) = mlp(c + concat([c, xhat])).

    The concat block is linear in [c, xhat], so it splits into a per-codeword part
    (computed once for the K codewords) and a per-vector part (once per vector).
    Interface shared with Qinco2Step: codeword_part, vector_part, blocks, finish.
    """

    d: int
    K: int
    L: int
    h: int
    lowrank: bool = False

    def setup(self):
        d, h = self.d, self.h
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.K, d))
        if self.lowrank:
            self.concat_in = Linear(h, 2 * d, use_bias=False)
            self.concat_out = Linear(d, h, use_bias=False)
        else:
            self.concat = Linear(d, 2 * d, use_bias=True)
        self.blocks = [ResBlock(d, h, name=f"block_{l}") for l in range(self.L)]

    def codeword_part(self):
        """(K, d): c + the codeword half of the concat block (bias included)."""
        c, d = self.codebook, self.d
        if self.lowrank:
            return c + (c @ self.concat_in.kernel[:d]) @ self.concat_out.kernel
        return c + c @ self.concat.kernel[:d] + self.concat.bias

    def vector_part(self, xhat):
        """(..., d): the partial-reconstruction half of the concat block."""
        d = self.d
        if self.lowrank:
            return (xhat @ self.concat_in.kernel[d:]) @ self.concat_out.kernel
        return xhat @ self.concat.kernel[d:]

    def finish(self, z, c):
        """The step's output from the residual blocks' output z (no outer skip in v1)."""
        return z

    def decode(self, xhat_BD, codes_B):
        """Next reconstruction xhat + f(C[codes], xhat)."""
        return xhat_BD + step_delta(self, xhat_BD, codes_B)


class Qinco2Step(nn.Module):
    """One QINCo2 step (spec 1.1): z = P_in c; z += W_cat [z; xhat] + b; L residual blocks;
    f(c, xhat) = c + P_out z. Projections are the identity when de == d.

    Initialisation (spec 1.2): W_cat, b and every block's down-projection are zero; up-projections
    and P_in / P_out Kaiming-uniform (fan_in, ReLU gain). Hence f = c + P_out P_in c at init.
    """

    d: int
    K: int
    L: int
    h: int
    de: int
    preselect: bool

    def setup(self):
        d, e = self.d, self.de
        self.codebook = self.param("codebook", nn.initializers.normal(1.0), (self.K, d))
        if self.preselect:
            self.presel_codebook = self.param("presel_codebook", nn.initializers.normal(1.0), (self.K, d))
        if e != d:
            self.in_proj = Linear(e, d, use_bias=False, init="kaiming")
            self.out_proj = Linear(d, e, use_bias=False, init="kaiming")
        self.concat = Linear(e, e + d, use_bias=True, init="zeros")
        self.blocks = [ResBlock(e, self.h, qinco2=True, name=f"block_{l}") for l in range(self.L)]

    def codeword_part(self):
        """(K, de): z0 + the codeword half of the concat block (bias included), z0 = P_in c."""
        z0 = self.codebook if self.de == self.d else self.in_proj(self.codebook)
        return z0 + z0 @ self.concat.kernel[: self.de] + self.concat.bias

    def vector_part(self, xhat):
        """(..., de): the partial-reconstruction half of the concat block (xhat is not projected)."""
        return xhat @ self.concat.kernel[self.de :]

    def finish(self, z, c):
        """Outer skip: c + P_out z."""
        return c + (z if self.de == self.d else self.out_proj(z))

    def decode(self, xhat_BD, codes_B):
        """Next reconstruction xhat + f(C[codes], xhat)."""
        return xhat_BD + step_delta(self, xhat_BD, codes_B)


def step_delta(step, xhat_BD, codes_B):
    """f(C[codes], xhat) of one step, for one code per vector."""
    z = step.codeword_part()[codes_B] + step.vector_part(xhat_BD)
    for block in step.blocks:
        z = block(z)
    return step.finish(z, step.codebook[codes_B])


def candidate_deltas(step, xhat_NFD, ids_NFA):
    """f(C[k], xhat_b) for candidate codes k of every beam b: (N, F, A, d).

    ids_NFA: the candidate codes per beam, or None for all K codes (then A = K, no gather).
    The first block's input projection is linear too: the codeword parts and the beam parts are
    projected separately instead of all N*F*A sums (saves 1/(2L) of the FLOPs).
    """
    cw_Ke, vec_NFe = step.codeword_part(), step.vector_part(xhat_NFD)

    def per_cand(table):  # (K, ...) -> broadcastable (1, 1, K, ...) or gathered (N, F, A, ...)
        return table[None, None] if ids_NFA is None else table[ids_NFA]

    z = per_cand(cw_Ke) + vec_NFe[:, :, None, :]
    blocks = step.blocks
    if blocks:
        up = blocks[0].up.kernel
        u = per_cand(cw_Ke @ up) + (vec_NFe @ up)[:, :, None, :]
        z = z + blocks[0].down(nn.relu(u))
    for block in blocks[1:]:
        z = block(z)
    return step.finish(z, per_cand(step.codebook))
