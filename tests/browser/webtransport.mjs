#!/usr/bin/env node
// End to end over WebTransport: starts an edge, opens its demo page
// (/demo) in headless Chromium, and checks what the browser and native
// clients see of the same group room, across an edge restart; then an
// expired token, and the limits the edge enforces on a browser client.
// Prints ONE line of JSON on stdout: {"ok":true,...} (exit 0) or
// {"ok":false,"error":...,"step":...} (exit 1) with the edge's stderr
// tail and the pages' console messages.
//
//   node tests/browser/webtransport.mjs --throng target/release/throng \
//     --config edge-config/dev.toml --data-dir /tmp/dir --screenshot out.png \
//     [--timeout-ms 120000]
//
// The browser is Debian's Chromium: $CHROMIUM or /usr/bin/chromium. Every
// wait is bounded by a deadline; a watchdog ends everything if the driver
// itself hangs, and child processes are killed on any exit.

import { execFile, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: opt } = parseArgs({
  options: {
    throng: { type: 'string' },
    config: { type: 'string' },
    'data-dir': { type: 'string' },
    screenshot: { type: 'string' },
    'timeout-ms': { type: 'string', default: '120000' },
  },
  strict: true,
});

function usage(msg) {
  process.stderr.write(`webtransport.mjs: ${msg}\nusage: node webtransport.mjs --throng BIN --config CFG ` +
    '--data-dir DIR --screenshot OUT.png [--timeout-ms 120000]\n');
  process.exit(2);
}
for (const k of ['throng', 'config', 'data-dir', 'screenshot']) if (!opt[k]) usage(`--${k} is required`);
const timeoutMs = Number(opt['timeout-ms']);
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) usage('--timeout-ms must be a positive number');

const BIN = opt.throng;
const CONFIG = opt.config;
const DATA_DIR = opt['data-dir'];
const ROOM = 'group-demo';
const started = Date.now();
const deadline = started + timeoutMs;

// ---------------------------------------------------------------------------
// What the run saw, for the JSON line.
const out = { steps: [] };
let step = 'init';
let stepStarted = Date.now();
const consoleAll = [];   // every console message of every page, bounded
const consoleErrors = [];
const pageErrors = [];
const edgeStderr = [];   // both edge runs, bounded
const children = new Set();
let context = null;
let mainPage = null;
let finished = false;
const profile = mkdtempSync(join(tmpdir(), 'throng-wt-'));

function setStep(name) {
  const now = Date.now();
  if (step !== 'init') out.steps.push({ step, ms: now - stepStarted });
  step = name;
  stepStarted = now;
}

function pushBounded(arr, item, max) {
  arr.push(item);
  if (arr.length > max) arr.splice(0, arr.length - max);
}

/** Milliseconds left for a wait that wants `ms`, never past the global deadline. */
function bounded(ms) {
  return Math.max(1, Math.min(ms, deadline - Date.now()));
}

class StepError extends Error {
  constructor(message, details) {
    super(message);
    this.details = details;
  }
}

function fail(message, details) {
  throw new StepError(message, details);
}

