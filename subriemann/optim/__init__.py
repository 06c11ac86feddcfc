r"""Training with the adapted geometry: :class:`AdaptedGD`, a ``torch.optim`` optimizer.

One step on a batch :math:`(X_B, Y_B)` is the explicit Euler step of the
gradient flow of the metric :math:`g_\lambda = (1-\lambda)1 + \lambda D^\top G D`
on that batch (``docs/optim.md``, ``docs/theory.md``):

.. math:: \theta \leftarrow \theta - \eta\, D^\top T\big((1-\lambda)1
          + \lambda\, T^\top DD^\top T\big)^{-1} r,

with :math:`DD^\top` the batch NTK from the structured engine and
:math:`G = TT^\top`, :math:`\nabla_x C = Tr` the output metric of the loss
(:math:`T = 1` for MSE, the softmax Fisher blocks for cross-entropy).
"""

from subriemann.optim.adapted import AdaptedGD, StepInfo

__all__ = ["AdaptedGD", "StepInfo"]
