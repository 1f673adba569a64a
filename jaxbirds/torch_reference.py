"""The tutorial's PyTorch training loop, written from its description, for timing comparisons.

Manual gradients throughout (no autograd), ``F.cross_entropy`` forward, the
closed-form batch-norm backward, and the embedding gradient accumulated either
with the tutorial's Python double loop or with one vectorised ``index_add_``.
Imported only when ``torch`` is installed (the ``torch`` extra).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from jaxbirds.errors import ConfigError
from jaxbirds.model import ModelConfig


def tutorial_training_loop(
    X: torch.Tensor,
    Y: torch.Tensor,
    mc: ModelConfig,
    steps: int,
    vectorised_dC: bool,
    batch_size: int = 32,
    seed: int = 2147483647,
) -> float:
    """Run ``steps`` SGD steps of the tutorial's loop; returns the last loss. The tutorial's model has
    one block: ``ConfigError`` for a deeper ``mc``."""
    if mc.depth != 1:
        raise ConfigError(f"the tutorial's PyTorch loop has one hidden block, not {mc.depth}")
    g = torch.Generator().manual_seed(seed)
    (H,) = mc.hidden
    V, E, k = mc.vocab_size, mc.embedding_dim, mc.context_size
    C = torch.randn((V, E), generator=g)
    W1 = torch.randn((E * k, H), generator=g) * (5 / 3) / (E * k) ** 0.5
    b1 = torch.randn(H, generator=g) * 0.1
    W2 = torch.randn((H, V), generator=g) * 0.1
    b2 = torch.randn(V, generator=g) * 0.1
    bngain = torch.randn((1, H), generator=g) * 0.1 + 1.0
    bnbias = torch.randn((1, H), generator=g) * 0.1
    parameters = [C, W1, b1, W2, b2, bngain, bnbias]
    n = batch_size
    with torch.no_grad():
        for i in range(steps):
            ix = torch.randint(0, X.shape[0], (batch_size,), generator=g)
            Xb, Yb = X[ix], Y[ix]
            emb = C[Xb]
            embcat = emb.view(emb.shape[0], -1)
            hprebn = embcat @ W1 + b1
            bnmean = hprebn.mean(0, keepdim=True)
            bnvar = hprebn.var(0, keepdim=True, unbiased=True)
            bnvar_inv = (bnvar + 1e-5) ** -0.5
            bnraw = (hprebn - bnmean) * bnvar_inv
            hpreact = bngain * bnraw + bnbias
            h = torch.tanh(hpreact)
            logits = h @ W2 + b2
            loss = F.cross_entropy(logits, Yb)

            dlogits = F.softmax(logits, 1)
            dlogits[range(n), Yb] -= 1
            dlogits /= n
            dh = dlogits @ W2.T
            dW2 = h.T @ dlogits
            db2 = dlogits.sum(0)
            dhpreact = (1.0 - h**2) * dh
            dbngain = (bnraw * dhpreact).sum(0, keepdim=True)
            dbnbias = dhpreact.sum(0, keepdim=True)
            dhprebn = (
                bngain
                * bnvar_inv
                / n
                * (n * dhpreact - dhpreact.sum(0) - n / (n - 1) * bnraw * (dhpreact * bnraw).sum(0))
            )
            dembcat = dhprebn @ W1.T
            dW1 = embcat.T @ dhprebn
            db1 = dhprebn.sum(0)
            demb = dembcat.view(emb.shape)
            dC = torch.zeros_like(C)
            if vectorised_dC:
                dC.index_add_(0, Xb.view(-1), demb.view(-1, E))
            else:
                for a in range(Xb.shape[0]):
                    for b in range(Xb.shape[1]):
                        dC[Xb[a, b]] += demb[a, b]
            grads = [dC, dW1, db1, dW2, db2, dbngain, dbnbias]
            lr = 0.1 if i < 100_000 else 0.01
            for p, grad in zip(parameters, grads, strict=True):
                p.data += -lr * grad
    return float(loss)
