// The demo page against a scripted fake server (no gateway needed): covers
// what a healthy server rarely does — gaps, message-before-ack, refusals,
// close codes. Usage: node mock.test.js  (INDEX_HTML=path/to/index.html)
const { chromium } = require('playwright-core');
const fs = require('fs');
const assert = require('assert');

const HTML = fs.readFileSync(process.env.INDEX_HTML || require('path').join(__dirname, '../../gateway/static/index.html'), 'utf8');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const msg = (seq, user, text, cid) => ({ type: 'message', room: 'r', seq, id: 'id' + seq, user, text, ts: 1700000000000 + seq * 1000, client_id: cid || 'c' + seq });

(async () => {
  const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'] });
  const page = await browser.newPage();
  page.on('pageerror', (e) => { console.error('page error', e); process.exitCode = 1; });
  await page.route('http://chat.test/**', (r) => r.fulfill({ contentType: 'text/html', body: HTML }));

  // The fake server: every frame the page sends goes to `inbox`; `server` is the
  // current socket route, so the test can push frames and close it.
  const inbox = []; let server = null; let conns = 0;
  await page.routeWebSocket('ws://chat.test/ws?user=me', (ws) => {
    server = ws; conns++;
    ws.onMessage((m) => inbox.push(JSON.parse(m)));
    ws.send(JSON.stringify({ type: 'hello', user: 'me', protocol: 1, limits: { max_frame_bytes: 65536, max_message_bytes: 100, max_rooms: 100, max_history: 100 } }));
  });
  const push = (f) => server.send(JSON.stringify(f));
  async function expectFrame(pred, what) {
    for (let i = 0; i < 100; i++) {
      const k = inbox.findIndex(pred);
      if (k >= 0) return inbox.splice(k, 1)[0];
      await sleep(50);
    }
    throw new Error('page did not send ' + what + '; got ' + JSON.stringify(inbox));
  }
  const seqs = () => page.$$eval('#messages li.msg', (els) => els.map((e) => e.dataset.seq === undefined ? null : +e.dataset.seq));

  await page.goto('http://chat.test/?user=me&room=r');
  await page.click('#connect');
  assert.deepEqual(await expectFrame((f) => f.type === 'join', 'join'), { type: 'join', room: 'r' });
  push({ type: 'joined', room: 'r', last_seq: 13, members: 2 });
  for (let s = 11; s <= 13; s++) push(msg(s, 'ann', 'm' + s));
  await page.waitForFunction(() => window.chat.connected && window.chat.lastSeq === 13);
  assert.equal(await page.textContent('#status'), 'connected');
  assert(await page.isVisible('#older'));

  // Gap: 15 arrives after 13, so the page asks for what is below 15.
  push(msg(15, 'ann', 'm15'));
  assert.deepEqual(await expectFrame((f) => f.type === 'history', 'gap history'), { type: 'history', room: 'r', before: 15, limit: 1 });
  push({ type: 'history', room: 'r', messages: [msg(14, 'ann', 'm14')], has_more: true });
  await page.waitForFunction(() => window.chat.lastSeq === 15);
  assert.deepEqual(await seqs(), [11, 12, 13, 14, 15]);

  // Load older: before = lowest seq; has_more:false hides the button.
  await page.click('#older');
  assert.deepEqual(await expectFrame((f) => f.type === 'history', 'older history'), { type: 'history', room: 'r', before: 11, limit: 50 });
  push({ type: 'history', room: 'r', messages: [msg(9, 'ann', 'm9'), msg(10, 'ann', 'm10')], has_more: false });
  await page.waitForSelector('#older', { state: 'hidden' });
  assert.deepEqual(await seqs(), [9, 10, 11, 12, 13, 14, 15]);

  // Own send, the message frame beating the ack: one element, no duplicate.
  await page.fill('#text', 'hi'); await page.press('#text', 'Enter');
  const s1 = await expectFrame((f) => f.type === 'send', 'send');
  assert.equal(await page.$eval(`li[data-client-id="${s1.client_id}"]`, (e) => e.className), 'msg own pending');
  push(msg(16, 'me', 'hi', s1.client_id));
  push({ type: 'ack', room: 'r', client_id: s1.client_id, seq: 16 });
  push(msg(16, 'me', 'hi', s1.client_id));          // a duplicate delivery, too
  await page.waitForFunction(() => window.chat.pending === 0 && window.chat.lastSeq === 16);
  assert.deepEqual(await seqs(), [9, 10, 11, 12, 13, 14, 15, 16]);

  // rate_limited: the same client_id goes out again after retry_after_ms.
  await page.fill('#text', 'again'); await page.press('#text', 'Enter');
  const s2 = await expectFrame((f) => f.type === 'send', 'send 2');
  push({ type: 'error', code: 'rate_limited', message: 'slow down', ref: s2.client_id, retry_after_ms: 200 });
  await page.waitForSelector(`li.pending[data-client-id="${s2.client_id}"]:has-text("retrying")`);
  const s2b = await expectFrame((f) => f.type === 'send', 'resend');
  assert.equal(s2b.client_id, s2.client_id);
  push({ type: 'ack', room: 'r', client_id: s2.client_id, seq: 17 });
  await page.waitForSelector(`li.msg:not(.pending)[data-seq="17"][data-client-id="${s2.client_id}"]`);

  // A refusal that is final: shown on the message, not retried.
  await page.fill('#text', 'nope'); await page.press('#text', 'Enter');
  const s3 = await expectFrame((f) => f.type === 'send', 'send 3');
  push({ type: 'error', code: 'forbidden', message: 'not allowed here', ref: s3.client_id });
  await page.waitForSelector(`li.failed[data-client-id="${s3.client_id}"]:has-text("not allowed here")`);
  // Too large for hello.limits.max_message_bytes (100 here): refused locally.
  await page.fill('#text', 'x'.repeat(101)); await page.press('#text', 'Enter');
  await page.waitForSelector('#banner:visible');
  assert.match(await page.textContent('#banner span'), /too long/);
  await page.click('#banner button');
  await page.waitForSelector('#banner', { state: 'hidden' });

  // An error without ref: the banner. Presence: others count, own is ignored.
  push({ type: 'error', code: 'internal', message: 'oops' });
  await page.waitForSelector('#banner:visible:has-text("internal: oops")');
  push({ type: 'presence', room: 'r', user: 'bob', state: 'join' });
  push({ type: 'presence', room: 'r', user: 'me', state: 'join' });
  await page.waitForSelector('li.system:has-text("bob joined")');
  assert.equal(await page.evaluate(() => window.chat.members), 3);

  // Slow consumer close: reconnect by itself, resume with since, resend pending.
  await page.fill('#text', 'queued'); await page.press('#text', 'Enter');
  const s4 = await expectFrame((f) => f.type === 'send', 'send 4');
  server.close({ code: 4008, reason: 'slow consumer' });
  await page.waitForFunction(() => /^reconnecting in \d+s$/.test(document.getElementById('status').textContent));
  // 17 was acked but its message frame never came, so resume after 16.
  assert.deepEqual(await expectFrame((f) => f.type === 'join', 're-join'), { type: 'join', room: 'r', since: 16 });
  assert.equal(conns, 2);
  push({ type: 'joined', room: 'r', last_seq: 18, members: 2 });
  push(msg(17, 'me', 'again', s2.client_id));     // already shown: deduped by seq
  push(msg(18, 'ann', 'while away'));
  const s4b = await expectFrame((f) => f.type === 'send', 'resend after reconnect');
  assert.equal(s4b.client_id, s4.client_id);
  push({ type: 'ack', room: 'r', client_id: s4.client_id, seq: 19 });
  await page.waitForFunction(() => window.chat.pending === 0);
  assert.deepEqual(await seqs(), [9, 10, 11, 12, 13, 14, 15, 16, 17, null, 18, 19]);  // null: the failed one stays where it was
  assert.equal(await page.evaluate(() => window.chat.closeCode), 4008);

  // Leave: a normal close, no reconnect.
  await page.click('#disconnect');
  await expectFrame((f) => f.type === 'leave', 'leave');
  await sleep(1200);
  assert.equal(conns, 2);
  assert.equal(await page.getAttribute('#status', 'data-state'), 'disconnected');
  console.log('demo page mock test: ok');
  await browser.close();
})().catch((e) => { console.error(e); process.exit(1); });
