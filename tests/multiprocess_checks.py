"""A sharded PPO iteration run by two processes (``jax.distributed`` on 127.0.0.1, gloo
collectives on CPU, 2 devices each) against the same iteration in one process on one device.

    python tests/multiprocess_checks.py worker PROCESS_ID PORT OUT.pkl   # started twice
    python tests/multiprocess_checks.py single OUT.pkl

``tests/test_parallel.py`` starts the processes and compares the files.
"""

from __future__ import annotations

import pickle
import sys

import jax

from rlhf_jax.parallel import initialize_distributed, make_mesh


def main(argv: list[str]) -> int:
    if argv[0] == "worker":
        pid, port, out = int(argv[1]), int(argv[2]), argv[3]
        assert initialize_distributed(f"127.0.0.1:{port}", 2, pid)
        assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
        mesh = make_mesh()
    else:
        out, mesh = argv[1], make_mesh(jax.devices()[:1])
    from multidevice_checks import ppo_run   # after initialize: it builds arrays at import

    result = ppo_run(mesh)
    if jax.process_index() == 0:
        with open(out, "wb") as f:
            pickle.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
