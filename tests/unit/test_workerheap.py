"""The worker-heap freeze: which calls of ``settle`` freeze, and that what they freeze is
what was alive then (later objects are still collected)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_settle_freezes_on_the_scheduled_calls_and_later_garbage_is_still_collected():
    # A fresh interpreter: the schedule counts calls per process.
    script = textwrap.dedent("""
        import gc, json
        from modeler import workerheap
        out = {"before": gc.get_freeze_count()}
        workerheap.settle()
        out["first"] = gc.get_freeze_count()
        class Node:
            pass
        a = Node(); a.self = a            # alive at no freeze: a cycle made after the first
        del a
        out["collected_after_first"] = gc.collect()
        workerheap.settle(); workerheap.settle()   # calls 2 and 3: no freeze
        keep = [[i] for i in range(1000)]
        out["third"] = gc.get_freeze_count()
        workerheap.settle()                        # call 4 freezes what is alive now
        out["fourth"] = gc.get_freeze_count()
        out["calls"] = workerheap.calls()
        print(json.dumps(out))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    out = __import__("json").loads(res.stdout)
    assert out["before"] == 0
    assert out["first"] > 1000  # the modules' objects
    assert out["collected_after_first"] >= 1  # a cycle made after the freeze is collected
    assert out["third"] == out["first"]
    assert out["fourth"] >= out["third"] + 1000  # the 1,000 lists alive at call 4
    assert out["calls"] == 4
