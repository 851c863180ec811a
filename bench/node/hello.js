'use strict';
// Node cluster hello world (the seed's example), instrumented for fairness numbers.
//
//   WORKERS=2 PORT=8000 NODE_CLUSTER_SCHED_POLICY=rr|none node bench/node/hello.js
//
// GET /slow first burns SLOW_MS (default 20) of CPU: uneven work, as bench/mixed.lua asks.
// Prints "ready" once every worker is listening. On SIGTERM (or SIGINT) to the primary,
// asks each worker over IPC for its counts, prints ONE JSON line
//   {"per_worker_connections": [...], "per_worker_requests": [...]}
// (ordered by worker id), then stops the workers and exits.
// Workers ignore SIGTERM so a signal sent to the whole process group still lets the
// primary collect their counts; they exit when the primary tells them to or goes away.
const cluster = require('node:cluster');
const http = require('node:http');

const PORT = Number(process.env.PORT || 8000);
const WORKERS = Number(process.env.WORKERS || 2);

if (cluster.isPrimary) {
  const workers = [];
  let listening = 0;
  let stopping = false;

  for (let i = 0; i < WORKERS; i++) workers.push(cluster.fork());

  cluster.on('listening', () => {
    if (++listening === WORKERS) process.stdout.write('ready\n');
  });
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) {
      console.error(`worker ${worker.process.pid} died (${signal || code}); exiting`);
      stop();
    }
  });

  const ask = (worker) =>
    new Promise((resolve) => {
      const timer = setTimeout(() => resolve({ connections: null, requests: null }), 2000);
      worker.once('message', (m) => {
        clearTimeout(timer);
        resolve(m);
      });
      if (worker.isConnected()) worker.send({ type: 'counts' });
    });

  async function stop() {
    if (stopping) return;
    stopping = true;
    const counts = await Promise.all(workers.map(ask));
    process.stdout.write(
      JSON.stringify({
        per_worker_connections: counts.map((c) => c.connections),
        per_worker_requests: counts.map((c) => c.requests),
      }) + '\n',
    );
    let alive = workers.filter((w) => !w.isDead()).length;
    if (alive === 0) return process.exit(0);
    cluster.on('exit', () => {
      if (--alive === 0) process.exit(0);
    });
    setTimeout(() => {
      for (const w of workers) if (!w.isDead()) w.process.kill('SIGKILL');
      process.exit(0);
    }, 3000).unref();
    for (const w of workers) if (w.isConnected()) w.send({ type: 'exit' });
  }

  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  let connections = 0;
  let requests = 0;
  const SLOW_MS = Number(process.env.SLOW_MS || 20);
  const server = http.createServer((req, res) => {
    requests++;
    if (req.url === '/slow') {
      // uneven work, as bench/hello_prefork.py's /slow: burn SLOW_MS of CPU
      const end = Date.now() + SLOW_MS;
      while (Date.now() < end);
    }
    res.writeHead(200);
    res.end('hello world\n');
  });
  server.on('connection', () => connections++);
  server.listen(PORT);

  process.on('SIGTERM', () => {});
  process.on('SIGINT', () => {});
  process.on('message', (m) => {
    if (m.type === 'counts') process.send({ type: 'counts', connections, requests });
    else if (m.type === 'exit') process.exit(0);
  });
}
