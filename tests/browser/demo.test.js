// Browser test of the demo page (gateway/static/index.html) against a real
// standalone chat-gateway. Run by tests/tests/browser.rs; by hand:
//   GATEWAY_BIN=target/debug/chat-gateway node tests/browser/demo.test.js
// Needs playwright-core and a Chromium (CHROMIUM, default /usr/bin/chromium).
const { chromium } = require('playwright-core');
const { spawn } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');
const assert = require('assert');

const BIN = process.env.GATEWAY_BIN || path.join(__dirname, '../../target/debug/chat-gateway');
const PORT = process.env.PORT || '18081';
const BASE = `http://127.0.0.1:${PORT}`;
const DATA = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-demo-'));
const SHOT = process.env.SCREENSHOT || '/tmp/demo.png';

let server = null;
async function startServer() {
  server = spawn(BIN, ['--standalone', '--data-dir', DATA, '--listen', `127.0.0.1:${PORT}`],
    { stdio: ['ignore', 'ignore', 'inherit'] });
  for (let i = 0; i < 100; i++) {
    try { if ((await fetch(BASE + '/readyz')).ok) return; } catch {}
    await sleep(100);
  }
  throw new Error('gateway did not become ready');
}
async function stopServer() {
  const s = server; server = null;
  const exited = new Promise((r) => s.once('exit', r));
  s.kill('SIGTERM');
  await exited;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Everything the page shows, in DOM order.
const rows = (page) => page.$$eval('#messages > li.msg', (els) => els.map((e) => ({
  seq: e.dataset.seq === undefined ? null : +e.dataset.seq,
  cid: e.dataset.clientId, user: e.dataset.user,
  text: e.querySelector('.text').textContent, pending: e.classList.contains('pending'),
})));
// Seqs strictly increasing (so: ordered, no duplicates), none pending.
async function checkList(page, label) {
  const r = await rows(page);
  const seqs = r.map((x) => x.seq);
  for (let i = 1; i < seqs.length; i++) assert(seqs[i] > seqs[i - 1], `${label}: order/dup at ${i}: ${seqs}`);
  assert(r.every((x) => !x.pending && x.seq !== null), `${label}: pending left: ${JSON.stringify(r.filter((x) => x.pending))}`);
  return r;
}
const waitConnected = (page, timeout = 30000) =>
  page.waitForFunction(() => document.getElementById('status').dataset.state === 'connected'
    && document.getElementById('status').textContent === 'connected' && window.chat.connected, null, { timeout });

async function open(browser, user, room) {
  const ctx = await browser.newContext({ viewport: { width: 900, height: 700 } });
  const page = await ctx.newPage();
  page.on('pageerror', (e) => { console.error(`[${user}] page error`, e); process.exitCode = 1; });
  // Log every frame for protocol debugging (CHAT_TRACE=1).
  page.on('websocket', (ws) => {
    if (!process.env.CHAT_TRACE) return;
    ws.on('framesent', (f) => console.log(`[${user}] >`, f.payload));
    ws.on('framereceived', (f) => console.log(`[${user}] <`, String(f.payload).slice(0, 300)));
    ws.on('close', () => console.log(`[${user}] ws closed`));
  });
  await page.goto(`${BASE}/?user=${encodeURIComponent(user)}&room=${room}`);
  assert.equal(await page.inputValue('#user'), user);
  assert.equal(await page.inputValue('#room'), room);
  await page.click('#connect');
  await waitConnected(page);
  return page;
}
async function say(page, text) {
  await page.fill('#text', text);
  await page.press('#text', 'Enter');
}

(async () => {
  await startServer();
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const room = 'demo-' + Date.now();
    const a = await open(browser, 'alice', room);
    const b = await open(browser, 'bob', room);

    // Presence: alice sees bob join; both count 2 members.
    await a.waitForSelector('#messages li.system:has-text("bob joined")');
    await a.waitForFunction(() => window.chat.members === 2);
    assert.equal(await b.evaluate(() => window.chat.members), 2);

    // Pending -> acked: the element is pending in the same task as the submit.
    const tricky = 'héllo 👋🏽 مرحبا بالعالم <b>not bold</b> &amp; \u202Eabc';
    const wasPending = await a.evaluate((t) => {
      const input = document.getElementById('text');
      input.value = t;
      document.getElementById('send').click();
      const li = document.querySelector('#messages li.msg:last-child');
      return li.classList.contains('pending') && li.textContent.includes('sending…') && li.dataset.seq === undefined;
    }, tricky);
    assert(wasPending, 'own message not shown as pending');
    await a.waitForSelector('#messages li.msg:not(.pending)[data-user="alice"]');
    const [mine] = await rows(a);
    assert.equal(mine.text, tricky);
    // Bob gets the same message with the same seq and client id, as plain text.
    const sel = `#messages li.msg[data-seq="${mine.seq}"]`;
    await b.waitForSelector(sel);
    assert.equal(await b.$eval(sel, (e) => e.dataset.clientId), mine.cid);
    assert.equal(await b.$eval(sel + ' .text', (e) => e.textContent), tricky);
    assert.equal(await b.$$eval('#messages b', (x) => x.length), 0, 'text was parsed as HTML');

    // A burst: 40 messages at once from alice exceed the rate limit (burst 20),
    // so some come back rate_limited and the page retries them; bob sends 20
    // meanwhile. In the end each is shown once, and both lists are identical.
    await a.evaluate(() => {
      for (let i = 1; i <= 40; i++) {
        document.getElementById('text').value = `a${i}`;
        document.getElementById('send').click();
      }
    });
    for (let i = 1; i <= 20; i++) await say(b, `b${i}`);
    await a.waitForFunction(() => window.chat.pending === 0 && window.chat.lastSeq === 61, null, { timeout: 30000 });
    await b.waitForFunction(() => window.chat.pending === 0 && window.chat.lastSeq === 61, null, { timeout: 30000 });
    const ra = await checkList(a, 'alice'), rb = await checkList(b, 'bob');
    assert.deepEqual(ra.map((x) => [x.seq, x.cid, x.text]), rb.map((x) => [x.seq, x.cid, x.text]));
    assert.equal(ra.length, 61);
    for (let i = 1; i <= 40; i++) assert.equal(ra.filter((x) => x.text === `a${i}`).length, 1);
    // (Order is not asserted: of a pipelined burst, a send already on the wire
    // when an earlier one is refused may win a refilled token and commit first.)
    for (let i = 1; i <= 20; i++) assert.equal(ra.filter((x) => x.text === `b${i}`).length, 1);

    // Reload bob: the backlog (last 50) shows; "Load older" fetches the rest.
    await b.reload();
    await b.click('#connect');
    await waitConnected(b);
    await b.waitForFunction(() => document.querySelectorAll('#messages li.msg').length === 50);
    await sleep(300);   // no own presence for the re-joining bob (member count stays 2)
    assert.equal(await b.evaluate(() => window.chat.members), 2);
    assert.equal((await checkList(b, 'bob reload'))[0].seq, 12);
    assert(await b.isVisible('#older'));
    await b.click('#older');
    await b.waitForFunction(() => document.querySelectorAll('#messages li.msg').length === 61);
    await b.waitForSelector('#older', { state: 'hidden' });
    assert.deepEqual((await checkList(b, 'bob older')).map((x) => x.seq), ra.map((x) => x.seq));

    // Restart the server: SIGTERM drains (close 1012), the pages reconnect on
    // their own. A message typed while down stays pending and is sent after
    // the re-join; nothing is lost or doubled.
    await stopServer();
    // The contract says draining closes with 1012.
    await a.waitForFunction(() => window.chat.closeCode !== null, null, { timeout: 5000 });
    assert.equal(await a.evaluate(() => window.chat.closeCode), 1012, 'drain close code');
    await a.waitForFunction(() => /^reconnecting in \d+s$|^connecting…$/.test(document.getElementById('status').textContent));
    await say(a, 'sent while the server was down');
    await say(b, 'bob too');
    assert.equal(await a.evaluate(() => window.chat.pending), 1);
    await sleep(1000);
    await startServer();
    await waitConnected(a); await waitConnected(b);
    await a.waitForFunction(() => window.chat.pending === 0 && window.chat.lastSeq === 63, null, { timeout: 30000 });
    await b.waitForFunction(() => window.chat.pending === 0 && window.chat.lastSeq === 63, null, { timeout: 30000 });
    const fa = await checkList(a, 'alice after restart'), fb = await checkList(b, 'bob after restart');
    assert.deepEqual(fa.map((x) => [x.seq, x.text]), fb.map((x) => [x.seq, x.text]));
    assert.equal(fa.length, 63);
    assert.deepEqual(fa.slice(-2).map((x) => x.text).sort(), ['bob too', 'sent while the server was down']);

    // One more live message after the restart.
    await say(b, 'all good? ✅');
    await a.waitForSelector('#messages li.msg[data-seq="64"]');

    await a.screenshot({ path: SHOT });

    // Leave: a user-initiated close does not reconnect.
    await b.click('#disconnect');
    await a.waitForSelector('#messages li.system:has-text("bob left")');
    await a.waitForFunction(() => window.chat.members === 1);
    await sleep(1500);
    assert.equal(await b.evaluate(() => window.chat.connected), false);
    assert(await b.isVisible('#connect'));
    console.log('demo page test: ok');
  } finally {
    await browser.close();
    if (server) await stopServer();
    fs.rmSync(DATA, { recursive: true, force: true });
  }
})().catch((e) => { console.error(e); process.exit(1); });
