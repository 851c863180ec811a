'use strict';
// The seed's master.js pattern: zero-downtime reload and respawn with Node's cluster.
//
//   PORT=8000 WORKERS=1 MODE=kill|disconnect|respawn node bench/node/reload_master.js
//
// MODE=kill (default): on SIGHUP fork WORKERS new workers; as each new one is
//   'listening', kill one old worker with SIGTERM (abrupt: in-flight requests may fail).
// MODE=disconnect: same, but retire the old worker with worker.disconnect() (graceful:
//   its servers close and it exits once its connections are done).
// MODE=respawn: whenever a worker exits, fork a replacement; prints JSON lines
//   {"event":"exit"|"online"|"listening","t":<ms>,"pid":<pid>,"id":<worker id>}
//   where t is process.hrtime in ms (CLOCK_MONOTONIC on Linux, the clock of Python's
//   time.monotonic()), so a driver can kill a worker by pid and measure kill->online/listening.
// stdout: "ready" once the first workers are listening; "reloaded" after each reload has
// finished (every old worker exited). SIGHUPs arriving mid-reload are coalesced into one
// more reload. SIGTERM/SIGINT stop everything and exit.
const cluster = require('node:cluster');
const http = require('node:http');

const PORT = Number(process.env.PORT || 8000);
const WORKERS = Number(process.env.WORKERS || 1);
const MODE = process.env.MODE || 'kill';

if (!['kill', 'disconnect', 'respawn'].includes(MODE)) {
  console.error(`unknown MODE=${MODE} (kill|disconnect|respawn)`);
  process.exit(2);
}

if (cluster.isPrimary) {
  const nowMs = () => Number(process.hrtime.bigint()) / 1e6;
  const event = (name, worker) => {
    if (MODE !== 'respawn') return;
    const line = { event: name, t: nowMs(), pid: worker.process.pid, id: worker.id };
    process.stdout.write(JSON.stringify(line) + '\n');
  };

  let stopping = false;
  let reloading = false;
  let pendingReload = false;

  const fork = () => {
    const w = cluster.fork();
    w.on('online', () => event('online', w));
    w.on('listening', () => event('listening', w));
    return w;
  };

  cluster.on('exit', (worker, code, signal) => {
    event('exit', worker);
    if (stopping) {
      if (Object.keys(cluster.workers).length === 0) process.exit(0);
      return;
    }
    if (MODE === 'respawn' && !worker.retiring) {
      const i = gen.indexOf(worker);
      const fresh = fork();
      if (i >= 0) gen[i] = fresh;
    }
  });

  // First generation.
  let gen = [];
  for (let i = 0; i < WORKERS; i++) gen.push(fork());
  let up = 0;
  for (const w of gen) {
    w.once('listening', () => {
      if (++up === WORKERS) process.stdout.write('ready\n');
    });
  }

  function reload() {
    if (stopping) return;
    if (reloading) {
      pendingReload = true;
      return;
    }
    reloading = true;
    const old = gen.slice();
    const next = [];
    let exited = 0;
    const onOldExit = () => {
      if (++exited < old.length) return;
      gen = next;
      reloading = false;
      process.stdout.write('reloaded\n');
      if (pendingReload) {
        pendingReload = false;
        reload();
      }
    };
    for (const w of old) {
      w.retiring = true;
      if (w.isDead()) exited++;
      else w.once('exit', onOldExit);
    }
    if (exited === old.length) {
      exited--;
      onOldExit();
    }
    for (let i = 0; i < old.length; i++) {
      const fresh = fork();
      next.push(fresh);
      fresh.once('listening', () => {
        const victim = old[i];
        if (victim.isDead()) return;
        if (MODE === 'disconnect') victim.disconnect();
        else victim.process.kill('SIGTERM');
      });
    }
  }

  function stop() {
    if (stopping) return;
    stopping = true;
    const all = Object.values(cluster.workers);
    if (all.length === 0) process.exit(0);
    for (const w of all) w.process.kill('SIGTERM');
    setTimeout(() => {
      for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
      process.exit(0);
    }, 3000).unref();
  }

  process.on('SIGHUP', reload);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  http
    .createServer((req, res) => {
      res.writeHead(200);
      res.end('hello world\n');
    })
    .listen(PORT);
}
