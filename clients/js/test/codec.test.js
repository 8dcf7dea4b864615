import test from 'node:test';
import assert from 'node:assert/strict';

import {
  DecodeError,
  EncodeError,
  ErrorCode,
  FrameReader,
  HARD_MAX_FRAME_BYTES,
  ThrongError,
  decodeClientFrame,
  decodeEdgeFrame,
  encodeClientFrame,
  encodeEdgeFrame,
  errorName,
  isFatal,
} from '../src/throng.js';

const bytes = (...b) => new Uint8Array(b);
const utf8 = (s) => new TextEncoder().encode(s);
const hex = (b) => Buffer.from(b).toString('hex');

/** A frame: 4-byte big-endian length, then `payload`. */
function framed(payload) {
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, payload.length);
  out.set(payload, 4);
  return out;
}

/** Unsigned LEB128 of a BigInt, for values a JS number cannot hold. */
function varint(n) {
  const out = [];
  let v = BigInt(n);
  while (v > 0x7fn) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return out;
}

const message = (seq, kind = 'chat', body = utf8(`message ${seq}`)) => ({ seq, sender: `user-${seq}`, kind, body });

const CLIENT_FRAMES = [
  { type: 'Hello', token: 'eyJhbGciOiJFZERTQSJ9.e30.c2ln' },
  { type: 'Join', room: 'lobby', resumeFrom: null, epoch: 0 },
  { type: 'Join', room: 'show-42:main_room.v2', resumeFrom: 2 ** 40, epoch: 1_796_000_000_123 },
  { type: 'Leave', room: 'lobby' },
  { type: 'Send', room: 'lobby', kind: 'chat', body: utf8('héllo 👋'), clientMsgId: 1 },
  { type: 'Send', room: 'lobby', kind: 'system', body: new Uint8Array(0), clientMsgId: Number.MAX_SAFE_INTEGER },
  { type: 'Ping', nonce: 300 },
  { type: 'Presence', queryId: 7, users: ['alice', 'bob', ''] },
  { type: 'Presence', queryId: 8, users: [] },
  { type: 'Seen', room: 'lobby', seq: 128 },
  { type: 'Refresh', token: 'next.token.here' },
];

const EDGE_FRAMES = [
  {
    type: 'Welcome',
    session: { tenant: 'acme', user: 'alice', role: 'moderator' },
    limits: { maxFrameBytes: 65536, maxBodyBytes: 4096, maxRooms: 8, sendRatePerSec: 5, sendBurst: 10, idleTimeoutMs: 30000 },
    expiresAt: 1_900_000_000,
  },
  {
    type: 'Joined', room: 'lobby', online: 3, recent: [message(1), message(2, 'host'), message(3, 'gift', new Uint8Array([0, 255]))],
    epoch: 1_796_000_000_123, resumed: { kind: 'Continued' },
  },
  { type: 'Joined', room: 'empty', online: 0, recent: [], epoch: 0, resumed: { kind: 'Fresh' } },
  { type: 'Joined', room: 'lobby', online: 0, recent: [], epoch: 9, resumed: { kind: 'NewEpoch', previous: 2 ** 50 } },
  { type: 'Joined', room: 'lobby', online: 0, recent: [], epoch: 9, resumed: { kind: 'Truncated' } },
  {
    type: 'Batch', room: 'lobby', tick: 17, messages: [message(4), message(5, 'like')],
    counters: { likes: 12, gifts: [{ gift: 'rose', count: 2 }, { gift: 'rocket', count: 1 }] },
    pinned: [4], online: 1000, missed: 2, epoch: 1_796_000_000_123,
  },
  { type: 'Batch', room: 'lobby', tick: 0, messages: [], counters: { likes: 0, gifts: [] }, pinned: [], online: 0, missed: 0, epoch: 0 },
  { type: 'Ack', clientMsgId: 1, seq: 2 ** 50, epoch: 2 ** 40 },
  { type: 'Rejected', clientMsgId: 2, code: ErrorCode.RateLimited, reason: 'slow down' },
  { type: 'Error', code: ErrorCode.TokenExpired, text: 'token expired' },
  { type: 'Error', code: 65535, text: '' },
  { type: 'Pong', nonce: 0 },
  { type: 'JoinRefused', room: 'vip', code: ErrorCode.Forbidden, text: 'not for you' },
  { type: 'Presence', queryId: 7, online: [true, false, true] },
  { type: 'PresenceRefused', queryId: 9, code: ErrorCode.QueryTooLarge, text: 'too many users' },
  { type: 'Refreshed', expiresAt: 1_900_003_600 },
  { type: 'RefreshRefused', code: ErrorCode.TokenInvalid, text: 'bad signature' },
];

