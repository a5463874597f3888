"""What fraction of the machine's matmul throughput a compiled program achieves.

Shared by `train_step.py` and `inference.py`: the program's floating-point
operations are its matmuls' and convolutions' (counted on the traced program,
the same count on every device), the machine's reference throughput from a plain
square float32 matmul timed in the same process, and the ratio of the two
rates is the program's efficiency against the physical limit it could reach.
"""

import statistics
import time

MATMUL_SIZE = 2048


def program_flops(jitted, args):
    """The matmul and convolution FLOPs of `jitted(*args)` (args may be `ShapeDtypeStruct`s).

    Counted on the traced program (2 per multiply-add of every `dot_general`
    and convolution), with each loop body counted once per iteration and a
    conditional as its costliest branch; XLA's own cost analysis counts a loop
    body once whatever its trip count. Recomputation (remat) is included: these
    are the operations the hardware runs.
    """
    return _jaxpr_flops(jitted.trace(*args).jaxpr.jaxpr)


def _jaxpr_flops(jaxpr):
    import math

    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * math.prod(out) * math.prod(lhs[d] for d in contracting)
        elif name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out = eqn.outvars[0].aval.shape
            # Each output element: (input features per group x kernel window) multiply-adds.
            total += 2 * math.prod(out) * math.prod(kernel) // kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
        elif name == "cond":
            total += max(_jaxpr_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            inner = [_jaxpr_flops(j) for j in _sub_jaxprs(eqn.params)]
            repeat = eqn.params.get("length", 1) if name == "scan" else 1
            if name == "while":
                raise ValueError("A while loop with an unknown trip count: its FLOPs cannot be counted.")
            total += repeat * sum(inner)
    return total


def _sub_jaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            jaxpr = getattr(item, "jaxpr", None)
            if jaxpr is not None and hasattr(jaxpr, "eqns"):
                yield jaxpr
            elif hasattr(item, "eqns"):
                yield item


def matmul_peak(size=MATMUL_SIZE, repeats=5, dtype="float32"):
    """The median FLOP/s of a jitted `size x size` matmul on the default device, after compilation.

    Example:
    >>> matmul_peak(256)["flops_per_s"] > 0
    True
    """
    import jax
    from jax import numpy as jnp

    a = jnp.ones((size, size), dtype)
    b = jnp.ones((size, size), dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"size": size, "dtype": dtype, "seconds": seconds, "flops_per_s": 2 * size**3 / seconds}


def bracketed(run, size=MATMUL_SIZE):
    """Runs `run()` between two matmul timings; returns `(its result, the faster matmul timing)`.

    On a machine shared with other work the throughput available changes from
    minute to minute: timing the reference right before and after the program
    keeps the ratio to the conditions the program ran under.
    """
    before = matmul_peak(size)
    result = run()
    after = matmul_peak(size)
    return result, max(before, after, key=lambda peak: peak["flops_per_s"])


def efficiency(flops, seconds, peak):
    """`{"flops", "flops_per_s", "ratio_to_matmul"}` of a program that ran `flops` in `seconds`."""
    rate = flops / seconds
    return {"flops": flops, "flops_per_s": rate, "ratio_to_matmul": rate / peak["flops_per_s"]}
