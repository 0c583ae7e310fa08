"""Load tests for a running Superbrain cluster: a Locust robot fleet and a capacity search.

* ``loadtest/locustfile.py``: one Locust user = one robot calling ``Act`` at a fixed
  control rate through the SDK (``serving.client.RobotClient``).
* ``python -m loadtest.run``: one headless Locust run with CSV output and a short
  summary (``make loadtest``).
* ``python -m loadtest.capacity``: starts a server and searches the largest fleet
  that meets the latency target (``make capacity``; docs/capacity.md).

The pieces that need no Locust (fleet mix, synthetic frames, CSV parsing) live in
``fleet.py`` and ``results.py`` so they stay importable and cheap.
"""
