/// <reference types="node" />
export { kr1Aad, wrapAad, parseKr1, openKr1 } from './format.js';

export interface KeyrotorClientOptions {
  /** Base URL of `keyrotor serve`, e.g. `http://127.0.0.1:8180`. */
  url: string;
  /** A token from `keyrotor tokens create ACTOR`. */
  token: string;
  /** Deadline of each call in milliseconds: connection, headers and body (default 10000). */
  timeoutMs?: number;
  /** A fetch implementation (default: the global one). */
  fetch?: typeof fetch;
}

export interface CallOptions {
  /** Where the value lives, e.g. `settings.api_key:42`; decrypt needs the one encrypt was given. */
  context?: string;
}

export interface ErrorDetail {
  code: string;
  message: string;
}

export type EncryptItem = string | { plaintext: string; context?: string };
export type DecryptItem = string | { ciphertext: string; context?: string };
export type EncryptResult = { ciphertext: string } | { error: ErrorDetail };
export type DecryptResult = { plaintext: string } | { error: ErrorDetail };

export interface RotateResult {
  run_id: number;
  created: boolean;
  state: string;
}

export interface Run {
  id: number;
  kind: string;
  scope: string | null;
  state: string;
  [field: string]: unknown;
}

export interface KeyrotorErrorOptions {
  status?: number;
  code?: string;
  retryAfter?: number | null;
  cause?: unknown;
}

/** Every failure of a call (docs/node.md); subclasses by HTTP status. */
export declare class KeyrotorError extends Error {
  /** Defaults: status 0, code `unreachable`, retryAfter null. */
  constructor(message: string, options?: KeyrotorErrorOptions);
  /** HTTP status; 0 when no answer came (unreachable, timed out, or refused before sending). */
  readonly status: number;
  /** keyrotor's error code, e.g. `decryption_failed`, `forbidden`, `rate_limited`. */
  readonly code: string;
  /** Seconds to wait before retrying (429 with a readable `Retry-After`), else null. */
  readonly retryAfter: number | null;
}
export declare class InvalidRequestError extends KeyrotorError {}
export declare class AuthenticationError extends KeyrotorError {}
export declare class PermissionDeniedError extends KeyrotorError {}
export declare class NotFoundError extends KeyrotorError {}
export declare class ConflictError extends KeyrotorError {}
export declare class PayloadTooLargeError extends KeyrotorError {}
export declare class RateLimitError extends KeyrotorError {}
/** 503 (or 502/504 from a proxy, or status 0: unreachable): a dependency is down; retry later. */
export declare class UnavailableError extends KeyrotorError {}
/** 503 with code `misconfigured`: the server's configuration or database schema is wrong; retrying does not help. */
export declare class MisconfiguredError extends KeyrotorError {}

export declare class KeyrotorClient {
  constructor(options: KeyrotorClientOptions);
  /** The base URL, without a trailing slash. */
  readonly url: string;
  readonly timeoutMs: number;
  encrypt(scope: string, plaintext: string, options?: CallOptions): Promise<string>;
  decrypt(scope: string, ciphertext: string, options?: CallOptions): Promise<string>;
  /** One result a item, in order; a bad item fails alone. */
  encryptBatch(scope: string, items: readonly EncryptItem[]): Promise<EncryptResult[]>;
  decryptBatch(scope: string, items: readonly DecryptItem[]): Promise<DecryptResult[]>;
  getSecret(scope: string, name: string): Promise<string>;
  putSecret(scope: string, name: string, value: string): Promise<void>;
  rotate(scope: string): Promise<RotateResult>;
  run(id: number): Promise<Run>;
  status(): Promise<{ actor: string; scopes: Record<string, unknown>[] }>;
  health(): Promise<{ status: string }>;
}
