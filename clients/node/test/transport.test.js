// Failures between the client and the server, against a local HTTP server that misbehaves the way a
// stalled or half-configured proxy does: every one must still be a KeyrotorError (docs/node.md).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { inspect } from 'node:util';
import {
  KeyrotorClient,
  KeyrotorError,
  InvalidRequestError,
  MisconfiguredError,
  NotFoundError,
  RateLimitError,
  UnavailableError,
} from '../index.js';

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

test('a proxy answering 502 or 504 (keyrotor behind it unreachable) is an UnavailableError', { timeout: 10_000 }, async () => {
  for (const status of [502, 504]) {
    await serving(
      (req, res) => {
        res.writeHead(status, { 'Content-Type': 'text/html' });
        res.end('<html>bad gateway</html>');
      },
      async (url) => {
        const kr = new KeyrotorClient({ url, token: 'krt_test' });
        await assert.rejects(kr.decrypt('s', 'kr1:1:x'), (e) => e instanceof UnavailableError && e.status === status);
      },
    );
  }
});

test("keyrotor's 503 misconfigured is a MisconfiguredError, not an UnavailableError to retry", { timeout: 10_000 }, async () => {
  for (const [code, check] of [
    ['misconfigured', (e) => e instanceof MisconfiguredError && !(e instanceof UnavailableError)],
    ['unavailable', (e) => e instanceof UnavailableError && !(e instanceof MisconfiguredError)],
  ]) {
    await serving(
      (req, res) => {
        res.writeHead(503, { 'Content-Type': 'application/json' });
        res.end(JSON.stringify({ error: { code, message: 'the server is misconfigured; see its log' } }));
      },
      async (url) => {
        const kr = new KeyrotorClient({ url, token: 'krt_test' });
        await assert.rejects(kr.decrypt('s', 'kr1:1:x'), (e) => check(e) && e instanceof KeyrotorError && e.status === 503 && e.code === code, code);
      },
    );
  }
});

test('Retry-After in seconds or as an HTTP date is a number of seconds, anything else null', { timeout: 10_000 }, async () => {
  const inTenSeconds = new Date(Date.now() + 10_000).toUTCString();
  for (const [header, check] of [
    ['7', (s) => s === 7],
    [inTenSeconds, (s) => Number.isInteger(s) && s >= 8 && s <= 11],
    ['Thu, 01 Jan 1970 00:00:00 GMT', (s) => s === 0],
    ['soon', (s) => s === null],
    ['-3', (s) => s === null],
  ]) {
    await serving(
      (req, res) => {
        res.writeHead(429, { 'Content-Type': 'application/json', 'Retry-After': header });
        res.end('{"error":{"code":"rate_limited","message":"over"}}');
      },
      async (url) => {
        const kr = new KeyrotorClient({ url, token: 'krt_test' });
        await assert.rejects(kr.encrypt('s', 'v'), (e) => e instanceof RateLimitError && check(e.retryAfter), header);
      },
    );
  }
});

test('a success without the field the call returns is invalid_response, not undefined', { timeout: 10_000 }, async () => {
  await serving(
    (req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end('{}');
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token: 'krt_test' });
      const invalid = (e) => e instanceof KeyrotorError && e.code === 'invalid_response';
      await assert.rejects(kr.decrypt('s', 'kr1:1:x'), invalid);
      await assert.rejects(kr.encrypt('s', 'v'), invalid);
      await assert.rejects(kr.getSecret('s', 'n'), invalid);
      await assert.rejects(kr.decryptBatch('s', ['kr1:1:x']), invalid);
      await assert.rejects(kr.encryptBatch('s', ['v']), invalid);
    },
  );
  // One result a item, in order, or the results cannot be matched to the items.
  await serving(
    (req, res) => {
      res.writeHead(200, { 'Content-Type': 'application/json' });
      res.end('{"results":[{"plaintext":"a"}]}');
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token: 'krt_test' });
      await assert.rejects(kr.decryptBatch('s', ['kr1:1:x', 'kr1:1:y']), (e) => e.code === 'invalid_response');
    },
  );
});

test('the token is in no inspection of the client, nor of an error', { timeout: 10_000 }, async () => {
  const token = 'krt_' + 'S'.repeat(43);
  await serving(
    (req, res) => {
      res.writeHead(401, { 'Content-Type': 'application/json' });
      res.end('{"error":{"code":"unauthenticated","message":"no"}}');
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token });
      for (const shown of [inspect(kr, { showHidden: true, depth: 10 }), JSON.stringify(kr), Object.getOwnPropertyNames(kr).map((k) => String(kr[k])).join()]) {
        assert.ok(!shown.includes(token));
      }
      const err = await kr.encrypt('s', 'v').catch((e) => e);
      assert.ok(err instanceof KeyrotorError && !inspect(err, { showHidden: true, depth: 10 }).includes(token));
    },
  );
});

test('a token that cannot be a header value is refused when the client is made, without echoing it', () => {
  const secret = 'krt_' + 'S'.repeat(43);
  for (const token of [`${secret}\r\nX-Other: 1`, `${secret}\nsecond-line`, `krt_S S`]) {
    assert.throws(
      () => new KeyrotorClient({ url: 'http://127.0.0.1:8180', token }),
      (e) => e instanceof TypeError && !inspect(e).includes('S'.repeat(10)) && !inspect(e).includes('krt_S'),
    );
  }
  // Surrounding whitespace (a token file's newline) is not part of the token, as the server reads it.
  assert.doesNotThrow(() => new KeyrotorClient({ url: 'http://127.0.0.1:8180', token: `${secret}\n` }));
});

test('a URL with credentials, a query or a scheme other than http(s) is refused, without echoing it', () => {
  for (const url of ['http://user:pa55word@keyrotor:8180', 'keyrotor-api:8180', 'ftp://keyrotor/', 'not a url pa55word', 'http://keyrotor:8180/?k=pa55word']) {
    assert.throws(
      () => new KeyrotorClient({ url, token: 'krt_test' }),
      (e) => e instanceof TypeError && !inspect(e).includes('pa55word'),
      url,
    );
  }
  assert.equal(new KeyrotorClient({ url: 'https://keyrotor.internal:8180/api/', token: 'krt_test' }).url, 'https://keyrotor.internal:8180/api');
});

test('timeoutMs must be a positive number of milliseconds', () => {
  for (const timeoutMs of [0, -1, NaN, Infinity, 2 ** 32, '5000', null]) {
    assert.throws(() => new KeyrotorClient({ url: 'http://127.0.0.1:8180', token: 'krt_test', timeoutMs }), TypeError, String(timeoutMs));
  }
  assert.equal(new KeyrotorClient({ url: 'http://127.0.0.1:8180', token: 'krt_test', timeoutMs: 250 }).timeoutMs, 250);
});

test("a secret named '.' or '..' is refused before sending: a URL parser would resolve it to another path", { timeout: 10_000 }, async () => {
  let requests = 0;
  await serving(
    (req, res) => {
      requests += 1;
      res.writeHead(404, { 'Content-Type': 'application/json' });
      res.end('{"error":{"code":"not_found","message":"Not Found"}}');
    },
    async (url) => {
      const kr = new KeyrotorClient({ url, token: 'krt_test' });
      for (const name of ['.', '..']) {
        const refused = (e) => e instanceof InvalidRequestError && !(e instanceof NotFoundError) && e.code === 'invalid_input';
        await assert.rejects(kr.getSecret('openai', name), refused);
        await assert.rejects(kr.putSecret('openai', name, 'sk-x'), refused);
      }
      assert.equal(requests, 0);
    },
  );
});
