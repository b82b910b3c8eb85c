// kiln's dashboard: the daemon's state, live (server-sent events from /ui/feed), and the
// actions of the CLI (the same API, with the bearer token the user gives; kept in this tab's
// sessionStorage only). No framework, no build step: the daemon embeds this file.
'use strict';

const S = {
  state: null,          // the feed's latest state
  token: sessionStorage.getItem('kiln-token') || '',
  auth: false,          // the daemon accepted the token
  actions: false,       // the daemon takes actions at all (it has a token)
  app: null,            // the app shown, or null for the overview
  series: {},           // release -> [[at_ms, rps, error %, p99 ms], ...] of S.app
  timeline: null,       // {events, verdicts} of S.app
  timelineHead: -1,     // the ledger head the timeline was read at
  timelineNext: 0,      // no timeline read before this time (ms)
  timelineAsked: 0,     // timeline reads asked, so a late answer is known
  releases: [],         // release numbers of S.app
  rendered: false,
  view: null,           // what #view holds: 'overview' or 'app:NAME'
};

const COLORS = ['#d9480f', '#1971c2', '#2f9e44', '#9c36b5', '#868e96'];
const ACTIONS = {
  promote: { label: 'promote', ask: (a) => `Promote the rollout of ${a} to its next step now?` },
  abort: { label: 'abort', ask: (a) => `Abort the rollout of ${a}? Traffic goes back to the stable release.` },
  rollback: { label: 'roll back', ask: (a, to) => `Roll ${a} back to release ${to}?` },
  pause: { label: 'pause', ask: (a) => `Pause ${a}? New requests are held at the router until resumed.` },
  resume: { label: 'resume', ask: (a) => `Resume ${a}? Held requests are released.` },
  maintenance: { label: 'maintenance', ask: (a) => `Put ${a} in maintenance? Clients get a 503 with the message below.` },
};

// ---- small helpers ------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') e.textContent = v;
    else if (k === 'class') e.className = v;
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

const $ = (sel, root) => (root || document).querySelector(sel);

function pct(x, digits) {
  return `${(x * 100).toFixed(digits === undefined ? 1 : digits)}%`;
}

function ms(x) {
  return x >= 1000 ? `${(x / 1000).toFixed(2)} s` : `${Number(x).toFixed(1)} ms`;
}

function age(msAgo) {
  const s = Math.max(0, Math.round(msAgo / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor(s / 60) % 60).padStart(2, '0')}m`;
  return `${Math.floor(s / 86400)}d${Math.floor(s / 3600) % 24}h`;
}

function when(atMs) {
  const d = new Date(atMs);
  return d.toISOString().replace('T', ' ').slice(0, 19);
}

function headers(json) {
  const h = {};
  if (S.token) h.Authorization = `Bearer ${S.token}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: headers(false), cache: 'no-store' });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function appOf(name) {
  return ((S.state && S.state.apps) || []).find((a) => a.app === name);
}

// What a release is to its app now: the canary of a rollout (in progress or aborted), the
// stable or live release, or an earlier one.
function roleOf(a, r) {
  if (!a) return 'previous';
  if (r === a.release && r !== a.live && a.phase !== 'completed') return 'canary';
  if (r === a.live || (a.phase === 'progressing' && r === a.stable)) return a.phase === 'progressing' ? 'stable' : 'live';
  return 'previous';
}

function releaseColor(a, r) {
  return { canary: COLORS[0], stable: COLORS[1], live: COLORS[1] }[roleOf(a, r)] || COLORS[4];
}

// ---- the token ----------------------------------------------------------------------------

async function checkSession() {
  try {
    const s = await getJSON('/ui/session');
    S.auth = Boolean(s.authorized);
    S.actions = Boolean(s.actions);
  } catch (e) {
    S.auth = false;
  }
  document.body.dataset.auth = S.auth ? 'token' : 'none';
  const state = $('#auth-state');
  if (!S.actions) state.textContent = 'read-only: the daemon has no --token-file';
  else if (S.auth) state.textContent = 'actions enabled';
  else if (S.token) state.textContent = 'token refused: read-only';
  else state.textContent = 'read-only';
  $('#token-forget').hidden = !S.token;
  if (S.app) buildActions();
}

