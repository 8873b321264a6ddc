"""telstate's benchmark suite: telstate against katsdptelstate, side by side in one run.

Run it with ``make bench`` (``python -m benchmarks``) or, to check that it
still works, ``make bench-quick`` (``--quick``, under a minute). It starts
its own redis-server and writes ``benchmarks/results/bench.{md,json,png}``
(``quick.*`` for a quick run).

Layout: :mod:`.contenders` registers every contender once;
:mod:`.workloads` holds one module per workload family; :mod:`.harness`
runs them interleaved and repeated; :mod:`.targets` checks the issue's
targets; :mod:`.report` writes the table, the JSON and the chart;
:mod:`.scale` sizes everything.
"""
