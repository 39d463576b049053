// p0rt console: keeps the tunnels table live from the server-sent event stream.
// No external code; every value goes in through textContent (never as markup).
"use strict";
(function () {
  const base = document.body.dataset.base;
  const table = document.getElementById("tunnels");
  if (!base || !table) { return; }
  const meta = document.querySelector('meta[name="csrf-token"]');
  const csrf = meta ? meta.content : "";
  const fields = ["name", "fingerprint", "client", "since", "requests", "bytes_in", "bytes_out", "in_flight"];
  const tbody = table.tBodies[0];
  const empty = document.getElementById("tunnels-empty");

  function disconnectForm(name) {
    const form = document.createElement("form");
    form.method = "post";
    form.action = base + "/tunnels/" + encodeURIComponent(name) + "/disconnect";
    const token = document.createElement("input");
    token.type = "hidden";
    token.name = "csrf";
    token.value = csrf;
    const button = document.createElement("button");
    button.type = "submit";
    button.className = "disconnect";
    button.textContent = "Disconnect";
    form.append(token, button);
    return form;
  }

  function render(tunnels) {
    const seen = new Set();
    for (const t of tunnels) {
      const name = String(t.name);
      seen.add(name);
      let row = Array.from(tbody.rows).find((r) => r.dataset.name === name);
      if (!row) {
        row = tbody.insertRow();
        row.dataset.name = name;
        for (const f of fields) {
          const td = row.insertCell();
          td.dataset.field = f;
        }
        row.insertCell().append(disconnectForm(name));
      }
      for (const f of fields) {
        const td = row.querySelector('td[data-field="' + f + '"]');
        const value = t[f] === null || t[f] === undefined ? "" : String(t[f]);
        if (td && td.textContent !== value) { td.textContent = value; }
      }
    }
    for (const row of Array.from(tbody.rows)) {
      if (!seen.has(row.dataset.name)) { row.remove(); }
    }
    if (empty) { empty.hidden = tunnels.length > 0; }
  }

  const events = new EventSource(base + "/events");
  events.onmessage = (e) => {
    try { render(JSON.parse(e.data).tunnels || []); } catch (_) { /* a torn message: wait for the next */ }
  };
  events.onerror = () => {
    const live = document.getElementById("live");
    if (live) { live.textContent = "Live updates paused (reconnecting)."; }
  };
  events.onopen = () => {
    const live = document.getElementById("live");
    if (live) { live.textContent = "Live: updated every second."; }
  };
})();