function setupToken() {
  $('#token-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const token = $('#token').value.trim();
    $('#token').value = '';
    // What a header cannot carry would make every request of the page fail.
    if (token && !/^[\x21-\x7e]+$/.test(token)) {
      $('#auth-state').textContent = 'a token is printable ASCII without spaces';
      return;
    }
    S.token = token;
    if (S.token) sessionStorage.setItem('kiln-token', S.token);
    else sessionStorage.removeItem('kiln-token');
    await checkSession();
  });
  $('#token-forget').addEventListener('click', async () => {
    S.token = '';
    sessionStorage.removeItem('kiln-token');
    await checkSession();
  });
}

// ---- routing ------------------------------------------------------------------------------

function route() {
  const m = /^#\/apps\/([^/]+)$/.exec(location.hash);
  let app = null;
  try {
    app = m ? decodeURIComponent(m[1]) : null;
  } catch (e) {
    app = null;
  }
  const view = app ? `app:${app}` : 'overview';
  if (view !== S.view) {
    S.view = view;
    S.app = app;
    S.series = {};
    S.timeline = null;
    S.timelineHead = -1;
    S.releases = [];
    if (app) openApp(app);
    else buildOverview();
  }
  render();
}

// ---- the overview -------------------------------------------------------------------------

function buildOverview() {
  const view = $('#view');
  view.replaceChildren(
    el('section', { id: 'overview' },
      el('h1', { text: 'apps' }),
      el('div', { id: 'apps', class: 'apps' })));
}

function weightsText(a) {
  return Object.entries(a.weights || {}).map(([r, w]) => `r${r} ${w}%`).join(' · ') || '—';
}

function renderOverview() {
  const box = $('#apps');
  if (!box) return;
  const apps = S.state.apps || [];
  if (apps.length === 0) {
    const text = S.state.starting ? 'The daemon is taking its first look…' : 'No apps yet: `kiln apply` one.';
    box.replaceChildren(el('p', { class: 'muted', text }));
    return;
  }
  box.replaceChildren(...apps.map((a) => {
    const instances = a.instances || [];
    const healthy = instances.filter((i) => i.health === 'healthy').length;
    const drifted = instances.filter((i) => i.drift).length;
    return el('a', { class: 'app', 'data-app': a.app, href: `#/apps/${encodeURIComponent(a.app)}` },
      el('span', { class: 'name', text: a.app }),
      el('span', { class: `phase phase-${a.phase}`, text: a.phase }),
      el('span', { class: 'live', text: a.live ? `live r${a.live}` : 'nothing live' }),
      el('span', { class: 'strategy', text: a.error ? a.error : `${a.strategy || ''}${a.step && a.phase === 'progressing' ? ` step ${a.step}` : ''}` }),
      el('span', { class: 'weights', text: weightsText(a) }),
      el('span', { class: 'health', text: `${healthy}/${instances.length} healthy${drifted ? `, ${drifted} drifted` : ''}` }),
      a.gate && a.gate.mode && a.gate.mode !== 'open' ? el('span', { class: 'gate', text: a.gate.mode }) : null);
  }));
}

// ---- one app ------------------------------------------------------------------------------

