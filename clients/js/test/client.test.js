// ThrongClient and ResumingRoom against an in-memory WebTransport that
// plays the edge. (Kept in this file: node --test runs every .js under test/.)

import test from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';

import {
  ErrorCode,
  ResumingRoom,
  Room,
  ThrongClient,
  ThrongError,
  decodeClientFrame,
  encodeEdgeFrame,
} from '../src/throng.js';

// ------------------------------------------------------------ fake edge --

const WELCOME = {
  type: 'Welcome',
  session: { tenant: 'acme', user: 'alice', role: 'viewer' },
  limits: { maxFrameBytes: 65536, maxBodyBytes: 1024, maxRooms: 4, sendRatePerSec: 5, sendBurst: 10, idleTimeoutMs: 30000 },
  expiresAt: 1_900_000_000,
};

const utf8 = (s) => new TextEncoder().encode(s);
const message = (seq) => ({ seq, sender: 'bob', kind: 'chat', body: utf8(`m${seq}`) });
const batch = (room, tick, seqs, extra = {}) => ({
  type: 'Batch', room, tick, messages: seqs.map(message),
  counters: { likes: 0, gifts: [] }, pinned: [], online: 2, missed: 0, epoch: 1, ...extra,
});

/** Length-prefixed ClientFrames out of what the client writes. */
class ClientFrameSplitter {
  #buf = new Uint8Array(0);

