// Throng client for browsers (and anything else with WebTransport): the wire
// protocol `throng/3` and a session over one WebTransport connection.
//
// One self-contained module, served to pages as-is: no imports, and nothing
// at the top level that a browser lacks.
//
// u64 fields travel as JS numbers. Values above Number.MAX_SAFE_INTEGER
// (2^53 - 1) are refused as Malformed rather than silently rounded: the edge
// never produces sequence numbers, ticks or counts that large, and the ids it
// echoes (client message ids, nonces, query ids) are the client's own.

export const DEFAULT_MAX_FRAME_BYTES = 64 * 1024;

/** No frame limit may exceed this (the edge's HARD_MAX_FRAME). */
export const HARD_MAX_FRAME_BYTES = 16 * 1024 * 1024;

const PREFIX_BYTES = 4;

// ---------------------------------------------------------------- errors --

/** The protocol's stable error codes (host/wire/src/error.rs). */
export const ErrorCode = Object.freeze({
  Malformed: 1,
  FrameTooLarge: 2,
  UnexpectedFrame: 3,
  Unauthenticated: 10,
  TokenExpired: 11,
  TokenInvalid: 12,
  TokenMalformed: 13,
  UnknownTenant: 14,
  AlgorithmNotAllowed: 15,
  Forbidden: 20,
  TooManyRooms: 21,
  NotJoined: 22,
  BadRoomName: 23,
  BodyTooLarge: 24,
  TooSlow: 25,
  QueryTooLarge: 26,
  RoomFull: 27,
  RoomLimit: 28,
  SeqOutOfRange: 29,
  RateLimited: 30,
  StorageFull: 31,
  ServerBusy: 40,
  ShuttingDown: 41,
  Disconnected: 42,
  Filtered: 50,
  FilterUnavailable: 51,
  Internal: 99,
});

const CODE_NAMES = new Map(Object.entries(ErrorCode).map(([name, code]) => [code, name]));

const FATAL_CODES = new Set(
  [
    'Malformed', 'FrameTooLarge', 'UnexpectedFrame', 'Unauthenticated', 'TokenExpired', 'TokenInvalid',
    'TokenMalformed', 'UnknownTenant', 'AlgorithmNotAllowed', 'TooSlow', 'ServerBusy', 'ShuttingDown',
    'Disconnected', 'Internal',
  ].map((name) => ErrorCode[name]),
);

// Code 0 is no wire code: the client's own, for a transport that failed.
const NO_EDGE_CODE = 0;

/** The name of `code`: its ErrorCode key, 'ConnectFailed' for 0, else 'Unknown'. */
export function errorName(code) {
  return CODE_NAMES.get(code) ?? (code === NO_EDGE_CODE ? 'ConnectFailed' : 'Unknown');
}

/**
 * Whether an `Error` frame with this code ends the connection. A code this
 * version does not know counts as fatal, as in the Rust client: an edge newer
 * than the client is not to be second-guessed.
 */
export function isFatal(code) {
  return !CODE_NAMES.has(code) || FATAL_CODES.has(code);
}

export class ThrongError extends Error {
  constructor(code, reason, { where = 'session', fatal = isFatal(code), codeName = errorName(code), room, clientMsgId } = {}) {
    super(`${where}: ${codeName} (${code}): ${reason}`);
    this.name = 'ThrongError';
    this.code = code;
    this.codeName = codeName;
    this.fatal = fatal;
    this.where = where;
    this.reason = reason;
    if (room !== undefined) this.room = room;
    if (clientMsgId !== undefined) this.clientMsgId = clientMsgId;
  }
}

/** Bytes that are not a valid frame: Malformed (1) or FrameTooLarge (2). */
export class DecodeError extends ThrongError {
  constructor(code, reason) {
    super(code, reason, { where: 'decode', fatal: true });
    this.name = 'DecodeError';
  }
}

/** A frame that would exceed the frame limit; nothing was sent. */
export class EncodeError extends ThrongError {
  constructor(reason) {
    super(ErrorCode.FrameTooLarge, reason, { where: 'encode', fatal: false });
    this.name = 'EncodeError';
  }
}

// --------------------------------------------------------------- postcard --

const utf8Encoder = new TextEncoder();
// ignoreBOM keeps a leading U+FEFF, which Rust keeps too.
const utf8Decoder = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

class Writer {
  #buf = new Uint8Array(64);
  #len = 0;

