// KeyrotorClient against a real `keyrotor serve`: started by tests/api/test_node.py, which passes
// KEYROTOR_URL, KEYROTOR_TOKEN (actor "node-app", grants on "node" and "tenant-1/*"), KEYROTOR_DENIED_TOKEN
// (no grants), KEYROTOR_FROM_PYTHON (values Python wrote), KEYROTOR_NODE_OUT (where to leave
// values for Python to read), KEYROTOR_SETTINGS_ROWS (docs/node.md's settings rows, one
// migrated by `legacy migrate`, one not yet) and KEYROTOR_MISCONFIGURED_URL (a second server, whose
// database lost keyrotor's schema after it started). Skipped when KEYROTOR_URL is not set.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import {
  KeyrotorClient,
  KeyrotorError,
  AuthenticationError,
  PermissionDeniedError,
  InvalidRequestError,
  MisconfiguredError,
  NotFoundError,
  UnavailableError,
} from '../index.js';

const url = process.env.KEYROTOR_URL;
const skip = url ? false : 'KEYROTOR_URL is not set (run through tests/api/test_node.py)';
const kr = url ? new KeyrotorClient({ url, token: process.env.KEYROTOR_TOKEN }) : null;

test('round trip, and values Python wrote', { skip }, async () => {
  const ct = await kr.encrypt('node', 'sk-from-node', { context: 'settings.api_key:1' });
  assert.match(ct, /^kr1:\d+:/);
  assert.equal(await kr.decrypt('node', ct, { context: 'settings.api_key:1' }), 'sk-from-node');
  for (const v of JSON.parse(readFileSync(process.env.KEYROTOR_FROM_PYTHON, 'utf8'))) {
    assert.equal(await kr.decrypt(v.scope, v.ciphertext, { context: v.context }), v.plaintext);
  }
  writeFileSync(process.env.KEYROTOR_NODE_OUT, JSON.stringify([{ scope: 'node', context: 'settings.api_key:1', ciphertext: ct, plaintext: 'sk-from-node' }]));
});

test("docs/node.md's settings service reads rows before and after legacy migrate, and saves them", { skip }, async () => {
  const rows = JSON.parse(readFileSync(process.env.KEYROTOR_SETTINGS_ROWS, 'utf8'));
  assert.equal(rows.length, 2);
  for (const row of rows) {
    // getApiKey, as written there.
    assert.equal(await kr.decrypt(row.provider, row.api_key, { context: `settings.api_key:${row.id}` }), row.plaintext);
  }
  // setApiKey: the new value opens for its row only.
  const row = rows[1];
  const stored = await kr.encrypt(row.provider, 'sk-proj-rotated', { context: `settings.api_key:${row.id}` });
  assert.equal(await kr.decrypt(row.provider, stored, { context: `settings.api_key:${row.id}` }), 'sk-proj-rotated');
  await assert.rejects(kr.decrypt(row.provider, stored, { context: `settings.api_key:${rows[0].id}` }), InvalidRequestError);
});

test('batches carry per-item errors', { skip }, async () => {
  const enc = await kr.encryptBatch('node', ['a', { plaintext: 'b', context: 'c:2' }, '']);
  assert.ok(enc[0].ciphertext && enc[1].ciphertext);
  assert.equal(enc[2].error.code, 'invalid_input');
  const dec = await kr.decryptBatch('node', [enc[0].ciphertext, { ciphertext: enc[1].ciphertext, context: 'c:2' }, 'kr1:1:xx']);
  assert.deepEqual(dec.slice(0, 2), [{ plaintext: 'a' }, { plaintext: 'b' }]);
  assert.ok(dec[2].error);
});

test('secrets', { skip }, async () => {
  await kr.putSecret('node', 'openai', 'sk-secret');
  assert.equal(await kr.getSecret('node', 'openai'), 'sk-secret');
  await assert.rejects(kr.getSecret('node', 'missing'), NotFoundError);
});

test('scopes and secret names reach the server as written, whatever their characters', { skip }, async () => {
  // '/', '?', '#' and '%' would change the path or end it ('.' and '..' are refused: transport.test.js).
  const names = ['a/b', '../status', 'a?b#c', '100%', '%2F', 'clé ключ', 'x..', '...'];
  for (const [i, name] of names.entries()) {
    await kr.putSecret('node', name, `sk-name-${i}`);
  }
  for (const [i, name] of names.entries()) {
    assert.equal(await kr.getSecret('node', name), `sk-name-${i}`, name);
  }
  await kr.putSecret('tenant-1/openai', 'a/b', 'sk-tenant');
  assert.equal(await kr.getSecret('tenant-1/openai', 'a/b'), 'sk-tenant');
  assert.equal(await kr.getSecret('node', 'a/b'), 'sk-name-0');
  await assert.rejects(kr.getSecret('node', 'b'), NotFoundError);
});

test('typed errors carry the HTTP status', { skip }, async () => {
  const ct = await kr.encrypt('node', 'v', { context: 'a:1' });
  await assert.rejects(kr.decrypt('node', ct, { context: 'a:2' }), (e) => e instanceof InvalidRequestError && e.status === 400 && e.code === 'decryption_failed');
  const bad = new KeyrotorClient({ url, token: 'krt_' + 'A'.repeat(43) });
  await assert.rejects(bad.encrypt('node', 'v'), (e) => e instanceof AuthenticationError && e.status === 401);
  const denied = new KeyrotorClient({ url, token: process.env.KEYROTOR_DENIED_TOKEN });
  await assert.rejects(denied.decrypt('node', ct, { context: 'a:1' }), (e) => e instanceof PermissionDeniedError && e.status === 403 && e instanceof KeyrotorError);
  assert.ok(!JSON.stringify(kr).includes(process.env.KEYROTOR_TOKEN));
});

test('health needs no token', { skip }, async () => {
  assert.deepEqual(await kr.health(), { status: 'ok' });
});

test('a server whose database has no schema answers MisconfiguredError: retrying will not help', { skip }, async () => {
  const broken = new KeyrotorClient({ url: process.env.KEYROTOR_MISCONFIGURED_URL, token: process.env.KEYROTOR_TOKEN });
  const misconfigured = (e) =>
    e instanceof MisconfiguredError && !(e instanceof UnavailableError) && e instanceof KeyrotorError && e.status === 503 && e.code === 'misconfigured';
  await assert.rejects(broken.decrypt('node', 'kr1:1:x', { context: 'a:1' }), misconfigured);
  await assert.rejects(broken.encrypt('node', 'v'), misconfigured);
  // The probe too: a database that answers without keyrotor's schema is not an outage.
  await assert.rejects(broken.health(), misconfigured);
});