  push(chunk) {
    const joined = new Uint8Array(this.#buf.length + chunk.length);
    joined.set(this.#buf);
    joined.set(chunk, this.#buf.length);
    const frames = [];
    let at = 0;
    while (joined.length - at >= 4) {
      const len = new DataView(joined.buffer, at).getUint32(0);
      if (joined.length - at - 4 < len) break;
      frames.push(decodeClientFrame(joined.subarray(at + 4, at + 4 + len)));
      at += 4 + len;
    }
    this.#buf = joined.slice(at);
    return frames;
  }
}

/**
 * One session as the browser's WebTransport shows it, with the edge's side
 * scripted by `handle(session, frame)` for every ClientFrame it reads.
 */
class FakeSession {
  received = [];
  rooms = new Map();
  closedBy = null;
  #handle;
  #control = null;
  #uni;
  #streams = [];
  #resolveClosed;
  #rejectClosed;
  #over = false;

  constructor(url, options, handle, { refuse = false } = {}) {
    this.url = url;
    this.options = options;
    this.#handle = handle;
    this.closed = new Promise((resolve, reject) => {
      this.#resolveClosed = resolve;
      this.#rejectClosed = reject;
    });
    this.incomingUnidirectionalStreams = new ReadableStream({ start: (c) => { this.#uni = c; } });
    if (refuse) {
      this.ready = Promise.reject(new Error('net::ERR_CONNECTION_REFUSED'));
      this.ready.catch(() => {});
      this.#end(() => this.#rejectClosed(new Error('net::ERR_CONNECTION_REFUSED')));
    } else {
      this.ready = Promise.resolve();
    }
  }

  async createBidirectionalStream() {
    const splitter = new ClientFrameSplitter();
    const readable = new ReadableStream({ start: (c) => { this.#control = c; } });
    this.#streams.push(this.#control);
    const writable = new WritableStream({
      write: (chunk) => {
        if (this.#over) throw new Error('the session is closed');
        for (const frame of splitter.push(chunk)) {
          this.received.push(frame);
          this.#handle(this, frame);
        }
      },
    });
    return { readable, writable };
  }

  close(info = {}) {
    if (this.#over) return;
    this.closedBy = { closeCode: info.closeCode ?? 0, reason: info.reason ?? '' };
    this.#end(() => this.#resolveClosed(this.closedBy));
  }

  // The edge's side.

  send(frame) {
    if (!this.#over) this.#control.enqueue(encodeEdgeFrame(frame));
  }

  sendBytes(bytes) {
    this.#control.enqueue(bytes);
  }

  /** Opens a room's stream, Joined first; `rooms` keeps what writes the rest. */
  openRoom(joined) {
    let stream;
    const readable = new ReadableStream({ start: (c) => { stream = c; } });
    this.#streams.push(stream);
    stream.enqueue(encodeEdgeFrame({ type: 'Joined', online: 1, recent: [], epoch: 1, resumed: { kind: 'Fresh' }, ...joined }));
    this.#uni.enqueue(readable);
    const room = {
      batch: (b) => stream.enqueue(encodeEdgeFrame(b)),
      end: () => stream.close(),
    };
    this.rooms.set(joined.room, room);
    return room;
  }

  /** The edge closes the session with a code; `streamsFirst` errors the streams before `closed` settles. */
  closeWith(closeCode, reason, { streamsFirst = false } = {}) {
    const settle = () => this.#resolveClosed({ closeCode, reason });
    if (streamsFirst) this.#end(() => setTimeout(settle, 5));
    else this.#end(settle);
  }

  /** The network goes away. */
  drop() {
    this.#end(() => this.#rejectClosed(new Error('connection lost')));
  }

  #end(settle) {
    this.#over = true;
    settle();
    const gone = new Error('the session is gone');
    for (const c of [...this.#streams, this.#uni]) {
      try {
        c.error(gone);
      } catch {
        // Already closed.
      }
    }
  }
}

/** A WebTransport constructor whose sessions are all served by `handle`; `sessions` lists them. */
function fakeWebTransport(handle = edge(), { refuse = () => false } = {}) {
  const sessions = [];
  class FakeWebTransport extends FakeSession {
    constructor(url, options) {
      super(url, options, handle, { refuse: refuse(sessions.length) });
      sessions.push(this);
    }
  }
  return { WebTransport: FakeWebTransport, sessions };
}

/**
 * A well-behaved edge: Welcome for the token 'good', TokenExpired for any
 * other; joins answered by a stream; sends acked with increasing seqs;
 * pings, presence and refresh answered. `on[type]` replaces the answer to
 * one frame type.
 */
function edge({ on = {} } = {}) {
  let seq = 100;
  return (session, frame) => {
    if (on[frame.type]) {
      on[frame.type](session, frame);
      return;
    }
    switch (frame.type) {
      case 'Hello':
        if (frame.token === 'good') {
          session.send(WELCOME);
        } else {
          session.send({ type: 'Error', code: ErrorCode.TokenExpired, text: 'token expired' });
          session.closeWith(ErrorCode.TokenExpired, 'token expired');
        }
        break;
      case 'Join':
        session.openRoom({ room: frame.room });
        break;
      case 'Leave':
        session.rooms.get(frame.room)?.end();
        break;
      case 'Send':
        session.send({ type: 'Ack', clientMsgId: frame.clientMsgId, seq: ++seq, epoch: 1 });
        break;
      case 'Ping':
        session.send({ type: 'Pong', nonce: frame.nonce });
        break;
      case 'Presence':
        session.send({ type: 'Presence', queryId: frame.queryId, online: frame.users.map((u) => u.startsWith('a')) });
        break;
      case 'Refresh':
        session.send({ type: 'Refreshed', expiresAt: WELCOME.expiresAt + 3600 });
        break;
      default:
    }
  };
}

async function connected(handle, options = {}) {
  const fake = fakeWebTransport(handle);
  const client = await ThrongClient.connect({ url: 'https://edge.test:4433/throng', token: 'good', WebTransport: fake.WebTransport, ...options });
  return { client, session: fake.sessions[0], fake };
}

function throngError(code, where) {
  return (e) => {
    assert.ok(e instanceof ThrongError, `expected a ThrongError, got ${e}`);
    assert.equal(e.code, code, e.message);
    if (where) assert.equal(e.where, where);
    return true;
  };
}

/** Polls `condition` until it holds (the fake answers asynchronously). */
async function until(condition, what, ms = 5000) {
  const deadline = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

// -------------------------------------------------------------- client --

test('connect says Hello and resolves with the Welcome', async () => {
  const hash = Buffer.alloc(32, 7);
  const { client, session } = await connected(edge(), { certHashes: hash.toString('base64') });
  assert.deepEqual(session.received, [{ type: 'Hello', token: 'good' }]);
  assert.equal(session.url, 'https://edge.test:4433/throng');
  assert.deepEqual(session.options.serverCertificateHashes, [{ algorithm: 'sha-256', value: new Uint8Array(hash) }]);
  assert.deepEqual(client.session, WELCOME.session);
  assert.deepEqual(client.limits, WELCOME.limits);
  assert.equal(client.expiresAt, WELCOME.expiresAt);
  client.close();
  assert.deepEqual(await client.closed, { code: 0, codeName: 'Closed', reason: 'closed by the client', fatal: false });
  assert.deepEqual(session.closedBy, { closeCode: 0, reason: 'closed by the client' });
});

test('certificate hashes may be hex, base64url or bytes, and must be SHA-256 sized', async () => {
  const hash = Buffer.alloc(32, 0xfb);
  for (const given of [hash.toString('hex'), hash.toString('base64url'), [new Uint8Array(hash)]]) {
    const { client, session } = await connected(edge(), { certHashes: given });
    assert.deepEqual(session.options.serverCertificateHashes[0].value, new Uint8Array(hash));
    client.close();
  }
  await assert.rejects(connected(edge(), { certHashes: 'AAAA' }), /32 bytes/);
  await assert.rejects(connected(edge(), { certHashes: '!!' }), /neither hex nor base64/);
});

test('a refused token rejects connect with the edge\'s code', async () => {
  const fake = fakeWebTransport();
  await assert.rejects(
    ThrongClient.connect({ url: 'https://edge.test/throng', token: 'stale', WebTransport: fake.WebTransport }),
    (e) => {
      throngError(ErrorCode.TokenExpired, 'connect')(e);
      assert.equal(e.codeName, 'TokenExpired');
      assert.equal(e.fatal, true);
      assert.equal(e.reason, 'token expired');
      return true;
    },
  );
});

test('a close code alone tells why the session ended at connect', async () => {
  const handle = edge({ on: { Hello: (s) => s.closeWith(ErrorCode.ServerBusy, 'at capacity', { streamsFirst: true }) } });
  await assert.rejects(connected(handle), (e) => throngError(ErrorCode.ServerBusy, 'connect')(e) && e.reason === 'at capacity');
});

test('transport failures reject connect with code 0 ConnectFailed', async () => {
  const refused = fakeWebTransport(edge(), { refuse: () => true });
  await assert.rejects(
    ThrongClient.connect({ url: 'https://edge.test/throng', token: 'good', WebTransport: refused.WebTransport }),
    (e) => throngError(0, 'connect')(e) && e.codeName === 'ConnectFailed' && /ERR_CONNECTION_REFUSED/.test(e.message),
  );
  const silent = fakeWebTransport(edge({ on: { Hello: () => {} } }));
  await assert.rejects(
    ThrongClient.connect({ url: 'https://edge.test/throng', token: 'good', WebTransport: silent.WebTransport, connectTimeoutMs: 30 }),
    (e) => throngError(0, 'connect')(e) && /no Welcome .* within 30 ms/.test(e.message),
  );
  assert.ok(silent.sessions[0].closedBy, 'the timed-out session was closed');
  await assert.rejects(ThrongClient.connect({ url: 'https://x/', token: 't', WebTransport: undefined }), /no WebTransport/);
  class Throws {
    constructor() {
      throw new SyntaxError('bad URL');
    }
  }
  await assert.rejects(ThrongClient.connect({ url: 'nope', token: 't', WebTransport: Throws }), (e) => throngError(0, 'connect')(e) && /bad URL/.test(e.message));
});

test('join resolves with the room once its stream delivers Joined; batches come as events and through for await', async () => {
  const { client, session } = await connected(
    edge({
      on: {
        Join(s, f) {
          const room = s.openRoom({ room: f.room, online: 5, recent: [message(1), message(2)] });
          // Sent at once with Joined: listeners added right after join() still see them.
          room.batch(batch(f.room, 1, [3]));
          room.batch(batch(f.room, 2, [4, 5]));
        },
      },
    }),
  );
  const room = await client.join('lobby', { resumeFrom: 0 });
  const events = [];
  room.addEventListener('batch', (e) => events.push(e.detail.tick));
  assert.ok(room instanceof Room);
  assert.deepEqual(session.received[1], { type: 'Join', room: 'lobby', resumeFrom: 0, epoch: 0 });
  assert.equal(room.room, 'lobby');
  assert.equal(room.online, 5);
  assert.deepEqual(room.recent.map((m) => m.seq), [1, 2]);
  assert.deepEqual(room.recent[0].body, utf8('m1'));
  const ticks = [];
  for await (const b of room) {
    ticks.push(b.tick);
    assert.equal(b.room, 'lobby');
    if (ticks.length === 2) session.rooms.get('lobby').batch(batch('lobby', 3, [6], { online: 9 }));
    if (ticks.length === 3) client.leave('lobby');
  }
  assert.deepEqual(ticks, [1, 2, 3]);
  assert.deepEqual(events, [1, 2, 3]);
  assert.equal(room.online, 9);
  assert.equal(await room.ended, null);
  assert.deepEqual(session.received.at(-1), { type: 'Leave', room: 'lobby' });
  client.close();
});

test('joins are matched to their streams by room, in whatever order the streams come', async () => {
  const pending = [];
  const { client } = await connected(
    edge({
      on: {
        Join(s, f) {
          pending.push(f.room);
          if (pending.length === 2) for (const room of pending.reverse()) s.openRoom({ room, online: room.length });
        },
      },
    }),
  );
  const [a, bb] = await Promise.all([client.join('a'), client.join('bb')]);
  assert.equal(a.room, 'a');
  assert.equal(a.online, 1);
  assert.equal(bb.room, 'bb');
  assert.equal(bb.online, 2);
  await assert.rejects(Promise.all([client.join('c'), client.join('c')]), /already under way/);
  client.close();
});

test('a refused join rejects with the edge\'s code and the room', async () => {
  const { client } = await connected(
    edge({ on: { Join: (s, f) => s.send({ type: 'JoinRefused', room: f.room, code: ErrorCode.Forbidden, text: 'not for you' }) } }),
  );
  await assert.rejects(client.join('vip'), (e) => {
    throngError(ErrorCode.Forbidden, 'join')(e);
    assert.equal(e.room, 'vip');
    assert.equal(e.fatal, false);
    return true;
  });
  assert.ok(await client.ping() >= 0, 'the session goes on');
  client.close();
});

test('send resolves with the Ack, rejects on Rejected; ids count from 1', async () => {
  const { client, session } = await connected(
    edge({
      on: {
        Send(s, f) {
          if (f.kind === 'host') s.send({ type: 'Rejected', clientMsgId: f.clientMsgId, code: ErrorCode.Forbidden, reason: 'viewers cannot' });
          else s.send({ type: 'Ack', clientMsgId: f.clientMsgId, seq: 40 + f.clientMsgId, epoch: 3 });
        },
      },
    }),
  );
  assert.deepEqual(await client.send('lobby', 'chat', 'héllo'), { clientMsgId: 1, seq: 41, epoch: 3 });
  assert.deepEqual(session.received[1], { type: 'Send', room: 'lobby', kind: 'chat', body: utf8('héllo'), clientMsgId: 1 });
  const [two, three] = await Promise.all([client.send('lobby', 'like', new Uint8Array([1])), client.send('lobby', 'gift', new ArrayBuffer(2))]);
  assert.deepEqual([two, three], [{ clientMsgId: 2, seq: 42, epoch: 3 }, { clientMsgId: 3, seq: 43, epoch: 3 }]);
  await assert.rejects(client.send('lobby', 'host', 'hi'), (e) => {
    throngError(ErrorCode.Forbidden, 'send')(e);
    assert.equal(e.clientMsgId, 4);
    assert.equal(e.reason, 'viewers cannot');
    return true;
  });
  // Bodies over maxBodyBytes are the edge's to refuse; only the frame limit is checked here.
  await client.send('lobby', 'chat', new Uint8Array(WELCOME.limits.maxBodyBytes + 1));
  await assert.rejects(client.send('lobby', 'chat', new Uint8Array(WELCOME.limits.maxFrameBytes)), (e) => e.codeName === 'FrameTooLarge' && e.where === 'encode');
  await assert.rejects(client.send('lobby', 'shout', 'x'), TypeError);
  client.close();
});

test('ping, presence and refresh are answered', async () => {
  const { client, session } = await connected(edge());
  assert.equal(typeof await client.ping(), 'number');
  assert.deepEqual(await client.presence(['alice', 'bob', 'anna']), [true, false, true]);
  assert.equal(await client.refresh('newer'), WELCOME.expiresAt + 3600);
  assert.equal(client.expiresAt, WELCOME.expiresAt + 3600);
  client.seen('lobby', 12);
  await until(() => session.received.length === 5, 'Seen');
  assert.deepEqual(session.received.slice(1), [
    { type: 'Ping', nonce: 1 },
    { type: 'Presence', queryId: 2, users: ['alice', 'bob', 'anna'] },
    { type: 'Refresh', token: 'newer' },
    { type: 'Seen', room: 'lobby', seq: 12 },
  ]);
  client.close();
});

test('refused presence and refresh reject without ending the session', async () => {
  const { client } = await connected(
    edge({
      on: {
        Presence: (s, f) => s.send({ type: 'PresenceRefused', queryId: f.queryId, code: ErrorCode.QueryTooLarge, text: 'too many' }),
        Refresh: (s) => s.send({ type: 'RefreshRefused', code: ErrorCode.TokenInvalid, text: 'bad signature' }),
      },
    }),
  );
  await assert.rejects(client.presence(['a']), (e) => throngError(ErrorCode.QueryTooLarge, 'presence')(e) && !e.fatal);
  await assert.rejects(client.refresh('forged'), (e) => throngError(ErrorCode.TokenInvalid, 'refresh')(e) && !e.fatal);
  assert.equal(client.expiresAt, WELCOME.expiresAt);
  await client.ping();
  client.close();
});

test('a non-fatal Error frame is an error event, not the end', async () => {
  const { client } = await connected(
    edge({ on: { Leave: (s) => s.send({ type: 'Error', code: ErrorCode.NotJoined, text: 'not in that room' }) } }),
  );
  const event = once(client, 'error');
  client.leave('elsewhere');
  const [{ detail }] = await event;
  throngError(ErrorCode.NotJoined, 'session')(detail);
  assert.equal(detail.fatal, false);
  await client.ping();
  client.close();
});

test('a fatal Error frame ends the session: pending calls, rooms and closed all say why', async () => {
  const { client, session } = await connected(edge({ on: { Send: () => {} } }));
  const room = await client.join('lobby');
  const pending = client.send('lobby', 'chat', 'never acked');
  await until(() => session.received.length === 3, 'the Send');
  const closeEvent = once(client, 'close');
  session.send({ type: 'Error', code: ErrorCode.TokenExpired, text: 'token expired at 12:00' });
  session.closeWith(ErrorCode.TokenExpired, 'token expired at 12:00');
  await assert.rejects(pending, (e) => throngError(ErrorCode.TokenExpired, 'session')(e) && e.fatal);
  const expected = { code: 11, codeName: 'TokenExpired', reason: 'token expired at 12:00', fatal: true };
  assert.deepEqual(await client.closed, expected);
  assert.deepEqual((await closeEvent)[0].detail, expected);
  throngError(ErrorCode.TokenExpired)(await room.ended);
  await assert.rejects(async () => {
    for await (const b of room) assert.fail(`unexpected batch ${b.tick}`);
  }, throngError(ErrorCode.TokenExpired));
  await assert.rejects(client.ping(), throngError(ErrorCode.TokenExpired));
});

test('the close code survives streams that break before closed settles', async () => {
  const { client, session } = await connected(edge());
  const room = await client.join('lobby');
  session.closeWith(ErrorCode.ShuttingDown, 'restarting', { streamsFirst: true });
  assert.deepEqual(await client.closed, { code: 41, codeName: 'ShuttingDown', reason: 'restarting', fatal: true });
  throngError(ErrorCode.ShuttingDown)(await room.ended);
});

test('a lost connection is code 0', async () => {
  const { client, session } = await connected(edge());
  session.drop();
  const info = await client.closed;
  assert.equal(info.code, 0);
  assert.equal(info.codeName, 'ConnectFailed');
  assert.match(info.reason, /connection lost/);
});

test('an edge that breaks the protocol is closed with the matching code', async () => {
  const { client, session } = await connected(edge({ on: { Ping: (s) => s.send(batch('lobby', 1, [])) } }));
  await assert.rejects(client.ping(), throngError(ErrorCode.UnexpectedFrame));
  assert.equal(session.closedBy.closeCode, ErrorCode.UnexpectedFrame);

  const garbled = await connected(edge({ on: { Ping: (s) => s.sendBytes(new Uint8Array([0, 0, 0, 1, 42])) } }));
  await assert.rejects(garbled.client.ping(), (e) => throngError(ErrorCode.Malformed, 'decode')(e) && /unknown EdgeFrame variant 42/.test(e.message));
  assert.equal(garbled.session.closedBy.closeCode, ErrorCode.Malformed);
});

test('a slow iterator gets the newest batches, the first counting what it missed', async () => {
  const { client, session } = await connected(edge());
  const room = await client.join('lobby', { buffer: 2 });
  let seen = 0;
  room.addEventListener('batch', () => { seen += 1; });
  for (let tick = 1; tick <= 5; tick++) session.rooms.get('lobby').batch(batch('lobby', tick, [tick], { missed: tick === 2 ? 4 : 0 }));
  await until(() => seen === 5, 'five batch events');
  client.leave('lobby');
  const got = [];
  for await (const b of room) got.push([b.tick, b.missed]);
  // Ticks 1 to 3 were dropped, and tick 2 had missed 4 before it: 1 + (1 + 4) + 1.
  assert.deepEqual(got, [[4, 7], [5, 0]]);
  assert.equal(await room.ended, null);
  client.close();
});

test('a room joined with buffer 0 is for events only', async () => {
  const { client } = await connected(edge());
  const room = await client.join('lobby', { buffer: 0 });
  await assert.rejects(async () => {
    for await (const b of room) assert.fail(`unexpected batch ${b.tick}`);
  }, /buffer: 0/);
  client.close();
});

// ------------------------------------------------------------ resuming --

/** Collects a ResumingRoom's events. */
function watch(resuming) {
  const seen = { seqs: [], batches: [], statuses: [], errors: [] };
  resuming.addEventListener('batch', (e) => {
    seen.batches.push(e.detail);
    seen.seqs.push(...e.detail.messages.map((m) => m.seq));
  });
  resuming.addEventListener('status', (e) => seen.statuses.push(e.detail));
  resuming.addEventListener('error', (e) => seen.errors.push(e.detail));
  return seen;
}

test('ResumingRoom reconnects after a drop, resumes after the last seq and never repeats a message', async () => {
  // The edge's ring holds seqs up to `head`; a join replays what follows resumeFrom.
  let head = 5;
  const ring = (room, resumeFrom) => Array.from({ length: head }, (_, i) => i + 1).filter((s) => s > (resumeFrom ?? 2));
  const fake = fakeWebTransport(edge({
    on: {
      Join(s, f) {
        s.openRoom({ room: f.room, online: 3, recent: ring(f.room, f.resumeFrom).map(message) });
      },
    },
  }));
  const hashes = [Buffer.alloc(32, 1), Buffer.alloc(32, 2)];
  let calls = 0;
  const resuming = new ResumingRoom({
    getOptions: async () => ({ url: 'https://edge.test/throng', token: 'good', certHashes: hashes[calls++ % 2].toString('base64'), WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  const seen = watch(resuming);
  assert.equal(resuming.status, 'idle');
  resuming.start();
  await until(() => seen.seqs.length === 3, 'the first recent messages');
  assert.deepEqual(seen.seqs, [3, 4, 5]);
  assert.equal(seen.batches[0].tick, 0);
  assert.equal(seen.batches[0].online, 3);
  assert.equal(resuming.lastSeq, 5);
  assert.ok(resuming.client instanceof ThrongClient);

  const first = fake.sessions[0];
  first.rooms.get('lobby').batch(batch('lobby', 7, [5, 6])); // 5 again: not handed out twice
  await until(() => resuming.lastSeq === 6, 'seq 6');
  assert.deepEqual(await resuming.send('chat', 'hi'), { clientMsgId: 1, seq: 101, epoch: 1 });

  head = 9; // what was said while the connection was down
  first.drop();
  await until(() => fake.sessions.length === 2 && fake.sessions[1].rooms.has('lobby'), 'the rejoin');
  const second = fake.sessions[1];
  assert.deepEqual(second.received[1], { type: 'Join', room: 'lobby', resumeFrom: 6, epoch: 1 });
  assert.deepEqual(second.options.serverCertificateHashes[0].value, new Uint8Array(hashes[1]), 'options fetched again');
  second.rooms.get('lobby').batch(batch('lobby', 20, [9, 10]));
  await until(() => resuming.lastSeq === 10, 'seq 10');

  assert.deepEqual(seen.seqs, [3, 4, 5, 6, 7, 8, 9, 10]);
  assert.deepEqual(seen.batches.map((b) => b.tick), [0, 7, 0, 20]);
  assert.deepEqual(seen.statuses, ['connecting', 'live', 'reconnecting', 'live']);
  assert.equal(resuming.reconnects, 1);
  assert.deepEqual(seen.errors, []);
  resuming.stop();
  assert.equal(resuming.status, 'closed');
  assert.equal(resuming.client, null);
  await assert.rejects(resuming.send('chat', 'late'), (e) => throngError(0, 'send')(e) && /not connected/.test(e.message));
});

test('ResumingRoom says when the room\'s numbering changed, and hands out the new numbering\'s messages', async () => {
  // The first edge numbers in epoch 1 up to 50; after its restart the room is
  // epoch 2 and numbers on above (from 1000): the viewer is told of the gap
  // between, before the new numbering's messages.
  const fake = fakeWebTransport(edge({
    on: {
      Join(s, f) {
        if (fake.sessions.length === 1) {
          s.openRoom({ room: f.room, online: 1, epoch: 1, recent: [message(49), message(50)] });
        } else {
          s.openRoom({
            room: f.room, online: 1, epoch: 2, resumed: { kind: 'NewEpoch', previous: f.epoch },
            recent: [message(1000), message(1001)],
          });
        }
      },
    },
  }));
  const resuming = new ResumingRoom({
    getOptions: async () => ({ url: 'https://edge.test/throng', token: 'good', certHashes: Buffer.alloc(32, 1).toString('base64'), WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  const seen = watch(resuming);
  const gaps = [];
  resuming.addEventListener('gap', (e) => gaps.push({ ...e.detail, seqsBefore: seen.seqs.length }));
  resuming.start();
  await until(() => seen.seqs.length === 2, 'the first recent messages');
  assert.equal(resuming.epoch, 1);
  fake.sessions[0].drop();
  await until(() => seen.seqs.length === 4, 'the new numbering\'s messages');
  assert.deepEqual(seen.seqs, [49, 50, 1000, 1001]);
  assert.deepEqual(fake.sessions[1].received[1], { type: 'Join', room: 'lobby', resumeFrom: 50, epoch: 1 });
  assert.deepEqual(gaps, [{ kind: 'NewEpoch', fromEpoch: 1, toEpoch: 2, afterSeq: 50, seqsBefore: 2 }]);
  assert.equal(resuming.gaps, 1);
  assert.equal(resuming.epoch, 2);
  assert.equal(resuming.lastSeq, 1001);
  // A batch of yet another numbering mid-stream (another edge took over) is
  // a gap too; what it repeats of the old numbering is not handed out twice.
  fake.sessions[1].rooms.get('lobby').batch(batch('lobby', 9, [1001, 2000], { epoch: 3 }));
  await until(() => seen.seqs.length === 5, 'the takeover\'s batch');
  assert.equal(gaps.length, 2);
  assert.deepEqual({ ...gaps[1], seqsBefore: undefined }, { kind: 'NewEpoch', fromEpoch: 2, toEpoch: 3, afterSeq: 1001, seqsBefore: undefined });
  assert.deepEqual(seen.seqs, [49, 50, 1000, 1001, 2000]);
  resuming.stop();
});

test('ResumingRoom reconnects after ShuttingDown and ServerBusy, backing off', async () => {
  const fake = fakeWebTransport(edge({
    on: {
      Hello(s) {
        // The second attempt finds the edge at capacity.
        if (fake.sessions.length === 2) s.closeWith(ErrorCode.ServerBusy, 'at capacity');
        else s.send(WELCOME);
      },
    },
  }));
  const resuming = new ResumingRoom({
    getOptions: () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  const seen = watch(resuming);
  resuming.start();
  await until(() => resuming.status === 'live', 'live');
  fake.sessions[0].closeWith(ErrorCode.ShuttingDown, 'bye');
  await until(() => fake.sessions.length === 3 && resuming.status === 'live', 'live again');
  assert.equal(resuming.reconnects, 1);
  assert.deepEqual(seen.statuses, ['connecting', 'live', 'reconnecting', 'live']);
  resuming.stop();
});

test('ResumingRoom stops for good on a code that reconnecting cannot fix', async () => {
  const fake = fakeWebTransport(edge());
  const resuming = new ResumingRoom({
    getOptions: async () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  const seen = watch(resuming);
  resuming.start();
  await until(() => resuming.status === 'live', 'live');
  fake.sessions[0].send({ type: 'Error', code: ErrorCode.Disconnected, text: 'banned by the tenant' });
  fake.sessions[0].closeWith(ErrorCode.Disconnected, 'banned by the tenant');
  await until(() => resuming.status === 'closed', 'closed');
  await sleep(30);
  assert.equal(fake.sessions.length, 1, 'no reconnect');
  assert.equal(seen.errors.length, 1);
  throngError(ErrorCode.Disconnected)(seen.errors[0]);
  assert.deepEqual(seen.statuses, ['connecting', 'live', 'closed']);
});

test('ResumingRoom stops on a refused token and on a refused join', async () => {
  for (const [handle, code] of [
    [edge({ on: { Hello: (s) => s.send({ type: 'Error', code: ErrorCode.TokenInvalid, text: 'bad signature' }) } }), ErrorCode.TokenInvalid],
    [edge({ on: { Join: (s, f) => s.send({ type: 'JoinRefused', room: f.room, code: ErrorCode.Forbidden, text: 'no' }) } }), ErrorCode.Forbidden],
  ]) {
    const fake = fakeWebTransport(handle);
    const resuming = new ResumingRoom({
      getOptions: async () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
      room: 'lobby',
    });
    const seen = watch(resuming);
    resuming.start();
    await until(() => resuming.status === 'closed', 'closed');
    throngError(code)(seen.errors[0]);
    assert.equal(fake.sessions.length, 1);
  }
});

test('ResumingRoom gives up when the edge stays unreachable, getOptions failures included', async () => {
  const fake = fakeWebTransport(edge(), { refuse: () => true });
  let calls = 0;
  const resuming = new ResumingRoom({
    getOptions: async () => {
      calls += 1;
      if (calls === 2) throw new Error('fetch failed');
      return { url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport };
    },
    room: 'lobby',
    firstBackoffMs: 2,
    maxBackoffMs: 8,
    giveUpAfterMs: 500,
  });
  const seen = watch(resuming);
  const started = Date.now();
  resuming.start();
  await until(() => resuming.status === 'closed', 'giving up');
  assert.ok(Date.now() - started >= 500);
  assert.ok(calls >= 3, `tried ${calls} times`);
  assert.deepEqual(seen.statuses, ['connecting', 'reconnecting', 'closed']);
  throngError(0, 'connect')(seen.errors[0]);
});

test('ResumingRoom.stop ends a live room and a pending reconnect', async () => {
  const fake = fakeWebTransport(edge());
  const resuming = new ResumingRoom({
    getOptions: () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 10_000,
  });
  resuming.start();
  await until(() => resuming.status === 'live', 'live');
  const client = resuming.client;
  fake.sessions[0].drop();
  await until(() => resuming.status === 'reconnecting', 'reconnecting');
  resuming.stop();
  assert.equal(resuming.status, 'closed');
  assert.equal((await client.closed).code, 0);
  await sleep(20);
  assert.equal(fake.sessions.length, 1);
  assert.throws(() => resuming.start(), /already/);
});

test('ResumingRoom rejoins when the edge ends the room\'s stream by itself', async () => {
  const fake = fakeWebTransport(edge());
  const resuming = new ResumingRoom({
    getOptions: () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  resuming.start();
  await until(() => resuming.status === 'live', 'live');
  fake.sessions[0].rooms.get('lobby').end();
  await until(() => fake.sessions.length === 2 && resuming.status === 'live', 'live on a new connection');
  assert.equal(resuming.reconnects, 1);
  assert.ok(fake.sessions[0].closedBy, 'the old connection was closed');
  resuming.stop();
});

test('ResumingRoom stops when the application closes its client', async () => {
  const fake = fakeWebTransport(edge());
  const resuming = new ResumingRoom({
    getOptions: () => ({ url: 'https://edge.test/throng', token: 'good', WebTransport: fake.WebTransport }),
    room: 'lobby',
    firstBackoffMs: 5,
  });
  const seen = watch(resuming);
  resuming.start();
  await until(() => resuming.status === 'live', 'live');
  resuming.client.close();
  await until(() => resuming.status === 'closed', 'closed');
  assert.equal(seen.errors[0].codeName, 'Closed');
  assert.equal(fake.sessions.length, 1);
});