function openApp(name) {
  const chart = (id, title) => el('figure', { class: 'chart' },
    el('figcaption', { text: title }),
    el('div', { class: 'plot' }, svg('svg', { id, viewBox: '0 0 360 120', preserveAspectRatio: 'none', role: 'img', 'aria-label': title })));
  $('#view').replaceChildren(
    el('section', { id: 'app', 'data-app': name },
      el('div', { class: 'crumbs' }, el('a', { href: '#/', text: 'apps' }), ' / ', el('strong', { text: name })),
      el('div', { class: 'summary' },
        el('div', {}, el('span', { class: 'label', text: 'phase' }), el('span', { id: 'phase', text: '…' })),
        el('div', {}, el('span', { class: 'label', text: 'step' }), el('span', { id: 'step', text: '-' })),
        el('div', {}, el('span', { class: 'label', text: 'weights' }), el('span', { id: 'weights' })),
        el('div', {}, el('span', { class: 'label', text: 'releases' }), el('span', { id: 'releases-line' })),
        el('div', {}, el('span', { class: 'label', text: 'gate' }), el('span', { id: 'gate' }))),
      el('p', { id: 'reason', class: 'reason', hidden: true }),
      el('div', { id: 'actions', class: 'actions' }),
      el('h2', { text: 'steps' }),
      el('ol', { id: 'steps', class: 'steps' }),
      el('h2', {}, 'canary and stable, from the router ', el('span', { id: 'window', class: 'muted' })),
      el('div', { id: 'legend', class: 'legend' }),
      el('div', { class: 'charts' },
        chart('chart-rps', 'requests per second'),
        chart('chart-errors', 'error rate, %'),
        chart('chart-p99', 'p99 latency, ms')),
      el('h2', { text: 'analysis verdicts' }),
      el('div', { id: 'verdicts', class: 'verdicts' }, el('p', { class: 'muted', text: 'loading…' })),
      el('h2', { text: 'instances' }),
      el('table', { id: 'instances', class: 'instances' },
        el('thead', {}, el('tr', {}, ['instance', 'release', 'state', 'health', 'address', 'age', 'routed', 'drift'].map((h) => el('th', { text: h })))),
        el('tbody', {})),
      el('h2', { text: 'timeline' }),
      el('ol', { id: 'timeline', class: 'timeline' })));
  buildActions();
  getJSON(`/ui/series?app=${encodeURIComponent(name)}`).then((s) => {
    if (S.app !== name) return;
    for (const [r, points] of Object.entries(s.releases || {})) {
      // Points the feed brought meanwhile are newer: keep them after the history.
      const newer = (S.series[r] || []).filter((p) => !points.length || p[0] > points[points.length - 1][0]);
      S.series[r] = points.concat(newer);
    }
    renderCharts();
  }).catch(() => {});
}

function buildActions() {
  const box = $('#actions');
  if (!box) return;
  if (!S.auth) {
    box.replaceChildren(el('p', { class: 'muted', text: S.actions ? 'Read-only: give the daemon\'s token above to act.' : 'Read-only: the daemon has no --token-file.' }));
    return;
  }
  const items = [];
  for (const action of Object.keys(ACTIONS)) {
    const button = el('button', { type: 'button', 'data-action': action, class: action === 'abort' || action === 'rollback' ? 'danger' : '', text: ACTIONS[action].label });
    button.addEventListener('click', () => ask(action));
    const group = el('span', { class: 'action' });
    if (action === 'rollback') {
      group.append(el('select', { id: 'rollback-to', 'aria-label': 'release to roll back to' }));
    }
    group.append(button, el('span', { class: 'action-error', 'data-error-for': action, role: 'alert' }));
    items.push(group);
  }
  box.replaceChildren(...items);
  renderReleasesSelect();
  renderActionsEnabled();
}

function renderReleasesSelect() {
  const select = $('#rollback-to');
  if (!select) return;
  const a = appOf(S.app);
  const current = select.value;
  const options = S.releases.slice().reverse().filter((n) => !a || (n !== a.live && !(a.phase === 'progressing' && n === a.release)));
  select.replaceChildren(...options.map((n) => el('option', { value: n, text: `release ${n}` })));
  if (options.map(String).includes(current)) select.value = current;
}

function renderActionsEnabled() {
  const a = appOf(S.app);
  if (!a) return;
  const progressing = a.phase === 'progressing';
  const gate = (a.gate && a.gate.mode) || 'open';
  const enable = {
    promote: progressing,
    abort: progressing,
    rollback: !progressing && S.releases.length > 1,
    pause: gate === 'open',
    resume: gate !== 'open',
    maintenance: gate === 'open',
  };
  for (const [action, on] of Object.entries(enable)) {
    const b = document.querySelector(`button[data-action="${action}"]`);
    if (b) b.disabled = !on;
  }
}

function ask(action) {
  const app = S.app;
  const to = action === 'rollback' ? Number(($('#rollback-to') || {}).value) : null;
  if (action === 'rollback' && !to) {
    showError(action, 'no earlier release to roll back to');
    return;
  }
  showError(action, '');
  const dialog = $('#confirm');
  $('#confirm-text').textContent = ACTIONS[action].ask(app, to);
  $('#confirm-message-label').hidden = action !== 'maintenance';
  $('#confirm-yes').textContent = ACTIONS[action].label;
  dialog.returnValue = '';
  dialog.onclose = () => {
    if (dialog.returnValue === 'yes') act(app, action, to);
  };
  dialog.showModal();
}

