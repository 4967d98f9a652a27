"""`edge-lb bench` beyond the per-packet cost (issue 13's targets), and what benchmarks/ scripts call:

    command.py     `edge-lb bench`: runs the parts, assembles one document, prints it (table or JSON)
    targets.py     the targets (limit, unit, the flag that measures them) and the report's assembly (pure)
    reaction.py    item 3: apply times of the real maps (health flip, pool death, 500 VIPs), the loop's lag
    apicost.py     item 3: event-loop time of GET /metrics and the API's reads on a big node
    restart.py     item 5: kill -9 -> a new supervisor answering and checking (namespace lab, --restart)
    checkscale.py  item 4: supervisor CPU, stale checks at 1,000 / 10,000 backends (namespace lab, --checks)
    checkserver.py the backend server checkscale.py runs in its lab (`python -m edge_lb.bench.checkserver`)

The per-packet part is edge_lb/dataplane/bench.py. Nothing in production imports this package.
"""
