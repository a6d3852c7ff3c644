"""Run every benchmark on one local Ray and print the ratios (results also in bench/results/)."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from bench import (  # noqa: E402
    bench_async,
    bench_classic,
    bench_data_prep,
    bench_dpo,
    bench_logprob_chunks,
    bench_long_context,
    bench_orchestration,
    bench_packing,
    bench_ppo,
    bench_qlora_memory,
    bench_rollout,
    bench_startup,
    bench_tokenize,
    bench_zero_memory,
)
from bench.summary import write_summary  # noqa: E402
from tuneyard.cluster.config import ClusterConfig  # noqa: E402
from tuneyard.cluster.ray_cluster import ray_cluster  # noqa: E402

OWN_RAY = {"startup"}  # benchmarks whose runs start their own local Ray, as a user's `tuneyard train` does


def main() -> None:
    """Every benchmark (or those named on the command line); each prints its ratio when done."""
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    benches = {
        "tokenize": bench_tokenize,
        "qlora_memory": bench_qlora_memory,
        "packing": bench_packing,
        "orchestration": bench_orchestration,
        "dpo": bench_dpo,
        "ppo": bench_ppo,
        "rollout": bench_rollout,
        "async": bench_async,
        "rl_logprobs": bench_logprob_chunks,
        "long_context": bench_long_context,
        "startup": bench_startup,
        "zero_memory": bench_zero_memory,
        "data_prep": bench_data_prep,
        "classic": bench_classic,
    }
    selected = sys.argv[1:] or list(benches)
    results = {}

    def run(name: str, tmp: str) -> None:
        result = benches[name].main(Path(tmp) / name)
        results[name] = result
        (out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"{name:14s} ratio {result['ratio']:.2f} (target {result['target']})  {json.dumps(result)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        # start-up first, before the shared Ray: a second local Ray on the machine slows ray.init several-fold,
        # which a user's machine does not have
        for name in [n for n in selected if n in OWN_RAY]:
            run(name, tmp)
        with ray_cluster(ClusterConfig(workers=2)):
            for name in [n for n in selected if n not in OWN_RAY]:
                run(name, tmp)
    print(f"summary: {write_summary(results, out)}")


if __name__ == "__main__":
    main()
