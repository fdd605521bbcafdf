// p2ptrain dashboard: live view of one ring. Plain JS, no libraries; charts are SVG drawn here.
// Everything from the server is shown as text (textContent), never parsed as HTML.
'use strict';
(() => {
  const SVG = 'http://www.w3.org/2000/svg';
  const $ = (id) => document.getElementById(id);
  const KEY = 'p2ptrain-dashboard-token';
  let token = sessionStorage.getItem(KEY) || '';
  if (location.hash.startsWith('#token=')) {
    token = decodeURIComponent(location.hash.slice(7));
    sessionStorage.setItem(KEY, token);
    history.replaceState(null, '', location.pathname);
  }
  let source = null;
  let retry = null;
  let updates = 0;
  let failures = 0;  // stream failures since the last update: retry at once the first time, then every 2 s

  // --- connection ---------------------------------------------------------------------------

  function setConn(state, text) {
    const el = $('conn');
    el.dataset.state = state;
    el.textContent = text || state;
  }

  function connect() {
    if (source) source.close();
    const url = '/api/events' + (token ? '?token=' + encodeURIComponent(token) : '');
    source = new EventSource(url);
    source.addEventListener('status', (ev) => {
      let snap;
      try { snap = JSON.parse(ev.data); } catch (e) { return; }
      updates += 1;
      failures = 0;
      render(snap);
      setConn('live');
    });
    source.onerror = () => {
      failures += 1;
      setConn('reconnecting');
      if (source.readyState === EventSource.CLOSED) {  // refused (401, 429, 503...): find out why, then retry
        source.close();
        source = null;
        probe();
      }
    };
  }

  async function probe() {
    try {
      const r = await fetch('/api/status', {headers: token ? {Authorization: 'Bearer ' + token} : {}, cache: 'no-store'});
      if (r.status === 401) { askToken(Boolean(token)); return; }
      if (r.ok) { render(await r.json()); }
    } catch (e) { /* the member is down or restarting: try again below */ }
    clearTimeout(retry);
    retry = setTimeout(connect, failures ? 2000 : 0);
  }

  function askToken(wrong) {
    setConn('token', 'token needed');
    show($('token-form'), true);
    $('token-error').textContent = wrong ? 'that token was not accepted' : '';
    $('token-input').focus();
  }

  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    token = $('token-input').value.trim();
    sessionStorage.setItem(KEY, token);
    show($('token-form'), false);
    probe();
  });

  // --- formatting ---------------------------------------------------------------------------

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return '–';
    return Number(x).toFixed(digits);
  }
  function bytes(n) {
    if (n === null || n === undefined) return '–';
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return n.toFixed(i ? 1 : 0) + ' ' + units[i];
  }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = String(text);
    return e;
  }
  function show(e, on) { e.toggleAttribute('hidden', !on); }
  function bar(fraction) {
    const outer = el('span', null, 'bar');
    const inner = el('span');
    inner.style.width = Math.round(100 * Math.max(0, Math.min(1, fraction || 0))) + '%';
    outer.appendChild(inner);
    return outer;
  }

  // --- rendering ----------------------------------------------------------------------------

  function render(s) {
    $('main').dataset.updates = String(updates);
    $('cluster').textContent = s.cluster ? 'cluster ' + s.cluster : '';
    $('ring-line').textContent = `view ${s.epoch} · ${s.members.length} member${s.members.length === 1 ? '' : 's'} · ${s.state}`;
    $('me').textContent = s.me;
    $('updated').textContent = clock(s.t);
    const srv = s.server || {};
    $('server-stats').textContent = `reports ${s.stats.reports}, dropped ${s.stats.malformed + s.stats.too_fast}` +
      (srv.rate_limited || srv.closed_slow ? ` · refused requests ${srv.rate_limited + srv.not_allowed + srv.unauthorized}, slow connections closed ${srv.closed_slow}` : '');
    renderMembers(s.members);
    renderJob(s.job, s.members, s.series);
    renderPlan(s.plan);
    const steps = s.series.map((p) => p[0]);
    const recov = s.events.filter((e) => e.kind === 'recovery').map((e) => e.step);
    lineChart($('loss-chart'), steps, s.series.map((p) => p[1]), recov, '');
    lineChart($('sps-chart'), steps, s.series.map((p) => p[2]), recov, 'sps');
    renderTimeline(s.timeline);
    renderEvents(s.events);
  }

  function renderMembers(members) {
    const body = $('members').tBodies[0];
    body.replaceChildren();
    $('member-count').textContent = `(${members.length})`;
    for (const m of members) {
      const tr = el('tr');
      tr.dataset.member = m.id;
      if (m.me) tr.classList.add('me');
      if (m.stale && !m.me) tr.classList.add('stale');
      tr.appendChild(el('td', m.id));
      tr.appendChild(el('td', m.address || '–', 'small'));
      tr.appendChild(el('td', m.state, 'state-' + m.state));
      tr.appendChild(el('td', m.cores ?? '–', 'num'));
      tr.appendChild(el('td', bytes(m.memory_bytes), 'num'));
      tr.appendChild(el('td', m.accelerator || '–'));
      tr.appendChild(el('td', fmt(m.gflops, 1), 'num'));
      tr.appendChild(el('td', m.battery === null || m.battery === undefined ? 'mains' : fmt(100 * m.battery, 0) + '%', 'num'));
      tr.appendChild(el('td', m.power || '–'));
      const busy = el('td');
      if (m.busy !== undefined && m.busy !== null) {
        busy.appendChild(bar(m.busy));
        busy.appendChild(document.createTextNode(' ' + fmt(100 * m.busy, 0) + '%'));
      } else {
        busy.textContent = m.stale && !m.me ? 'no report' : '–';
      }
      tr.appendChild(busy);
      tr.appendChild(el('td', m.joules === undefined ? '–' : fmt(m.joules, 2) + (m.measured ? '' : ' est.'), 'num'));
      tr.appendChild(el('td', m.joules_total === undefined ? '–' : fmt(m.joules_total, 1), 'num'));
      tr.appendChild(el('td', m.step === undefined ? '–' : m.step + 1, 'num'));
      body.appendChild(tr);
    }
  }

  function renderJob(job, members, series) {
    show($('job-none'), !job);
    show($('job'), Boolean(job));
    if (!job) return;
    const last = series.length ? series[series.length - 1] : null;
    const step = last ? last[0] + 1 : 0;
    $('job-model').textContent = job.model;
    $('job-strategy').textContent = job.strategy + (job.schedule && job.strategy === 'pipeline' ? ' (' + job.schedule + ')' : '');
    $('job-step').textContent = `step ${step} of ${job.steps}`;
    $('job-bar').style.width = Math.round(100 * Math.min(1, step / Math.max(1, job.steps))) + '%';
    $('loss-now').textContent = last ? fmt(last[1], 4) : '–';
    $('sps-now').textContent = last ? fmt(last[2], 0) : '–';
    $('job-batch').textContent = `${job.global_batch} samples per step, codec ${job.codec}`;
    $('job-id').textContent = job.id;
  }

  function renderPlan(plan) {
    show($('plan-none'), !plan);
    show($('plan'), Boolean(plan));
    $('plan-kind').textContent = plan ? '(' + plan.kind + ')' : '';
    $('plan-who').textContent = plan && plan.kind !== 'pipeline' ? 'member (samples of each global batch)' : 'members (share of each micro-batch)';
    const body = $('plan').tBodies[0];
    body.replaceChildren();
    if (!plan) { $('plan-note').textContent = ''; return; }
    for (const st of plan.stages) {
      const tr = el('tr');
      tr.appendChild(el('td', st.stage, 'num'));
      const who = st.members.map((m, i) => st.members.length > 1 || plan.kind !== 'pipeline' ? `${m} (${st.shares[i]})` : m);
      tr.appendChild(el('td', who.join(', ')));
      tr.appendChild(el('td', st.layers ? (st.layers[0] === st.layers[1] ? String(st.layers[0]) : `${st.layers[0]}–${st.layers[1]}`) : 'all (full replica)'));
      body.appendChild(tr);
    }
    $('plan-note').textContent = plan.kind === 'pipeline'
      ? `${plan.micro_batches} micro-batch${plan.micro_batches === 1 ? '' : 'es'}, ${plan.schedule}; ` +
        `predicted ${fmt(plan.predicted_samples_per_s, 0)} samples/s`
      : 'data parallel: every member holds the whole model and takes its share of each global batch';
  }

  function ticks(lo, hi, n) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / n;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map((k) => k * mag).find((k) => k >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(v);
    out.decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
    return out;
  }

  function lineChart(root, xs, ys, marks, cls) {
    const W = 480, H = 200, L = 48, R = 10, T = 10, B = 26;
    root.replaceChildren();
    const pts = xs.map((x, i) => [x, ys[i]]).filter((p) => p[1] !== null && Number.isFinite(p[1]));
    if (!pts.length) {
      root.appendChild(svg('text', {x: W / 2, y: H / 2, 'text-anchor': 'middle'}, 'waiting for the first step…'));
      return;
    }
    let x0 = pts[0][0], x1 = pts[pts.length - 1][0];
    if (x1 === x0) x1 = x0 + 1;
    let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
    if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
    const pad = 0.05 * (y1 - y0);
    y0 -= pad; y1 += pad;
    const sx = (x) => L + (W - L - R) * (x - x0) / (x1 - x0);
    const sy = (y) => T + (H - T - B) * (1 - (y - y0) / (y1 - y0));
    const yt = ticks(y0, y1, 4);
    for (const v of yt) {
      root.appendChild(svg('line', {x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: 'grid'}));
      root.appendChild(svg('text', {x: L - 4, y: sy(v) + 4, 'text-anchor': 'end'}, v.toFixed(yt.decimals)));
    }
    for (const v of ticks(x0, x1, 5)) {
      root.appendChild(svg('text', {x: sx(v), y: H - 8, 'text-anchor': 'middle'}, String(Math.round(v + 1))));
    }
    root.appendChild(svg('line', {x1: L, x2: L, y1: T, y2: H - B, class: 'axis'}));
    root.appendChild(svg('line', {x1: L, x2: W - R, y1: H - B, y2: H - B, class: 'axis'}));
    for (const m of marks) {
      if (m >= x0 && m <= x1) root.appendChild(svg('line', {x1: sx(m), x2: sx(m), y1: T, y2: H - B, class: 'event'}));
    }
    const d = pts.map((p, i) => (i ? 'L' : 'M') + sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1)).join('');
    root.appendChild(svg('path', {d, class: 'line ' + cls}));
  }

  function renderTimeline(tl) {
    const root = $('timeline');
    const has = tl && tl.lanes.some((l) => l.ops.length);
    show($('timeline-none'), !has);
    show(root, has);
    root.replaceChildren();
    if (!has) return;
    const W = 960, L = 150, R = 10, lane = 22, H = 20 + lane * tl.lanes.length;
    root.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const sx = (t) => L + (W - L - R) * (t + tl.window_s) / tl.window_s;
    tl.lanes.forEach((ln, i) => {
      const y = 4 + i * lane;
      root.appendChild(svg('rect', {x: L, y, width: W - L - R, height: lane - 4, class: 'lane'}));
      root.appendChild(svg('text', {x: L - 6, y: y + 13, 'text-anchor': 'end'}, ln.id));
      for (const [kind, micro, a, b] of ln.ops) {
        const x = Math.max(L, sx(a));
        const r = svg('rect', {x, y: y + 1, width: Math.max(1, Math.min(W - R, sx(b)) - x), height: lane - 6, class: 'k' + kind});
        r.appendChild(svg('title', {}, `${['forward', 'backward', 'optimizer'][kind]} micro-batch ${micro}`));
        root.appendChild(r);
      }
    });
    root.appendChild(svg('text', {x: W - R, y: H - 2, 'text-anchor': 'end'}, `last ${(tl.window_s * 1000).toFixed(0)} ms →`));
  }

  function renderEvents(events) {
    const list = $('events');
    list.replaceChildren();
    for (const e of events) {
      const li = el('li');
      li.appendChild(el('span', clock(e.t) + ' ', 'muted'));
      if (e.kind === 'recovery') {
        li.appendChild(el('span', `recovery: the job went on at step ${e.step + 1} in view ${e.epoch} with ${e.members.length} members`, 'failed'));
      } else {
        li.appendChild(el('span', `view ${e.epoch}: ${e.members.length} member${e.members.length === 1 ? '' : 's'}`));
        if (e.joined.length) li.appendChild(el('span', ' · joined ' + e.joined.join(', '), 'joined'));
        if (e.left.length) li.appendChild(el('span', ' · left ' + e.left.join(', '), 'left'));
        if (e.failed.length) li.appendChild(el('span', ' · failed ' + e.failed.join(', '), 'failed'));
      }
      list.appendChild(li);
    }
  }

  probe();
})();
