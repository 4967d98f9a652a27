// edge-lb dashboard: polls the REST API each second and renders the node, BGP, the VIPs with a traffic chart
// per VIP, and the event log. No framework, no build step. Every value from the API reaches the page through
// textContent or setAttribute, never as markup.
"use strict";

(() => {
  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 3000;
  const WINDOW_S = 60; // the chart shows the last minute
  const EVENTS_SHOWN = 50;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const CHART_W = 600;
  const CHART_H = 160;
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  // Per VIP name: the packet counters of the previous poll {t, packets: Map address -> count} and the
  // rate samples of the last WINDOW_S seconds [{t, rates: Map address -> packets/s}]. t is in seconds.
  const traffic = new Map();

  // ---- helpers -------------------------------------------------------------------------------------------

  function el(tag, attrs = {}, text = undefined, ns = null) {
    const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  const svg = (tag, attrs = {}, text = undefined) => el(tag, attrs, text, SVG_NS);
  const byId = (id) => document.getElementById(id);

  function si(n, unit = "") {
    const value = Number(n) || 0;
    for (const [scale, prefix] of [[1e9, "G"], [1e6, "M"], [1e3, "k"]]) {
      if (Math.abs(value) >= scale) return `${(value / scale).toFixed(1)} ${prefix}${unit}`;
    }
    return `${Math.round(value)}${unit ? " " + unit : ""}`;
  }

  function bytes(n) {
    let value = Number(n) || 0;
    if (value < 1024) return `${value} B`;
    let unit = "B";
    for (unit of ["KiB", "MiB", "GiB", "TiB"]) {
      value /= 1024;
      if (value < 1024) break;
    }
    return `${value.toFixed(1)} ${unit}`;
  }

  const percent = (share) => `${((Number(share) || 0) * 100).toFixed(1)}%`;
  const latency = (s) => (s === null || s === undefined ? "–" : `${(Number(s) * 1000).toFixed(1)} ms`);

  function age(epoch) {
    if (epoch === null || epoch === undefined) return "never";
    return `${Math.max(0, Date.now() / 1000 - Number(epoch)).toFixed(0)} s ago`;
  }

  function duration(s) {
    const total = Math.floor(Number(s) || 0);
    const [d, h, m] = [Math.floor(total / 86400), Math.floor(total / 3600) % 24, Math.floor(total / 60) % 60];
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${total % 60}s` : `${total}s`;
  }

  // ---- data ----------------------------------------------------------------------------------------------

  async function getJSON(path) {
    const abort = new AbortController();
    const timer = setTimeout(() => abort.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch(path, {signal: abort.signal, cache: "no-store",
                                          headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
      return await response.json();
    } catch (err) {
      throw new Error(err.name === "AbortError" ? `${path}: no answer in ${FETCH_TIMEOUT_MS} ms` : String(err.message || err));
    } finally {
      clearTimeout(timer);
    }
  }

  // Turn one poll's packet counters into packets/s since the previous poll.
  function recordTraffic(vip, t) {
    let seen = traffic.get(vip.vip);
    if (!seen) traffic.set(vip.vip, (seen = {last: null, samples: []}));
    const packets = new Map(vip.backends.map((b) => [b.address, Number(b.packets) || 0]));
    if (seen.last && t > seen.last.t) {
      const dt = t - seen.last.t;
      const rates = new Map();
      for (const [address, count] of packets) {
        const before = seen.last.packets.get(address);
        // A backend new to this VIP, or counters reset by a restart: no rate for this interval.
        rates.set(address, before === undefined || count < before ? 0 : (count - before) / dt);
      }
      seen.samples.push({t, rates});
    }
    seen.last = {t, packets};
    while (seen.samples.length && seen.samples[0].t < t - WINDOW_S) seen.samples.shift();
    return seen;
  }

  // ---- rendering -----------------------------------------------------------------------------------------

  function renderNode(node) {
    byId("node-instance").textContent = node.instance || "";
    const summary = byId("node-summary");
    summary.dataset.phase = node.phase || "unknown";
    summary.textContent = [
      `${node.phase || "?"} on ${node.interface || "?"} (XDP ${node.attached ? "attached" : "not attached"})`,
      `pid ${node.pid ?? "?"}`, `up ${duration(node.uptime)}`, `gateway ${node.gateway_mac || "?"}`,
      `config ${node.config || "?"}`,
    ].join(" · ");
    // The same lines as `edge-lb status`: local faults, tunnel checks, watchdog, speaker, connection table.
    const notices = node.notices || [];
    const list = byId("node-notices");
    list.dataset.count = notices.length;
    list.replaceChildren(...notices.map((text) => el("li", {}, text)));
    renderBgp(node.bgp ?? null);
  }

  function renderBgp(bgp) {
    byId("bgp-none").hidden = bgp !== null;
    byId("bgp-peers").hidden = bgp === null;
    const banner = byId("bgp-disabled");
    banner.hidden = !(bgp && bgp.disabled);
    banner.textContent = bgp && bgp.disabled
      ? `Disabled for maintenance: every VIP is withdrawn while ${bgp.disable_file || "the disable file"} exists.`
      : "";
    const peers = bgp ? Object.entries(bgp.peers || {}).sort(([a], [b]) => a.localeCompare(b)) : [];
    byId("bgp-peers").tBodies[0].replaceChildren(...peers.map(([peer, state]) => {
      const row = el("tr", {"data-peer": peer, "data-state": state});
      row.append(el("td", {}, peer), el("td", {class: "state"}, state));
      return row;
    }));
    const announced = bgp ? bgp.announced || [] : [];
    const list = byId("bgp-announced");
    list.textContent = announced.length ? "" : "nothing";
    list.dataset.count = announced.length;
    list.append(...announced.map((prefix) => el("code", {"data-prefix": prefix}, prefix)));
  }

  function vipSection(name) {
    const container = byId("vips");
    for (const section of container.children) if (section.dataset.vip === name) return section;
    const section = el("section", {class: "vip", "data-vip": name});
    const table = el("table", {class: "backends"});
    const head = el("tr");
    for (const title of ["Backend", "State", "Weight", "Ring share", "Packets", "Bytes", "Encap", "Check",
                         "Last reason", "Latency", "Checked"]) head.append(el("th", {}, title));
    table.append(el("thead"), el("tbody"));
    table.tHead.append(head);
    const figure = el("figure", {class: "chart"});
    const caption = el("figcaption", {}, `Traffic share: packets/s per backend, last ${WINDOW_S} s`);
    caption.append(el("span", {class: "scale"}));
    figure.append(caption,
                  svg("svg", {class: "traffic", viewBox: `0 0 ${CHART_W} ${CHART_H}`,
                              preserveAspectRatio: "none", role: "img", "data-samples": 0}),
                  el("ul", {class: "legend"}));
    section.append(el("h3"), table, figure);
    container.append(section);
    return section;
  }

  function backendRow(vipName, b) {
    const row = el("tr", {"data-vip": vipName, "data-backend": b.address, "data-state": b.state});
    const weight = b.config_weight !== undefined && b.config_weight !== b.weight
      ? `${b.weight} (config ${b.config_weight})` : b.weight;
    const cells = [["address", b.address], ["state", b.state], ["weight", weight],
                   ["ring-share", percent(b.ring_share)], ["packets", si(b.packets)], ["bytes", bytes(b.bytes)],
                   ["encap", b.encap ?? "–"], ["via", b.via ? `${b.check} via ${b.via}` : "–"], ["reason", b.reason ?? ""], ["latency", latency(b.latency)], ["checked", age(b.last_check)]];
    row.append(...cells.map(([name, value]) => el("td", {class: name}, value)));
    row.querySelector("td.packets").title = String(b.packets);
    row.querySelector("td.bytes").title = String(b.bytes);
    return row;
  }

  function renderVips(vips, t) {
    const names = new Set();
    for (const vip of vips) {
      vip.vip = vip.vip || `${vip.address}:${vip.port}/${vip.protocol}`;
      names.add(vip.vip);
      const section = vipSection(vip.vip);
      section.querySelector("h3").textContent =
        `${vip.vip} — ${vip.healthy}/${vip.backends.length} healthy, ${vip.in_ring} in the ring, ` +
        `${si(vip.packets)} packets, ${bytes(vip.bytes)}`;
      section.querySelector("tbody").replaceChildren(...vip.backends.map((b) => backendRow(vip.vip, b)));
      drawChart(section.querySelector("figure.chart"), recordTraffic(vip, t), vip.backends, t);
    }
    for (const section of [...byId("vips").children]) {
      if (!names.has(section.dataset.vip)) {
        traffic.delete(section.dataset.vip);
        section.remove();
      }
    }
  }

  // A stacked area chart: one band per backend, its height that backend's packets/s, x the last WINDOW_S s.
  function drawChart(figure, seen, backends, now) {
    const chart = figure.querySelector("svg");
    const samples = seen.samples;
    const addresses = backends.map((b) => b.address);
    const totals = samples.map((s) => addresses.reduce((sum, a) => sum + (s.rates.get(a) || 0), 0));
    const top = Math.max(1, ...totals);
    const x = (t) => (CHART_W * (1 - (now - t) / WINDOW_S)).toFixed(1);
    const y = (v) => (CHART_H - (v / top) * (CHART_H - 14)).toFixed(1);
    const floor = samples.map(() => 0);
    const parts = [svg("line", {class: "axis", x1: 0, y1: CHART_H - 0.5, x2: CHART_W, y2: CHART_H - 0.5})];
    addresses.forEach((address, i) => {
      const ceiling = samples.map((s, k) => floor[k] + (s.rates.get(address) || 0));
      const upper = samples.map((s, k) => `${x(s.t)},${y(ceiling[k])}`);
      const lower = samples.map((s, k) => `${x(s.t)},${y(floor[k])}`).reverse();
      const path = svg("path", {class: "series", "data-backend": address, "data-points": samples.length,
                                fill: COLOURS[i % COLOURS.length],
                                d: samples.length ? `M${upper.join("L")}L${lower.join("L")}Z` : ""});
      path.append(svg("title", {}, address));
      parts.push(path);
      ceiling.forEach((v, k) => { floor[k] = v; });
    });
    chart.replaceChildren(...parts);
    chart.dataset.samples = samples.length;
    chart.dataset.maxPps = Math.round(top);
    figure.querySelector("span.scale").textContent = `top of the scale ${si(top, "pkt/s")}`;

    const latest = samples.length ? samples[samples.length - 1] : null;
    const total = latest ? totals[totals.length - 1] : 0;
    figure.querySelector("ul.legend").replaceChildren(...addresses.map((address, i) => {
      const pps = latest ? latest.rates.get(address) || 0 : 0;
      const item = el("li", {"data-backend": address, "data-pps": Math.round(pps)});
      const swatch = el("span", {class: "swatch"});
      swatch.style.background = COLOURS[i % COLOURS.length];
      item.append(swatch, el("span", {}, `${address} ${si(pps, "pkt/s")}` +
                                        (total > 0 ? ` (${percent(pps / total)})` : "")));
      return item;
    }));
  }

  function renderEvents(events) {
    const newest = events.slice(-EVENTS_SHOWN).reverse();
    byId("events").replaceChildren(...newest.map((event) => {
      const item = el("li", {"data-event": event.event});
      const when = new Date(Number(event.time) * 1000);
      const fields = Object.entries(event).filter(([k]) => k !== "time" && k !== "event")
        .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`).join(" ");
      item.append(el("time", {datetime: isNaN(when) ? "" : when.toISOString()},
                     isNaN(when) ? "?" : when.toLocaleTimeString()),
                  el("strong", {}, event.event), el("span", {class: "fields"}, fields));
      return item;
    }));
  }

  function renderConnection(problems) {
    const conn = byId("conn");
    conn.dataset.ok = problems.length ? "false" : "true";
    conn.hidden = problems.length === 0;
    conn.textContent = problems.length ? `API problem (showing the last data received): ${problems.join("; ")}` : "";
    document.body.dataset.polls = (Number(document.body.dataset.polls) || 0) + 1;
  }

  // ---- the loop ------------------------------------------------------------------------------------------

  async function poll() {
    const results = await Promise.allSettled([
      getJSON("/api/v1/node"), getJSON("/api/v1/vips"), getJSON(`/api/v1/events?limit=${EVENTS_SHOWN}`)]);
    const t = performance.now() / 1000;
    const renderers = [renderNode, (vips) => renderVips(vips, t), renderEvents];
    const problems = [];
    results.forEach((result, i) => {
      if (result.status === "rejected") {
        problems.push(result.reason.message || String(result.reason));
        return;
      }
      try {
        renderers[i](result.value);
      } catch (err) { // a document of an unexpected shape: say so, keep polling
        problems.push(`cannot show ${["node", "vips", "events"][i]}: ${err.message || err}`);
      }
    });
    renderConnection(problems);
  }

  async function loop() {
    const started = performance.now();
    await poll();
    setTimeout(loop, Math.max(0, POLL_MS - (performance.now() - started)));
  }

  loop();
})();