function showError(action, message) {
  const e = document.querySelector(`.action-error[data-error-for="${action}"]`);
  if (e) e.textContent = message;
}

async function act(app, action, to) {
  const base = `/v1/apps/${encodeURIComponent(app)}`;
  let method = 'POST';
  let url = `${base}/${action}`;
  let body = {};
  if (action === 'rollback') body = { to };
  if (action === 'maintenance') {
    method = 'PUT';
    body = { message: $('#confirm-message').value || 'down for maintenance' };
  }
  const button = document.querySelector(`button[data-action="${action}"]`);
  if (button) button.setAttribute('aria-busy', 'true');
  try {
    const r = await fetch(url, { method, headers: headers(true), body: JSON.stringify(body) });
    const out = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(out.error || `${r.status} ${r.statusText}`);
    showError(action, '');
    if (button) button.dataset.done = String(Date.now());
  } catch (e) {
    showError(action, `${ACTIONS[action].label} failed: ${e.message}`);
  } finally {
    if (button) button.removeAttribute('aria-busy');
  }
}

function renderApp() {
  const a = appOf(S.app);
  const section = $('#app');
  if (!section) return;
  if (!a) {
    if (S.state.starting) return;
    $('#phase').textContent = 'gone';
    $('#step').textContent = '-';
    $('#weights').replaceChildren();
    $('#reason').hidden = false;
    $('#reason').textContent = `No app named ${S.app} is running.`;
    $('#instances tbody').replaceChildren();
    for (const b of document.querySelectorAll('button[data-action]')) b.disabled = true;
    return;
  }
  $('#phase').textContent = a.phase;
  $('#phase').className = `phase phase-${a.phase}`;
  const steps = (a.deploy && a.deploy.steps) || [];
  $('#step').textContent = a.strategy === 'canary' && a.phase === 'progressing' && a.step
    ? `step ${a.step} of ${steps.length}` : '-';
  $('#weights').replaceChildren(...Object.entries(a.weights || {}).map(([r, w]) =>
    el('span', { class: 'weight', 'data-release': r, 'data-weight': w },
      el('i', { class: 'swatch', 'data-color': releaseColor(a, Number(r)) }), `r${r} ${w}%`)));
  for (const sw of document.querySelectorAll('#weights .swatch')) sw.style.background = sw.dataset.color;
  $('#releases-line').textContent = `release ${a.release}${a.stable ? `, stable ${a.stable}` : ''}${a.live ? `, live ${a.live}` : ''} · ${a.strategy} · ${a.replicas} replica${a.replicas === 1 ? '' : 's'}`;
  $('#gate').textContent = (a.gate && a.gate.mode) || 'open';
  const reason = a.reason || a.awaiting_decision || (a.awaiting_promotion ? 'waiting for promote' : null) || a.unserved || a.error;
  $('#reason').hidden = !reason;
  $('#reason').textContent = reason || '';
  $('#steps').replaceChildren(...steps.map((s, i) => el('li', {
    class: a.phase === 'progressing' && a.step === i + 1 ? 'current' : (a.step > i + 1 || a.phase === 'completed' ? 'done' : ''),
  }, `${s.weight}%${s.pause_ms ? ` for ${age(s.pause_ms)}` : (i + 1 < steps.length ? ' until promoted' : '')}`)));
  if (!steps.length) $('#steps').replaceChildren(el('li', { class: 'muted', text: `${a.strategy}: no canary steps` }));
  renderInstances(a);
  renderActionsEnabled();
  const points = (S.state.points || {})[S.app] || {};
  for (const [r, p] of Object.entries(points)) {
    const list = S.series[r] || (S.series[r] = []);
    if (!list.length || list[list.length - 1][0] < p[0]) list.push(p);
  }
  // Five minutes, as the daemon keeps: a release gone that long leaves the charts.
  const horizon = (S.state.at_ms || Date.now()) - 300000;
  for (const r of Object.keys(S.series)) {
    S.series[r] = S.series[r].filter((p) => p[0] >= horizon);
    if (!S.series[r].length) delete S.series[r];
  }
  $('#window').textContent = `(each point: the last ${S.state.window_s || 5} s)`;
  renderCharts();
  if (S.state.head !== S.timelineHead && Date.now() >= S.timelineNext) loadTimeline(S.app, S.state.head);
}

