"""jaxbirds: a character-level MLP that invents bird names, with every gradient written by hand.

Modules: ``data`` (names -> examples), ``model`` (the forward pass), ``ops`` and
``vjp`` (plain and hand-differentiated operations), ``manual`` (the backward pass
by hand), ``gradcheck`` (``jax.grad`` as the referee), ``train``, ``sample``,
``checkpoint`` and ``bench``.
"""

__version__ = "0.1.0"
