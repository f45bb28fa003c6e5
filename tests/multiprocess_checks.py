"""A sharded PPO iteration run by two processes (``jax.distributed`` on 127.0.0.1, gloo
collectives on CPU, 2 devices each), to compare with the same iterations in one process on one
device (which ``multidevice_checks.py --save-ppo`` writes).

    python tests/multiprocess_checks.py PROCESS_ID PORT OUT.pkl   # started twice

``tests/test_parallel.py`` starts the processes and compares the files.
"""

from __future__ import annotations

import pickle
import sys

import jax

from rlhf_jax.parallel import initialize_distributed, make_mesh


def main(argv: list[str]) -> int:
    pid, port, out = int(argv[0]), int(argv[1]), argv[2]
    assert initialize_distributed(f"127.0.0.1:{port}", 2, pid)
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    from multidevice_checks import ppo_run   # after initialize: it builds arrays at import

    result = ppo_run(make_mesh())
    if jax.process_index() == 0:
        with open(out, "wb") as f:
            pickle.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