/** Polls `fn` until it returns a truthy value (returned) or the time is up. */
async function waitFor(what, fn, ms, interval = 25) {
  const limit = bounded(ms);
  const until = Date.now() + limit;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() >= until) fail(`timed out after ${limit} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

// ---------------------------------------------------------------------------
// Child processes.

function spawnProc(name, args, { stderrSink } = {}) {
  const proc = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const p = {
    name, proc, stdout: [], stderr: [], exited: false, exitCode: null, exitSignal: null, spawnError: null,
  };
  p.exit = new Promise((resolve) => {
    proc.on('exit', (code, signal) => {
      p.exited = true;
      p.exitCode = code;
      p.exitSignal = signal;
      children.delete(p);
      resolve();
    });
    proc.on('error', (e) => {
      p.spawnError = String(e.message || e);
      p.exited = true;
      children.delete(p);
      resolve();
    });
  });
  children.add(p);
  createInterface({ input: proc.stdout }).on('line', (l) => p.stdout.push(l));
  createInterface({ input: proc.stderr }).on('line', (l) => {
    pushBounded(p.stderr, l, 400);
    if (stderrSink) pushBounded(stderrSink, l, 400);
  });
  return p;
}

function exitDesc(p) {
  if (p.spawnError) return `cannot start: ${p.spawnError}`;
  return p.exitSignal ? `signal ${p.exitSignal}` : `exit code ${p.exitCode}`;
}

async function stopProc(p, ms = 15000) {
  if (!p || p.exited) return 'exited';
  p.proc.kill('SIGTERM');
  const t = setTimeout(() => { if (!p.exited) p.proc.kill('SIGKILL'); }, Math.max(1, Math.min(ms, deadline - Date.now())));
  await p.exit;
  clearTimeout(t);
  return p.exitSignal === 'SIGKILL' ? 'killed' : 'terminated';
}

function killAll() {
  for (const p of children) {
    try { p.proc.kill('SIGKILL'); } catch { /* gone */ }
  }
}

/** Runs `throng ARGS` to completion; resolves {code, stdout, stderr}. */
function run(args, ms = 30000) {
  return new Promise((resolve) => {
    const child = execFile(BIN, args, { timeout: bounded(ms), killSignal: 'SIGKILL', maxBuffer: 4 << 20 },
      (err, stdout, stderr) => {
        const code = err ? (typeof err.code === 'number' ? err.code : (err.killed ? 'timeout' : String(err.code))) : 0;
        resolve({ code, stdout: String(stdout), stderr: String(stderr) });
      });
    const entry = { name: `throng ${args[0]}`, proc: child, exited: false };
    children.add(entry);
    child.on('exit', () => children.delete(entry));
  });
}

// ---------------------------------------------------------------------------
// The edge.

const READY_KEYS = ['quic', 'cert', 'webtransport', 'cert_sha256', 'demo'];

/** `throng ready k=v k=v ...` → {k: v}; a value may hold spaces (a path). */
function parseReady(line) {
  const rest = line.slice('throng ready '.length);
  const starts = [];
  const re = /(?:^| )([a-z0-9_]+)=/g;
  let m;
  while ((m = re.exec(rest))) starts.push({ key: m[1], at: m.index + m[0].length, from: m.index });
  const fields = {};
  starts.forEach((s, i) => {
    fields[s.key] = rest.slice(s.at, i + 1 < starts.length ? starts[i + 1].from : rest.length);
  });
  return fields;
}

async function startEdge(listen, admin) {
  const edge = spawnProc('edge', ['serve', '--config', CONFIG, '--listen', listen, '--admin', admin,
    '--data-dir', DATA_DIR], { stderrSink: edgeStderr });
  const line = await waitFor('the edge\'s ready line', () => {
    const l = edge.stdout.find((x) => x.startsWith('throng ready '));
    if (l) return l;
    if (edge.exited) fail(`the edge stopped (${exitDesc(edge)}) before its ready line`);
    return null;
  }, 60000, 20);
  const ready = parseReady(line);
  const missing = READY_KEYS.filter((k) => !ready[k]);
  if (missing.length) fail(`the ready line lacks ${missing.join(', ')}: ${line}`);
  ready.admin = new URL(ready.demo).host;
  return { edge, ready, line };
}

async function mint(user, role, extra = []) {
  const r = await run(['token', '--config', CONFIG, '--tenant', 'dev', '--user', user, '--role', role, ...extra]);
  const token = r.stdout.trim();
  if (r.code !== 0 || !token) fail(`throng token --user ${user} ${extra.join(' ')} failed (${r.code}): ${r.stderr.trim()}`);
  return token;
}

async function nativeSend(ready, token, text) {
  const r = await run(['client', '--server', ready.quic, '--cert', ready.cert, '--token', token,
    'send', ROOM, text], 30000);
  const m = /ack id=\d+ seq=(\d+)/.exec(r.stdout);
  if (r.code !== 0 || !m) {
    fail(`native send of ${JSON.stringify(text)} failed (${r.code}): ${(r.stdout + r.stderr).trim().slice(-800)}`);
  }
  return { body: text, seq: Number(m[1]) };
}

function listenerMessages(listener) {
  const msgs = [];
  for (const l of listener.stdout) {
    let o;
    try { o = JSON.parse(l); } catch { continue; }
    if (o && o.type === 'message' && (o.room === undefined || o.room === ROOM)) {
      msgs.push({ seq: Number(o.seq), sender: o.sender, kind: o.kind, body: o.body, recent: !!o.recent });
    }
  }
  return msgs;
}

// ---------------------------------------------------------------------------
// The pages.

function watchPage(page, label) {
  page.on('console', (msg) => {
    const loc = msg.location();
    const text = `[${label}] ${msg.type()}: ${msg.text()}` + (loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : '');
    pushBounded(consoleAll, text, 300);
    if (msg.type() === 'error') pushBounded(consoleErrors, text, 200);
  });
  page.on('pageerror', (err) => pushBounded(pageErrors, `[${label}] ${err.message}`, 100));
  page.on('crash', () => pushBounded(pageErrors, `[${label}] the page crashed`, 100));
}

/** What a demo page shows, read from its DOM. */
function readPageDom() {
  const t = (id) => document.getElementById(id)?.textContent ?? null;
  const num = (id) => {
    const v = t(id);
    return v === null || v.trim() === '' || Number.isNaN(Number(v)) ? v : Number(v);
  };
  const bodyOf = (li) => (li.querySelector('.body') ?? li).textContent;
  return {
    status: t('status'),
    error_code: t('error-code'),
    last_seq: num('last-seq'),
    reconnects: num('reconnects'),
    missed: num('missed'),
    likes: num('likes'),
    gifts: num('gifts'),
    online: num('online'),
    rate: num('rate'),
    send_result: t('send-result'),
    pinned: [...document.querySelectorAll('#pinned li')].map((li) => ({ seq: Number(li.dataset.seq), body: bodyOf(li) })),
    messages: [...document.querySelectorAll('#messages li')].map((li) => ({
      seq: Number(li.dataset.seq), sender: li.dataset.sender, kind: li.dataset.kind, body: bodyOf(li),
    })),
  };
}

async function readPage(page) {
  return page.evaluate(readPageDom);
}

async function statusOf(page) {
  try {
    return await page.evaluate(() => document.getElementById('status')?.textContent ?? null);
  } catch (e) {
    return `(cannot read: ${e.message})`;
  }
}

/** page.waitForFunction with a deadline and a readable failure. */
async function pageWait(page, what, fn, arg, ms) {
  const limit = bounded(ms);
  try {
    await page.waitForFunction(fn, arg, { timeout: limit, polling: 50 });
  } catch (e) {
    if (e && e.name === 'TimeoutError') {
      fail(`timed out after ${limit} ms waiting for the page: ${what}; #status is ${JSON.stringify(await statusOf(page))}`);
    }
    throw e;
  }
}

