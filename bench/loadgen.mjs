// The Node load generator of bench/bench_http.py: C closed-loop clients over keep-alive
// connections, each sending its next request when the previous one answered, for a fixed time.
// The same semantics as load() in bench_http.py, in a process that costs the machine far less
// CPU than a Python aiohttp client, so the servers under test keep more of the cores.
//
//   node bench/loadgen.mjs SPEC.json CLIENTS SECONDS
//
// SPEC.json: {"method", "url", "headers": {...}, "bodies": ["...", ...]}; request i sends
// bodies[i % bodies.length]. The spec comes in a file, not argv, because its headers hold the
// bench's token and argv is readable by every user of the machine.
//
// Prints one JSON object on stdout: req_s, p50_ms, p99_ms (of the answered requests), requests,
// errors (non-200 answers and failed connections: neither counted as throughput nor as
// latency), error (the first one's status and a few bytes of its body), cpu_s (this process's
// user + system CPU during the timed part) and elapsed_s. No dependency but Node's own modules.

import { readFileSync } from "node:fs";
import http from "node:http";
import { performance } from "node:perf_hooks";

function main() {
  const [specPath, clientsArg, secondsArg] = process.argv.slice(2);
  const clients = Number.parseInt(clientsArg, 10);
  const seconds = Number.parseFloat(secondsArg);
  if (!specPath || !(clients > 0) || !(seconds > 0)) {
    process.stderr.write("usage: node bench/loadgen.mjs SPEC.json CLIENTS SECONDS\n");
    process.exit(2);
  }
  const spec = JSON.parse(readFileSync(specPath, "utf8"));
  const url = new URL(spec.url);
  // Encoded once: the generator's per-request work is sending bytes, not building them.
  const bodies = spec.bodies.map((b) => Buffer.from(b, "utf8"));
  const headers = bodies.map((b) => ({ ...spec.headers, "Content-Length": b.length }));
  // One socket per client at most, kept open between requests; Nagle off, as aiohttp sets it.
  const agent = new http.Agent({ keepAlive: true, maxSockets: clients, noDelay: true });

  const stats = { latencies: [], errors: 0, error: null };

  function send(i) {
    const k = i % bodies.length;
    const body = bodies[k];
    return new Promise((resolve) => {
      const req = http.request(
        {
          agent,
          method: spec.method,
          hostname: url.hostname,
          port: url.port,
          path: url.pathname + url.search,
          headers: headers[k],
        },
        (res) => {
          res.on("error", (err) => resolve(`${err.code || err.name}`));
          if (res.statusCode === 200) {
            // Read to its end (the connection is reused only then), keeping nothing.
            res.on("end", () => resolve(null));
            res.resume();
            return;
          }
          const chunks = [];
          res.on("data", (chunk) => chunks.push(chunk));
          res.on("end", () => {
            const text = Buffer.concat(chunks).toString("utf8", 0, 120);
            resolve(`HTTP ${res.statusCode}: ${text}`);
          });
        },
      );
      req.on("error", (err) => resolve(`${err.code || err.name}`));
      req.end(body);
    });
  }

  function failed(message) {
    stats.errors += 1;
    stats.error ??= message;
  }

  async function client(k, stop) {
    for (let i = k; performance.now() < stop; i += clients) {
      const t0 = performance.now();
      const problem = await send(i);
      if (problem === null) {
        stats.latencies.push(performance.now() - t0);
      } else {
        failed(problem);
      }
    }
  }

  async function run() {
    const warm = await send(0); // a connection and the server's caches, outside the timing
    if (warm !== null) {
      failed(warm);
    }
    const cpu0 = process.cpuUsage();
    const started = performance.now();
    const stop = started + seconds * 1e3;
    await Promise.all(Array.from({ length: clients }, (_, k) => client(k, stop)));
    const elapsedMs = performance.now() - started;
    const cpu = process.cpuUsage(cpu0);
    agent.destroy();

    const sorted = Float64Array.from(stats.latencies).sort();
    const n = sorted.length;
    // The median as Python's statistics.median takes it; p99 as bench_http.py's load() does.
    const p50 = n === 0 ? 0 : n % 2 === 1 ? sorted[(n - 1) / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2;
    const p99 = n === 0 ? 0 : sorted[Math.min(n - 1, Math.floor(n * 0.99))];
    const result = {
      req_s: n / (elapsedMs / 1e3),
      p50_ms: p50,
      p99_ms: p99,
      requests: n,
      errors: stats.errors,
      error: stats.error,
      cpu_s: (cpu.user + cpu.system) / 1e6,
      elapsed_s: elapsedMs / 1e3,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  }

  run().catch((err) => {
    process.stderr.write(`loadgen: ${err && err.stack ? err.stack : err}\n`);
    process.exit(1);
  });
}

main();