function expectDecodeError(fn, code, pattern) {
  assert.throws(fn, (e) => {
    assert.ok(e instanceof DecodeError, `expected a DecodeError, got ${e}`);
    assert.ok(e instanceof ThrongError);
    assert.equal(e.code, code);
    assert.equal(e.codeName, errorName(code));
    assert.equal(e.fatal, true);
    if (pattern) assert.match(e.message, pattern);
    return true;
  });
}

const decodeEdge = (...payload) => decodeEdgeFrame(new Uint8Array(payload));

test('every client frame round-trips', () => {
  for (const frame of CLIENT_FRAMES) {
    const encoded = encodeClientFrame(frame);
    assert.equal(new DataView(encoded.buffer, encoded.byteOffset).getUint32(0), encoded.length - 4);
    assert.deepEqual(decodeClientFrame(encoded.subarray(4)), frame, frame.type);
  }
});

test('every edge frame round-trips through a FrameReader', () => {
  for (const frame of EDGE_FRAMES) {
    assert.deepEqual(new FrameReader().push(encodeEdgeFrame(frame)), [frame], frame.type);
  }
});

test('bytes match postcard', () => {
  // The Rust codec's own test: Ping { nonce: 1 } is [4, 1].
  assert.equal(hex(encodeClientFrame({ type: 'Ping', nonce: 1 })), '000000020401');
  assert.equal(hex(encodeClientFrame({ type: 'Ping', nonce: 300 })), '0000000304ac02');
  assert.equal(hex(encodeClientFrame({ type: 'Hello', token: 't' })), '00000003000174');
  assert.equal(hex(encodeClientFrame({ type: 'Join', room: 'a', resumeFrom: null })), '00000005010161' + '00' + '00');
  assert.equal(hex(encodeClientFrame({ type: 'Join', room: 'a', resumeFrom: 5, epoch: 300 })), '00000007010161' + '0105' + 'ac02');
  assert.equal(
    hex(encodeClientFrame({ type: 'Send', room: 'r', kind: 'gift', body: bytes(9, 8), clientMsgId: 2 })),
    '00000008' + '03' + '0172' + '02' + '020908' + '02',
  );
  assert.equal(hex(encodeEdgeFrame({ type: 'Error', code: 99, text: 'x' })), '00000004' + '05' + '63' + '0178');
  assert.equal(hex(encodeClientFrame({ type: 'Ping', nonce: Number.MAX_SAFE_INTEGER })), '0000000904' + hex(varint(2n ** 53n - 1n)));
});

test('an absent resumeFrom encodes as None, an absent epoch as 0', () => {
  const frame = encodeClientFrame({ type: 'Join', room: 'lobby' });
  assert.deepEqual(decodeClientFrame(frame.subarray(4)), { type: 'Join', room: 'lobby', resumeFrom: null, epoch: 0 });
});

test('a FrameReader splits frames fed one byte at a time and in odd chunks', () => {
  const all = EDGE_FRAMES.map((f) => encodeEdgeFrame(f));
  const stream = new Uint8Array(all.reduce((n, f) => n + f.length, 0));
  all.reduce((at, f) => (stream.set(f, at), at + f.length), 0);
  for (const sizes of [[1], [2, 3], [5, 7, 11], [4], [64, 1], [stream.length]]) {
    const reader = new FrameReader();
    const got = [];
    for (let at = 0, i = 0; at < stream.length; i++) {
      const n = sizes[i % sizes.length];
      got.push(...reader.push(stream.subarray(at, at + n)));
      at += n;
    }
    reader.finish();
    assert.deepEqual(got, EDGE_FRAMES, `chunks of ${sizes}`);
  }
});