/** In the page: does #messages hold an item for each of these seqs? */
function pageHasSeqs(want) {
  const shown = new Set([...document.querySelectorAll('#messages li')].map((li) => Number(li.dataset.seq)));
  return want.every((s) => shown.has(s));
}

/**
 * Checks that the page shows each sent {body, seq} exactly once, with that
 * body, in the order sent. Messages are matched by the seq the edge acked, so
 * what an earlier run left in a reused data dir cannot be mistaken for them.
 */
function checkShown(shown, sent, what) {
  let lastIndex = -1;
  for (const s of sent) {
    const at = shown.map((m, i) => (m.seq === s.seq ? i : -1)).filter((i) => i >= 0);
    if (at.length !== 1) fail(`${what}: the page shows seq ${s.seq} (${s.body}) ${at.length} times`, { shown });
    const m = shown[at[0]];
    if (m.body !== s.body) fail(`${what}: the page shows seq ${s.seq} as ${JSON.stringify(m.body)}, not ${JSON.stringify(s.body)}`, { shown });
    if (at[0] <= lastIndex) fail(`${what}: the page shows ${s.body} out of order`, { shown });
    lastIndex = at[0];
  }
}

// ---------------------------------------------------------------------------
// Browser-side limits, run inside the live demo page.

async function limitsInPage({ token }) {
  const withTimeout = (p, ms, what) => {
    let t;
    return Promise.race([p, new Promise((_, rej) => { t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms); })])
      .finally(() => clearTimeout(t));
  };
  const errInfo = (e) => ({
    code: e?.code ?? null, codeName: e?.codeName ?? null, fatal: e?.fatal ?? null, message: String(e?.message ?? e),
  });
  const m = window.throngDemo?.module;
  if (!m) throw new Error('window.throngDemo.module is not set');
  const cfg = await (await fetch('/demo/config.json', { cache: 'no-store' })).json();
  const res = { config: cfg };
  const certHashes = Array.isArray(cfg.certHashes) && cfg.certHashes.length ? cfg.certHashes : undefined;
  const client = await withTimeout(m.ThrongClient.connect({ url: cfg.url, token, certHashes }),
    15000, 'ThrongClient.connect');
  const L = client.limits;
  res.limits = L;
  try {
    // (a) maxRooms joins, then one more.
    const joined = [];
    for (let i = 0; i < L.maxRooms; i += 1) {
      await withTimeout(client.join(`lim-${i}`), 10000, `join lim-${i}`);
      joined.push(`lim-${i}`);
    }
    let extra;
    try {
      await withTimeout(client.join(`lim-${L.maxRooms}`), 10000, 'the extra join');
      extra = { accepted: true };
    } catch (e) {
      extra = { accepted: false, ...errInfo(e) };
    }
    res.a = { max_rooms: L.maxRooms, joined: joined.length, extra };

    // (c) first, while the send bucket is full: a body one byte over.
    try {
      const ack = await withTimeout(client.send('lim-0', 'chat', new Uint8Array(L.maxBodyBytes + 1).fill(120)),
        10000, 'the oversized body');
      res.c = { body_bytes: L.maxBodyBytes + 1, accepted: true, seq: ack?.seq ?? null };
    } catch (e) {
      res.c = { body_bytes: L.maxBodyBytes + 1, accepted: false, ...errInfo(e) };
    }

    // (b) sendBurst + 20 messages as fast as possible.
    const n = L.sendBurst + 20;
    const enc = new TextEncoder();
    const t0 = performance.now();
    const sends = [];
    for (let i = 0; i < n; i += 1) sends.push(client.send('lim-0', 'chat', enc.encode(`burst-${i}`)));
    const settled = await withTimeout(Promise.allSettled(sends), 20000, 'the burst\'s answers');
    const elapsed = (performance.now() - t0) / 1000;
    const byCode = {};
    let acked = 0;
    for (const s of settled) {
      if (s.status === 'fulfilled') acked += 1;
      else {
        const k = s.reason?.codeName ?? String(s.reason?.message ?? s.reason);
        byCode[k] = (byCode[k] || 0) + 1;
      }
    }
    res.b = {
      sent: n, acked, rejected: n - acked, rate_limited: byCode.RateLimited || 0, rejections: byCode,
      elapsed_s: Number(elapsed.toFixed(3)), send_burst: L.sendBurst, send_rate_per_sec: L.sendRatePerSec,
    };
  } finally {
    try { client.close(); } catch { /* closed */ }
  }

  // (d) a raw session announcing a frame one byte over the limit.
  const d = { max_frame_bytes: L.maxFrameBytes, announced: L.maxFrameBytes + 1 };
  res.d = d;
  const b64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
  const hashes = (cfg.certHashes || []).map((h) => ({ algorithm: 'sha-256', value: b64(h) }));
  const wt = new WebTransport(cfg.url, hashes.length ? { serverCertificateHashes: hashes } : {});
  const closed = wt.closed.then(
    (info) => ({ how: 'closed', closeCode: info?.closeCode ?? null, reason: info?.reason ?? '' }),
    (e) => ({ how: 'error', closeCode: e?.closeCode ?? null, source: e?.source ?? null,
      streamErrorCode: e?.streamErrorCode ?? null, message: String(e?.message ?? e) }));
  try {
    await withTimeout(wt.ready, 10000, 'the raw session\'s ready');
    const bidi = await withTimeout(wt.createBidirectionalStream(), 5000, 'createBidirectionalStream');
    const writer = bidi.writable.getWriter();
    const reader = bidi.readable.getReader();
    // Frames from the edge on the control stream: 4-byte big-endian length, postcard payload.
    const frames = [];
    let buf = new Uint8Array(0);
    let frameWaiters = [];
    const varint = (bytes, pos) => {
      let v = 0; let shift = 0;
      for (;;) {
        if (pos >= bytes.length) return [null, pos];
        const b = bytes[pos]; pos += 1;
        v += (b & 0x7f) * 2 ** shift; shift += 7;
        if (!(b & 0x80)) return [v, pos];
      }
    };
    const describeFrame = (p) => {
      // The client's own decoder when it has one; else just enough postcard to read an Error.
      if (typeof m.decodeEdgeFrame === 'function') {
        try {
          const f = m.decodeEdgeFrame(p);
          return f.type === 'Error' ? { name: 'Error', code: f.code, text: f.text } : { name: f.type };
        } catch { /* fall through */ }
      }
      const [tag, pos] = varint(p, 0);
      // EdgeFrame variants: 0 Welcome, 1 Joined, 2 Batch, 3 Ack, 4 Rejected, 5 Error.
      if (tag === 5) {
        const [code, p2] = varint(p, pos);
        const [len, p3] = varint(p, p2);
        const text = len === null ? '' : new TextDecoder().decode(p.subarray(p3, p3 + len));
        return { tag, name: 'Error', code, text };
      }
      return { tag, name: ['Welcome', 'Joined', 'Batch', 'Ack', 'Rejected'][tag] ?? `variant ${tag}` };
    };
    const reading = (async () => {
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const next = new Uint8Array(buf.length + value.length);
          next.set(buf); next.set(value, buf.length); buf = next;
          while (buf.length >= 4) {
            const len = new DataView(buf.buffer, buf.byteOffset, 4).getUint32(0);
            if (buf.length < 4 + len) break;
            frames.push(describeFrame(buf.subarray(4, 4 + len)));
            buf = buf.slice(4 + len);
            const w = frameWaiters; frameWaiters = []; w.forEach((f) => f());
          }
        }
        d.control_stream = 'finished';
      } catch (e) {
        d.control_stream = `reset: ${e?.message ?? e}`;
      }
      const w = frameWaiters; frameWaiters = []; w.forEach((f) => f());
    })();
    const nextFrame = async (ms) => {
      const until = performance.now() + ms;
      while (!frames.length) {
        const left = until - performance.now();
        if (left <= 0) throw new Error(`no frame from the edge within ${ms} ms`);
        await new Promise((r) => { frameWaiters.push(r); setTimeout(r, left); });
      }
      return frames.shift();
    };
    let hello = m.encodeClientFrame({ type: 'Hello', token });
    hello = hello instanceof Uint8Array ? hello : new Uint8Array(hello);
    // Whether or not the client's encoder adds the length prefix, send it once.
    const prefixed = hello.length >= 4 && new DataView(hello.buffer, hello.byteOffset, 4).getUint32(0) === hello.length - 4;
    if (!prefixed) {
      const p = new Uint8Array(hello.length + 4);
      new DataView(p.buffer).setUint32(0, hello.length);
      p.set(hello, 4);
      hello = p;
    }
    await withTimeout(writer.write(hello), 5000, 'writing Hello');
    const first = await withTimeout(nextFrame(10000), 11000, 'the answer to Hello');
    d.hello_answer = first;
    if (first.name !== 'Welcome') throw new Error(`Hello was answered by ${JSON.stringify(first)}`);
    const big = new Uint8Array(4 + 1024).fill(0x41);
    new DataView(big.buffer).setUint32(0, L.maxFrameBytes + 1);
    try {
      await withTimeout(writer.write(big), 5000, 'writing the oversized prefix');
    } catch (e) {
      d.write_error = String(e?.message ?? e);
    }
    const c = await withTimeout(closed, 10000, 'the raw session to close');
    d.closed = c;
    await Promise.race([reading, new Promise((r) => setTimeout(r, 1000))]);
    d.frames = frames.slice(0, 10);
    const errFrame = frames.find((f) => f.name === 'Error');
    d.error_frame = errFrame ?? null;
    d.via = [];
    if (c.closeCode === 2) d.via.push('closeCode');
    if (errFrame && errFrame.code === 2) d.via.push('errorFrame');
  } catch (e) {
    d.error = String(e?.message ?? e);
  } finally {
    try { wt.close(); } catch { /* closed */ }
  }
  return res;
}

