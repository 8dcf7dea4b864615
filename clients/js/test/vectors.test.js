// Frames encoded by the Rust codec (host/wire), checked against this client.
// vectors.json is written by a Rust test; it is not edited by hand.

import test from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';

import {
  DecodeError,
  ErrorCode,
  FrameReader,
  ThrongError,
  decodeClientFrame,
  encodeClientFrame,
  isFatal,
} from '../src/throng.js';

const path = new URL('./vectors.json', import.meta.url);
const GENERATE = 'THRONG_BLESS=1 cargo test --release -p throng-tests --test e2e js_client::';

const fromHex = (hex) => Uint8Array.from(Buffer.from(hex, 'hex'));
const toHex = (bytes) => Buffer.from(bytes).toString('hex');

/** Decoded frames with their Uint8Array bodies as plain arrays, as the JSON has them. */
function plain(value) {
  if (value instanceof Uint8Array) return Array.from(value);
  if (Array.isArray(value)) return value.map(plain);
  if (value !== null && typeof value === 'object') {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

/** A JSON client frame as the encoder takes it: its body as bytes. */
function withBytes(frame) {
  return frame.type === 'Send' ? { ...frame, body: Uint8Array.from(frame.body) } : frame;
}

function readAll(bytes, max, chunk) {
  const reader = new FrameReader(max);
  const frames = [];
  for (let at = 0; at < bytes.length; at += chunk) frames.push(...reader.push(bytes.subarray(at, at + chunk)));
  reader.finish();
  return frames;
}

if (!existsSync(path)) {
  test('vectors.json from the Rust codec', () => {
    assert.fail(`clients/js/test/vectors.json is missing; generate it with \`${GENERATE}\` (from the repository root)`);
  });
} else {
  const vectors = JSON.parse(readFileSync(path, 'utf8'));

  test('the vector file has every section', () => {
    for (const key of ['maxFrameBytes', 'edge', 'client', 'malformed', 'errorCodes']) {
      assert.ok(key in vectors, `vectors.json has no "${key}"; regenerate it with \`${GENERATE}\``);
    }
    assert.ok(vectors.edge.length > 0 && vectors.client.length > 0 && vectors.malformed.length > 0);
  });

  test('edge frames decode as the Rust codec encoded them', () => {
    for (const { name, hex, frame } of vectors.edge) {
      const bytes = fromHex(hex);
      assert.deepEqual(plain(readAll(bytes, vectors.maxFrameBytes, bytes.length)), [frame], `${name}, whole`);
      assert.deepEqual(plain(readAll(bytes, vectors.maxFrameBytes, 1)), [frame], `${name}, byte by byte`);
    }
  });

  test('client frames encode byte for byte as the Rust codec does', () => {
    for (const { name, hex, frame } of vectors.client) {
      assert.equal(toHex(encodeClientFrame(withBytes(frame), vectors.maxFrameBytes)), hex, name);
      assert.deepEqual(plain(decodeClientFrame(fromHex(hex).subarray(4))), frame, `${name}, decoded`);
    }
  });

  test('malformed streams fail with the Rust codec\'s code', () => {
    for (const { name, hex, maxFrameBytes, code, codeName } of vectors.malformed) {
      assert.throws(
        () => readAll(fromHex(hex), maxFrameBytes, Infinity),
        (e) => {
          assert.ok(e instanceof DecodeError && e instanceof ThrongError, `${name}: got ${e}`);
          assert.equal(e.code, code, `${name}: ${e.message}`);
          assert.equal(e.codeName, codeName, name);
          return true;
        },
        name,
      );
    }
  });

  test('error codes and fatality match the Rust table', () => {
    for (const { name, code, fatal } of vectors.errorCodes) {
      assert.equal(ErrorCode[name], code, name);
      assert.equal(isFatal(code), fatal, `${name} fatal`);
    }
    const rust = new Set(vectors.errorCodes.map((c) => c.name));
    const extra = Object.keys(ErrorCode).filter((name) => !rust.has(name));
    assert.deepEqual(extra, [], 'codes the Rust table does not have');
  });
}
