"""Regenerate the tiny PyTorch QINCo v1 and QINCo2 checkpoints used by tests/test_torch_format.py
and tests/test_torch_qinco2.py.

Needs torch (the optional `torch` extra); the tests themselves never import it:

    python tests/make_pt_fixture.py [--out tests/data]

It defines, in a module registered as `model_qinco`, classes with the same names, attributes
and submodule layout as the original QINCo v1 model (spec sections 1.2-1.6), so that
`torch.save(model, path)` writes the same pickle structure as the official training script
(IVFQINCo: spec sections 1.7 and 1.9).
A PQ_QINCo (two QINCo sub-quantizers with their own db_scale, after an OPQ matrix) is written as
well. It also stores, per checkpoint, a few scaled input vectors with the torch model's greedy codes
and the decoded reconstructions of those codes (`*_ref.npz`).

QINCo2 checkpoints are what the official QINCo2 training writes (spec 1.5): a dict holding the
model's state_dict ("model", names such as steps.{m}.concat.mlp.weight), the optimizer and
scheduler states, "parameters" and "data_dim". The torch modules below carry those names and
shapes; their step math and beam search (spec 1.1, 2.1) give the reference codes. IVF-QINCo2
(parameters ivf_in_use, ivf_K) has the original's IVFBook as steps.0 (a frozen ivf_centroids table
in the normalised space) and M networked steps after it; its encode keeps one beam after the IVF
step and pre-selects max(A, B) candidates at the first networked step (spec 2.1, 5.1).
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
import torch
from torch import nn

model_qinco = types.ModuleType("model_qinco")
sys.modules["model_qinco"] = model_qinco


def _exported(cls):
    """Make cls pickle as model_qinco.<name>."""
    cls.__module__ = "model_qinco"
    setattr(model_qinco, cls.__name__, cls)
    return cls


def nearest_rows(x, cb):
    """Index of the nearest codebook row for each x row (expanded squared L2, first index on ties)."""
    dist = (x**2).sum(1, keepdim=True) + (cb**2).sum(1)[None, :] - 2 * x @ cb.T
    return dist.argmin(1)


def nearest_candidates(x, cand):
    """Per batch row, the nearest of its K candidates (B, K, d) via bmm; returns (codes, chosen)."""
    dist = (x**2).sum(1, keepdim=True) + (cand**2).sum(2) - 2 * torch.bmm(cand, x[:, :, None])[:, :, 0]
    codes = dist.argmin(1)
    return codes, cand[torch.arange(x.shape[0]), codes]


@_exported
class QINCoStep(nn.Module):
    """One step: codebook, concat block and L residual blocks."""

    def __init__(self, d, K, L, h):
        nn.Module.__init__(self)
        self.d, self.K, self.L, self.h = d, K, L, h
        self.codebook = nn.Embedding(K, d)
        self.MLPconcat = nn.Linear(2 * d, d)
        self.residual_blocks = []
        for l in range(L):
            block = nn.Sequential(nn.Linear(d, h, bias=False), nn.ReLU(), nn.Linear(h, d, bias=False))
            self.add_module(f"residual_block{l}", block)
            self.residual_blocks.append(block)

    def implicit(self, c, xhat):
        """f(c, xhat): concat [c, xhat], residual concat block, then the residual blocks."""
        z = c + self.MLPconcat(torch.cat((c, xhat), 1))
        for block in self.residual_blocks:
            z = z + block(z)
        return z

    def decode(self, xhat, codes):
        return self.implicit(self.codebook(codes), xhat)

    def encode(self, xhat, x):
        C = self.codebook.weight
        K, d = C.shape
        bs = xhat.shape[0]
        c_r = C.repeat(bs, 1, 1).reshape(bs * K, d)
        xhat_r = xhat.reshape(bs, 1, d).repeat(1, K, 1).reshape(bs * K, d)
        cand = self.implicit(c_r, xhat_r).reshape(bs, K, d) + xhat.reshape(bs, 1, d)
        codes, xhat_next = nearest_candidates(x, cand)
        return codes, xhat_next - xhat


@_exported
class QINCo(nn.Module):
    """codebook0 followed by M-1 QINCo steps registered as step1 .. step{M-1}."""

    def __init__(self, d, K, L, M, h):
        nn.Module.__init__(self)
        self.d, self.K, self.L, self.M, self.h = d, K, L, M, h
        self.codebook0 = nn.Embedding(K, d)
        self.steps = []
        for m in range(1, M):
            step = QINCoStep(d, K, L, h)
            self.add_module(f"step{m}", step)
            self.steps.append(step)

    def decode(self, codes):
        xhat = self.codebook0(codes[:, 0])
        for i, step in enumerate(self.steps):
            xhat = xhat + step.decode(xhat, codes[:, i + 1])
        return xhat

    def encode(self, x):
        codes = torch.zeros(x.shape[0], len(self.steps) + 1, dtype=torch.int64)
        codes[:, 0] = nearest_rows(x, self.codebook0.weight)
        xhat = self.codebook0.weight[codes[:, 0]]
        for i, step in enumerate(self.steps):
            codes[:, i + 1], delta = step.encode(xhat, x)
            xhat = xhat + delta
        return codes, xhat


@_exported
class QINCoLR(QINCo):
    """QINCo whose concat block is a bias-free rank-h factorisation 2d -> h -> d."""

    def __init__(self, d, K, L, M, h):
        QINCo.__init__(self, d, K, L, M, h)
        for step in self.steps:
            step.MLPconcat = nn.Sequential(nn.Linear(2 * d, h, bias=False), nn.Linear(h, d, bias=False))


@_exported
class IVFQINCo(QINCo):
    """A frozen table of K_IVF centroids (codebook0), then M full QINCo steps registered as step0 .. step{M-1};
    codes have M + 1 columns (column 0 the list id). encode / decode are QINCo's."""

    def __init__(self, d, K_IVF, K, L, M, h):
        nn.Module.__init__(self)
        self.d, self.K_IVF, self.K, self.L, self.M, self.h = d, K_IVF, K, L, M, h
        self.codebook0 = nn.Embedding(K_IVF, d, _freeze=True)
        self.steps = []
        for m in range(M):
            step = QINCoStep(d, K, L, h)
            self.add_module(f"step{m}", step)
            self.steps.append(step)