// ---------------------------------------------------------------------------
// Ending, in every case.

function printAndExit(obj, code) {
  if (finished) return;
  finished = true;
  try { process.stdout.write(JSON.stringify(obj) + '\n'); } catch { /* nothing to do */ }
  killAll();
  try { rmSync(profile, { recursive: true, force: true }); } catch { /* best effort */ }
  process.exit(code);
}

function failureJson(error, extra = {}) {
  return {
    ok: false,
    error,
    step,
    ...extra,
    details: out,
    edge_stderr_tail: edgeStderr.slice(-40),
    console: consoleAll.slice(-80),
    console_errors: consoleErrors,
    page_errors: pageErrors,
  };
}

process.on('exit', killAll);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => printAndExit(failureJson(`the driver got ${sig}`), 1));
}

// Should Chromium or a child hang past every bounded wait, end it all.
const watchdog = setTimeout(() => {
  printAndExit(failureJson(`watchdog: the run took longer than ${timeoutMs + 20000} ms`), 1);
}, timeoutMs + 20000);
watchdog.unref();

// ---------------------------------------------------------------------------
// The run.

async function main() {
  // 1. The edge.
  setStep('start-edge');
  let { edge, ready } = await startEdge('127.0.0.1:0', '127.0.0.1:0');
  out.ready = ready;
  const demoUrl = ready.demo;

  // 2. Tokens.
  setStep('tokens');
  const tokens = {
    alice: await mint('web-alice', 'viewer'),
    bob: await mint('native-bob', 'host'),
    carol: await mint('native-carol', 'viewer'),
    dave: await mint('web-dave', 'viewer'),
    expired: await mint('web-erin', 'viewer', ['--expired']),
  };

  // 3. The native listener.
  setStep('native-listener');
  const listener = spawnProc('listener', ['client', '--server', ready.quic, '--cert', ready.cert, '--token', tokens.carol,
    'listen', ROOM, '--json']);
  await waitFor(`the native listener to join ${ROOM}`, () => {
    if (listener.stderr.some((l) => l.startsWith(`joined ${ROOM}`))) return true;
    if (listener.exited) fail(`the native listener stopped (${exitDesc(listener)}): ${listener.stderr.slice(-10).join(' | ')}`);
    return false;
  }, 20000);

  // 4. The page.
  setStep('open-page');
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1280, height: 860 },
    timeout: bounded(60000),
  });
  mainPage = context.pages()[0] || await context.newPage();
  watchPage(mainPage, 'page');
  const pageUrl = `${demoUrl}#token=${encodeURIComponent(tokens.alice)}&room=${ROOM}&autoconnect=1`;
  await mainPage.goto(pageUrl, { waitUntil: 'domcontentloaded', timeout: bounded(30000) });
  await pageWait(mainPage, '#status = live', () => document.getElementById('status')?.textContent === 'live', null, 30000);
  out.module_exposed = await mainPage.evaluate(() => !!(window.throngDemo && window.throngDemo.module));

  // 5. Native → page.
  setStep('native-to-page');
  const nativeSent = [];
  for (const text of ['from-native-1', 'from-native-2', 'from-native-3']) {
    nativeSent.push(await nativeSend(ready, tokens.bob, text));
  }
  out.native_sent = nativeSent;
  await pageWait(mainPage, `from-native-1..3 (seqs ${nativeSent.map((s) => s.seq).join(', ')}) in #messages`, pageHasSeqs,
    nativeSent.map((s) => s.seq), 20000);
  checkShown((await readPage(mainPage)).messages, nativeSent, 'from-native-1..3');

  // 6. Page → native.
  setStep('page-to-native');
  await mainPage.fill('#chat', 'from-browser', { timeout: bounded(5000) });
  await mainPage.click('#send', { timeout: bounded(5000) });
  await pageWait(mainPage, '#send-result = ack N', () => /^ack \d+$/.test(document.getElementById('send-result')?.textContent || ''),
    null, 15000);
  const sendResult = await mainPage.evaluate(() => document.getElementById('send-result').textContent);
  const browserSeq = Number(/^ack (\d+)$/.exec(sendResult)[1]);
  out.browser_send = { result: sendResult, seq: browserSeq };
  const nativeSaw = await waitFor(`the native listener to print from-browser (seq ${browserSeq})`,
    () => listenerMessages(listener).find((m) => m.seq === browserSeq), 15000);
  if (nativeSaw.body !== 'from-browser') fail(`the native listener got seq ${browserSeq} as ${JSON.stringify(nativeSaw.body)}, not from-browser`);
  if (nativeSaw.sender !== 'web-alice') fail(`the native listener got from-browser from ${nativeSaw.sender}, not web-alice`);
  const browserSent = { body: 'from-browser', seq: browserSeq };
  await pageWait(mainPage, `from-browser (seq ${browserSeq}) in #messages`, pageHasSeqs, [browserSeq], 15000);
  checkShown((await readPage(mainPage)).messages, [...nativeSent, browserSent], 'from-native-1..3 and from-browser');

  // 7. Same sequence on both sides.
  setStep('same-sequence');
  await waitFor('the native listener to have from-native-1..3',
    () => nativeSent.every((s) => listenerMessages(listener).some((m) => m.seq === s.seq)), 10000);
  {
    const pageMsgs = (await readPage(mainPage)).messages;
    const nativeMsgs = listenerMessages(listener);
    const nativeBySeq = new Map(nativeMsgs.map((m) => [m.seq, m]));
    const pageSeqs = new Set(pageMsgs.map((m) => m.seq));
    const commonPage = pageMsgs.filter((m) => nativeBySeq.has(m.seq));
    const commonNative = nativeMsgs.filter((m) => pageSeqs.has(m.seq));
    const mismatches = commonPage.filter((m) => nativeBySeq.get(m.seq).body !== m.body)
      .map((m) => ({ seq: m.seq, page: m.body, native: nativeBySeq.get(m.seq).body }));
    const orderSame = commonPage.length === commonNative.length && commonPage.every((m, i) => commonNative[i].seq === m.seq);
    out.same_sequence = {
      page: pageMsgs.map((m) => [m.seq, m.body]),
      native: nativeMsgs.map((m) => [m.seq, m.body]),
      common: commonPage.length,
      mismatches,
      order_same: orderSame,
    };
    const expected = [...nativeSent, browserSent];
    const missing = expected.filter((s) => !commonPage.some((m) => m.seq === s.seq && m.body === s.body)).map((s) => s.body);
    if (mismatches.length) fail(`the page and the native listener disagree on ${mismatches.length} seqs`);
    if (!orderSame) fail('the page and the native listener show their common messages in different orders');
    if (missing.length) fail(`not on both sides: ${missing.join(', ')}`);
  }

  // 8. Restart the edge under the page.
  setStep('restart-stop');
  const beforeRestart = await readPage(mainPage);
  out.restart = { last_seq_before: beforeRestart.last_seq, edge_stop: await stopProc(edge, 20000), edge_exit: exitDesc(edge) };
  await pageWait(mainPage, '#status to leave live after the edge stopped',
    () => document.getElementById('status')?.textContent !== 'live', null, 40000);
  out.restart.status_while_down = await statusOf(mainPage);
  if (out.restart.status_while_down.startsWith('error:')) fail(`the page gave up when the edge stopped: ${out.restart.status_while_down}`);
  pushBounded(edgeStderr, '--- the edge was stopped; starting it again ---', 400);

  setStep('restart-start');
  ({ edge, ready: out.restart.ready } = await startEdge(ready.quic, ready.admin));
  const ready2 = out.restart.ready;
  out.restart.cert_kept = ready2.cert_sha256 === ready.cert_sha256;
  out.restart.same_addresses = ready2.quic === ready.quic && ready2.admin === ready.admin;
  if (!out.restart.same_addresses) fail(`the edge came back on other addresses: ${ready2.quic} ${ready2.admin}`);
  out.restart.status_at_ready = await statusOf(mainPage);
  out.listener_after_stop = listener.exited ? exitDesc(listener) : 'running';

  setStep('restart-send');
  const afterSent = [];
  for (const text of ['after-restart-1', 'after-restart-2', 'after-restart-3']) {
    afterSent.push(await nativeSend(ready2, tokens.bob, text));
  }
  out.restart.native_sent = afterSent;

  setStep('restart-page');
  const allSent = [...nativeSent, browserSent, ...afterSent];
  await pageWait(mainPage, `after-restart-1..3 (seqs ${afterSent.map((s) => s.seq).join(', ')}) in #messages`, pageHasSeqs,
    afterSent.map((s) => s.seq), 40000);
  await pageWait(mainPage, '#status = live again and #reconnects >= 1',
    () => document.getElementById('status')?.textContent === 'live' && Number(document.getElementById('reconnects')?.textContent) >= 1,
    null, 20000);
  {
    const shown = await readPage(mainPage);
    out.page = shown;
    const seqs = shown.messages.map((m) => m.seq);
    const dupSeqs = seqs.filter((s, i) => seqs.indexOf(s) !== i);
    const increasing = seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
    out.restart.reconnects = shown.reconnects;
    out.restart.duplicate_seqs = dupSeqs;
    out.restart.seqs_increasing = increasing;
    if (dupSeqs.length) fail(`the page shows seqs more than once: ${dupSeqs.join(', ')}`);
    if (!increasing) fail(`the page's seqs do not increase: ${seqs.join(', ')}`);
    checkShown(shown.messages, allSent, 'after the restart');
    if (!(shown.reconnects >= 1)) fail(`#reconnects is ${shown.reconnects}`);
  }
  await mainPage.screenshot({ path: opt.screenshot, fullPage: true, timeout: bounded(15000) });
  out.screenshot = opt.screenshot;

  // 9. An expired token.
  setStep('expired-token');
  const expiredPage = await context.newPage();
  watchPage(expiredPage, 'expired');
  await expiredPage.goto(`${demoUrl}#token=${encodeURIComponent(tokens.expired)}&room=lobby&autoconnect=1`,
    { waitUntil: 'domcontentloaded', timeout: bounded(30000) });
  await pageWait(expiredPage, '#error-code = TokenExpired and #status = error: ...',
    () => document.getElementById('error-code')?.textContent === 'TokenExpired'
      && (document.getElementById('status')?.textContent || '').startsWith('error:'), null, 20000);
  {
    const first = await readPage(expiredPage);
    // It must stay put: no reconnect, no other status, for about a second.
    let changed = false;
    try {
      await expiredPage.waitForFunction((r) => Number(document.getElementById('reconnects')?.textContent) !== r
        || !(document.getElementById('status')?.textContent || '').startsWith('error:')
        || document.getElementById('error-code')?.textContent !== 'TokenExpired',
      first.reconnects, { timeout: bounded(1200), polling: 50 });
      changed = true;
    } catch (e) {
      if (!e || e.name !== 'TimeoutError') throw e;
    }
    const later = await readPage(expiredPage);
    out.expired = { status: later.status, error_code: later.error_code, reconnects: later.reconnects, stayed: !changed };
    if (changed) fail(`the expired-token page did not stay stopped: ${JSON.stringify({ first: first.status, later: later.status, reconnects: later.reconnects })}`);
    if (later.reconnects !== 0) fail(`the expired-token page reconnected ${later.reconnects} times`);
  }
  await expiredPage.close().catch(() => {});

  // 10. Limits, from the live page.
  setStep('limits');
  await pageWait(mainPage, '#status = live before the limits checks',
    () => document.getElementById('status')?.textContent === 'live', null, 15000);
  const lim = await Promise.race([
    mainPage.evaluate(limitsInPage, { token: tokens.dave }),
    new Promise((_, rej) => setTimeout(() => rej(new Error('the limits checks did not finish within 60 s')), bounded(60000))),
  ]);
  out.limits = lim;
  setStep('limits-a');
  if (!lim.a || lim.a.extra.accepted || lim.a.extra.codeName !== 'TooManyRooms') {
    fail(`join #${(lim.limits?.maxRooms ?? 0) + 1} was not refused with TooManyRooms: ${JSON.stringify(lim.a)}`);
  }
  setStep('limits-c');
  if (!lim.c || lim.c.accepted || lim.c.codeName !== 'BodyTooLarge') {
    fail(`a body of maxBodyBytes + 1 was not refused with BodyTooLarge: ${JSON.stringify(lim.c)}`);
  }
  setStep('limits-b');
  {
    const b = lim.b;
    const allowed = b ? b.send_burst + Math.ceil(b.send_rate_per_sec * b.elapsed_s) + 2 : 0;
    if (b) b.acked_allowed = allowed;
    if (!b || b.rate_limited < 1) fail(`no send was refused with RateLimited: ${JSON.stringify(b)}`);
    if (b.acked > allowed) fail(`${b.acked} of ${b.sent} sends were acked; at most ${allowed} should be`);
  }
  setStep('limits-d');
  {
    const d = lim.d;
    if (!d || !d.via || d.via.length === 0) fail(`the oversized frame did not end the session with FrameTooLarge (2): ${JSON.stringify(d)}`);
  }
  // The live page was not disturbed by any of it.
  await pageWait(mainPage, '#status still live after the limits checks',
    () => document.getElementById('status')?.textContent === 'live', null, 10000);

  // 11. Stop everything.
  setStep('stop');
  out.page_final = await readPage(mainPage).then((p) => ({
    status: p.status, reconnects: p.reconnects, last_seq: p.last_seq, missed: p.missed, messages: p.messages.length,
  }));
  await Promise.race([context.close(), new Promise((r) => setTimeout(r, bounded(10000)))]).catch(() => {});
  context = null;
  out.edge_stop = await stopProc(edge, 15000);
  await stopProc(listener, 5000);
  setStep('done');
}

try {
  await main();
  clearTimeout(watchdog);
  printAndExit({ ok: true, ...out, console_errors: consoleErrors, page_errors: pageErrors,
    elapsed_ms: Date.now() - started }, 0);
} catch (e) {
  const message = e instanceof StepError ? e.message : String((e && e.stack) || e);
  const extra = e instanceof StepError && e.details ? { failure_details: e.details } : {};
  if (mainPage && !mainPage.isClosed()) {
    try {
      extra.page = await Promise.race([readPage(mainPage), new Promise((r) => setTimeout(() => r(null), 3000))]);
      await Promise.race([mainPage.screenshot({ path: opt.screenshot, fullPage: true }),
        new Promise((r) => setTimeout(r, 5000))]);
    } catch { /* the page may be gone */ }
  }
  if (context) await Promise.race([context.close(), new Promise((r) => setTimeout(r, 5000))]).catch(() => {});
  printAndExit(failureJson(message, extra), 1);
}
