"""Compiling a model method into one program, with the model's variables as inputs."""

import keras


class CompiledProgram:
    """Runs `fn(*args)` of a model as a single compiled program.

    On JAX the function is traced once per input signature under `jax.jit`,
    with the model's variable values passed in (a `keras.StatelessScope`), so
    the program never captures stale weights: reloaded, trained or LoRA-enabled
    variables are picked up at the next call. Keyword arguments are static
    (part of the compilation key). Other backends run the function as is.

    Args:
        model: the `keras.Model` whose variables `fn` reads.
        fn: the function to compile; it must not update variables.
    """

    def __init__(self, model, fn):
        self.model = model
        self.fn = fn
        self._jitted = None
        if keras.backend.backend() == "jax":
            import jax

            self._jitted = jax.jit(self._stateless, static_argnums=(0,))

    def _stateless(self, static, values, args):
        mapping = list(zip(self.model.variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            return self.fn(*args, **dict(static))

    def __call__(self, *args, **static):
        if self._jitted is None:
            return self.fn(*args, **static)
        values = [v.value for v in self.model.variables]
        return self._jitted(tuple(sorted(static.items())), values, args)
