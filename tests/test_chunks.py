"""policies/chunks.py: an action chunk of H actions is executed k at a time, then the policy replans."""

from __future__ import annotations

import numpy as np
import pytest

from vigil.policies.chunks import ActionChunkQueue


def test_chunk_queue_executes_k_of_h_then_replans():
    q = ActionChunkQueue(execute=2)
    assert q.needs_plan() and len(q) == 0
    chunk = np.arange(10, dtype=np.float32).reshape(5, 2)  # H = 5 actions of m = 2
    q.push(chunk)
    assert len(q) == 2 and not q.needs_plan()
    np.testing.assert_array_equal(q.pop(), chunk[0])
    np.testing.assert_array_equal(q.pop(), chunk[1])
    assert q.needs_plan()  # only k = 2 of H = 5 are executed
    q.push(chunk)
    q.pop()
    q.push(chunk + 100)  # a fresh plan replaces what is left of the old one
    np.testing.assert_array_equal(q.pop(), chunk[0] + 100)
    q.clear()
    assert q.needs_plan()
    with pytest.raises(ValueError):
        q.push(np.zeros((1, 2), np.float32))  # H < k
    with pytest.raises(ValueError):
        q.push(np.zeros(4, np.float32))  # not (H, m)
    with pytest.raises(ValueError):
        ActionChunkQueue(0)
