// The kr1 format (docs/format.md), for checking the conformance vectors of tests/vectors/ and
// for readers that hold a DEK themselves. Applications normally call keyrotor serve instead.
import { createDecipheriv } from 'node:crypto';

const PREFIX = 'kr1:';
// fatal: bytes that authenticate but are not UTF-8 are refused, not turned into U+FFFD.
// ignoreBOM: a leading U+FEFF is part of the value (keyrotor returns it), not a marker to drop.
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

function u16(n) {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n);
  return b;
}
function u32(n) {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

/** The AAD a value is bound to: "kr1" || u16(len scope) || scope || u32(version) || u32(len context) || context. */
export function kr1Aad(scope, version, context = '') {
  const s = Buffer.from(scope, 'utf8');
  const c = Buffer.from(context, 'utf8');
  return Buffer.concat([Buffer.from('kr1'), u16(s.length), s, u32(version), u32(c.length), c]);
}

/** The AAD of a DEK wrapped by the local KEK: "keyrotor/dek\0" || u32(len scope) || scope || u64(version). */
export function wrapAad(scope, version) {
  const s = Buffer.from(scope, 'utf8');
  const v = Buffer.alloc(8);
  v.writeBigUInt64BE(BigInt(version));
  return Buffer.concat([Buffer.from('keyrotor/dek\0', 'latin1'), u32(s.length), s, v]);
}

/** Parse `kr1:<version>:<base64url(nonce || ciphertext || tag)>` strictly; throws on anything else. */
export function parseKr1(value) {
  if (typeof value !== 'string' || !value.startsWith(PREFIX)) throw new Error('not a kr1 ciphertext');
  const rest = value.slice(PREFIX.length);
  const sep = rest.indexOf(':');
  if (sep < 0) throw new Error('kr1 ciphertext has no version field');
  const vText = rest.slice(0, sep);
  if (!/^[1-9][0-9]{0,9}$/.test(vText) || Number(vText) > 2 ** 31 - 1) throw new Error('invalid version field');
  const b64 = rest.slice(sep + 1);
  if (!/^[A-Za-z0-9_-]*$/.test(b64) || b64.length % 4 === 1) throw new Error('body is not base64url');
  const raw = Buffer.from(b64, 'base64url');
  if (raw.toString('base64url') !== b64) throw new Error('body is not canonical base64url');
  if (raw.length < 28) throw new Error('kr1 ciphertext is truncated');
  return { version: Number(vText), nonce: raw.subarray(0, 12), body: raw.subarray(12, raw.length - 16), tag: raw.subarray(raw.length - 16) };
}

/** Open a kr1 value with its DEK (32 bytes); throws if it does not authenticate or is not UTF-8. */
export function openKr1(dek, scope, context, value) {
  const { version, nonce, body, tag } = parseKr1(value);
  const d = createDecipheriv('aes-256-gcm', dek, nonce);
  d.setAAD(kr1Aad(scope, version, context));
  d.setAuthTag(tag);
  return UTF8.decode(Buffer.concat([d.update(body), d.final()]));
}
