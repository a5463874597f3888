"""openpi's own JAX π0, timed like `pi0_speed.py` (same configuration, batch and timing).

This script runs openpi's code, not keras_openpi's: it needs a separate
environment with openpi's pinned versions and an openpi checkout, e.g.

    python3.11 -m venv /tmp/openpi_venv
    /tmp/openpi_venv/bin/pip install jax==0.5.3 jaxlib==0.5.3 flax==0.10.2 \\
        jaxtyping==0.2.36 beartype==0.19.0 numpy==1.26.4 ml-dtypes==0.4.1 \\
        optax==0.2.4 chex==0.1.90 orbax-checkpoint==0.11.13 einops augmax \\
        safetensors typing_extensions
    git clone https://github.com/Physical-Intelligence/openpi /tmp/openpi

    /tmp/openpi_venv/bin/python benchmarks/openpi_pi0_speed.py --openpi-src /tmp/openpi

`pi0_speed.py --openpi-python /tmp/openpi_venv/bin/python --openpi-src /tmp/openpi`
runs it right after its own measurement, for a ratio measured under the same
machine load. openpi's model code imports torch only for type annotations and
its PyTorch port, which are stubbed here. Its custom Gemma widths are given
through `gemma.get_config` and the SigLIP size through `siglip.Module`, the
two places where openpi fixes them. The train step is openpi's
`scripts/train.py` step (value and gradient of `compute_loss`, gradient-norm
clipping, AdamW, parameter update, loss and gradient norm returned) without
EMA; the sampler is `sample_actions(num_steps=10)`, jitted. Everything runs in float32.

Usage:
    python benchmarks/openpi_pi0_speed.py --openpi-src DIR [--json PATH] [--repeats N]
        [--retain-freed-memory]
"""

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
import types

BATCH = 4
VLM = dict(width=256, depth=6, mlp_dim=1024, num_heads=8, num_kv_heads=1, head_dim=32)
EXPERT = dict(width=128, depth=6, mlp_dim=512, num_heads=8, num_kv_heads=1, head_dim=32)


def stub_torch():
    """Stands in for torch and openpi's PyTorch port, which the JAX model only names."""
    torch = types.ModuleType("torch")
    torch.Tensor = type("Tensor", (), {})
    torch.uint8 = torch.float32 = object()
    torch.nn = types.ModuleType("torch.nn")
    torch.nn.functional = types.ModuleType("torch.nn.functional")
    sys.modules.update(
        {
            "torch": torch,
            "torch.nn": torch.nn,
            "torch.nn.functional": torch.nn.functional,
            "openpi.models_pytorch.pi0_pytorch": types.ModuleType("pi0_pytorch"),
        }
    )


def retain_freed_memory():
    """The same glibc settings as `keras_openpi.backend.retain_freed_memory`."""
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return all(mallopt(option, -1 if option != -8 else 1) == 1 for option in (-8, -3, -1))


def timed(fn, repeats):
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    return {
        "median": median,
        "min": min(times),
        "max": max(times),
        "cpu_median": statistics.median(cpu_times),
        "compile": max(first - median, 0.0),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openpi-src", required=True, help="an openpi checkout")
    parser.add_argument("--json", help="where to write the results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--retain-freed-memory", action="store_true")
    args = parser.parse_args()
    retained = retain_freed_memory() if args.retain_freed_memory else False

    stub_torch()
    sys.path.insert(0, os.path.join(args.openpi_src, "src"))
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx
    from openpi.models import gemma
    from openpi.models import model as openpi_model
    from openpi.models import pi0
    from openpi.models import pi0_config
    from openpi.models import siglip

    custom = {"bench_vlm": gemma.Config(**VLM), "bench_expert": gemma.Config(**EXPERT)}
    get_config = gemma.get_config
    gemma.get_config = lambda variant: custom.get(variant) or get_config(variant)
    vit = siglip.Module
    pi0._siglip = types.SimpleNamespace(Module=lambda **kw: vit(**{**kw, "variant": "S/16"}))

    config = pi0_config.Pi0Config(
        dtype="float32",
        paligemma_variant="bench_vlm",
        action_expert_variant="bench_expert",
        action_dim=32,
        action_horizon=50,
        max_token_len=48,
    )
    model = config.create(jax.random.key(0))
    num_parameters = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
    )
    print(f"openpi Pi0 parameters: {num_parameters:,}")

    rng = np.random.default_rng(0)
    keys = openpi_model.IMAGE_KEYS
    observation = openpi_model.Observation(
        images={k: jnp.asarray(rng.uniform(-1, 1, (BATCH, 224, 224, 3)), "float32") for k in keys},
        image_masks={k: jnp.ones((BATCH,), bool) for k in keys},
        state=jnp.asarray(rng.normal(size=(BATCH, 32)), "float32"),
        tokenized_prompt=jnp.asarray(rng.integers(0, 257_152, (BATCH, 48)), "int32"),
        tokenized_prompt_mask=jnp.asarray(np.arange(48)[None] < rng.integers(8, 48, (BATCH, 1))),
    )
    actions = jnp.asarray(rng.normal(size=(BATCH, 50, 32)), "float32")

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-10),
    )
    graphdef, state = nnx.split(model)
    holder = {"state": state, "opt_state": tx.init(state.filter(nnx.Param)), "step": 0}

    def train_step(state, opt_state, step, observation, actions):
        model = nnx.merge(graphdef, state)
        model.train()

        def loss_fn(model, rng, observation, actions):
            return jnp.mean(model.compute_loss(rng, observation, actions, train=True))

        rng = jax.random.fold_in(jax.random.key(1), step)
        diff = nnx.DiffState(0, nnx.Param)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, rng, observation, actions)
        params = state.filter(nnx.Param)
        updates, opt_state = tx.update(grads, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return nnx.state(model), opt_state, loss, optax.global_norm(grads)

    train_step = jax.jit(train_step, donate_argnums=(0, 1))

    @jax.jit
    def sample(state, rng, observation):
        return nnx.merge(graphdef, state).sample_actions(rng, observation, num_steps=10)

    def one_train_step():
        state, opt_state, loss, grad_norm = train_step(
            holder["state"], holder["opt_state"], holder["step"], observation, actions
        )
        holder.update(state=state, opt_state=opt_state, step=holder["step"] + 1)
        float(loss), float(grad_norm)

    load = os.getloadavg()[0]
    train = timed(one_train_step, args.repeats)
    sampled = timed(
        lambda: np.asarray(sample(holder["state"], jax.random.key(2), observation)), args.repeats
    )
    results = {
        "model": "openpi pi0 (JAX)",
        "num_parameters": num_parameters,
        "train_step_s_median": train["median"],
        "train_step_s_min": train["min"],
        "train_step_s_max": train["max"],
        "train_step_cpu_s_median": train["cpu_median"],
        "train_compile_s": train["compile"],
        "sample_s_median": sampled["median"],
        "sample_s_min": sampled["min"],
        "sample_s_max": sampled["max"],
        "sample_cpu_s_median": sampled["cpu_median"],
        "sample_compile_s": sampled["compile"],
        "retain_freed_memory": retained,
        "jax": jax.__version__,
        "load_average": [load, os.getloadavg()[0]],
    }
    print(
        f"openpi: train step {train['median']:.2f} s (CPU {train['cpu_median']:.2f} s), "
        f"sample {sampled['median']:.2f} s (CPU {sampled['cpu_median']:.2f} s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
