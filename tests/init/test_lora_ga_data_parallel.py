"""LoRA-GA gradient estimation, data parallel: on 4 CPU devices (in a subprocess, since XLA_FLAGS must be set
before jax starts), the jit-with-sharded-batches and the shard_map + pmean estimates equal the single-device
estimate and the NumPy mean gradient."""

import json
import os
import subprocess
import sys
import textwrap

_DP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh
    sys.path.insert(0, {here!r})
    import lorapro_jax as lp
    from lorapro_jax.init import estimate_full_gradients
    from _lora_ga_ref import Net, loss_fn, make_batches, np_loss_and_grads, weights

    def model():
        m = Net(nnx.Rngs(0))
        lp.apply_lora(m, lp.LoraConfig(rank=2, targets=["fc", "gen", "ein"]), rngs=nnx.Rngs(1))
        return m

    batches = make_batches(3, 8, seed=7)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    single = estimate_full_gradients(model(), loss_fn, batches)
    runs = {{
        "jit": estimate_full_gradients(model(), loss_fn, batches, mesh=mesh),
        "shard_map": estimate_full_gradients(model(), loss_fn, batches, mesh=mesh, data_parallel="shard_map"),
        "shard_map_layers": estimate_full_gradients(model(), loss_fn, batches, mesh=mesh, data_parallel="shard_map",
                                                    layer_by_layer=True),
    }}
    w = weights(model())
    per = [np_loss_and_grads(w, x, t)[1] for x, t in batches]
    ref = {{k: np.mean([g[k] for g in per], 0) for k in single}}
    sharded = runs["jit"]["fc"].sharding
    out = {{
        "devices": jax.device_count(),
        "single_vs_numpy": max(float(np.abs(np.asarray(single[k]) - ref[k]).max()) for k in ref),
        "scale": max(float(np.abs(ref[k]).max()) for k in ref),
        "diff": {{name: max(float(np.abs(np.asarray(r[k]) - np.asarray(single[k])).max()) for k in ref)
                 for name, r in runs.items()}},
        "jit_result_devices": len(sharded.device_set),
    }}
    try:
        estimate_full_gradients(model(), loss_fn, make_batches(1, 6), mesh=mesh)
        out["indivisible_error"] = ""
    except ValueError as e:
        out["indivisible_error"] = str(e)
    print("RESULT" + json.dumps(out))
    """
)


def test_data_parallel_estimate_equals_single_device_on_4_cpu_devices():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _DP_SCRIPT.format(here=here)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    assert out["devices"] == 4
    assert out["jit_result_devices"] == 4
    assert out["single_vs_numpy"] < 1e-5 * max(1.0, out["scale"])
    for name, d in out["diff"].items():
        assert d < 1e-5 * max(1.0, out["scale"]), (name, d)
    assert "not divisible by the 4 devices" in out["indivisible_error"]
