#!/usr/bin/env node
// Opens the edge's live dashboard in headless Chromium, waits for it to be
// live, and prints what the page shows (read from the DOM) as one line of
// JSON on stdout. Exit 0 on success, 1 on timeout or failure.
//
//   node tests/browser/dashboard.mjs --url http://127.0.0.1:9433 --key KEY \
//     --screenshot out.png [--updates 3] [--timeout-ms 30000] [--expect-error]
//
// With --expect-error it waits for `#status` to read `error: ...` instead.
// The browser is Debian's Chromium: $CHROMIUM or /usr/bin/chromium.

import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: opt } = parseArgs({
  options: {
    url: { type: 'string' },
    key: { type: 'string' },
    screenshot: { type: 'string' },
    updates: { type: 'string', default: '3' },
    'timeout-ms': { type: 'string', default: '30000' },
    'expect-error': { type: 'boolean', default: false },
  },
  strict: true,
});

function usage(msg) {
  process.stderr.write(`dashboard.mjs: ${msg}\nusage: node dashboard.mjs --url URL --key KEY --screenshot OUT.png ` +
    '[--updates N] [--timeout-ms T] [--expect-error]\n');
  process.exit(2);
}
if (!opt.url) usage('--url is required');
if (opt.key === undefined) usage('--key is required');
if (!opt.screenshot) usage('--screenshot is required');
const want = Number(opt.updates);
const timeoutMs = Number(opt['timeout-ms']);
if (!Number.isInteger(want) || want < 0) usage('--updates must be a whole number');
if (!Number.isFinite(timeoutMs) || timeoutMs <= 0) usage('--timeout-ms must be a positive number');

const base = opt.url.replace(/\/+$/, '');
const target = `${base}/dashboard#key=${encodeURIComponent(opt.key)}`;
const consoleErrors = [];
const profile = mkdtempSync(join(tmpdir(), 'throng-dashboard-'));
let context;

function cleanup() {
  try { rmSync(profile, { recursive: true, force: true }); } catch { /* best effort */ }
}

// Should Chromium itself hang, do not hang the test with it.
const watchdog = setTimeout(() => {
  process.stdout.write(JSON.stringify({ error: 'watchdog: the driver took too long', status: null,
    console_errors: consoleErrors }) + '\n');
  cleanup();
  process.exit(1);
}, timeoutMs + 60_000);
watchdog.unref();

// Everything the page shows, read from the DOM.
function readPage() {
  const value = (td) => {
    if (!('value' in td.dataset)) return td.textContent;
    const v = td.dataset.value;
    if (v === '') return null;
    if (v === 'true') return true;
    if (v === 'false') return false;
    if (v.length < 40 && /^-?\d+(\.\d+)?([eE][+-]?\d+)?$/.test(v)) return Number(v);
    return v;
  };
  const rows = (scope, attr, name) => {
    const root = document.querySelector(scope);
    if (!root) return [];
    return [...root.querySelectorAll(`tr[${attr}]`)].map((tr) => {
      const o = { [name]: tr.getAttribute(attr) };
      for (const td of tr.querySelectorAll('td[data-field]')) o[td.dataset.field] = value(td);
      return o;
    });
  };
  const status = document.getElementById('status');
  const edge = {};
  for (const el of document.querySelectorAll('#edge [data-field]')) edge[el.dataset.field] = el.textContent;
  const cluster = document.getElementById('cluster');
  const clusterShown = !!cluster && !cluster.hidden;
  return {
    status: status ? status.textContent : null,
    updates: status ? Number(status.dataset.updates || 0) : 0,
    edge,
    rooms_count: document.getElementById('rooms-count')?.textContent ?? null,
    rooms: rows('#rooms', 'data-room', 'room'),
    tenants: rows('#tenants', 'data-tenant', 'tenant'),
    modules: rows('#modules', 'data-sha256', 'sha256'),
    deployments: rows('#deployments', 'data-scope', 'scope'),
    quarantines: rows('#quarantines', 'data-module', 'module'),
    cluster_shown: clusterShown,
    cluster_edges: clusterShown ? rows('#cluster', 'data-edge', 'edge') : [],
  };
}

async function statusText(page) {
  try {
    return await page.evaluate(() => document.getElementById('status')?.textContent ?? null);
  } catch {
    return null;
  }
}

let code = 1;
try {
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1400, height: 900 },
  });
  const page = context.pages()[0] || await context.newPage();
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      const loc = msg.location();
      consoleErrors.push(msg.text() + (loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : ''));
    }
  });
  page.on('pageerror', (err) => consoleErrors.push(`page error: ${err.message}`));

  const started = Date.now();
  await page.goto(target, { waitUntil: 'domcontentloaded', timeout: timeoutMs });
  const left = Math.max(1, timeoutMs - (Date.now() - started));
  let reached = true;
  try {
    if (opt['expect-error']) {
      await page.waitForFunction(() => (document.getElementById('status')?.textContent || '').startsWith('error:'),
        null, { timeout: left, polling: 100 });
    } else {
      await page.waitForFunction((n) => {
        const s = document.getElementById('status');
        return !!s && s.textContent === 'live' && Number(s.dataset.updates) >= n;
      }, want, { timeout: left, polling: 100 });
    }
  } catch (e) {
    if (e && e.name !== 'TimeoutError') throw e;
    reached = false;
  }
  if (reached) {
    const out = await page.evaluate(readPage);
    out.console_errors = consoleErrors;
    await page.screenshot({ path: opt.screenshot, fullPage: true });
    process.stdout.write(JSON.stringify(out) + '\n');
    code = 0;
  } else {
    const status = await statusText(page);
    await page.screenshot({ path: opt.screenshot, fullPage: true }).catch(() => {});
    process.stdout.write(JSON.stringify({ error: `timed out after ${timeoutMs} ms`, status,
      console_errors: consoleErrors }) + '\n');
    process.stderr.write(`dashboard.mjs: timed out; #status is ${JSON.stringify(status)}\n`);
  }
} catch (e) {
  process.stdout.write(JSON.stringify({ error: String(e && e.message || e), status: null,
    console_errors: consoleErrors }) + '\n');
} finally {
  if (context) await context.close().catch(() => {});
  cleanup();
}
process.exit(code);
