"""`edge-lb backend`: the backend side of edge-lb as one command (set up, check, tear down a Linux backend).

    model.py    what is wanted, the facts, the check items, the changes and their undos (data only)
    judge.py    facts -> what is wrong, one item per check line (pure)
    plan.py     facts -> the changes setup makes (pure; refuses what it must not fix by itself)
    state.py    the state file: each change's undo, for teardown
    system.py   the kernel: facts gathered, changes applied (netlink.py, /proc/sys, dataplane/decap.py)
    fake.py     an in-memory host with the same interface, for the table tests
    command.py  the argparse subcommands and the setup / check / teardown flows
"""
