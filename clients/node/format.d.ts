/// <reference types="node" />
export declare function kr1Aad(scope: string, version: number, context?: string): Buffer;
export declare function wrapAad(scope: string, version: number): Buffer;
export declare function parseKr1(value: string): { version: number; nonce: Buffer; body: Buffer; tag: Buffer };
export declare function openKr1(dek: Uint8Array, scope: string, context: string, value: string): string;
