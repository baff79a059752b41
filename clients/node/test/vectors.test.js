// The conformance vectors of tests/vectors/kr1.json, read with this package's format module.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { createDecipheriv } from 'node:crypto';
import { kr1Aad, wrapAad, parseKr1, openKr1 } from '../index.js';

const vectors = JSON.parse(readFileSync(new URL('../../../tests/vectors/kr1.json', import.meta.url), 'utf8'));
const dek = Buffer.from(vectors.dek_hex, 'hex');

test('values open, with the documented AAD', () => {
  for (const v of vectors.values) {
    assert.equal(kr1Aad(v.scope, v.version, v.context).toString('hex'), v.aad_hex);
    const parsed = parseKr1(v.ciphertext);
    assert.equal(parsed.version, v.version);
    assert.equal(parsed.nonce.toString('hex'), v.nonce_hex);
    assert.equal(openKr1(dek, v.scope, v.context, v.ciphertext), v.plaintext);
  }
});

test('refused values do not open', () => {
  for (const v of vectors.refused) {
    assert.throws(() => openKr1(dek, v.scope, v.context, v.ciphertext), undefined, v.why);
  }
});

test('wrapped DEKs unwrap with the documented AAD', () => {
  const kek = Buffer.from(vectors.wrap_kek_hex, 'hex');
  for (const w of vectors.wrapped_deks) {
    assert.equal(wrapAad(w.scope, w.version).toString('hex'), w.aad_hex);
    const blob = Buffer.from(w.blob_hex, 'hex');
    const d = createDecipheriv('aes-256-gcm', kek, blob.subarray(0, 12));
    d.setAAD(wrapAad(w.scope, w.version));
    d.setAuthTag(blob.subarray(blob.length - 16));
    const out = Buffer.concat([d.update(blob.subarray(12, blob.length - 16)), d.final()]);
    assert.equal(out.toString('hex'), vectors.dek_hex);
  }
});
