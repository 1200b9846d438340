"""A run of ``simulate.py`` in which one training node lies: test-only, never shipped.

    python -m tests.poison <simulate.py overrides>

Partition ``POISON_PARTITION`` (default 0) replies to every training round with a claim of
``POISON_EXAMPLES`` examples and its update multiplied by ``POISON_SCALE`` (default -1e6: the
sign flipped and the norm a million times larger). The ClientApp's own handlers run unchanged
behind a Flower mod, so the rest of the federation is the real one.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

import client.app as client_app_module
from gating.federated.protocol import METRICS, NUM_EXAMPLES, PARTITION_KEY, UPDATE


def lie(message: Message, context: Context, call_next) -> Message:
    reply = call_next(message, context)
    partition = int(os.environ.get("POISON_PARTITION", "0"))
    if reply.has_error() or UPDATE not in reply.content.array_records:
        return reply
    if int(reply.content[METRICS][PARTITION_KEY]) != partition:
        return reply
    scale = float(os.environ.get("POISON_SCALE", "-1e6"))
    update = reply.content[UPDATE]
    reply.content[UPDATE] = ArrayRecord(
        {name: Array(np.asarray(update[name].numpy() * scale)) for name in update}
    )
    reply.content[METRICS][NUM_EXAMPLES] = float(os.environ.get("POISON_EXAMPLES", "1e9"))
    return reply


def poisoned_app() -> ClientApp:
    app = ClientApp(mods=[lie])
    app.query()(client_app_module.query)
    app.train()(client_app_module.train)
    app.evaluate()(client_app_module.evaluate)
    return app


if __name__ == "__main__":
    client_app_module.app = poisoned_app()  # simulate.simulate imports it at call time
    import simulate

    sys.argv = ["simulate.py", *sys.argv[1:]]
    simulate.main()
