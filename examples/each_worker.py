"""Broadcast to every worker (the seed's `eachWorker` example, in Python).

    python examples/each_worker.py

`cluster.workers` maps each live worker's id to its Worker. The primary sends the same message to
every worker; each prints it and says it has heard it; once all have, the primary disconnects them
all and the program ends.
"""

import prefork as cluster

NUM_WORKERS = 4


def each_worker(callback):
    for worker in list(cluster.workers.values()):
        callback(worker)


if cluster.is_primary:
    for _ in range(NUM_WORKERS):
        cluster.fork()

    each_worker(lambda worker: worker.send("big announcement to all workers"))

    heard = set()

    @cluster.on("message")
    def on_message(worker, message, handle):
        heard.add(worker.id)
        if len(heard) == NUM_WORKERS:
            print("every worker has heard it: disconnecting them")
            cluster.disconnect(lambda: print("all workers are gone"))

else:

    @cluster.worker.on("message")
    def on_message(message, handle):
        print(f"worker {cluster.worker.id} got: {message}")
        cluster.worker.send("heard")