@_exported
class PQ_QINCo(nn.Module):
    """nsub QINCo models over contiguous blocks, after an optional OPQ matrix (d_out, d_in)."""

    def __init__(self, sub_quantizers, opq_matrix=None):
        nn.Module.__init__(self)
        self.sub_quantizers = list(sub_quantizers)
        for m, q in enumerate(self.sub_quantizers):
            self.add_module(f"sub_quantizer_{m}", q)
        self.opq_matrix = None if opq_matrix is None else nn.Parameter(torch.from_numpy(opq_matrix))
        self.db_scale = 1

    def encode(self, x):
        if self.opq_matrix is not None:
            x = x @ self.opq_matrix.T
        codes, xhat, a = [], [], 0
        for q in self.sub_quantizers:
            c, xh = q.encode(x[:, a : a + q.d] / q.db_scale)
            codes.append(c)
            xhat.append(xh * q.db_scale)
            a += q.d
        xhat = torch.cat(xhat, 1)
        if self.opq_matrix is not None:
            xhat = xhat @ self.opq_matrix
        return torch.cat(codes, 1), xhat

    def decode(self, codes):
        out, a = [], 0
        for q in self.sub_quantizers:
            out.append(q.decode(codes[:, a : a + q.M]) * q.db_scale)
            a += q.M
        xhat = torch.cat(out, 1)
        return xhat @ self.opq_matrix if self.opq_matrix is not None else xhat


def make_pq(out_dir, name, subs, opq: bool, n=32, seed=5):
    """A tiny PQ_QINCo of QINCo sub-quantizers (d, K, M, L, h, db_scale), saved with its reference codes."""
    torch.manual_seed(seed)
    qs = []
    for d, K, M, L, h, scale in subs:
        q = QINCo(d, K, L, M, h)
        q.db_scale = np.float32(scale)
        qs.append(q)
    d_out = sum(s[0] for s in subs)
    rng = np.random.default_rng(seed)
    A = np.linalg.qr(rng.normal(size=(d_out, d_out)))[0].astype(np.float32) if opq else None
    model = PQ_QINCo(qs, A)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    # Rotated-space inputs near each block's first-level codewords (times its scale), plus noise.
    y = torch.cat([q.codebook0.weight[torch.randint(0, q.K, (n,), generator=gen)] * float(q.db_scale)
                   + 0.3 * float(q.db_scale) * torch.randn(n, q.d, generator=gen) for q in qs], 1).detach()
    x = y @ torch.from_numpy(A) if opq else y
    with torch.no_grad():
        codes, xhat = model.encode(x)
        recon = model.decode(codes)
    torch.save(model, os.path.join(out_dir, f"{name}.pt"))
    np.savez(
        os.path.join(out_dir, f"{name}_ref.npz"),
        x=x.numpy().astype(np.float32), codes=codes.numpy(), recon=recon.numpy().astype(np.float32),
        encode_xhat=xhat.numpy().astype(np.float32), subs=np.array(subs, np.float64),
        opq_matrix=A if opq else np.zeros((0, 0), np.float32),
    )
    print(f"{name}: PQ_QINCo of {len(qs)} sub-quantizers, opq={opq}, codes[0]={codes[0].tolist()}")


