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

const BY_STATUS = {
  400: InvalidRequestError,
  401: AuthenticationError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  413: PayloadTooLargeError,
  429: RateLimitError,
  503: UnavailableError,
};

function errorFor(status, body, retryAfter) {
  const detail = body && typeof body === 'object' && body.error ? body.error : {};
  const Cls = BY_STATUS[status] || KeyrotorError;
  const message = typeof detail.message === 'string' ? detail.message : `keyrotor answered HTTP ${status}`;
  return new Cls(message, { status, code: typeof detail.code === 'string' ? detail.code : 'http_error', retryAfter });
}

function itemsOf(values, field) {
  return values.map((v) => (typeof v === 'string' ? { [field]: v } : { [field]: v[field], context: v.context ?? '' }));
}

export class KeyrotorClient {
  /**
   * @param {{url: string, token: string, timeoutMs?: number, fetch?: typeof fetch}} options
   */
  constructor({ url, token, timeoutMs = 10_000, fetch: fetchImpl } = {}) {
    if (!url) throw new TypeError('KeyrotorClient needs { url }');
    if (!token) throw new TypeError('KeyrotorClient needs { token }');
    this.url = url.replace(/\/+$/, '');
    this.timeoutMs = timeoutMs;
    this._fetch = fetchImpl || globalThis.fetch;
    // Not an enumerable property: a logged or serialised client never shows the token.
    Object.defineProperty(this, '_auth', { value: `Bearer ${token}`, enumerable: false });
  }

  async _call(method, path, body) {
    const headers = { Authorization: this._auth, Accept: 'application/json' };
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
    if (!resp.ok) {
      const ra = resp.headers.get('Retry-After');
      throw errorFor(resp.status, doc, ra ? Number(ra) : null);
    }
    if (doc === null || typeof doc !== 'object') {
      // keyrotor answers every success with a JSON object; anything else came from something
      // else on the way (a proxy's page), and its text is not repeated.
      throw new KeyrotorError(`keyrotor answered HTTP ${resp.status} without a JSON object`, {
        status: resp.status,
        code: 'invalid_response',
      });
    }
    return doc;
  }

  /** Encrypt `plaintext` in `scope`; the same `context` must be given to decrypt it. */
  async encrypt(scope, plaintext, { context = '' } = {}) {
    return (await this._call('POST', '/v1/encrypt', { scope, plaintext, context })).ciphertext;
  }

  /** Decrypt a `kr1:` value (or a legacy value of the old backend) of `scope`. */
  async decrypt(scope, ciphertext, { context = '' } = {}) {
    return (await this._call('POST', '/v1/decrypt', { scope, ciphertext, context })).plaintext;
  }

  /**
   * Encrypt many values of one scope. Items are strings or `{ plaintext, context }`.
   * Resolves to one result per item: `{ ciphertext }` or `{ error: { code, message } }`.
   */
  async encryptBatch(scope, items) {
    return (await this._call('POST', '/v1/encrypt/batch', { scope, items: itemsOf(items, 'plaintext') })).results;
  }

  /** Decrypt many values of one scope: one `{ plaintext }` or `{ error }` per item. */
  async decryptBatch(scope, items) {
    return (await this._call('POST', '/v1/decrypt/batch', { scope, items: itemsOf(items, 'ciphertext') })).results;
  }

  /** Read one of keyrotor's own secrets. */
  async getSecret(scope, name) {
    return (await this._call('GET', `/v1/secrets/${encodeURIComponent(scope)}/${encodeURIComponent(name)}`)).value;
  }

  /** Store (or replace) one of keyrotor's own secrets. */
  async putSecret(scope, name, value) {
    await this._call('PUT', `/v1/secrets/${encodeURIComponent(scope)}/${encodeURIComponent(name)}`, { value });
  }

  /** Open (or join) a DEK rotation of `scope`: `{ run_id, created, state }`. */
  async rotate(scope) {
    return this._call('POST', `/v1/rotate/${encodeURIComponent(scope)}`);
  }

  /** One run (as `GET /v1/runs/{id}` answers). */
  async run(id) {
    return this._call('GET', `/v1/runs/${encodeURIComponent(String(id))}`);
  }

  /** The scopes this token's actor may use. */
  async status() {
    return this._call('GET', '/v1/status');
  }

  /** `{ status: 'ok' }` when the server and its database answer. */
  async health() {
    return this._call('GET', '/v1/health');
  }
}