test('decoded bodies do not share the pushed chunk', () => {
  const chunk = encodeEdgeFrame(EDGE_FRAMES[1]);
  const [joined] = new FrameReader().push(chunk);
  chunk.fill(0);
  assert.deepEqual(joined.recent[2].body, new Uint8Array([0, 255]));
});

test('an oversized length prefix is refused before the payload arrives', () => {
  const reader = new FrameReader(100);
  assert.deepEqual(reader.push(bytes(0, 0, 0)), []);
  expectDecodeError(() => reader.push(bytes(101)), ErrorCode.FrameTooLarge, /101 bytes exceeds the limit of 100/);
  expectDecodeError(() => reader.push(bytes(1, 2, 3)), ErrorCode.FrameTooLarge);
  expectDecodeError(() => new FrameReader().push(bytes(0xff, 0xff, 0xff, 0xff)), ErrorCode.FrameTooLarge);
  // No limit goes above the hard maximum.
  const big = new FrameReader(2 ** 31);
  const prefix = new Uint8Array(4);
  new DataView(prefix.buffer).setUint32(0, HARD_MAX_FRAME_BYTES + 1);
  expectDecodeError(() => big.push(prefix), ErrorCode.FrameTooLarge);
});

test('a frame exactly at the limit passes', () => {
  const frame = encodeEdgeFrame({ type: 'Error', code: 1, text: 'x'.repeat(10) });
  const limit = frame.length - 4;
  assert.equal(new FrameReader(limit).push(frame).length, 1);
  expectDecodeError(() => new FrameReader(limit - 1).push(frame), ErrorCode.FrameTooLarge);
});

test('a zero length prefix is malformed', () => {
  expectDecodeError(() => new FrameReader().push(bytes(0, 0, 0, 0)), ErrorCode.Malformed, /empty frame/);
});

test('trailing bytes are malformed', () => {
  expectDecodeError(() => decodeEdge(6, 1, 0), ErrorCode.Malformed, /1 trailing bytes/);
  expectDecodeError(() => new FrameReader().push(framed(bytes(6, 1, 0))), ErrorCode.Malformed);
  // The Rust codec's test, from the edge's side: Ping { nonce: 1 } plus one byte.
  expectDecodeError(() => decodeClientFrame(bytes(4, 1, 0)), ErrorCode.Malformed, /trailing/);
});

test('a truncated payload or stream is malformed', () => {
  expectDecodeError(() => decodeEdge(), ErrorCode.Malformed);
  expectDecodeError(() => decodeEdge(5, 1), ErrorCode.Malformed, /ends in the middle/);
  expectDecodeError(() => decodeEdge(5, 1, 3, 0x61), ErrorCode.Malformed);
  const reader = new FrameReader();
  const frame = encodeEdgeFrame({ type: 'Pong', nonce: 5 });
  assert.deepEqual(reader.push(frame.subarray(0, 5)), []);
  expectDecodeError(() => reader.finish(), ErrorCode.Malformed, /ended 5 bytes into a frame/);
  const prefixOnly = new FrameReader();
  prefixOnly.push(bytes(0, 0));
  expectDecodeError(() => prefixOnly.finish(), ErrorCode.Malformed, /2 bytes/);
  const clean = new FrameReader();
  clean.push(frame);
  clean.finish();
});

test('a FrameReader that failed keeps failing', () => {
  const reader = new FrameReader();
  expectDecodeError(() => reader.push(bytes(0, 0, 0, 0)), ErrorCode.Malformed);
  expectDecodeError(() => reader.push(encodeEdgeFrame({ type: 'Pong', nonce: 1 })), ErrorCode.Malformed, /empty/);
  expectDecodeError(() => reader.finish(), ErrorCode.Malformed, /empty/);
});