function renderInstances(a) {
  const rows = (a.instances || []).map((i) => el('tr', { 'data-instance': i.id, class: i.drift ? 'drifted' : '' },
    el('td', { class: 'mono', text: i.id }),
    el('td', { text: i.release ? `r${i.release}` : '' }),
    el('td', { text: i.state }),
    el('td', { class: `health-${i.health}`, text: i.health }),
    el('td', { class: 'mono', text: i.addr }),
    el('td', { text: age(i.age_ms) }),
    el('td', { text: i.routed ? 'yes' : 'no' }),
    el('td', { class: 'drift', text: i.drift || '' })));
  $('#instances tbody').replaceChildren(...rows);
}

function renderCharts() {
  const a = appOf(S.app);
  const releases = Object.keys(S.series).map(Number).sort((x, y) => x - y);
  $('#legend').replaceChildren(...releases.map((r) => {
    const sw = el('i', { class: 'swatch' });
    sw.style.background = releaseColor(a, r);
    return el('span', { 'data-release': r }, sw, `r${r} (${roleOf(a, r)})`);
  }));
  drawChart('#chart-rps', releases, 1, (v) => v.toFixed(1));
  drawChart('#chart-errors', releases, 2, (v) => `${v.toFixed(1)}%`);
  drawChart('#chart-p99', releases, 3, (v) => ms(v));
}

function drawChart(sel, releases, column, fmt) {
  const box = $(sel);
  if (!box) return;
  const W = 360;
  const H = 120;
  const all = releases.flatMap((r) => S.series[r] || []);
  if (!all.length) {
    box.replaceChildren(svg('text', { x: 8, y: 64, class: 'empty' }));
    box.firstChild.textContent = 'no requests measured yet';
    return;
  }
  const t1 = Math.max(...all.map((p) => p[0]));
  const t0 = Math.min(t1 - 60000, Math.min(...all.map((p) => p[0])));
  const top = Math.max(column === 2 ? 1 : 0.001, ...all.map((p) => p[column])) * 1.15;
  const x = (t) => ((t - t0) / Math.max(1, t1 - t0)) * (W - 4) + 2;
  const y = (v) => H - 14 - (v / top) * (H - 24);
  const kids = [
    svg('line', { x1: 0, y1: H - 14, x2: W, y2: H - 14, class: 'axis' }),
    svg('line', { x1: 0, y1: y(top / 1.15), x2: W, y2: y(top / 1.15), class: 'grid' }),
  ];
  const label = (text, attrs) => {
    const t = svg('text', attrs);
    t.textContent = text;
    return t;
  };
  kids.push(label(fmt(top / 1.15), { x: 4, y: y(top / 1.15) - 3, class: 'tick' }));
  kids.push(label(`${Math.round((t1 - t0) / 1000)} s ago`, { x: 2, y: H - 2, class: 'tick' }));
  kids.push(label('now', { x: W - 24, y: H - 2, class: 'tick' }));
  const a = appOf(S.app);
  for (const r of releases) {
    const points = S.series[r] || [];
    const line = svg('polyline', {
      'data-release': r,
      'data-points': points.length,
      points: points.map((p) => `${x(p[0]).toFixed(1)},${y(p[column]).toFixed(1)}`).join(' '),
      fill: 'none',
      stroke: releaseColor(a, r),
      'stroke-width': 2,
      'vector-effect': 'non-scaling-stroke',
    });
    const last = points[points.length - 1];
    const title = svg('title', {});
    title.textContent = last ? `r${r}: ${fmt(last[column])}` : `r${r}`;
    line.append(title);
    kids.push(line);
  }
  box.replaceChildren(...kids);
}

async function loadTimeline(app, head) {
  // At most one read in flight and one every 2 s; an answer older than the last is dropped.
  S.timelineHead = head;
  S.timelineNext = Date.now() + 2000;
  const asked = ++S.timelineAsked;
  try {
    const t = await getJSON(`/ui/events?app=${encodeURIComponent(app)}&limit=200`);
    if (S.app !== app || asked !== S.timelineAsked) return;
    S.timeline = t;
    S.releases = t.releases || [];
    renderTimeline();
    renderReleasesSelect();
    renderActionsEnabled();
  } catch (e) {
    S.timelineHead = -1;
    S.timelineNext = Date.now() + 5000;
    const v = $('#verdicts');
    if (v) v.replaceChildren(el('p', { class: 'error', text: `cannot read the ledger: ${e.message}` }));
  }
}

