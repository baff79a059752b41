// Failures between the client and the server, against a local HTTP server that misbehaves the way a
// stalled or half-configured proxy does: every one must still be a KeyrotorError (docs/node.md).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { KeyrotorClient, KeyrotorError, UnavailableError } from '../index.js';

async function serving(handler, fn) {
  const server = http.createServer(handler);
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  try {
    await fn(`http://127.0.0.1:${server.address().port}`);
  } finally {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
}

test('a body that stalls after the headers is an UnavailableError, not a DOMException', { timeout: 10_000 }, async () => {
  await serving(
    (req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.write('{"ciphertext":'); // and nothing more
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token: 'krt_test', timeoutMs: 200 });
      await assert.rejects(kr.encrypt('s', 'v'), (e) => e instanceof UnavailableError && e.status === 0);
    },
  );
});

test('a success answer that is not JSON is a KeyrotorError, not a TypeError', { timeout: 10_000 }, async () => {
  await serving(
    (req, res) => {
      res.writeHead(200, { 'Content-Type': 'text/html' });
      res.end('<html>welcome to nginx</html>');
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token: 'krt_test' });
      await assert.rejects(kr.decrypt('s', 'kr1:1:x'), (e) => e instanceof KeyrotorError && e.status === 200);
    },
  );
});