test('unknown variants are malformed', () => {
  expectDecodeError(() => decodeEdge(12), ErrorCode.Malformed, /unknown EdgeFrame variant 12/);
  expectDecodeError(() => decodeEdge(0x80, 0x01), ErrorCode.Malformed, /variant 128/);
  expectDecodeError(() => decodeClientFrame(bytes(8)), ErrorCode.Malformed, /ClientFrame variant 8/);
  // Kind and Role are enums too.
  expectDecodeError(() => decodeClientFrame(bytes(3, 1, 0x61, 5, 0, 1)), ErrorCode.Malformed, /unknown Kind 5/);
  const welcome = [...encodeEdgeFrame(EDGE_FRAMES[0]).subarray(4)];
  welcome[1 + 1 + 4 + 1 + 5] = 3; // the role, after tag, "acme" and "alice"
  expectDecodeError(() => decodeEdge(...welcome), ErrorCode.Malformed, /unknown Role 3/);
});

test('a bool byte other than 0 or 1 is malformed', () => {
  assert.deepEqual(decodeEdge(8, 1, 2, 0, 1), { type: 'Presence', queryId: 1, online: [false, true] });
  expectDecodeError(() => decodeEdge(8, 1, 1, 2), ErrorCode.Malformed, /bool byte of 2/);
});

test('an option tag other than 0 or 1 is malformed', () => {
  assert.deepEqual(decodeClientFrame(bytes(1, 1, 0x61, 1, 7, 3)), { type: 'Join', room: 'a', resumeFrom: 7, epoch: 3 });
  expectDecodeError(() => decodeClientFrame(bytes(1, 1, 0x61, 2, 7, 3)), ErrorCode.Malformed, /option tag of 2/);
});

test('varints follow postcard: bounded length, no overflow, zero padding accepted', () => {
  // u64: at most 10 bytes, and the 10th may carry one bit.
  expectDecodeError(() => decodeEdge(6, ...Array(10).fill(0x80), 0), ErrorCode.Malformed, /longer than 10 bytes/);
  expectDecodeError(() => decodeEdge(6, ...Array(9).fill(0xff), 0x02), ErrorCode.Malformed, /u64 varint overflows/);
  // u16 (codes): at most 3 bytes, the 3rd carrying two bits.
  assert.equal(decodeEdge(5, 0xff, 0xff, 0x03, 0).code, 65535);
  expectDecodeError(() => decodeEdge(5, 0xff, 0xff, 0x04, 0), ErrorCode.Malformed, /u16 varint overflows/);
  expectDecodeError(() => decodeEdge(5, 0x80, 0x80, 0x80, 0x00, 0), ErrorCode.Malformed, /longer than 3 bytes/);
  // u32 (limits, variant tags): at most 5 bytes, the 5th carrying four bits.
  expectDecodeError(() => decodeEdge(0x80, 0x80, 0x80, 0x80, 0x10), ErrorCode.Malformed, /u32 varint overflows/);
  expectDecodeError(() => decodeEdge(0x80, 0x80, 0x80, 0x80, 0x80, 0), ErrorCode.Malformed, /u32 varint is longer/);
  // postcard 1.x reads a zero-padded varint as its value; so does this decoder.
  assert.deepEqual(decodeEdge(6, 0x81, 0x00), { type: 'Pong', nonce: 1 });
  assert.deepEqual(decodeEdge(0x86, 0x80, 0x00, 0x81, 0x80, 0x00), { type: 'Pong', nonce: 1 });
});

test('a u64 above 2^53 - 1 is refused rather than rounded', () => {
  assert.deepEqual(decodeEdge(6, ...varint(2n ** 53n - 1n)), { type: 'Pong', nonce: Number.MAX_SAFE_INTEGER });
  for (const n of [2n ** 53n, 2n ** 53n + 1n, 2n ** 64n - 1n]) {
    expectDecodeError(() => decodeEdge(6, ...varint(n)), ErrorCode.Malformed, /above 2\^53 - 1/);
  }
  assert.throws(() => encodeClientFrame({ type: 'Ping', nonce: 2 ** 53 }), RangeError);
});

test('invalid UTF-8 is malformed, and a BOM is kept', () => {
  expectDecodeError(() => decodeEdge(5, 1, 1, 0xff), ErrorCode.Malformed, /not valid UTF-8/);
  expectDecodeError(() => decodeEdge(5, 1, 2, 0xc3, 0x28), ErrorCode.Malformed, /UTF-8/);
  expectDecodeError(() => decodeEdge(5, 1, 3, 0xed, 0xa0, 0x80), ErrorCode.Malformed, /UTF-8/); // a surrogate
  assert.equal(decodeEdge(5, 1, 4, 0xef, 0xbb, 0xbf, 0x61).text, '\ufeffa');
});