function thresholdsText(t) {
  if (!t) return 'unknown: the release that was judged is not in the timeline';
  const parts = [`${t.default ? 'defaults (no [deploy.analysis]): ' : ''}max error rate ${pct(t.max_error_rate, 1)}`];
  if (t.max_p99_ms !== null && t.max_p99_ms !== undefined) {
    parts.push(`max p99 ${t.max_p99_ms} ms`);
  }
  if (t.compare_to_stable) parts.push('and not clearly worse than stable');
  parts.push(`at least ${t.min_requests} requests`);
  return parts.join(', ');
}

function measurementText(m) {
  return `${m.requests} requests, ${m.errors} errors (${pct(m.error_rate, 1)}), p99 ${ms(m.p99_ms)}`;
}

function renderTimeline() {
  const t = S.timeline;
  const verdicts = (t.verdicts || []).slice().reverse();
  $('#verdicts').replaceChildren(...(verdicts.length ? verdicts.map((v) =>
    el('div', { class: `verdict verdict-${v.verdict}`, 'data-verdict': v.verdict, 'data-seq': v.seq },
      el('div', { class: 'head' },
        el('strong', { text: v.verdict }),
        ` release ${v.release === null ? '?' : v.release}, step ${v.step} at ${v.weight}% · ${when(v.at_ms)}`),
      v.reason ? el('div', { class: 'why', text: v.reason }) : null,
      el('div', {}, el('span', { class: 'label', text: 'canary' }), measurementText(v.canary)),
      el('div', {}, el('span', { class: 'label', text: 'stable' }), measurementText(v.stable)),
      el('div', {}, el('span', { class: 'label', text: 'thresholds' }), thresholdsText(v.thresholds))))
    : [el('p', { class: 'muted', text: 'No canary step judged yet.' })]));
  const events = (t.events || []).slice().reverse();
  $('#timeline').replaceChildren(...events.map((e) => el('li', { 'data-seq': e.seq, 'data-kind': e.kind, class: `kind-${e.kind.split('.')[0]}` },
    el('span', { class: 'when', text: when(e.at_ms) }),
    el('span', { class: 'kind', text: e.kind }),
    el('span', { class: 'text', text: e.text }))));
}

// ---- the whole page ------------------------------------------------------------------------

function renderChain() {
  const c = (S.state && S.state.chain) || {};
  const chain = $('#chain');
  chain.dataset.state = c.state || 'unknown';
  if (c.state === 'ok') chain.textContent = `ledger ok: ${c.events} events${c.checkpoints ? `, ${c.checkpoints} checkpoints` : ''}`;
  else if (c.state === 'broken') chain.textContent = `ledger BROKEN at event ${c.seq}: ${c.message}`;
  else chain.textContent = 'ledger: not verified yet';
}

function render() {
  if (!S.state) return;
  renderChain();
  // A view an error replaced is built again once there is a state to show.
  if (S.app && !$('#app')) openApp(S.app);
  if (!S.app && !$('#apps')) buildOverview();
  if (S.app) renderApp();
  else renderOverview();
  if (!S.rendered) {
    S.rendered = true;
    window.kilnFirstRenderMs = performance.now();
    document.body.dataset.ready = '1';
  }
}

function connect() {
  const conn = $('#conn');
  const feed = new EventSource('/ui/feed');
  feed.addEventListener('state', (ev) => {
    try {
      S.state = JSON.parse(ev.data);
    } catch (e) {
      return;
    }
    conn.dataset.state = 'live';
    conn.textContent = 'live';
    render();
  });
  feed.addEventListener('error', () => {
    conn.dataset.state = 'lost';
    conn.textContent = 'reconnecting…';
    // A browser gives up on a feed answered with an error (the daemon full, or restarting):
    // try again a little later.
    if (feed.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  });
}

async function start() {
  setupToken();
  window.addEventListener('hashchange', route);
  const session = checkSession();
  let failed = null;
  try {
    S.state = await getJSON('/ui/state');
  } catch (e) {
    failed = e.message;
  }
  route();
  if (failed) $('#view').replaceChildren(el('p', { class: 'error', text: `cannot read the daemon's state: ${failed}` }));
  connect();
  await session;
}

start();
