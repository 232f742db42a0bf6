"""Memory and performance model: what fits, what is fastest, calibrated by measurement.

    shapes.py    parameter counts from the model on the meta device; byte sizes
    memory.py    memory per device of a training step, replayed allocation by allocation
    profiles.py  device and interconnect profiles (built-in GPUs, this machine measured)
    speed.py     step time: compute, alpha-beta communication, bubble, overlap
    efficiency.py  CPUs: cost per FLOP at a micro-batch's size and TP width (a probed block)
    strategy_cost.py  CPUs: what TP and FSDP cost per block, measured in bench-comm's ranks
    planner.py   every strategy and mix on N devices, ranked
    render.py    rich table, markdown, JSON
    predict.py   predicted against measured for a result row
    budget.py    runtime.device_memory on real runs
    commands.py  ``parallab plan`` and ``parallab bench-comm`` (settings and functions)
"""
