"""`CallLeversMixin`: a layer whose computation the memory levers may wrap."""

from keras_openpi.backend.call_levers import check_levers
from keras_openpi.backend.call_levers import levered_call


class CallLeversMixin:
    """Runs the layer's `forward` through the memory levers set on it.

    A layer class with this mixin writes its computation as `forward` and
    its `call` (same signature: Keras reads it) as `return
    self.run_forward(...)`, which runs `forward` directly, or wrapped by the
    levers `set_call_levers` set: rematerialization, sequencing and row
    chunks (see `keras_openpi.backend.call_levers`). The levers are
    a property of the layer object, set by the fine-tuning strategies
    (`enable_remat`, `enable_sequencing`); outputs and gradients are the same
    with or without them.

    Example:
    >>> block.set_call_levers({"remat"})  # doctest: +SKIP
    >>> block.call_levers  # doctest: +SKIP
    frozenset({'remat'})
    """

    call_levers = frozenset()
    chunk_rows = None

    def set_call_levers(self, levers, chunk_rows=None):
        """Sets the levers (a set of `"remat"`, `"sequenced"`, `"row_chunked"`) and the chunk size."""
        levers = frozenset(levers)
        check_levers(levers)
        self.call_levers = levers
        self.chunk_rows = chunk_rows

    def run_forward(self, *args, **kwargs):
        """`forward(*args, **kwargs)`, through the layer's levers."""
        if not self.call_levers:
            return self.forward(*args, **kwargs)
        return levered_call(self, self.forward, self.call_levers, self.chunk_rows)(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward().")
