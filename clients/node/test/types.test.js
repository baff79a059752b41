// index.d.ts against index.js: what a TypeScript user is told exists must exist, and what exists
// must be declared (tsc itself is not a dependency; this catches the drift it would).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as client from '../index.js';
import * as format from '../format.js';

const dts = readFileSync(new URL('../index.d.ts', import.meta.url), 'utf8');
const formatDts = readFileSync(new URL('../format.d.ts', import.meta.url), 'utf8');

function classBody(name) {
  const start = dts.indexOf(`export declare class ${name} `);
  assert.ok(start >= 0, `index.d.ts declares ${name}`);
  const open = dts.indexOf('{', start);
  let depth = 0;
  for (let i = open; i < dts.length; i++) {
    if (dts[i] === '{') depth += 1;
    if (dts[i] === '}' && --depth === 0) return dts.slice(open + 1, i);
  }
  throw new Error(`unbalanced declaration of ${name}`);
}

test('every export is declared, and every declared export exists', () => {
  const declared = new Set([...dts.matchAll(/export declare (?:class|function) (\w+)/g)].map((m) => m[1]));
  for (const m of dts.matchAll(/export \{([^}]+)\} from '\.\/format\.js'/g)) {
    for (const name of m[1].split(',')) declared.add(name.trim());
  }
  assert.deepEqual([...declared].sort(), Object.keys(client).sort());
  const formatDeclared = [...formatDts.matchAll(/export declare function (\w+)/g)].map((m) => m[1]);
  assert.deepEqual(formatDeclared.sort(), Object.keys(format).sort());
});

test("the client's public members are declared", () => {
  const body = classBody('KeyrotorClient');
  const kr = new client.KeyrotorClient({ url: 'http://127.0.0.1:8180', token: 'krt_test' });
  const members = [...Object.keys(kr), ...Object.getOwnPropertyNames(client.KeyrotorClient.prototype)];
  for (const name of members.filter((n) => n !== 'constructor' && !n.startsWith('_'))) {
    assert.match(body, new RegExp(`\\b${name}\\b[?(:]`), `index.d.ts declares KeyrotorClient.${name}`);
  }
});

test('errors are built as declared: (message, { status, code, retryAfter, cause })', () => {
  assert.match(classBody('KeyrotorError'), /constructor\(message: string, options\?: KeyrotorErrorOptions\)/);
  const cause = new Error('inner');
  const err = new client.NotFoundError('no secret', { status: 404, code: 'not_found', retryAfter: null, cause });
  assert.equal(err.name, 'NotFoundError');
  assert.deepEqual([err.message, err.status, err.code, err.retryAfter, err.cause], ['no secret', 404, 'not_found', null, cause]);
  assert.deepEqual([new client.KeyrotorError('x').status, new client.KeyrotorError('x').code], [0, 'unreachable']);
});