def make(cls, out_dir, name, d, K, M, L, h, db_scale, n=24, seed=0, nlist=0):
    """Build, save and reference-encode one tiny model (nlist: the K_IVF of an IVFQINCo)."""
    torch.manual_seed(seed)
    model = cls(d, nlist, K, L, M, h) if cls is IVFQINCo else cls(d, K, L, M, h)
    model.db_scale = np.float32(db_scale)
    model.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    # Inputs near the first-level codewords plus noise, so the steps have work to do.
    rows = torch.randint(0, nlist or K, (n,), generator=gen)
    x = model.codebook0.weight[rows] + 0.5 * torch.randn(n, d, generator=gen)
    with torch.no_grad():
        x = x.detach()
        codes, xhat = model.encode(x)
        recon = model.decode(codes)
    torch.save(model, os.path.join(out_dir, f"{name}.pt"))
    np.savez(
        os.path.join(out_dir, f"{name}_ref.npz"),
        x=x.numpy().astype(np.float32),
        codes=codes.numpy(),
        recon=recon.numpy().astype(np.float32),
        encode_xhat=xhat.numpy().astype(np.float32),
        config=np.array([d, K, M, L, h], np.int64),
        lowrank=np.array(cls is QINCoLR),
        db_scale=np.float32(db_scale),
        **({"nlist": np.array(nlist, np.int64)} if nlist else {}),
    )
    print(f"{name}: {cls.__name__} d={d} K={K} M={M} L={L} h={h} nlist={nlist}, codes[0]={codes[0].tolist()}")


# ----------------------------------------------------------------------------------------------
# QINCo2 (names and shapes of the official qinco/model/qinco_base.py)


class ConcatBlock(nn.Module):
    """Linear (de + D) -> de with bias, registered as `mlp` (state_dict: concat.mlp.weight/bias)."""

    def __init__(self, de, D):
        nn.Module.__init__(self)
        self.mlp = nn.Linear(de + D, de)


class ResidualBlock(nn.Module):
    """z + down_proj(relu(up_proj(z))), both bias-free."""

    def __init__(self, de, dh):
        nn.Module.__init__(self)
        self.up_proj = nn.Linear(de, dh, bias=False)
        self.down_proj = nn.Linear(dh, de, bias=False)

    def forward(self, z):
        return z + self.down_proj(torch.relu(self.up_proj(z)))


class SubStep(nn.Module):
    """The pre-selection codebook holder (state_dict: substep.codebook.weight)."""

    def __init__(self, K, D):
        nn.Module.__init__(self)
        self.codebook = nn.Embedding(K, D)


class QINCo2Step(nn.Module):
    """Step m >= 1: codebook, optional pre-selection book, projections, concat, residual blocks."""

    def __init__(self, D, K, L, de, dh, A):
        nn.Module.__init__(self)
        self.codebook = nn.Embedding(K, D)
        if A:
            self.substep = SubStep(K, D)
        self.in_proj = nn.Linear(D, de, bias=False) if de != D else nn.Identity()
        self.concat = ConcatBlock(de, D)
        self.residual_blocks = nn.ModuleList([ResidualBlock(de, dh) for _ in range(L)])
        self.out_proj = nn.Linear(de, D, bias=False) if de != D else nn.Identity()
        self.register_buffer("xtarget_mean", torch.zeros(D))
        self.register_buffer("xtarget_var", torch.ones(D))

    def f(self, c, xhat):
        z = self.in_proj(c)
        z = z + self.concat.mlp(torch.cat([z, xhat], -1))
        for block in self.residual_blocks:
            z = block(z)
        return c + self.out_proj(z)


