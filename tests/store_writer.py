"""Child process for test_store.py: append alerts to an AlertStore forever, printing each id once `append` has
returned (that is the acknowledgement), until killed."""

import sys

from vigil.runtime.store import AlertStore

store = AlertStore(sys.argv[1])
i = 0
while True:
    record = store.append(f"robot-{i % 3}", ("warn", "alert", "stop")[i % 3], "writer", f"reason {i}",
                          {"i": i, "pad": "x" * (i % 50)}, count=i + 1, t_ns=1_000_000 + i)
    print(record.id, i, flush=True)
    i += 1
