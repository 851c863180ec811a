'use strict';
// Node cluster IPC benchmark: primary <-> one forked worker.
//
//   node bench/node/ipc.js [seconds]
//
// env: IPC_SECONDS (default 2, argv[2] wins), IPC_WARMUP (seconds, default 0.2),
//      IPC_METRICS (comma-separated keys of the result to measure; all by default),
//      IPC_SERIALIZATION ("json" default, or "advanced"),
//      IPC_WORKER_CPUS (a taskset CPU list: every thread of the worker is moved there once online;
//      bench/ipc.py starts the primary itself under `taskset -c`).
//
// Prints ONE JSON line on stdout, all values per second:
//   {"rtt_small": .., "rtt_64k": .., "rtt_16m": .., "stream_small": .., "stream_64k": .., "stream_16m": ..}
// rtt_*    : round trips with one message in flight (worker echoes the message back).
// stream_* : messages streamed primary->worker; the clock stops when the worker reports
//            it has received every message sent (so queued-but-unread messages do not count).
// Messages: small = 64 bytes of JSON, 64k / 16m = {type, n, s} with a 64 KiB / 16 MiB string.
// Each measurement runs for `seconds` but goes on until at least MIN_MSGS messages completed
// (a 16 MiB round trip takes tens to hundreds of ms), and never past LIMIT(seconds) (then it reports
// the rate of what completed).
const cluster = require('node:cluster');
const fs = require('node:fs');
const { execFileSync } = require('node:child_process');

const CTL = '__ctl';
const MIN_MSGS = 3;
const LIMIT = (seconds) => Math.max(10 * seconds, 10) * 1000; // ms, hard cap of one measurement

if (cluster.isPrimary) {
  primary().catch((err) => {
    console.error(err);
    process.exit(1);
  });
} else {
  workerMain();
}

function workerMain() {
  let mode = 'echo';
  let count = 0;
  process.on('message', (m) => {
    if (m.type === CTL) {
      if (m.op === 'echo' || m.op === 'count') {
        mode = m.op;
        count = 0;
        process.send({ type: CTL, op: 'ack' });
      } else if (m.op === 'end') {
        process.send({ type: CTL, op: 'count', n: count });
        count = 0;
      }
      return;
    }
    if (mode === 'echo') process.send(m);
    else count++;
  });
}

// The CPUs any thread of `pid` may run on (as bench/ipc.py's prefork side reports them).
function cpusOf(pid) {
  const cpus = new Set();
  for (const tid of fs.readdirSync(`/proc/${pid}/task`)) {
    let status;
    try {
      status = fs.readFileSync(`/proc/${pid}/task/${tid}/status`, 'utf8');
    } catch {
      continue; // a thread that ended meanwhile
    }
    const list = /^Cpus_allowed_list:\s*(\S+)/m.exec(status)[1];
    for (const part of list.split(',')) {
      const [a, b] = part.split('-').map(Number);
      for (let c = a; c <= (b ?? a); c++) cpus.add(c);
    }
  }
  return [...cpus].sort((x, y) => x - y);
}

function nowMs() {
  return Number(process.hrtime.bigint()) / 1e6;
}

function waitCtl(worker, op) {
  return new Promise((resolve) => {
    const on = (m) => {
      if (m && m.type === CTL && m.op === op) {
        worker.off('message', on);
        resolve(m);
      }
    };
    worker.on('message', on);
  });
}

async function setMode(worker, op) {
  const acked = waitCtl(worker, 'ack');
  worker.send({ type: CTL, op });
  await acked;
}

async function rtt(worker, msg, seconds, minMsgs = MIN_MSGS) {
  await setMode(worker, 'echo');
  return new Promise((resolve) => {
    let n = 0;
    const t0 = nowMs();
    const deadline = t0 + seconds * 1000;
    const hardStop = t0 + LIMIT(seconds);
    const on = (m) => {
      if (m.type === CTL) return;
      n++;
      const t = nowMs();
      if ((t >= deadline && n >= minMsgs) || t >= hardStop) {
        worker.off('message', on);
        resolve(n / ((t - t0) / 1000));
      } else {
        worker.send(msg);
      }
    };
    worker.on('message', on);
    worker.send(msg);
  });
}