class Step0(nn.Module):
    def __init__(self, K, D):
        nn.Module.__init__(self)
        self.codebook = nn.Embedding(K, D)
        self.register_buffer("xtarget_mean", torch.zeros(D))
        self.register_buffer("xtarget_var", torch.ones(D))


class IVFBook(nn.Module):
    """The original's IVF step: a frozen table of ivf_K centroids (state_dict: steps.0.ivf_centroids.weight)."""

    def __init__(self, ivf_K, D):
        nn.Module.__init__(self)
        self.ivf_centroids = nn.Embedding(ivf_K, D)
        self.ivf_centroids.requires_grad_(False)

    @property
    def table(self):
        return self.ivf_centroids.weight


class QINCo2(nn.Module):
    """data_mean / data_std buffers and the steps, as the official model's state_dict names them.
    ivf_K > 0: IVF-QINCo2, the IVF step then M networked steps (steps.1 .. steps.M)."""

    def __init__(self, D, K, M, L, de, dh, A, ivf_K=0):
        nn.Module.__init__(self)
        self.register_buffer("data_mean", torch.zeros(D))
        self.register_buffer("data_std", torch.ones(()))
        first = IVFBook(ivf_K, D) if ivf_K else Step0(K, D)
        n_net = M if ivf_K else M - 1
        self.ivf = bool(ivf_K)
        self.steps = nn.ModuleList([first] + [QINCo2Step(D, K, L, de, dh, A) for _ in range(n_net)])

    def table0(self):
        return self.steps[0].table if self.ivf else self.steps[0].codebook.weight

    def encode(self, x, A, B):
        """Beam search with pre-selection (spec 2.1) on normalised x; returns (codes, xhat).
        IVF: the nearest centroid (one beam), then max(A, B) candidates at the first networked step."""
        K = self.steps[-1].codebook.weight.shape[0]
        M = len(self.steps)
        d0 = ((x[:, None, :] - self.table0()[None]) ** 2).sum(-1)
        F = 1 if M == 1 or self.ivf else min(B, K)
        codes = d0.topk(F, dim=1, largest=False).indices[:, :, None]
        xhat = self.table0()[codes[:, :, 0]]
        n = x.shape[0]
        for m in range(1, M):
            step = self.steps[m]
            r = x[:, None, :] - xhat
            if A:
                pre = step.substep.codebook.weight
                n_codes = max(A, B) if self.ivf and m == 1 else A
                ids = ((r[:, :, None, :] - pre[None, None]) ** 2).sum(-1).topk(n_codes, dim=2, largest=False).indices
            else:
                ids = torch.arange(K).expand(n, xhat.shape[1], K)
            Fin, nc = ids.shape[1], ids.shape[2]
            c = step.codebook.weight[ids]
            cand = xhat[:, :, None, :] + step.f(c, xhat[:, :, None, :].expand_as(c))
            dist = ((x[:, None, None, :] - cand) ** 2).sum(-1).reshape(n, Fin * nc)
            F = 1 if m == M - 1 else min(B, Fin * nc)
            sel = dist.topk(F, dim=1, largest=False).indices
            parent = sel // nc
            code = ids.reshape(n, Fin * nc).gather(1, sel)
            xhat = cand.reshape(n, Fin * nc, -1)[torch.arange(n)[:, None], sel]
            codes = torch.cat([codes[torch.arange(n)[:, None], parent], code[:, :, None]], 2)
        return codes[:, 0], xhat[:, 0]

    def decode(self, codes):
        xhat = self.table0()[codes[:, 0]]
        for m in range(1, codes.shape[1]):
            xhat = xhat + self.steps[m].f(self.steps[m].codebook.weight[codes[:, m]], xhat)
        return xhat


