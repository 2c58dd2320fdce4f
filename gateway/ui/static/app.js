// The fleet dashboard: one page, the gateway's read API behind it, refreshed every few seconds.
// No inline script and no markup built from strings: every value reaches the page as text.
"use strict";

(() => {
  const REFRESH_MS = 5000;
  const PAGE = 100;
  const RANGES = { "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
  // The tile server an administrator configured (--ui-tiles), or null: tracks are then drawn on plain axes.
  const TILES = (() => {
    const meta = document.querySelector('meta[name="gateway-tiles"]');
    return meta ? { url: meta.content, attribution: meta.dataset.attribution || "" } : null;
  })();
  // Names in natural order, as the read API lists devices: sim-2 before sim-10.
  const NATURAL = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });
  const state = { session: null, timer: null, view: null, sort: {}, busy: false };

  // -- small helpers ------------------------------------------------------

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "text") node.textContent = value;
      else if (key === "class") node.className = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const view = () => document.getElementById("view");
  const say = (text) => { document.getElementById("status").textContent = text; };
  const badge = (text, kind) => el("span", { class: `badge ${kind || text}`, text });

  function ago(iso) {
    if (!iso) return "never";
    const s = (Date.now() - Date.parse(iso)) / 1000;
    if (s < 0) return "just now";
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    if (s < 172800) return `${Math.round(s / 3600)} h ago`;
    return `${Math.round(s / 86400)} d ago`;
  }
  const when = (iso) => (iso ? new Date(iso).toLocaleString() : "—");
  const num = (v) => (v === null || v === undefined ? "—" : typeof v === "number" ? v.toLocaleString() : String(v));

  class ApiFailure extends Error {
    constructor(status, doc) {
      super((doc && doc.message) || `the gateway answered ${status}`);
      this.status = status;
      this.code = doc && doc.error;
    }
  }

  async function call(path, method = "GET", body = undefined) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && state.session) headers["X-CSRF-Token"] = state.session.csrf;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
    });
    let doc = null;
    try { doc = await response.json(); } catch (e) { doc = null; }
    if (response.status === 401 && path.startsWith("/v1/")) {
      signedOut((doc && doc.message) || "signed out");
    }
    if (!response.ok && !(path === "/healthz" && response.status === 503)) throw new ApiFailure(response.status, doc);
    return doc;
  }
  const q = (params) => {
    const s = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") s.set(k, v);
    const text = s.toString();
    return text ? `?${text}` : "";
  };
  const enc = encodeURIComponent;

  // A sortable table: columns are {key, label, num, cell(row) -> node|text, sort(row) -> value}.
  function table(id, caption, columns, rows) {
    const sort = state.sort[id] || { key: null, dir: 1 };
    const column = columns.find((c) => c.key === sort.key);
    const sorted = column ? [...rows].sort((a, b) => {
      const va = column.sort ? column.sort(a) : a[column.key];
      const vb = column.sort ? column.sort(b) : b[column.key];
      if (va === vb) return 0;
      if (va === null || va === undefined) return 1;
      if (vb === null || vb === undefined) return -1;
      if (typeof va === "string" && typeof vb === "string") return NATURAL.compare(va, vb) * sort.dir;
      return (va < vb ? -1 : 1) * sort.dir;
    }) : rows;
    const head = columns.map((c) => el("th", {
      scope: "col", class: c.num ? "num" : null,
      "aria-sort": sort.key === c.key ? (sort.dir > 0 ? "ascending" : "descending") : "none",
    }, el("button", {
      type: "button", text: c.label,
      onclick: () => {
        state.sort[id] = { key: c.key, dir: sort.key === c.key ? -sort.dir : 1 };
        refresh();
      },
    })));
    const body = sorted.map((row) => el("tr", {}, columns.map((c) => el("td", {
      class: [c.num ? "num" : "", c.wrap ? "wrap" : ""].join(" ").trim() || null,
    }, c.cell ? c.cell(row) : num(row[c.key])))));
    return el("div", { class: "table-wrap" }, el("table", { id },
      el("caption", { class: "skip", text: caption }),
      el("thead", {}, el("tr", {}, head)),
      el("tbody", {}, body.length ? body : el("tr", {}, el("td", { colspan: columns.length, class: "empty", text: "none" })))));
  }

  // -- sign in and out ------------------------------------------------------

  function signedIn(session) {
    state.session = session;
    document.getElementById("signin").hidden = true;
    document.getElementById("nav").hidden = false;
    document.getElementById("signout").hidden = false;
    document.getElementById("who").textContent = `${session.subject} (${session.role})`;
    route();
  }

  function signedOut(message) {
    state.session = null;
    clearInterval(state.timer);
    state.timer = null;
    view().replaceChildren();
    document.getElementById("nav").hidden = true;
    document.getElementById("signout").hidden = true;
    document.getElementById("who").textContent = "";
    document.getElementById("signin").hidden = false;
    document.getElementById("signin-error").textContent = message || "";
    document.getElementById("token").focus();
    call("/ui/sign-in").then((options) => {
      const box = document.getElementById("provider");
      box.hidden = !options.provider;
      if (options.provider) {
        const link = document.getElementById("provider-link");
        link.textContent = `Sign in with ${options.provider.name}`;
        link.href = options.provider.url;
      }
    }, () => {});
  }

  async function signIn(event) {
    event.preventDefault();
    const input = document.getElementById("token");
    try {
      const session = await call("/ui/session", "POST", { token: input.value.trim() });
      input.value = "";
      signedIn(session);
    } catch (e) {
      document.getElementById("signin-error").textContent = e.message;
    }
  }

  async function signOut() {
    try { await call("/ui/session", "DELETE"); } catch (e) { /* ended anyway */ }
    signedOut("signed out");
  }

  // -- the pages ------------------------------------------------------------

  const pages = {};

  pages.fleet = {
    title: "Fleet",
    setup(params) {
      this.match = params.get("match") || "";
      this.filter = params.get("status") || "all";
      this.cursors = [null];
      const search = el("input", {
        id: "fleet-search", type: "search", value: this.match, placeholder: "name contains…", "aria-label": "Search devices",
        oninput: (e) => { this.match = e.target.value; this.cursors = [null]; debounce(refresh, 300); },
      });
      const filter = el("select", {
        id: "fleet-filter", "aria-label": "Show",
        onchange: (e) => { this.filter = e.target.value; refresh(); },
      }, ["all", "online", "silent", "flagged", "revoked"].map((v) => el("option", { value: v, text: v, selected: v === this.filter })));
      this.pager = el("span", { class: "pager" });
      this.count = el("span", { class: "count" });
      this.body = el("div");
      return [el("h1", { text: "Fleet" }), el("div", { class: "toolbar" }, search, filter, this.count, this.pager), this.body];
    },
    async load() {
      const cursor = this.cursors[this.cursors.length - 1];
      const page = await call(`/v1/devices${q({ limit: PAGE, cursor, match: this.match })}`);
      const status = (d) => (d.status === "revoked" ? "revoked" : d.quality.flagged ? "flagged" : d.silent ? "silent" : d.online ? "online" : "idle");
      const devices = page.devices.filter((d) => this.filter === "all" || status(d) === this.filter);
      this.body.replaceChildren(table("fleet", "Devices", [
        { key: "name", label: "Device", cell: (d) => el("a", { href: `#/device/${enc(d.name)}`, text: d.name }) },
        { key: "status", label: "Status", sort: status, cell: (d) => badge(status(d)) },
        { key: "transport", label: "Transport", cell: (d) => d.transport || "—" },
        { key: "address", label: "Address", cell: (d) => d.address || "—" },
        { key: "last_seen", label: "Last seen", cell: (d) => el("time", { datetime: d.last_seen, title: when(d.last_seen), text: ago(d.last_seen) }) },
        { key: "readings_today", label: "Readings today", num: true },
        { key: "failures", label: "Quality failures", num: true, sort: (d) => d.quality.failures, cell: (d) => num(d.quality.failures) },
      ], devices));
      const n = this.cursors.length;
      this.count.textContent = `page ${n}: ${devices.length} of ${page.devices.length} shown`;
      this.pager.replaceChildren(
        el("button", { type: "button", text: "Previous", disabled: n === 1, onclick: () => { this.cursors.pop(); refresh(); } }),
        el("button", { type: "button", text: "Next", disabled: !page.next_cursor, onclick: () => { this.cursors.push(page.next_cursor); refresh(); } }),
      );
    },
  };

  pages.device = {
    setup(params, name) {
      this.name = name;
      this.range = params.get("range") || "24h";
      this.zoom = null;
      this.charts = {};
      this.head = el("div");
      this.latest = el("div", { class: "cards" });
      this.chartBox = el("div", { class: "charts" });
      this.quarantine = el("div");
      this.alerts = el("div");
      this.rejected = el("div");
      this.commands = el("div");
      this.desired = el("div");
      const ranges = el("span", { role: "group", "aria-label": "Chart range" }, Object.keys(RANGES).map((r) => el("button", {
        type: "button", text: `last ${r}`, "aria-pressed": String(r === this.range), class: r === this.range ? "primary" : null,
        onclick: () => { location.hash = `#/device/${enc(name)}?range=${r}`; },
      })));
      return [
        el("h1", {}, el("a", { href: "#/fleet", text: "Fleet" }), " / ", name), this.head,
        el("h2", { text: "Latest values" }), this.latest,
        el("div", { class: "toolbar" }, el("h2", { text: "Charts" }), ranges,
          el("button", { type: "button", text: "Follow now", onclick: () => { this.zoom = null; refresh(); } })),
        this.chartBox,
        el("h2", { text: "Commands" }), this.commandForm(name), this.commands,
        el("h2", { text: "Desired configuration" }), this.desired,
        el("h2", { text: "Quarantined readings" }), this.quarantine,
        el("h2", { text: "Alerts" }), this.alerts,
        el("h2", { text: "Rejected input" }), this.rejected,
      ];
    },
    async load() {
      const name = enc(this.name);
      const [device, latest, alerts, rejected] = await Promise.all([
        call(`/v1/devices/${name}`), call(`/v1/devices/${name}/latest`),
        call(`/v1/alerts${q({ device: this.name, limit: 50 })}`), call(`/v1/devices/${name}/rejected?limit=20`),
      ]);
      const status = device.status === "revoked" ? "revoked" : device.quality.flagged ? "flagged" : device.silent ? "silent" : device.online ? "online" : "idle";
      this.head.replaceChildren(el("p", {}, badge(status), ` ${device.transport || "never connected"} ${device.address || ""} · last seen `,
        el("time", { datetime: device.last_seen, text: ago(device.last_seen) }),
        ` · ${num(device.readings_today)} readings today · quality: ${device.quality.failures} failures in ${device.quality.window} s (flag at ${device.quality.threshold})`));
      const metrics = Object.keys(latest.metrics).sort();
      this.latest.replaceChildren(...(metrics.length ? metrics.map((m) => {
        const v = latest.metrics[m];
        return el("div", { class: "card", id: `latest-${m}` }, el("div", { class: "label", text: m }),
          el("div", { class: "value", text: num(v.value) }),
          el("div", { class: "age" }, el("time", { datetime: v.ts, title: when(v.ts), text: ago(v.ts) })));
      }) : [el("p", { class: "empty", text: "no readings yet" })]));
      await this.draw(metrics);
      await this.loadCommands();
      await this.loadQuarantine();
      this.alerts.replaceChildren(alertsTable("device-alerts", alerts.alerts, false));
      this.rejected.replaceChildren(table("device-rejected", "Rejected input", [
        { key: "received_at", label: "Received", cell: (r) => when(r.received_at) },
        { key: "source", label: "From" },
        { key: "reason", label: "Reason", wrap: true, cell: (r) => r.reason },
        { key: "bytes", label: "Bytes", num: true },
        { key: "sample", label: "Input (start)", wrap: true, cell: (r) => el("code", { text: r.sample }) },
      ], rejected.rejected));
    },
    commandForm(name) {
      if (!["operator", "admin"].includes(state.session.role)) {
        return el("p", { class: "empty", text: "Sending commands needs the operator role." });
      }
      const command = el("input", { id: "command-name", name: "name", required: true, placeholder: "reboot", "aria-label": "Command" });
      const params = el("input", { id: "command-params", name: "params", placeholder: '{"hz": 5}', "aria-label": "Parameters (JSON)" });
      const ttl = el("input", { id: "command-ttl", name: "ttl", value: "10m", size: 5, "aria-label": "Expires after" });
      const send = async (event) => {
        event.preventDefault();
        let body;
        try {
          body = { name: command.value.trim(), params: params.value.trim() ? JSON.parse(params.value) : {}, ttl: ttl.value.trim() };
        } catch (e) { say(`parameters: not JSON (${e.message})`); return; }
        try {
          const done = await call(`/v1/devices/${enc(name)}/commands`, "POST", body);
          say(`command ${done.id} (${done.name}) ${done.state}`);
          command.value = ""; params.value = "";
        } catch (e) { say(`not sent: ${e.message}`); }
        refresh();
      };
      return el("form", { id: "command-form", class: "toolbar", onsubmit: send },
        el("label", {}, "Command ", command), el("label", {}, "Parameters ", params), el("label", {}, "Expires after ", ttl),
        el("button", { type: "submit", class: "primary", text: "Send" }));
    },
    async loadCommands() {
      const name = enc(this.name);
      const [doc, desired] = await Promise.all([call(`/v1/devices/${name}/commands?limit=20`), call(`/v1/devices/${name}/desired`)]);
      this.commands.replaceChildren(table("device-commands", "Commands", [
        { key: "created", label: "Sent at", cell: (c) => when(c.created) },
        { key: "name", label: "Command" },
        { key: "params", label: "Parameters", wrap: true, cell: (c) => el("code", { text: JSON.stringify(c.params) }) },
        { key: "state", label: "State", cell: (c) => el("span", { "data-command": c.id }, badge(c.state)) },
        { key: "attempts", label: "Sent", num: true },
        { key: "transport", label: "Over", cell: (c) => c.transport || "—" },
        { key: "sender", label: "By" },
        { key: "result", label: "Result", wrap: true, cell: (c) => (c.result === null ? "—" : el("code", { text: JSON.stringify(c.result) })) },
        { key: "cancel", label: "", cell: (c) => (["queued", "sent"].includes(c.state) && ["operator", "admin"].includes(state.session.role) ? el("button", {
          type: "button", text: "Cancel", "aria-label": `Cancel command ${c.id}`,
          onclick: async () => {
            try { await call(`/v1/commands/${enc(c.id)}/cancel`, "POST"); say(`command ${c.id} canceled`); } catch (e) { say(e.message); }
            refresh();
          },
        }) : "") },
      ], doc.commands));
      this.desired.replaceChildren(desired.version ? tree({
        version: desired.version, desired: desired.desired, reported: desired.reported, "still to apply": desired.delta,
      }) : el("p", { class: "empty", text: "None set (PUT /v1/devices/{name}/desired, or gatewayctl device desire)." }));
    },
    // A tracker's track: its positions over the chart's window, longitude across and latitude up, drawn from
    // the series API (the mean position of each time bucket) with no map tiles fetched from anywhere.
    async drawTrack(since, until) {
      let box = this.charts["(track)"];
      if (!box) {
        box = this.charts["(track)"] = el("div", { class: "chart", id: "chart-track", role: "img", "aria-label": "Track" });
        this.chartBox.prepend(box);
      }
      const points = Math.max(50, Math.min(2000, Math.round(box.clientWidth || 600)));
      const ask = (m) => call(`/v1/devices/${enc(this.name)}/series${q({ metric: m, since: Math.round(since), until: Math.round(until), points })}`);
      const [lat, lon] = await Promise.all([ask("lat"), ask("lon")]);
      const lonAt = new Map(lon.t.map((t, i) => [t, lon.mean[i]]));
      const pairs = lat.t.map((t, i) => [lonAt.get(t), lat.mean[i], t]).filter(([x]) => x !== undefined);
      box.dataset.points = String(pairs.length);
      const lons = pairs.map((p) => p[0]), lats = pairs.map((p) => p[1]);
      const common = {
        text: pairs.map((p) => new Date(p[2]).toLocaleString()), mode: "lines+markers", name: "track",
        marker: { size: 4, color: "#0b5cad" }, line: { color: "#0b5cad", width: 1.5 },
        hovertemplate: "%{text}<br>%{lat:.5f}, %{lon:.5f}<extra></extra>",
      };
      const title = { text: "track", font: { size: 14 } };
      let traces, layout;
      if (TILES) {
        // Over the administrator's tile server (--ui-tiles), the only other origin the page's policy allows.
        const span = (v) => (v.length ? Math.max(...v) - Math.min(...v) : 0);
        const mid = (v, dflt) => (v.length ? (Math.max(...v) + Math.min(...v)) / 2 : dflt);
        // The zoom that fits the track: the map's world is 512 px wide at zoom 0, and latitudes stretch by 1/cos.
        const stretch = 1 / Math.cos((mid(lats, 0) * Math.PI) / 180);
        const fit = (degrees, px) => Math.log2((360 * px) / (512 * Math.max(degrees, 0.0005)));
        const zoom = Math.max(1, Math.min(16, Math.min(fit(span(lons), (box.clientWidth || 600) - 16),
                                                       fit(span(lats) * stretch, 376)) - 0.4));
        traces = [{ type: "scattermap", lon: lons, lat: lats, ...common }];
        layout = {
          title, margin: { l: 8, r: 8, t: 36, b: 8 }, height: 420, showlegend: false,
          map: {
            style: {
              version: 8,
              sources: { tiles: { type: "raster", tiles: [TILES.url], tileSize: 256, attribution: TILES.attribution } },
              layers: [{ id: "tiles", type: "raster", source: "tiles" }],
            },
            center: { lat: mid(lats, 0), lon: mid(lons, 0) }, zoom,
          },
        };
        box.dataset.map = "tiles";
      } else {
        traces = [{ x: lons, y: lats, ...common, hovertemplate: "%{text}<br>%{y:.5f}, %{x:.5f}<extra></extra>" }];
        layout = {
          title, margin: { l: 60, r: 16, t: 36, b: 36 }, height: 360, showlegend: false,
          xaxis: { title: { text: "longitude" } }, yaxis: { title: { text: "latitude" }, scaleanchor: "x" },
        };
        box.dataset.map = "axes";
      }
      await Plotly.react(box, traces, layout, { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["toImage"] });
    },
    async loadQuarantine() {
      if (state.session.role !== "admin") {
        this.quarantine.replaceChildren(el("p", { class: "empty", text: "Quarantined readings need the admin role." }));
        return;
      }
      const held = await call(`/v1/quarantine${q({ device: this.name, limit: 100 })}`);
      this.quarantine.replaceChildren(quarantineTable("device-quarantine", held.quarantine));
    },
    async draw(metrics) {
      if (typeof Plotly === "undefined") { say("the chart library has not loaded"); return; }
      const until = this.zoom ? this.zoom[1] : Date.now();
      const since = this.zoom ? this.zoom[0] : until - RANGES[this.range];
      if (metrics.includes("lat") && metrics.includes("lon")) await this.drawTrack(since, until);
      for (const m of metrics) {
        let box = this.charts[m];
        if (!box) {
          box = this.charts[m] = el("div", { class: "chart", id: `chart-${m}`, role: "img", "aria-label": `${m} over time` });
          this.chartBox.append(box);
          box.dataset.metric = m;
        }
        const points = Math.max(50, Math.min(2000, Math.round(box.clientWidth || 600)));
        const s = await call(`/v1/devices/${enc(this.name)}/series${q({ metric: m, since: Math.round(since), until: Math.round(until), points })}`);
        box.dataset.buckets = String(s.t.length);
        box.dataset.readings = String(s.count.reduce((a, b) => a + b, 0));
        const x = s.t.map((t) => new Date(t));
        const traces = [
          { x, y: s.max, name: "max", mode: "lines", line: { width: 0 }, hoverinfo: "skip", showlegend: false },
          { x, y: s.min, name: "min–max", mode: "lines", line: { width: 0 }, fill: "tonexty", fillcolor: "rgba(11,92,173,0.18)", hoverinfo: "skip" },
          { x, y: s.mean, name: m, mode: s.t.length > 1 ? "lines" : "markers", line: { color: "#0b5cad", width: 1.5, simplify: false } },
        ];
        const layout = {
          title: { text: m, font: { size: 14 } }, margin: { l: 50, r: 16, t: 36, b: 36 }, height: 300,
          xaxis: { type: "date", range: [new Date(since), new Date(until)] }, yaxis: { automargin: true },
          showlegend: false, uirevision: `${this.range}`,
        };
        await Plotly.react(box, traces, layout, { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["toImage"] });
        if (!box.dataset.listening) {
          box.dataset.listening = "1";
          box.on("plotly_relayout", (e) => {
            if (e["xaxis.autorange"]) { this.zoom = null; refresh(); return; }
            const a = e["xaxis.range[0]"]; const b = e["xaxis.range[1]"];
            if (a && b) { this.zoom = [Date.parse(a), Date.parse(b)]; refresh(); }
          });
        }
      }
    },
  };

  function alertsTable(id, alerts, withDevice) {
    const columns = [
      { key: "state", label: "State", cell: (a) => badge(a.state) },
      { key: "fired_at", label: "Fired", cell: (a) => when(a.fired_at) },
      { key: "rule", label: "Rule" },
      { key: "metric", label: "Metric" },
      { key: "message", label: "Message", wrap: true, cell: (a) => a.message },
      { key: "cleared_at", label: "Cleared", cell: (a) => when(a.cleared_at) },
    ];
    if (withDevice) columns.splice(1, 0, { key: "device", label: "Device", cell: (a) => el("a", { href: `#/device/${enc(a.device)}`, text: a.device }) });
    return table(id, "Alerts", columns, alerts);
  }

  function quarantineTable(id, rows) {
    return table(id, "Quarantined readings", [
      { key: "id", label: "ID", num: true },
      { key: "device", label: "Device", cell: (r) => el("a", { href: `#/device/${enc(r.device)}`, text: r.device }) },
      { key: "metric", label: "Metric" },
      { key: "ts", label: "Time", cell: (r) => when(r.ts) },
      { key: "value", label: "Value", num: true },
      { key: "rule", label: "Rule", wrap: true, cell: (r) => r.rule },
      { key: "release", label: "", cell: (r) => el("button", {
        type: "button", text: "Release", "data-release": r.id, "aria-label": `Release reading ${r.id}`,
        onclick: async (e) => {
          e.target.disabled = true;
          try {
            const done = await call(`/v1/quarantine/${r.id}/release`, "POST");
            say(`reading ${r.id} released: ${done.stored} stored`);
          } catch (err) { say(`not released: ${err.message}`); }
          refresh();
        },
      }) },
    ], rows);
  }

  pages.alerts = {
    setup() { this.body = el("div"); return [el("h1", { text: "Alerts" }), this.body]; },
    async load() {
      const doc = await call("/v1/alerts?limit=500");
      this.body.replaceChildren(alertsTable("alerts", doc.alerts, true));
    },
  };

  pages.quarantine = {
    setup() { this.body = el("div"); return [el("h1", { text: "Quarantine" }), this.body]; },
    async load() {
      try {
        const doc = await call("/v1/quarantine?limit=1000");
        this.body.replaceChildren(quarantineTable("quarantine", doc.quarantine));
      } catch (e) {
        if (e.status !== 403) throw e;
        this.body.replaceChildren(el("p", { class: "error", id: "refused", text: `Refused: ${e.message}` }));
      }
    },
  };

  pages.sinks = {
    setup() { this.body = el("div"); return [el("h1", { text: "Sinks" }), this.body]; },
    async load() {
      const doc = await call("/v1/sinks");
      this.body.replaceChildren(doc.sinks.length ? table("sinks", "Sinks", [
        { key: "name", label: "Sink" },
        { key: "url", label: "Address", wrap: true, cell: (s) => s.url },
        { key: "lag_readings", label: "Lag (readings)", num: true },
        { key: "lag_seconds", label: "Lag (s)", num: true, cell: (s) => (s.lag_seconds === null ? "0" : s.lag_seconds.toFixed(1)) },
        { key: "readings_sent", label: "Sent", num: true },
        { key: "last_sent_at", label: "Last sent", cell: (s) => when(s.last_sent_at) },
        { key: "last_error", label: "Last error", wrap: true, cell: (s) => (s.last_error ? `${when(s.last_error_at)}: ${s.last_error}` : "—") },
        { key: "parked_batches", label: "Parked", num: true, cell: (s) => (s.parked_batches ? badge(`${s.parked_batches} batches`, "parked") : "0") },
        { key: "retry", label: "", cell: (s) => (s.parked_batches && state.session.role === "admin" ? el("button", {
          type: "button", text: "Retry parked",
          onclick: async () => {
            try { const r = await call(`/v1/sinks/${enc(s.name)}/retry`, "POST"); say(`${r.retried_batches} batches will be sent again`); } catch (e) { say(e.message); }
            refresh();
          },
        }) : "") },
      ], doc.sinks) : el("p", { class: "empty", text: "No sinks: give the gateway --upload-url or [[sink]] tables." }));
    },
  };

  function tree(value) {
    if (value === null || typeof value !== "object") {
      if (typeof value === "boolean") return badge(value ? "yes" : "no", value ? "ok" : "idle");
      return el("span", { text: num(value) });
    }
    if (Array.isArray(value)) return value.length ? el("div", {}, value.map((v) => tree(v))) : el("span", { text: "none" });
    return el("dl", { class: "tree" }, Object.entries(value).map(([k, v]) => [el("dt", { text: k }), el("dd", {}, tree(v))]));
  }

  pages.health = {
    setup() { this.body = el("div"); return [el("h1", { text: "Health" }), this.body]; },
    async load() {
      const doc = await call("/healthz");
      this.body.replaceChildren(el("p", {}, "Status: ", badge(doc.status, doc.status === "ok" ? "ok" : "failing")), tree(doc));
    },
  };

  // -- routing and refresh ------------------------------------------------------

  let pending = null;
  function debounce(f, ms) { clearTimeout(pending); pending = setTimeout(f, ms); }

  async function refresh() {
    const page = state.view;
    if (!page || state.busy || !state.session) return;
    state.busy = true;
    try {
      await page.load();
      if (state.view === page) say(`updated ${new Date().toLocaleTimeString()}`);
    } catch (e) {
      if (state.session) say(`not updated: ${e.message}`);
    } finally {
      state.busy = false;
    }
  }

  function route() {
    if (!state.session) return;
    const hash = location.hash.replace(/^#\/?/, "") || "fleet";
    const [path, query] = hash.split("?");
    const [name, ...rest] = path.split("/");
    const page = pages[name] || pages.fleet;
    for (const a of document.querySelectorAll("#nav a")) {
      if (a.getAttribute("href") === `#/${name}`) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
    }
    state.view = page;
    const arg = rest.length ? decodeURIComponent(rest.join("/")) : undefined;
    view().replaceChildren(...page.setup(new URLSearchParams(query || ""), arg));
    document.title = `txgateway — ${arg || name}`;
    clearInterval(state.timer);
    state.timer = setInterval(refresh, REFRESH_MS);
    state.busy = false;
    refresh();
  }

  async function start() {
    document.getElementById("signin-form").addEventListener("submit", signIn);
    document.getElementById("signout").addEventListener("click", signOut);
    window.addEventListener("hashchange", () => { route(); document.getElementById("main").focus(); });
    // Back from the provider's sign-in with an error: say it, and leave it out of the address.
    const error = new URLSearchParams(location.search).get("error");
    if (error) history.replaceState(null, "", location.pathname + location.hash);
    try {
      signedIn(await call("/ui/session"));
    } catch (e) {
      signedOut(error || "");
    }
  }

  start();
})();
