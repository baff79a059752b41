// Client of keyrotor's HTTP API (`keyrotor serve`). ESM, no runtime dependencies: Node >= 18 fetch.
//
//   import { KeyrotorClient } from '@keyrotor/client';
//   const kr = new KeyrotorClient({ url: 'http://127.0.0.1:8180', token: process.env.KEYROTOR_TOKEN });
//   const apiKey = await kr.decrypt('openai', row.api_key, { context: `settings.api_key:${row.id}` });
//
// The token names the actor every call acts as (`keyrotor tokens create ACTOR`); keyrotor's
// grants for that actor decide each scope. Errors are KeyrotorError subclasses carrying the
// HTTP status and keyrotor's error code; messages never contain a token or a value.

export { kr1Aad, wrapAad, parseKr1, openKr1 } from './format.js';

/** Any error answered by keyrotor serve, or a failure to reach it (status 0). */
export class KeyrotorError extends Error {
  constructor(message, { status = 0, code = 'unreachable', retryAfter = null, cause } = {}) {
    super(message, cause ? { cause } : undefined);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}
/** 400: a bad request, value, scope or ciphertext (wrong context or tampered: code decryption_failed). */
export class InvalidRequestError extends KeyrotorError {}
/** 401: the token is missing, unknown, expired or revoked. */
export class AuthenticationError extends KeyrotorError {}
/** 403: the token's actor has no grant for this scope. */
export class PermissionDeniedError extends KeyrotorError {}
/** 404: no such secret, scope or run. */
export class NotFoundError extends KeyrotorError {}
/** 409: conflicts with the current state (e.g. key_exhausted: rotate the scope). */
export class ConflictError extends KeyrotorError {}
/** 413: the body or the batch is too large. */
export class PayloadTooLargeError extends KeyrotorError {}
/** 429: this token is over its rate limit; `retryAfter` is in seconds. */
export class RateLimitError extends KeyrotorError {}
/** 503 (or unreachable): a dependency is down; retry later. */
export class UnavailableError extends KeyrotorError {}
/**
 * 503 with code `misconfigured`: the server's configuration or its database is wrong (e.g. a
 * database `keyrotor db upgrade` never ran on). No retry mends it: an operator must, from the
 * server's log. Not an UnavailableError, so that a retry-on-unavailable loop stops.
 */
export class MisconfiguredError extends KeyrotorError {}

const BY_STATUS = {
  400: InvalidRequestError,
  401: AuthenticationError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  413: PayloadTooLargeError,
  429: RateLimitError,
  // 502 and 504 come from a load balancer or proxy in front of keyrotor that could not reach it
  // or got no answer in time: the same "retry later" as keyrotor's own 503.
  502: UnavailableError,
  503: UnavailableError,
  504: UnavailableError,
};

function errorFor(status, body, retryAfter) {
  const detail = body && typeof body === 'object' && body.error ? body.error : {};
  const code = typeof detail.code === 'string' ? detail.code : 'http_error';
  // keyrotor answers 503 both for an outage and for its own misconfiguration; only the first passes.
  const Cls = status === 503 && code === 'misconfigured' ? MisconfiguredError : BY_STATUS[status] || KeyrotorError;
  const message = typeof detail.message === 'string' ? detail.message : `keyrotor answered HTTP ${status}`;
  return new Cls(message, { status, code, retryAfter });
}

/** `Retry-After` (RFC 9110: whole seconds, or an HTTP date) as seconds from now; null if absent or unreadable. */
function retryAfterSeconds(header) {
  if (header === null) return null;
  const text = header.trim();
  if (/^[0-9]+$/.test(text)) return Number(text);
  // An HTTP date starts with the day's name; Date.parse alone also reads '-3' or '2024' as dates.
  const at = /^[A-Za-z]{3}/.test(text) ? Date.parse(text) : NaN;
  return Number.isNaN(at) ? null : Math.max(0, Math.ceil((at - Date.now()) / 1000));
}

function invalidResponse(status, what) {
  // The answer came from something other than keyrotor (a proxy's page, a stub) or does not fit
  // the call; its text is not repeated.
  return new KeyrotorError(`keyrotor answered HTTP ${status} ${what}`, { status, code: 'invalid_response' });
}

/**
 * One path segment, percent-encoded so that '/', '?', '#' and '%' stay inside it.
 *
 * '.' and '..' cannot be sent: every URL parser (fetch's included) resolves them, percent-encoded
 * or not, as dot segments, so the request would reach another path (a secret named '..' would
 * become GET /v1/secrets/, a 404 that reads as "no such secret"). Refused before sending.
 */
function segment(text) {
  if (text === '.' || text === '..') {
    throw new InvalidRequestError("a scope, secret name or run id of '.' or '..' cannot be a URL path segment", {
      code: 'invalid_input',
    });
  }
  return encodeURIComponent(text);
}

function itemsOf(values, field) {
  if (!Array.isArray(values)) throw new TypeError('batch items must be an array');
  return values.map((v) => (typeof v === 'string' ? { [field]: v } : { [field]: v[field], context: v.context ?? '' }));
}

/** The base URL, checked: http(s), no credentials, query or fragment. Errors never echo it. */
function baseUrl(url) {
  let parsed;
  try {
    parsed = new URL(url);
  } catch {
    throw new TypeError('KeyrotorClient { url } is not an absolute URL (e.g. http://keyrotor-api:8180)');
  }
  if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') {
    throw new TypeError('KeyrotorClient { url } must be http: or https:');
  }
  // fetch refuses credentials in a URL and quotes the URL in its error; the token authenticates.
  if (parsed.username || parsed.password) throw new TypeError('KeyrotorClient { url } must not contain credentials');
  if (parsed.search || parsed.hash) throw new TypeError('KeyrotorClient { url } must not have a query or fragment');
  return parsed.href.replace(/\/+$/, '');
}