def make_qinco2(out_dir, name, D, K, M, L, de, dh, A, B, n=40, seed=0, ddp=False, ivf_K=0):
    """A QINCo2 checkpoint dict as the official training writes it, and the torch reference codes."""
    torch.manual_seed(seed)
    model = QINCo2(D, K, M, L, de, dh, A, ivf_K)
    with torch.no_grad():
        for p in model.parameters():  # trained-looking weights: no zero blocks, codebooks of scale 1
            p.copy_(torch.randn_like(p) * (1.0 if p.dim() == 2 and p.shape[1] == D and p.shape[0] in (K, ivf_K)
                                           else 0.3))
        if ivf_K:  # centroids spread wider than the steps' codewords, as an IVF table is
            model.steps[0].ivf_centroids.weight.mul_(3.0)
        model.data_mean.copy_(torch.randn(D) * 5)
        model.data_std.fill_(3.5)
    gen = torch.Generator().manual_seed(seed + 1)
    ncodes = M + 1 if ivf_K else M
    codes0 = torch.randint(0, K, (n, ncodes), generator=gen)
    if ivf_K:
        codes0[:, 0] = torch.randint(0, ivf_K, (n,), generator=gen)
    with torch.no_grad():
        xn = model.decode(codes0) + 0.3 * torch.randn(n, D, generator=gen)
        codes, xhat = model.encode(xn, A, B)
        greedy, _ = model.encode(xn, 0, 1)
        recon = model.decode(codes)
    x_raw = xn * model.data_std + model.data_mean
    state = model.state_dict()  # an OrderedDict with its _metadata attribute, as torch writes it
    for k in state:
        state[k] = state[k].clone()  # the weights the codes were computed with
    opt = torch.optim.AdamW(model.parameters(), lr=8e-4, weight_decay=0.1)
    sum((p**2).sum() for p in model.parameters()).backward()
    opt.step()  # a real optimizer state in the file (the loader must pass over it)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1.0)
    if ddp:
        state = type(state)((f"module.{k}", v) for k, v in state.items())
    params = {"K": K, "M": M, "L": L, "de": de, "dh": dh, "A": A, "B": B}
    if ivf_K:
        params.update(ivf_in_use=True, ivf_K=ivf_K)
    ckpt = {"epoch": 3, "model": state, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "logger": {"cur_step": 12, "best_mse": 0.5, "best_mse_epoch": 2, "last_lr": 8e-4},
            "parameters": params, "data_dim": D}
    torch.save(ckpt, os.path.join(out_dir, f"{name}.pt"))
    np.savez(os.path.join(out_dir, f"{name}_ref.npz"), x=x_raw.numpy().astype(np.float32), codes=codes.numpy(),
             greedy_codes=greedy.numpy(), recon=(recon * model.data_std + model.data_mean).numpy().astype(np.float32),
             config=np.array([D, K, M, L, de, dh, A, B, ivf_K], np.int64))
    print(f"{name}: QINCo2 D={D} K={K} M={M} L={L} de={de} dh={dh} A={A} B={B} ivf_K={ivf_K}, "
          f"codes[0]={codes[0].tolist()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"))
    parser.add_argument("--only", help="write only this fixture (e.g. qinco_ivf_tiny)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fixtures = {
        "qinco_tiny": dict(cls=QINCo, d=8, K=16, M=3, L=2, h=12, db_scale=2.75),
        "qinco_lr_tiny": dict(cls=QINCoLR, d=8, K=16, M=4, L=1, h=6, db_scale=37.5, seed=1),
        # K_IVF > 256: the list ids need more than 8 bits
        "qinco_ivf_tiny": dict(cls=IVFQINCo, d=8, K=16, M=2, L=1, h=8, db_scale=5.0, seed=2, nlist=300, n=64),
    }
    for name, kw in fixtures.items():
        if args.only in (None, name):
            make(out_dir=args.out, name=name, **kw)
    if args.only in (None, "pq_qinco_tiny"):
        make_pq(args.out, "pq_qinco_tiny", [(8, 16, 3, 1, 8, 3.0), (8, 16, 2, 2, 6, 5.5)], opq=True)
    qinco2 = {
        "qinco2_tiny": dict(D=8, K=16, M=3, L=2, de=6, dh=10, A=4, B=3),
        "qinco2_ddp_tiny": dict(D=8, K=16, M=3, L=1, de=8, dh=12, A=0, B=1, seed=2, ddp=True),
        # B > A: the first networked step after the IVF keeps max(A, B) = 5 candidates of its one beam
        "qinco2_ivf_tiny": dict(D=8, K=16, M=2, L=1, de=6, dh=10, A=4, B=5, seed=3, ivf_K=40, n=64),
    }
    for name, kw in qinco2.items():
        if args.only in (None, name):
            make_qinco2(args.out, name, **kw)


if __name__ == "__main__":
    main()
