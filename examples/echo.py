"""Echo between the primary and a worker (the seed's `worker.send()` example, in Python).

    python examples/echo.py

The primary forks one worker and sends it '主进程'; the worker prints what it got and answers
'你好'; the primary prints the answer and disconnects the worker, and the program ends by itself.
In a worker, `cluster.worker` plays the part of Node's `process`: `cluster.worker.send()` and
`cluster.worker.on("message", ...)`.
"""

import prefork as cluster

if cluster.is_primary:
    worker = cluster.fork()
    worker.send("主进程")  # kept until the worker's script listens for messages

    @worker.on("message")
    def on_message(message, handle):
        print("message =", message)
        worker.disconnect()  # done: let the worker go; the primary exits once it has

    worker.on("exit", lambda code, signal: print(f"worker {worker.id} exited with code {code}"))

else:

    @cluster.worker.on("message")
    def on_message(msg, handle):
        print("msg =", msg)
        cluster.worker.send("你好")