// The token's characters as the server reads them (it trims surrounding whitespace): visible
// ASCII only. A line break inside would make fetch throw an error quoting the whole header.
const TOKEN = /^[\x21-\x7e]+$/;
const MAX_TIMEOUT_MS = 2 ** 31 - 1;

export class KeyrotorClient {
  // Private: no inspection of the client (util.inspect with showHidden, a logger's dump of a
  // provider) can show it.
  #auth;

  /**
   * @param {{url: string, token: string, timeoutMs?: number, fetch?: typeof fetch}} options
   */
  constructor({ url, token, timeoutMs = 10_000, fetch: fetchImpl } = {}) {
    if (!url || typeof url !== 'string') throw new TypeError('KeyrotorClient needs { url }');
    if (!token || typeof token !== 'string') throw new TypeError('KeyrotorClient needs { token }');
    const bare = token.trim();
    if (!TOKEN.test(bare)) {
      throw new TypeError('KeyrotorClient { token } must be one line of visible ASCII (as `keyrotor tokens create` prints it)');
    }
    // Checked here: AbortSignal.timeout would throw on every call instead, reported as the
    // server being unreachable. The bound is the largest delay a timer takes (about 24.8 days).
    if (typeof timeoutMs !== 'number' || !(timeoutMs > 0 && timeoutMs <= MAX_TIMEOUT_MS)) {
      throw new TypeError('KeyrotorClient { timeoutMs } must be a positive number of milliseconds');
    }
    this.url = baseUrl(url);
    this.timeoutMs = Math.ceil(timeoutMs);
    this._fetch = fetchImpl || globalThis.fetch;
    this.#auth = `Bearer ${bare}`;
  }

  async _call(method, path, body) {
    const headers = { Authorization: this.#auth, Accept: 'application/json' };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    let text;
    try {
      resp = await this._fetch(this.url + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: AbortSignal.timeout(this.timeoutMs),
      });
      // Inside the try: the timeout and a dropped connection can end the body as well as the
      // headers, and either is the server not answering.
      text = await resp.text();
    } catch (err) {
      throw new UnavailableError(`cannot reach keyrotor at ${this.url}: ${err && err.name}`, { cause: err });
    }
    let doc = null;
    try {
      doc = text ? JSON.parse(text) : null;
    } catch {
      doc = null;
    }
    if (!resp.ok) throw errorFor(resp.status, doc, retryAfterSeconds(resp.headers.get('Retry-After')));
    // keyrotor answers every success with a JSON object.
    if (doc === null || typeof doc !== 'object' || Array.isArray(doc)) throw invalidResponse(resp.status, 'without a JSON object');
    return { doc, status: resp.status };
  }

  /** The string `field` of the answer. */
  async _text(method, path, body, field) {
    const { doc, status } = await this._call(method, path, body);
    if (typeof doc[field] !== 'string') throw invalidResponse(status, `without "${field}"`);
    return doc[field];
  }

  /** The `results` of a batch answer: one a item, in order. */
  async _batch(path, scope, items) {
    const { doc, status } = await this._call('POST', path, { scope, items });
    if (!Array.isArray(doc.results) || doc.results.length !== items.length) {
      throw invalidResponse(status, 'without one result a item');
    }
    return doc.results;
  }

  /** Encrypt `plaintext` in `scope`; the same `context` must be given to decrypt it. */
  async encrypt(scope, plaintext, { context = '' } = {}) {
    return this._text('POST', '/v1/encrypt', { scope, plaintext, context }, 'ciphertext');
  }

  /** Decrypt a `kr1:` value (or a legacy value of the old backend) of `scope`. */
  async decrypt(scope, ciphertext, { context = '' } = {}) {
    return this._text('POST', '/v1/decrypt', { scope, ciphertext, context }, 'plaintext');
  }

  /**
   * Encrypt many values of one scope. Items are strings or `{ plaintext, context }`.
   * Resolves to one result per item: `{ ciphertext }` or `{ error: { code, message } }`.
   */
  async encryptBatch(scope, items) {
    return this._batch('/v1/encrypt/batch', scope, itemsOf(items, 'plaintext'));
  }

  /** Decrypt many values of one scope: one `{ plaintext }` or `{ error }` per item. */
  async decryptBatch(scope, items) {
    return this._batch('/v1/decrypt/batch', scope, itemsOf(items, 'ciphertext'));
  }

  /** Read one of keyrotor's own secrets. */
  async getSecret(scope, name) {
    return this._text('GET', `/v1/secrets/${segment(scope)}/${segment(name)}`, undefined, 'value');
  }

  /** Store (or replace) one of keyrotor's own secrets. */
  async putSecret(scope, name, value) {
    await this._call('PUT', `/v1/secrets/${segment(scope)}/${segment(name)}`, { value });
  }

  /** Open (or join) a DEK rotation of `scope`: `{ run_id, created, state }`. */
  async rotate(scope) {
    return (await this._call('POST', `/v1/rotate/${segment(scope)}`)).doc;
  }

  /** One run (as `GET /v1/runs/{id}` answers). */
  async run(id) {
    return (await this._call('GET', `/v1/runs/${segment(String(id))}`)).doc;
  }

  /** The scopes this token's actor may use. */
  async status() {
    return (await this._call('GET', '/v1/status')).doc;
  }

  /** `{ status: 'ok' }` when the server and its database answer. */
  async health() {
    return (await this._call('GET', '/v1/health')).doc;
  }
}