  #reserve(n) {
    if (this.#len + n <= this.#buf.length) return;
    const grown = new Uint8Array(Math.max(this.#buf.length * 2, this.#len + n));
    grown.set(this.#buf.subarray(0, this.#len));
    this.#buf = grown;
  }

  byte(b) {
    this.#reserve(1);
    this.#buf[this.#len++] = b;
  }

  // Division rather than bit shifts: shifts would truncate to 32 bits.
  varint(n) {
    while (n > 0x7f) {
      this.byte((n % 0x80) | 0x80);
      n = Math.floor(n / 0x80);
    }
    this.byte(n);
  }

  bytes(b) {
    this.#reserve(b.length);
    this.#buf.set(b, this.#len);
    this.#len += b.length;
  }

  finish() {
    return this.#buf.subarray(0, this.#len);
  }
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.pos = 0;
  }

  get left() {
    return this.bytes.length - this.pos;
  }

  fail(what, at = this.pos) {
    throw new DecodeError(ErrorCode.Malformed, `${what} (at payload byte ${at})`);
  }

  byte() {
    if (this.left === 0) this.fail('the payload ends in the middle of a value');
    return this.bytes[this.pos++];
  }

  take(n) {
    if (n > this.left) this.fail(`a length of ${n} exceeds the ${this.left} bytes left`);
    const out = this.bytes.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  // As postcard 1.x reads varints: at most `maxBytes` bytes, and the last
  // may only carry the bits the type has left (zero padding is accepted).
  varint(maxBytes, lastMax, type) {
    const at = this.pos;
    let value = 0;
    for (let i = 0; i < maxBytes; i++) {
      const b = this.byte();
      value += (b & 0x7f) * 2 ** (7 * i);
      if (b < 0x80) {
        if (i === maxBytes - 1 && b > lastMax) this.fail(`the ${type} varint overflows`, at);
        return value;
      }
    }
    return this.fail(`the ${type} varint is longer than ${maxBytes} bytes`, at);
  }

  /** A sequence length, checked against what is left before anything is allocated. */
  length() {
    const at = this.pos;
    const n = U64.dec(this);
    // Every element of every sequence here takes at least one byte.
    if (n > this.left) this.fail(`a length of ${n} exceeds the ${this.left} bytes left`, at);
    return n;
  }
}

// Each wire type: enc(writer, value, path) and dec(reader). `path` names the
// field in messages about a bad value passed by the caller.

function uint(type, maxBytes, lastMax, max) {
  return {
    enc(w, v, path) {
      if (!Number.isSafeInteger(v) || v < 0 || v > max) {
        throw new RangeError(`${path} must be a whole number from 0 to ${max} (${type}), not ${v}`);
      }
      w.varint(v);
    },
    dec(r) {
      const at = r.pos;
      const v = r.varint(maxBytes, lastMax, type);
      if (v > Number.MAX_SAFE_INTEGER) r.fail(`a ${type} above 2^53 - 1, which a JS number cannot hold exactly`, at);
      return v;
    },
  };
}

const U16 = uint('u16', 3, 0b11, 0xffff);
const U32 = uint('u32', 5, 0b1111, 0xffff_ffff);
const U64 = uint('u64', 10, 0b1, Number.MAX_SAFE_INTEGER);

const BOOL = {
  enc(w, v, path) {
    if (typeof v !== 'boolean') throw new TypeError(`${path} must be a boolean`);
    w.byte(v ? 1 : 0);
  },
  dec(r) {
    const at = r.pos;
    const b = r.byte();
    if (b > 1) r.fail(`a bool byte of ${b}`, at);
    return b === 1;
  },
};

const STR = {
  enc(w, v, path) {
    if (typeof v !== 'string') throw new TypeError(`${path} must be a string`);
    const bytes = utf8Encoder.encode(v);
    w.varint(bytes.length);
    w.bytes(bytes);
  },
  dec(r) {
    const at = r.pos;
    const bytes = r.take(r.length());
    try {
      return utf8Decoder.decode(bytes);
    } catch {
      return r.fail('a string that is not valid UTF-8', at);
    }
  },
};

const BYTES = {
  enc(w, v, path) {
    if (!(v instanceof Uint8Array)) throw new TypeError(`${path} must be a Uint8Array`);
    w.varint(v.length);
    w.bytes(v);
  },
  // A copy, so a body does not keep the whole received chunk alive.
  dec: (r) => r.take(r.length()).slice(),
};

function option(type) {
  return {
    enc(w, v, path) {
      if (v === null || v === undefined) {
        w.byte(0);
      } else {
        w.byte(1);
        type.enc(w, v, path);
      }
    },
    dec(r) {
      const at = r.pos;
      const tag = r.byte();
      if (tag === 0) return null;
      if (tag !== 1) r.fail(`an option tag of ${tag}`, at);
      return type.dec(r);
    },
  };
}

function vec(type) {
  return {
    enc(w, v, path) {
      if (!Array.isArray(v)) throw new TypeError(`${path} must be an array`);
      w.varint(v.length);
      v.forEach((item, i) => type.enc(w, item, `${path}[${i}]`));
    },
    dec(r) {
      const out = [];
      for (let n = r.length(); n > 0; n--) out.push(type.dec(r));
      return out;
    },
  };
}

/** A Rust enum without fields, as its lowercase names in wire order. */
function names(what, list) {
  return {
    enc(w, v, path) {
      const i = list.indexOf(v);
      if (i < 0) throw new TypeError(`${path} must be one of ${list.join(', ')}, not ${JSON.stringify(v)}`);
      w.varint(i);
    },
    dec(r) {
      const at = r.pos;
      const i = U32.dec(r);
      if (i >= list.length) r.fail(`an unknown ${what} ${i}`, at);
      return list[i];
    },
  };
}

function struct(fields) {
  return {
    enc(w, v, path) {
      if (typeof v !== 'object' || v === null) throw new TypeError(`${path} must be an object`);
      for (const [key, type] of fields) type.enc(w, v[key], `${path}.${key}`);
    },
    dec(r, out = {}) {
      for (const [key, type] of fields) out[key] = type.dec(r);
      return out;
    },
  };
}

/** A Rust enum of struct variants, as objects with a `type` of the variant's name. */
function union(what, variants) {
  const bodies = variants.map(([type, fields]) => [type, struct(fields)]);
  return {
    what,
    enc(w, v) {
      const i = bodies.findIndex(([type]) => type === v?.type);
      if (i < 0) throw new TypeError(`not a ${what}: unknown type ${JSON.stringify(v?.type)}`);
      w.varint(i);
      bodies[i][1].enc(w, v, v.type);
    },
    dec(r) {
      const at = r.pos;
      const i = U32.dec(r);
      if (i >= bodies.length) r.fail(`an unknown ${what} variant ${i}`, at);
      const [type, body] = bodies[i];
      return body.dec(r, { type });
    },
  };
}

const KIND = names('Kind', ['chat', 'like', 'gift', 'host', 'system']);
const ROLE = names('Role', ['viewer', 'host', 'moderator']);
const MESSAGE = struct([['seq', U64], ['sender', STR], ['kind', KIND], ['body', BYTES]]);

/** A u64 that encodes as 0 when absent (a Join's epoch: "the room's current"). */
const ABSENT_IS_ZERO = { enc: (w, v, path) => U64.enc(w, v ?? 0, path), dec: (r) => U64.dec(r) };

/** What became of a join's resume: {kind: 'Fresh' | 'Continued' | 'Truncated'} or {kind: 'NewEpoch', previous}. */
const RESUMED_KINDS = ['Fresh', 'Continued', 'Truncated', 'NewEpoch'];
const RESUMED = {
  enc(w, v, path) {
    const i = RESUMED_KINDS.indexOf(v?.kind);
    if (i < 0) throw new TypeError(`${path}.kind must be one of ${RESUMED_KINDS.join(', ')}`);
    w.varint(i);
    if (v.kind === 'NewEpoch') U64.enc(w, v.previous, `${path}.previous`);
  },
  dec(r) {
    const at = r.pos;
    const i = U32.dec(r);
    if (i >= RESUMED_KINDS.length) r.fail(`an unknown Resumed ${i}`, at);
    const kind = RESUMED_KINDS[i];
    return kind === 'NewEpoch' ? { kind, previous: U64.dec(r) } : { kind };
  },
};

const CLIENT_FRAME = union('ClientFrame', [
  ['Hello', [['token', STR]]],
  ['Join', [['room', STR], ['resumeFrom', option(U64)], ['epoch', ABSENT_IS_ZERO]]],
  ['Leave', [['room', STR]]],
  ['Send', [['room', STR], ['kind', KIND], ['body', BYTES], ['clientMsgId', U64]]],
  ['Ping', [['nonce', U64]]],
  ['Presence', [['queryId', U64], ['users', vec(STR)]]],
  ['Seen', [['room', STR], ['seq', U64]]],
  ['Refresh', [['token', STR]]],
]);

const EDGE_FRAME = union('EdgeFrame', [
  ['Welcome', [
    ['session', struct([['tenant', STR], ['user', STR], ['role', ROLE]])],
    ['limits', struct([
      ['maxFrameBytes', U32], ['maxBodyBytes', U32], ['maxRooms', U32],
      ['sendRatePerSec', U32], ['sendBurst', U32], ['idleTimeoutMs', U64],
    ])],
    ['expiresAt', U64],
  ]],
  ['Joined', [['room', STR], ['online', U64], ['recent', vec(MESSAGE)], ['epoch', U64], ['resumed', RESUMED]]],
  // A newtype variant, Batch(Batch): postcard writes the struct's fields
  // right after the tag, so it reads as a struct variant.
  ['Batch', [
    ['room', STR], ['tick', U64], ['messages', vec(MESSAGE)],
    ['counters', struct([['likes', U64], ['gifts', vec(struct([['gift', STR], ['count', U64]]))]])],
    ['pinned', vec(U64)], ['online', U64], ['missed', U64], ['epoch', U64],
  ]],
  ['Ack', [['clientMsgId', U64], ['seq', U64], ['epoch', U64]]],
  ['Rejected', [['clientMsgId', U64], ['code', U16], ['reason', STR]]],
  ['Error', [['code', U16], ['text', STR]]],
  ['Pong', [['nonce', U64]]],
  ['JoinRefused', [['room', STR], ['code', U16], ['text', STR]]],
  ['Presence', [['queryId', U64], ['online', vec(BOOL)]]],
  ['PresenceRefused', [['queryId', U64], ['code', U16], ['text', STR]]],
  ['Refreshed', [['expiresAt', U64]]],
  ['RefreshRefused', [['code', U16], ['text', STR]]],
]);

// ----------------------------------------------------------------- frames --

function frameLimit(maxFrameBytes) {
  if (!Number.isSafeInteger(maxFrameBytes) || maxFrameBytes < 1) {
    throw new RangeError(`maxFrameBytes must be a positive whole number, not ${maxFrameBytes}`);
  }
  return Math.min(maxFrameBytes, HARD_MAX_FRAME_BYTES);
}

function encodeFrame(schema, frame, maxFrameBytes) {
  const limit = frameLimit(maxFrameBytes);
  const w = new Writer();
  w.bytes(new Uint8Array(PREFIX_BYTES));
  schema.enc(w, frame);
  const out = w.finish();
  const len = out.length - PREFIX_BYTES;
  if (len > limit) throw new EncodeError(`a ${frame.type} frame of ${len} bytes exceeds the limit of ${limit} bytes`);
  new DataView(out.buffer, out.byteOffset, PREFIX_BYTES).setUint32(0, len);
  return out;
}

function decodePayload(schema, payload) {
  if (!(payload instanceof Uint8Array)) throw new TypeError('a payload must be a Uint8Array');
  const r = new Reader(payload);
  const frame = schema.dec(r);
  if (r.left > 0) throw new DecodeError(ErrorCode.Malformed, `the ${frame.type} frame has ${r.left} trailing bytes`);
  return frame;
}

/** A ClientFrame with its 4-byte length prefix; EncodeError if over the limit. */
export function encodeClientFrame(frame, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES) {
  return encodeFrame(CLIENT_FRAME, frame, maxFrameBytes);
}

/** An EdgeFrame with its length prefix (what the edge sends; for tests and tools). */
export function encodeEdgeFrame(frame, maxFrameBytes = DEFAULT_MAX_FRAME_BYTES) {
  return encodeFrame(EDGE_FRAME, frame, maxFrameBytes);
}

/** One EdgeFrame from a payload without its prefix, every byte used; DecodeError otherwise. */
export function decodeEdgeFrame(payload) {
  return decodePayload(EDGE_FRAME, payload);
}

/** One ClientFrame from a payload without its prefix (what the edge reads). */
export function decodeClientFrame(payload) {
  return decodePayload(CLIENT_FRAME, payload);
}

/**
 * Splits a byte stream into EdgeFrames. Holds at most one partial frame
 * besides the chunk being pushed, and refuses an oversized length prefix as
 * soon as its 4 bytes are in, before a byte of the payload is buffered.
 * After an error it throws that error again: the stream is not to be trusted.
 */
export class FrameReader {
  #max;
  #prefix = new Uint8Array(PREFIX_BYTES);
  #prefixHave = 0;
  #payload = null;
  #payloadHave = 0;
  #error = null;

  constructor(maxFrameBytes = DEFAULT_MAX_FRAME_BYTES) {
    this.#max = frameLimit(maxFrameBytes);
  }

  push(chunk) {
    if (!(chunk instanceof Uint8Array)) throw new TypeError('FrameReader.push takes a Uint8Array');
    if (this.#error) throw this.#error;
    try {
      return this.#split(chunk);
    } catch (e) {
      this.#error = e;
      throw e;
    }
  }

  /** Throws Malformed if the stream ended inside a frame. */
  finish() {
    if (this.#error) throw this.#error;
    const held = this.#prefixHave + this.#payloadHave;
    if (held > 0) {
      this.#error = new DecodeError(ErrorCode.Malformed, `the stream ended ${held} bytes into a frame`);
      throw this.#error;
    }
  }

  #split(chunk) {
    const frames = [];
    let at = 0;
    while (at < chunk.length) {
      if (this.#payload === null) {
        const n = Math.min(PREFIX_BYTES - this.#prefixHave, chunk.length - at);
        this.#prefix.set(chunk.subarray(at, at + n), this.#prefixHave);
        this.#prefixHave += n;
        at += n;
        if (this.#prefixHave < PREFIX_BYTES) break;
        const len = this.#announced();
        if (chunk.length - at >= len) {
          // The whole payload is in this chunk: decode it where it lies.
          frames.push(decodeEdgeFrame(chunk.subarray(at, at + len)));
          at += len;
          this.#prefixHave = 0;
          continue;
        }
        this.#payload = new Uint8Array(len);
      }
      const n = Math.min(this.#payload.length - this.#payloadHave, chunk.length - at);
      this.#payload.set(chunk.subarray(at, at + n), this.#payloadHave);
      this.#payloadHave += n;
      at += n;
      if (this.#payloadHave === this.#payload.length) {
        const payload = this.#payload;
        this.#payload = null;
        this.#payloadHave = 0;
        this.#prefixHave = 0;
        frames.push(decodeEdgeFrame(payload));
      }
    }
    return frames;
  }

  #announced() {
    const len = new DataView(this.#prefix.buffer).getUint32(0);
    if (len === 0) throw new DecodeError(ErrorCode.Malformed, 'an empty frame (length prefix 0)');
    if (len > this.#max) {
      throw new DecodeError(ErrorCode.FrameTooLarge, `a frame of ${len} bytes exceeds the limit of ${this.#max} bytes`);
    }
    return len;
  }
}

// ---------------------------------------------------------------- session --

/** How long a broken stream waits for the session's close to say why. */
const CLOSE_GRACE_MS = 1000;

/** Batches a Room keeps for its iterator by default. */
const ROOM_BUFFER = 1024;

const PRIVATE = Symbol('throng');
const DELIVER = Symbol('deliver');
const END = Symbol('end');

const noop = () => {};

const nextTask = () => new Promise((resolve) => setTimeout(resolve, 0));

function describe(e) {
  return e instanceof Error ? e.message || e.name : String(e);
}

/** Whether `promise` settles within `ms`. */
async function settlesWithin(promise, ms) {
  let timer;
  try {
    return await Promise.race([
      promise.then(() => true, () => true),
      new Promise((resolve) => { timer = setTimeout(resolve, ms, false); }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

function toBody(body) {
  if (typeof body === 'string') return utf8Encoder.encode(body);
  if (body instanceof Uint8Array) return body;
  if (body instanceof ArrayBuffer) return new Uint8Array(body);
  if (ArrayBuffer.isView(body)) return new Uint8Array(body.buffer, body.byteOffset, body.byteLength);
  throw new TypeError('a message body must be a string (sent as UTF-8) or bytes');
}

function fromBase64(text) {
  try {
    const binary = atob(text.replace(/-/g, '+').replace(/_/g, '/'));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  } catch {
    throw new TypeError(`certificate hash ${JSON.stringify(text)} is neither hex nor base64`);
  }
}

function hashBytes(hash) {
  if (hash instanceof Uint8Array) return hash;
  if (typeof hash !== 'string') throw new TypeError('a certificate hash must be a base64 or hex string, or a Uint8Array');
  // 64 characters cannot be the base64 of 32 bytes (that is 43 or 44), so hex is unambiguous.
  if (/^[0-9a-fA-F]{64}$/.test(hash)) return Uint8Array.from(hash.match(/../g), (h) => parseInt(h, 16));
  return fromBase64(hash);
}

/** WebTransport's serverCertificateHashes from base64/hex strings or bytes. */
function certificateHashes(hashes) {
  return (Array.isArray(hashes) ? hashes : [hashes]).map((hash) => {
    const value = hashBytes(hash);
    if (value.length !== 32) throw new TypeError(`a certificate hash must be a SHA-256 digest (32 bytes), not ${value.length} bytes`);
    return { algorithm: 'sha-256', value };
  });
}

function closeError(info, where) {
  const code = info?.closeCode ?? NO_EDGE_CODE;
  const reason = info?.reason || (code === NO_EDGE_CODE ? 'the session was closed without a code' : 'the edge closed the session');
  return new ThrongError(code, reason, { where, fatal: true });
}

function protocolViolation(reason) {
  return new ThrongError(ErrorCode.UnexpectedFrame, reason, { where: 'session', fatal: true });
}

/** The frames of one incoming stream, one at a time; null at its clean end. */
class FrameSource {
  #reader;
  #frames;
  #ready = [];

  constructor(readable, maxFrameBytes) {
    this.#reader = readable.getReader();
    this.#frames = new FrameReader(maxFrameBytes);
  }

  /** Throws DecodeError for bad bytes, and whatever the stream throws when it breaks. */
  async next() {
    while (this.#ready.length === 0) {
      const { value, done } = await this.#reader.read();
      if (done) {
        this.#frames.finish();
        return null;
      }
      this.#ready = this.#frames.push(value);
    }
    return this.#ready.shift();
  }

  cancel() {
    this.#reader.cancel().catch(noop);
  }
}

/** A joined room: the `Joined` answer, then its batches as events and through `for await`. */
export class Room extends EventTarget {
  #queue = [];
  #limit;
  #end;
  #waiting = [];
  #settle;

  constructor(key, joined, limit) {
    if (key !== PRIVATE) throw new TypeError('rooms come from ThrongClient.join()');
    super();
    this.room = joined.room;
    this.online = joined.online;
    this.recent = joined.recent;
    /** The room's numbering: sequence numbers compare only within one epoch. */
    this.epoch = joined.epoch;
    /** What became of the join's resumeFrom. */
    this.resumed = joined.resumed;
    this.ended = new Promise((resolve) => { this.#settle = resolve; });
    this.#limit = limit;
  }

  [DELIVER](batch) {
    this.online = batch.online;
    this.dispatchEvent(new CustomEvent('batch', { detail: batch }));
    if (this.#limit === 0) return;
    this.#queue.push(batch);
    if (this.#queue.length > this.#limit) {
      // The iterator fell behind: its next batch says how many it missed.
      const dropped = this.#queue.shift();
      this.#queue[0] = { ...this.#queue[0], missed: this.#queue[0].missed + dropped.missed + 1 };
    }
    this.#wake();
  }

  [END](reason) {
    if (this.#end !== undefined) return;
    this.#end = reason;
    this.#settle(reason);
    this.dispatchEvent(new CustomEvent('end', { detail: reason }));
    this.#wake();
  }

  #wake() {
    for (const resolve of this.#waiting.splice(0)) resolve();
  }

  async *[Symbol.asyncIterator]() {
    if (this.#limit === 0) throw new Error(`room "${this.room}" was joined with buffer: 0; listen for its batch events`);
    for (;;) {
      if (this.#queue.length > 0) {
        yield this.#queue.shift();
      } else if (this.#end !== undefined) {
        if (this.#end !== null) throw this.#end;
        return;
      } else {
        await new Promise((resolve) => this.#waiting.push(resolve));
      }
    }
  }
}

/** A session with one edge over WebTransport. Make one with ThrongClient.connect(). */
export class ThrongClient extends EventTarget {
  #transport;
  #transportClosed;
  #writer = null;
  #control = null;
  #where = 'connect';
  #session = null;
  #limits = null;
  #expiresAt = 0;
  // One counter for client message ids, nonces and query ids, as the Rust client.
  #nextId = 1;
  #acks = new Map();
  #joins = new Map();
  #pings = new Map();
  #queries = new Map();
  #refresh = null;
  #rooms = new Map();
  #leaving = new Set();
  #fatal = null;
  #closed;
  #resolveClosed;

  constructor(key, transport) {
    if (key !== PRIVATE) throw new TypeError('use ThrongClient.connect() to make a client');
    super();
    this.#transport = transport;
    this.#closed = new Promise((resolve) => { this.#resolveClosed = resolve; });
    transport.closed.then(
      (info) => this.#fail(closeError(info, this.#where)),
      (e) => this.#fail(new ThrongError(NO_EDGE_CODE, `the connection failed: ${describe(e)}`, { where: this.#where })),
    );
    // Registered after the handlers above, so by the time it settles they have run.
    this.#transportClosed = transport.closed.then(noop, noop);
  }

  /**
   * Opens a session and says Hello; resolves once the edge's Welcome is in.
   * Rejects with a ThrongError: the edge's code (e.g. TokenExpired), or code
   * 0 'ConnectFailed' when the transport could not be set up in time.
   */
  static async connect({ url, token, certHashes, connectTimeoutMs = 10000, WebTransport: WT = globalThis.WebTransport } = {}) {
    if (typeof url !== 'string' || url === '') throw new TypeError('connect: url must be the edge\'s https:// WebTransport URL');
    if (typeof token !== 'string') throw new TypeError('connect: token must be a string (a JWT)');
    if (typeof WT !== 'function') {
      throw new ThrongError(NO_EDGE_CODE, 'there is no WebTransport here; pass one as the WebTransport option', { where: 'connect' });
    }
    const options = certHashes == null ? {} : { serverCertificateHashes: certificateHashes(certHashes) };
    let transport;
    try {
      transport = new WT(url, options);
    } catch (e) {
      throw new ThrongError(NO_EDGE_CODE, `cannot open ${url}: ${describe(e)}`, { where: 'connect' });
    }
    const client = new ThrongClient(PRIVATE, transport);
    const handshake = client.#handshake(token);
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new ThrongError(NO_EDGE_CODE, `no Welcome from ${url} within ${connectTimeoutMs} ms`, { where: 'connect' })),
        connectTimeoutMs,
      );
    });
    try {
      await Promise.race([handshake, timeout]);
    } catch (e) {
      handshake.catch(noop);
      client.#fail(e);
      throw client.#fatal;
    } finally {
      clearTimeout(timer);
    }
    return client;
  }

  async #handshake(token) {
    let first;
    try {
      await this.#transport.ready;
      const stream = await this.#transport.createBidirectionalStream();
      this.#writer = stream.writable.getWriter();
      this.#control = new FrameSource(stream.readable, DEFAULT_MAX_FRAME_BYTES);
      // The limits are unknown until Welcome, so Hello may use the most there is.
      await this.#writer.write(encodeClientFrame({ type: 'Hello', token }, HARD_MAX_FRAME_BYTES));
      first = await this.#control.next();
    } catch (e) {
      throw e instanceof ThrongError ? e : await this.#lostError(e);
    }
    if (first === null) throw await this.#lostError(null);
    if (first.type === 'Error') throw new ThrongError(first.code, first.text, { where: 'connect', fatal: true });
    if (first.type !== 'Welcome') throw protocolViolation(`the edge answered Hello with ${first.type}, not Welcome`);
    this.#session = first.session;
    this.#limits = first.limits;
    this.#expiresAt = first.expiresAt;
    this.#where = 'session';
    this.#readControl();
    this.#acceptRooms();
  }

  /** Who the edge believes this client is. */
  get session() {
    return this.#session;
  }

  /** The limits the edge enforces on this connection. */
  get limits() {
    return this.#limits;
  }

  /** When the token expires, in seconds since the Unix epoch; `refresh` moves it. */
  get expiresAt() {
    return this.#expiresAt;
  }

  /** Resolves once the session is over: {code, codeName, reason, fatal}. */
  get closed() {
    return this.#closed;
  }

  /**
   * Joins `room`; resolves when its stream delivered Joined. `resumeFrom`
   * asks for what the edge still has after that sequence number of
   * numbering `epoch` (a Joined's or a Batch's; 0: the room's current one);
   * the Room's `resumed` says what became of it. `buffer` bounds the
   * batches kept for `for await` (0: events only).
   */
  async join(room, { resumeFrom = null, epoch = 0, buffer = ROOM_BUFFER } = {}) {
    this.#ensureOpen();
    if (!Number.isSafeInteger(buffer) || buffer < 0) throw new RangeError('buffer must be a whole number of batches');
    if (this.#joins.has(room)) throw new Error(`a join of room "${room}" is already under way`);
    const frame = encodeClientFrame({ type: 'Join', room, resumeFrom, epoch }, this.#limits.maxFrameBytes);
    const joined = this.#expect(this.#joins, room, { buffer });
    this.#write(frame);
    return joined;
  }

  /** Leaves `room`; its Room ends once the edge finishes the stream. Does nothing once closed. */
  leave(room) {
    if (this.#fatal) return;
    const frame = encodeClientFrame({ type: 'Leave', room }, this.#limits.maxFrameBytes);
    this.#leaving.add(room);
    this.#write(frame);
  }

  /** Tells the edge everything in `room` up to `seq` is processed (group rooms keep it). */
  seen(room, seq) {
    if (this.#fatal) return;
    this.#write(encodeClientFrame({ type: 'Seen', room, seq }, this.#limits.maxFrameBytes));
  }

  /**
   * Sends a message; resolves with the edge's Ack, rejects on Rejected.
   * Limits are the edge's to enforce: a body over maxBodyBytes goes out and
   * comes back BodyTooLarge. Only a frame over maxFrameBytes is refused here
   * (EncodeError), since the edge would end the whole session for it.
   */
  async send(room, kind, body) {
    this.#ensureOpen();
    const clientMsgId = this.#nextId++;
    const frame = encodeClientFrame({ type: 'Send', room, kind, body: toBody(body), clientMsgId }, this.#limits.maxFrameBytes);
    const acked = this.#expect(this.#acks, clientMsgId);
    this.#write(frame);
    return acked;
  }

  /** Which of `users` (of this tenant) are online on the edge, in order. */
  async presence(users) {
    this.#ensureOpen();
    const queryId = this.#nextId++;
    const frame = encodeClientFrame({ type: 'Presence', queryId, users }, this.#limits.maxFrameBytes);
    const answered = this.#expect(this.#queries, queryId, { count: users.length });
    this.#write(frame);
    return answered;
  }

  /** Round-trip time of a Ping, in milliseconds. */
  async ping() {
    this.#ensureOpen();
    const nonce = this.#nextId++;
    const frame = encodeClientFrame({ type: 'Ping', nonce }, this.#limits.maxFrameBytes);
    const ponged = this.#expect(this.#pings, nonce);
    const start = performance.now();
    this.#write(frame);
    await ponged;
    return performance.now() - start;
  }

  /** Moves the session to a later token of the same user; resolves with its expiry. */
  async refresh(token) {
    this.#ensureOpen();
    if (this.#refresh) throw new Error('a refresh is already under way');
    const frame = encodeClientFrame({ type: 'Refresh', token }, this.#limits.maxFrameBytes);
    const refreshed = new Promise((resolve, reject) => { this.#refresh = { resolve, reject }; });
    this.#write(frame);
    return refreshed;
  }

  /** Ends the session; what is pending rejects with code 0 'Closed'. */
  close() {
    this.#fail(new ThrongError(NO_EDGE_CODE, 'closed by the client', { where: 'session', fatal: false, codeName: 'Closed' }));
  }

  #ensureOpen() {
    if (this.#fatal) throw this.#fatal;
  }

  #expect(pending, key, extra = {}) {
    return new Promise((resolve, reject) => pending.set(key, { resolve, reject, ...extra }));
  }

  /** The waiter for `key`, taken out of `pending`; a reply nobody waits for is dropped. */
  #take(pending, key) {
    const waiter = pending.get(key);
    pending.delete(key);
    return waiter;
  }

  // A failed write means the session is going: #fail rejects what waits.
  #write(frame) {
    this.#writer.write(frame).catch(async (e) => this.#fail(await this.#lostError(e)));
  }

  /** The session's close reason if it closes soon, else null. */
  async #closingError() {
    if (!this.#fatal) await settlesWithin(this.#transportClosed, CLOSE_GRACE_MS);
    return this.#fatal;
  }

  // A stream broke or ended: the close that usually follows carries the
  // edge's code, so it is waited for briefly before blaming the transport.
  async #lostError(cause) {
    const closing = await this.#closingError();
    if (closing) return closing;
    const reason = cause === null ? 'the edge ended the control stream' : `the connection failed: ${describe(cause)}`;
    return new ThrongError(NO_EDGE_CODE, reason, { where: this.#where });
  }

  #fail(err) {
    if (this.#fatal) return;
    this.#fatal = err;
    for (const pending of [this.#acks, this.#joins, this.#pings, this.#queries]) {
      for (const waiter of pending.values()) waiter.reject(err);
      pending.clear();
    }
    this.#refresh?.reject(err);
    this.#refresh = null;
    for (const [room, source] of this.#rooms) {
      room[END](err);
      source.cancel();
    }
    this.#rooms.clear();
    this.#control?.cancel();
    try {
      this.#transport.close({ closeCode: err.code, reason: err.reason.slice(0, 200) });
    } catch {
      // Already closed.
    }
    const info = { code: err.code, codeName: err.codeName, reason: err.reason, fatal: err.fatal };
    this.#resolveClosed(info);
    this.dispatchEvent(new CustomEvent('close', { detail: info }));
  }

  async #readControl() {
    for (;;) {
      let frame;
      try {
        frame = await this.#control.next();
      } catch (e) {
        this.#fail(e instanceof ThrongError ? e : await this.#lostError(e));
        return;
      }
      if (frame === null) {
        this.#fail(await this.#lostError(null));
        return;
      }
      if (this.#fatal) return;
      this.#onControl(frame);
    }
  }

  #onControl(frame) {
    switch (frame.type) {
      case 'Ack':
        this.#take(this.#acks, frame.clientMsgId)?.resolve({ clientMsgId: frame.clientMsgId, seq: frame.seq, epoch: frame.epoch });
        return;
      case 'Rejected':
        this.#take(this.#acks, frame.clientMsgId)?.reject(
          new ThrongError(frame.code, frame.reason, { where: 'send', fatal: false, clientMsgId: frame.clientMsgId }),
        );
        return;
      case 'JoinRefused':
        this.#take(this.#joins, frame.room)?.reject(
          new ThrongError(frame.code, frame.text, { where: 'join', fatal: false, room: frame.room }),
        );
        return;
      case 'Presence':
        this.#answerPresence(frame);
        return;
      case 'PresenceRefused':
        this.#take(this.#queries, frame.queryId)?.reject(new ThrongError(frame.code, frame.text, { where: 'presence', fatal: false }));
        return;
      case 'Pong':
        this.#take(this.#pings, frame.nonce)?.resolve();
        return;
      case 'Refreshed':
        this.#expiresAt = frame.expiresAt;
        this.#refresh?.resolve(frame.expiresAt);
        this.#refresh = null;
        return;
      case 'RefreshRefused':
        this.#refresh?.reject(new ThrongError(frame.code, frame.text, { where: 'refresh', fatal: false }));
        this.#refresh = null;
        return;
      case 'Error': {
        const err = new ThrongError(frame.code, frame.text, { where: 'session', fatal: isFatal(frame.code) });
        if (err.fatal) this.#fail(err);
        else this.dispatchEvent(new CustomEvent('error', { detail: err }));
        return;
      }
      default:
        this.#fail(protocolViolation(`the edge sent ${frame.type} on the control stream`));
    }
  }

  #answerPresence({ queryId, online }) {
    const waiter = this.#take(this.#queries, queryId);
    if (!waiter) return;
    if (online.length === waiter.count) {
      waiter.resolve(online);
    } else {
      const reason = `the presence answer has ${online.length} entries for ${waiter.count} users`;
      waiter.reject(new ThrongError(ErrorCode.Malformed, reason, { where: 'presence', fatal: false }));
    }
  }

  async #acceptRooms() {
    const incoming = this.#transport.incomingUnidirectionalStreams.getReader();
    try {
      for (;;) {
        const { value, done } = await incoming.read();
        if (done || this.#fatal) return;
        this.#readRoom(value);
      }
    } catch {
      // The session is over; `closed` says why.
    }
  }

  // The edge opens one stream per join; its first frame, Joined, names the
  // room, which is how it finds its join even when streams arrive out of order.
  async #readRoom(stream) {
    const source = new FrameSource(stream, this.#limits.maxFrameBytes);
    let room = null;
    try {
      const joined = await source.next();
      if (joined === null) return;
      if (joined.type !== 'Joined') throw protocolViolation(`a room stream began with ${joined.type}, not Joined`);
      const waiter = this.#take(this.#joins, joined.room);
      if (!waiter) {
        source.cancel();
        return;
      }
      room = new Room(PRIVATE, joined, waiter.buffer);
      this.#rooms.set(room, source);
      waiter.resolve(room);
      // Batches wait a task, so listeners added right after `await join()` see them all.
      await nextTask();
      for (;;) {
        const frame = await source.next();
        if (frame === null) {
          room[END](this.#leaving.delete(room.room) ? null : await this.#closingError());
          return;
        }
        if (frame.type !== 'Batch') throw protocolViolation(`the edge sent ${frame.type} on the stream of room "${room.room}"`);
        room[DELIVER](frame);
      }
    } catch (e) {
      const err = e instanceof ThrongError ? e : await this.#lostError(e);
      room?.[END](err);
      if (e instanceof ThrongError) this.#fail(err);
    } finally {
      this.#rooms.delete(room);
    }
  }
}

// --------------------------------------------------------------- resuming --

/** Codes after which connecting again may help: lost networks and restarting edges. */
const RECOVERABLE = new Set([NO_EDGE_CODE, ErrorCode.TooSlow, ErrorCode.ServerBusy, ErrorCode.ShuttingDown, ErrorCode.Internal]);

// A client closed by the application (through `resuming.client`) stays closed.
function isRecoverable(err) {
  return err instanceof ThrongError && err.codeName !== 'Closed' && RECOVERABLE.has(err.code);
}

/**
 * One room that survives dropped connections: it reconnects with backoff
 * (fresh options from getOptions() each time, since the edge's certificate
 * hash can rotate), rejoins after the last sequence number it handed out,
 * and never hands out a message twice. Where messages may have been lost
 * uncounted (the room's numbering changed: an edge restarted or another
 * took the room over; or the edge no longer held everything after our
 * number) it emits a 'gap' event ({kind: 'NewEpoch' | 'Truncated',
 * fromEpoch, toEpoch, afterSeq}) before the batches that follow it.
 */
export class ResumingRoom extends EventTarget {
  #getOptions;
  #firstBackoffMs;
  #maxBackoffMs;
  #giveUpAfterMs;
  #lastSeq;
  #epoch = 0;
  #status = 'idle';
  #started = false;
  #stopped = false;
  #wakeUp = noop;

  constructor({ getOptions, room, resumeFrom = null, epoch = 0, firstBackoffMs = 100, maxBackoffMs = 2000, giveUpAfterMs = 60000 } = {}) {
    super();
    if (typeof getOptions !== 'function') throw new TypeError('getOptions must be an async function returning {url, token, certHashes}');
    if (typeof room !== 'string') throw new TypeError('room must be a string');
    this.room = room;
    this.reconnects = 0;
    /** Gaps met so far (see the 'gap' event). */
    this.gaps = 0;
    this.client = null;
    this.#getOptions = getOptions;
    this.#lastSeq = resumeFrom;
    this.#epoch = epoch;
    this.#firstBackoffMs = firstBackoffMs;
    this.#maxBackoffMs = maxBackoffMs;
    this.#giveUpAfterMs = giveUpAfterMs;
  }

  /** The sequence number of the last message handed out, or null. */
  get lastSeq() {
    return this.#lastSeq;
  }

  /** The numbering lastSeq is of (0 before the first join). */
  get epoch() {
    return this.#epoch;
  }

  /** 'idle' before start(), then 'connecting' | 'live' | 'reconnecting' | 'closed'. */
  get status() {
    return this.#status;
  }

  start() {
    if (this.#started) throw new Error('start() was already called');
    this.#started = true;
    this.#run();
  }

  /** Sends through the current connection; rejects if there is none right now. */
  async send(kind, body) {
    if (!this.client) throw new ThrongError(NO_EDGE_CODE, `not connected to room "${this.room}" right now`, { where: 'send', fatal: false });
    return this.client.send(this.room, kind, body);
  }

  stop() {
    this.#stopped = true;
    this.#wakeUp();
    this.client?.close();
    this.client = null;
    this.#setStatus('closed');
  }

  async #run() {
    this.#setStatus('connecting');
    let backoff = this.#firstBackoffMs;
    let downSince = Date.now();
    let wasLive = false;
    while (!this.#stopped) {
      let client = null;
      let room;
      try {
        client = await this.#connect();
        room = await client.join(this.room, { resumeFrom: this.#lastSeq, epoch: this.#epoch });
      } catch (e) {
        client?.close();
        if (this.#stopped) return;
        if (!isRecoverable(e) || Date.now() - downSince >= this.#giveUpAfterMs) {
          this.#finish(e);
          return;
        }
        this.#setStatus('reconnecting');
        await this.#sleep(backoff);
        backoff = Math.min(backoff * 2, this.#maxBackoffMs);
        continue;
      }
      if (this.#stopped) {
        client.close();
        return;
      }
      if (wasLive) this.reconnects += 1;
      wasLive = true;
      this.client = client;
      backoff = this.#firstBackoffMs;
      this.#setStatus('live');
      const end = await this.#follow(room);
      this.client = null;
      client.close();
      if (this.#stopped) return;
      if (end !== null && !isRecoverable(end)) {
        this.#finish(end);
        return;
      }
      downSince = Date.now();
      this.#setStatus('reconnecting');
      await this.#sleep(backoff);
    }
  }

  async #connect() {
    let options;
    try {
      options = await this.#getOptions();
    } catch (e) {
      // Most likely the page that serves the options is as unreachable as the edge.
      throw new ThrongError(NO_EDGE_CODE, `getOptions failed: ${describe(e)}`, { where: 'connect' });
    }
    const client = await ThrongClient.connect(options);
    client.addEventListener('error', (e) => this.#emit('error', e.detail));
    return client;
  }

  /** Hands out the room's batches until it ends; resolves with why (null: the edge finished it). */
  async #follow(room) {
    const kind = room.resumed.kind;
    this.#numbering(kind === 'NewEpoch' || kind === 'Truncated' ? kind : null, room.epoch);
    const recent = this.#unseen(room.recent);
    if (recent.length > 0) {
      this.#emit('batch', {
        type: 'Batch', room: room.room, tick: 0, messages: recent,
        counters: { likes: 0, gifts: [] }, pinned: [], online: room.online, missed: 0, epoch: room.epoch,
      });
    }
    try {
      for await (const batch of room) {
        // Another edge took the room over mid-stream.
        if (batch.epoch !== this.#epoch) this.#numbering('NewEpoch', batch.epoch);
        const messages = this.#unseen(batch.messages);
        this.#emit('batch', messages === batch.messages ? batch : { ...batch, messages });
      }
      return null;
    } catch (e) {
      return e;
    }
  }

  /** Takes in the room's numbering, saying so where a gap may hide lost messages. */
  #numbering(gap, epoch) {
    if (gap !== null) {
      this.gaps += 1;
      this.#emit('gap', { kind: gap, fromEpoch: this.#epoch, toEpoch: epoch, afterSeq: this.#lastSeq });
    }
    // A room's numbers only go up, across epochs too: lastSeq still tells
    // what was handed out already.
    this.#epoch = epoch;
  }

  /** The messages after the last one handed out, which become the handed out ones. */
  #unseen(messages) {
    const last = this.#lastSeq;
    const fresh = last === null ? messages : messages.filter((m) => m.seq > last);
    if (fresh.length > 0) this.#lastSeq = fresh[fresh.length - 1].seq;
    return fresh;
  }

  #finish(err) {
    this.#stopped = true;
    this.#emit('error', err);
    this.#setStatus('closed');
  }

  #sleep(ms) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, ms);
      this.#wakeUp = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }

  #setStatus(status) {
    if (this.#status === status) return;
    this.#status = status;
    this.#emit('status', status);
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