test('declared lengths beyond the payload are refused without allocating', () => {
  // A string of 2^32 - 1 bytes, a body of 2^53 - 1, a Vec<Message> of 2^40 elements.
  expectDecodeError(() => decodeEdge(5, 1, ...varint(2n ** 32n - 1n)), ErrorCode.Malformed, /exceeds the 0 bytes left/);
  expectDecodeError(
    () => decodeClientFrame(bytes(3, 1, 0x61, 0, ...varint(2n ** 53n - 1n), 1)),
    ErrorCode.Malformed,
    /exceeds the 1 bytes left/,
  );
  expectDecodeError(() => decodeEdge(1, 1, 0x61, 0, ...varint(2n ** 40n)), ErrorCode.Malformed, /exceeds/);
  expectDecodeError(() => decodeEdge(8, 1, 3, 1, 1), ErrorCode.Malformed, /exceeds the 2 bytes left/);
});

test('encoding refuses frames over the limit with an EncodeError', () => {
  const frame = { type: 'Send', room: 'lobby', kind: 'chat', body: new Uint8Array(200), clientMsgId: 1 };
  assert.throws(() => encodeClientFrame(frame, 100), (e) => {
    assert.ok(e instanceof EncodeError && e instanceof ThrongError);
    assert.equal(e.code, ErrorCode.FrameTooLarge);
    assert.equal(e.codeName, 'FrameTooLarge');
    assert.equal(e.where, 'encode');
    assert.equal(e.fatal, false);
    assert.match(e.message, /Send frame of 211 bytes exceeds the limit of 100 bytes/);
    return true;
  });
  assert.equal(encodeClientFrame(frame, 211).length, 215);
});

test('encoding refuses values the wire cannot carry', () => {
  assert.throws(() => encodeClientFrame({ type: 'Shout', room: 'a' }), /unknown type "Shout"/);
  assert.throws(() => encodeClientFrame(null), TypeError);
  assert.throws(() => encodeClientFrame({ type: 'Send', room: 'a', kind: 'yell', body: bytes(), clientMsgId: 1 }), /Send\.kind must be one of chat, like/);
  assert.throws(() => encodeClientFrame({ type: 'Send', room: 'a', kind: 'chat', body: 'text', clientMsgId: 1 }), /Send\.body must be a Uint8Array/);
  assert.throws(() => encodeClientFrame({ type: 'Ping', nonce: -1 }), RangeError);
  assert.throws(() => encodeClientFrame({ type: 'Ping', nonce: 1.5 }), RangeError);
  assert.throws(() => encodeClientFrame({ type: 'Presence', queryId: 1, users: ['a', 2] }), /Presence\.users\[1\] must be a string/);
  assert.throws(() => encodeEdgeFrame({ type: 'Error', code: 65536, text: '' }), /0 to 65535 \(u16\)/);
  assert.throws(() => encodeClientFrame({ type: 'Ping', nonce: 1 }, 0), RangeError);
});

test('error codes, names and fatality', () => {
  assert.ok(Object.isFrozen(ErrorCode));
  assert.equal(ErrorCode.TokenExpired, 11);
  assert.equal(errorName(30), 'RateLimited');
  assert.equal(errorName(0), 'ConnectFailed');
  assert.equal(errorName(1234), 'Unknown');
  assert.equal(isFatal(ErrorCode.TokenExpired), true);
  assert.equal(isFatal(ErrorCode.TooSlow), true);
  assert.equal(isFatal(ErrorCode.NotJoined), false);
  assert.equal(isFatal(ErrorCode.RateLimited), false);
  assert.equal(isFatal(1234), true, 'an unknown code is taken as fatal');
  const e = new ThrongError(ErrorCode.Forbidden, 'not for you', { where: 'join', room: 'vip' });
  assert.equal(e.codeName, 'Forbidden');
  assert.equal(e.fatal, false);
  assert.equal(e.room, 'vip');
  assert.equal(e.reason, 'not for you');
  assert.equal(e.message, 'join: Forbidden (20): not for you');
});