async function stream(worker, msg, seconds, batch, minMsgs = MIN_MSGS) {
  await setMode(worker, 'count');
  const t0 = nowMs();
  const deadline = t0 + seconds * 1000;
  const hardStop = t0 + LIMIT(seconds);
  let sent = 0;
  const more = () => {
    const t = nowMs();
    return (t < deadline || sent < minMsgs) && t < hardStop;
  };
  // Keep at most two batches queued in the primary: the callback of a batch's last
  // send fires once it is written to the channel, so memory stays bounded and the
  // rate measured is one the sender can sustain.
  let prev = Promise.resolve();
  while (more()) {
    for (let i = 0; i < batch - 1; i++) worker.send(msg);
    const done = new Promise((resolve) => worker.send(msg, resolve));
    sent += batch;
    await prev;
    prev = done;
  }
  await prev;
  const reply = waitCtl(worker, 'count');
  worker.send({ type: CTL, op: 'end' });
  const { n } = await reply;
  const elapsed = (nowMs() - t0) / 1000;
  if (n !== sent) throw new Error(`worker counted ${n} messages, primary sent ${sent}`);
  return n / elapsed;
}

async function primary() {
  const seconds = Number(process.argv[2] || process.env.IPC_SECONDS || 2);
  const warmup = Number(process.env.IPC_WARMUP ?? 0.2);
  const serialization = process.env.IPC_SERIALIZATION || 'json';
  cluster.setupPrimary({ serialization });

  const worker = cluster.fork();
  await new Promise((resolve) => worker.once('online', resolve));
  if (process.env.IPC_WORKER_CPUS) {
    execFileSync('taskset', ['-a', '-p', '-c', process.env.IPC_WORKER_CPUS, String(worker.process.pid)],
      { stdio: 'ignore' });
  }

  const small = { type: 'ping', n: 123, s: 'hello' + '.'.repeat(29) }; // 64 bytes of JSON
  const big = { type: 'ping', n: 123, s: 'x'.repeat(64 * 1024) };
  const huge = { type: 'ping', n: 123, s: 'x'.repeat(16 * 1024 * 1024) };
  if (JSON.stringify(small).length !== 64) throw new Error('the small message is not 64 bytes');

  // the warm-up runs for IPC_WARMUP seconds but needs only one message (16 MiB ones are slow)
  const measure = async (fn, msg, batch) => {
    if (warmup > 0) {
      if (fn === rtt) await rtt(worker, msg, warmup, 1);
      else await stream(worker, msg, warmup, batch, 1);
    }
    return fn === rtt ? rtt(worker, msg, seconds) : stream(worker, msg, seconds, batch);
  };

  const cases = {
    rtt_small: [rtt, small], rtt_64k: [rtt, big], rtt_16m: [rtt, huge],
    stream_small: [stream, small, 256], stream_64k: [stream, big, 16], stream_16m: [stream, huge, 1],
  };
  const wanted = (process.env.IPC_METRICS || '').split(',').filter(Boolean); // bench/ipc.py --metrics
  const result = {};
  for (const [k, [fn, msg, batch]] of Object.entries(cases)) {
    if (!wanted.length || wanted.includes(k)) result[k] = await measure(fn, msg, batch);
  }
  for (const k of Object.keys(result)) result[k] = Math.round(result[k] * 10) / 10;
  result.cpus = { primary: cpusOf(process.pid), worker: cpusOf(worker.process.pid) };
  process.stdout.write(JSON.stringify(result) + '\n');

  const killTimer = setTimeout(() => worker.process.kill('SIGKILL'), 3000);
  killTimer.unref();
  worker.once('exit', () => {
    clearTimeout(killTimer);
    process.exitCode = 0;
  });
  worker.kill();
}
