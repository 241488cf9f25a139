// task-dispatcher dashboard: a small script, no build step, no dependencies.
// Pages are rendered by the server; this script keeps them live (server-sent events), filters
// the overview, and sends every change to the control plane's JSON API. It only ever sets
// user-provided text with textContent, never as markup.
"use strict";

(() => {
  const meta = (name) => document.querySelector(`meta[name="${name}"]`).content;
  const API = meta("api-prefix");
  const CSRF = meta("csrf-token");
  const ENDPOINTS = {
    add: () => ["POST", `${API}/tasks`],
    pause: (id) => ["POST", `${API}/tasks/${encodeURIComponent(id)}/pause`],
    resume: (id) => ["POST", `${API}/tasks/${encodeURIComponent(id)}/resume`],
    remove: (id) => ["DELETE", `${API}/tasks/${encodeURIComponent(id)}`],
    reorder: (id) => ["POST", `${API}/tasks/${encodeURIComponent(id)}/reorder`],
    run: (id) => ["POST", `${API}/tasks/${encodeURIComponent(id)}/run`],
    edit: (id) => ["PATCH", `${API}/tasks/${encodeURIComponent(id)}`],
    preview: (id) => ["POST", `${API}/tasks/${encodeURIComponent(id)}/preview?count=5`],
    "pause-account": (id) => ["POST", `${API}/accounts/${encodeURIComponent(id)}/pause`],
    "resume-account": (id) => ["POST", `${API}/accounts/${encodeURIComponent(id)}/resume`],
  };

  // ---------------------------------------------------------------- API calls

  async function call(action, id, body) {
    const [method, url] = ENDPOINTS[action](id);
    const headers = { "X-CSRF-Token": CSRF, Accept: "application/json" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await fetch(url, {
        method, headers, credentials: "same-origin",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      return { ok: false, status: 0, data: { detail: `network error: ${err.message}` } };
    }
    let data = null;
    try { data = await response.json(); } catch (_) { data = null; }
    return { ok: response.ok, status: response.status, data };
  }

  // Errors come back as JSON naming the field; accept FastAPI's list form and a flat one.
  function fieldErrors(data) {
    const found = [];
    const visit = (item) => {
      if (!item || typeof item !== "object") return;
      if (Array.isArray(item)) { item.forEach(visit); return; }
      const loc = Array.isArray(item.loc) ? item.loc.filter((p) => p !== "body") : null;
      const field = item.field || (loc && loc.length ? String(loc[0]) : null);
      const message = item.message || item.msg || (typeof item.detail === "string" ? item.detail : null);
      if (field && message) { found.push([field, message]); return; }
      if (item.detail !== undefined) visit(item.detail);
      if (item.error !== undefined) visit(item.error);
      if (item.errors !== undefined) visit(item.errors);
    };
    visit(data);
    return found;
  }

  function describe(result) {
    const errors = fieldErrors(result.data);
    if (errors.length) return errors.map(([f, m]) => `${f}: ${m}`).join("; ");
    const detail = result.data && (result.data.detail || result.data.message);
    return typeof detail === "string" ? detail : `HTTP ${result.status}`;
  }

  let noticeTimer = 0;
  function notice(text) {
    const box = document.getElementById("notice");
    if (!box) return;
    box.textContent = text;
    box.classList.add("shown");
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => box.classList.remove("shown"), 4000);
  }

  // ---------------------------------------------------------------- relative times

  function relative(iso, now) {
    if (!iso) return "-";
    const seconds = Math.round((Date.parse(iso) - now) / 1000);
    const abs = Math.abs(seconds);
    let text;
    if (abs < 2) return "now";
    if (abs < 60) text = `${abs}s`;
    else if (abs < 3600) text = `${Math.floor(abs / 60)}m ${abs % 60}s`;
    else if (abs < 86400) text = `${Math.floor(abs / 3600)}h ${Math.floor((abs % 3600) / 60)}m`;
    else text = `${Math.floor(abs / 86400)}d ${Math.floor((abs % 86400) / 3600)}h`;
    return seconds > 0 ? `in ${text}` : `${text} ago`;
  }

  function tickTimes() {
    const now = Date.now();
    for (const el of document.querySelectorAll("time[data-rel]")) {
      const text = relative(el.getAttribute("datetime"), now);
      if (el.textContent !== text) el.textContent = text;
    }
  }

  // ---------------------------------------------------------------- rows

  function fillRow(li, row) {
    li.dataset.id = row.task_id;
    li.dataset.status = row.status;
    li.dataset.type = row.task_type;
    li.dataset.sys = row.sys_type;
    li.dataset.outcome = row.outcome;
    li.dataset.failing = row.failing ? "1" : "";
    li.dataset.due = row.due_at;
    for (const el of li.querySelectorAll("[data-f]")) {
      const value = row[el.dataset.f];
      if (value === undefined) continue;
      const text = String(value);
      if (el.textContent !== text) el.textContent = text;
      if (el.dataset.f === "outcome") el.dataset.v = text;
    }
    const link = li.querySelector("a[data-f=task_id]");
    if (link) link.href = `/tasks/${encodeURIComponent(row.task_id)}`;
    const handle = li.querySelector(".handle");
    if (handle) handle.setAttribute("aria-label", `Move ${row.task_id}: arrow up or down`);
    const time = li.querySelector("time[data-rel]");
    if (time) time.setAttribute("datetime", row.next_run_at);
    const streak = li.querySelector(".streak");
    if (streak) streak.hidden = !row.streak;
    const error = li.querySelector(".error");
    if (error) error.title = row.last_error;
    const pause = li.querySelector("[data-action=pause]");
    const resume = li.querySelector("[data-action=resume]");
    if (pause) pause.hidden = row.status === "paused" || row.status === "completed";
    if (resume) resume.hidden = row.status !== "paused";
  }

  function rowsById() {
    const map = new Map();
    for (const li of document.querySelectorAll("#lanes li.task")) map.set(li.dataset.id, li);
    return map;
  }

  function laneFor(account) {
    const lanes = document.getElementById("lanes");
    for (const lane of lanes.querySelectorAll("section.lane")) {
      if (lane.dataset.account === account) return lane;
    }
    const lane = document.getElementById("lane-template").content.firstElementChild.cloneNode(true);
    lane.dataset.account = account;
    lane.querySelector(".lane-id").textContent = account;
    lane.querySelector("ol").setAttribute("aria-label", `Tasks of ${account} in priority order`);
    const after = [...lanes.children].find((s) => s.dataset.account > account);
    lanes.insertBefore(lane, after || null);
    return lane;
  }

  function newRow(row) {
    const li = document.getElementById("row-template").content.firstElementChild.cloneNode(true);
    fillRow(li, row);
    return li;
  }

  // A bounded page (a large store: see OVERVIEW_LIMIT) shows only some tasks, picked and
  // filtered by the server: rows for the others are not added, and changing a filter loads
  // the page again.
  function bounded() {
    const lanes = document.getElementById("lanes");
    return Boolean(lanes && lanes.hasAttribute("data-bounded"));
  }

  // ``order`` holds the accounts whose order changed (an emptied account as []). A lane
  // moves the rows it has into their relative order; rows it lacks are left out.
  function applyOrder(order) {
    const rows = rowsById();
    for (const lane of document.querySelectorAll("#lanes section.lane")) {
      const account = lane.dataset.account;
      const ids = order[account];
      const list = lane.querySelector("ol");
      if (ids) {
        let index = 0;
        for (const id of ids) {
          const li = rows.get(id);
          if (!li || li.parentElement !== list) continue;
          if (list.children[index] !== li) list.insertBefore(li, list.children[index] || null);
          index += 1;
        }
      }
      const count = list.querySelectorAll("li.task").length;
      const truncated = lane.hasAttribute("data-truncated");
      if (ids && !ids.length) { lane.remove(); continue; }
      if (!count && !truncated) { lane.remove(); continue; }
      const label = lane.querySelector(".count");
      // A truncated lane counts its account's tasks, which only the order message knows.
      if (label && (!truncated || ids)) label.textContent = `${truncated ? ids.length : count} task(s)`;
    }
  }

  function applyUpdate(message) {
    if (message.health) showHealth(message.health.problems);
    if (document.getElementById("lanes")) applyToLanes(message);
    const page = document.querySelector("article.task-page");
    if (page) {
      const mine = (message.changed || []).find((r) => r.task_id === page.dataset.id);
      if (mine) {
        page.dataset.status = mine.status;
        page.querySelector("h1 .status").textContent = mine.status;
        const pause = page.querySelector("[data-action=pause]");
        const resume = page.querySelector("[data-action=resume]");
        pause.hidden = mine.status === "paused" || mine.status === "completed";
        resume.hidden = mine.status !== "paused";
        const reason = page.querySelector(".waiting-reason");
        if (reason && mine.waiting !== undefined) {
          reason.querySelector("[data-f=waiting]").textContent = mine.waiting;
          reason.hidden = !mine.waiting;
        }
      }
    }
    tickTimes();
  }

  function applyToLanes(message) {
    const rows = rowsById();
    for (const row of message.changed || []) {
      let li = rows.get(row.task_id);
      if (!li) {
        if (bounded()) continue;
        li = newRow(row);
        laneFor(row.account_id).querySelector("ol").appendChild(li);
        rows.set(row.task_id, li);
      } else {
        fillRow(li, row);
      }
    }
    for (const id of message.removed || []) {
      const li = rows.get(id);
      if (li) li.remove();
    }
    if (message.order) applyOrder(message.order);
    applyFilters();
  }

  function showHealth(problems) {
    const box = document.getElementById("health");
    const list = box.querySelector("ul");
    list.replaceChildren(...problems.map((p) => {
      const li = document.createElement("li");
      li.textContent = p;
      return li;
    }));
    box.hidden = problems.length === 0;
  }

  function listen() {
    if (!window.EventSource) return;
    // The feed first sends what changed since this page was rendered (and the account
    // order, unless it is still the one the page was rendered with), then every change.
    const since = encodeURIComponent(meta("rendered-at"));
    const order = encodeURIComponent(meta("order-tag"));
    const source = new EventSource(`/events?since=${since}&order=${order}`);
    source.addEventListener("update", (event) => applyUpdate(JSON.parse(event.data)));
    window.addEventListener("pagehide", () => source.close());
  }

  // ---------------------------------------------------------------- filters

  // The server's rule (views.overdue): a next start over a minute past, no run out.
  const OVERDUE_AFTER = 60_000;
  function late(li, now) {
    const due = li.dataset.due;
    return Boolean(due) && li.dataset.status !== "running" && Date.parse(due) < now - OVERDUE_AFTER;
  }

  let filterForm = null;
  function applyFilters() {
    if (!filterForm) return;
    const now = Date.now();
    const f = Object.fromEntries(new FormData(filterForm).entries());
    const q = (f.q || "").trim().toLowerCase();
    let shown = 0;
    for (const lane of document.querySelectorAll("#lanes section.lane")) {
      let visible = 0;
      const laneMatches = !f.account || lane.dataset.account === f.account;
      for (const li of lane.querySelectorAll("li.task")) {
        const match = laneMatches
          && (!f.attention || (f.attention === "failing" ? li.dataset.failing === "1" : late(li, now)))
          && (!f.status || li.dataset.status === f.status)
          && (!f.type || li.dataset.type === f.type)
          && (!f.sys || li.dataset.sys === f.sys)
          && (!q || li.dataset.id.toLowerCase().includes(q)
              || li.querySelector(".error").textContent.toLowerCase().includes(q));
        if (li.hidden === match) li.hidden = !match;
        if (match) visible += 1;
      }
      lane.hidden = visible === 0;
      shown += visible;
    }
    document.getElementById("shown").textContent = `${shown} task(s) shown`;
  }

  function setUpFilters() {
    filterForm = document.getElementById("filters");
    if (!filterForm) return;
    const params = new URLSearchParams(location.search);
    for (const el of filterForm.elements) {
      if (el.name && params.has(el.name)) el.value = params.get(el.name);
    }
    const search = () => {
      const query = new URLSearchParams();
      for (const [k, v] of new FormData(filterForm).entries()) if (v) query.set(k, v);
      const text = query.toString();
      return text ? `?${text}` : "";
    };
    if (filterForm.hasAttribute("data-bounded")) {
      // The server filters a bounded page: a change loads the page for the new filters
      // (typing waits for a pause, so a word is one load, not one per letter).
      let typing = 0;
      const load = () => {
        clearTimeout(typing);
        if (search() !== location.search) location.assign(`${location.pathname}${search()}`);
      };
      filterForm.addEventListener("input", (event) => {
        clearTimeout(typing);
        if (event.target.tagName === "SELECT") load();
        else typing = setTimeout(load, 500);
      });
      filterForm.addEventListener("submit", (e) => { e.preventDefault(); load(); });
      applyFilters();
      return;
    }
    const changed = () => {
      history.replaceState(null, "", search() || location.pathname);
      applyFilters();
    };
    filterForm.addEventListener("input", changed);
    filterForm.addEventListener("submit", (e) => e.preventDefault());
    applyFilters();
  }

  // ---------------------------------------------------------------- actions

  async function act(action, id, control) {
    if (control) control.disabled = true;
    const result = await call(action, id);
    if (control) control.disabled = false;
    if (!result.ok) { notice(`${action} ${id} failed: ${describe(result)}`); return false; }
    if (action === "run") {
      const account = result.data && result.data.account_id;
      notice(`${id}: run asked for; it starts as soon as account ${account} is free`);
      return true;
    }
    notice(`${id}: ${action === "remove" ? "removed" : action === "pause" ? "paused" : "resumed"}`);
    const record = result.data && typeof result.data === "object" ? result.data : null;
    const status = action === "pause" ? "paused" : action === "resume" ? "pending" : null;
    for (const root of document.querySelectorAll(`[data-id="${CSS.escape(id)}"]`)) {
      const pause = root.querySelector("[data-action=pause]");
      const resume = root.querySelector("[data-action=resume]");
      if (status && pause && resume) {
        const now = (record && record.status) || status;
        root.dataset.status = now;
        const badge = root.querySelector(".status");
        if (badge) badge.textContent = now;
        pause.hidden = now === "paused" || now === "completed";
        resume.hidden = now !== "paused";
      }
    }
    return true;
  }

  function showStatus(id, status) {
    for (const root of document.querySelectorAll(`[data-id="${CSS.escape(id)}"]`)) {
      root.dataset.status = status;
      const badge = root.querySelector(".status");
      if (badge) badge.textContent = status;
      const pause = root.querySelector("[data-action=pause]");
      const resume = root.querySelector("[data-action=resume]");
      if (pause) pause.hidden = status === "paused" || status === "completed";
      if (resume) resume.hidden = status !== "paused";
    }
  }

  // Pause or resume a whole account: one request, answered task by task.
  async function actOnAccount(action, account, control) {
    if (control) control.disabled = true;
    const result = await call(action, account);
    if (control) control.disabled = false;
    if (!result.ok) { notice(`${action} ${account} failed: ${describe(result)}`); return; }
    const tasks = (result.data && result.data.tasks) || [];
    for (const task of tasks) showStatus(task.task_id, task.status);
    const changed = tasks.filter((task) => task.changed).length;
    const verb = action === "pause-account" ? "paused" : "resumed";
    notice(`${account}: ${changed} of ${tasks.length} task(s) ${verb}`);
    applyFilters();
  }

  function setUpActions() {
    document.addEventListener("click", async (event) => {
      const laneButton = event.target.closest("button[data-account-action]");
      if (laneButton) {
        const lane = laneButton.closest("[data-account]");
        if (lane) await actOnAccount(laneButton.dataset.accountAction, lane.dataset.account, laneButton);
        return;
      }
      const button = event.target.closest("button[data-action]");
      if (!button) return;
      const holder = button.closest("[data-id]");
      const id = holder && holder.dataset.id;
      if (!id) return;
      const action = button.dataset.action;
      if (action === "remove") {
        const dialog = document.getElementById("confirm-remove");
        dialog.returnValue = "";
        dialog.showModal();
        dialog.addEventListener("close", async () => {
          if (dialog.returnValue !== "remove") return;
          if (await act("remove", id, button)) location.assign("/");
        }, { once: true });
        return;
      }
      await act(action, id, button);
    });
  }

  // ---------------------------------------------------------------- reorder

  async function moveTo(li, position) {
    const list = li.parentElement;
    const before = [...list.children];
    const from = before.indexOf(li);
    if (position === from || position < 0 || position >= before.length) return;
    list.insertBefore(li, before.filter((x) => x !== li)[position] || null);
    const result = await call("reorder", li.dataset.id, { position });
    if (!result.ok) {
      list.replaceChildren(...before);
      notice(`reorder ${li.dataset.id} failed: ${describe(result)}`);
      return;
    }
    notice(`${li.dataset.id}: moved to position ${position}`);
  }

  function setUpReorder() {
    const lanes = document.getElementById("lanes");
    if (!lanes) return;
    let dragged = null;
    const clear = () => lanes.querySelectorAll(".drop-before, .drop-after")
      .forEach((el) => el.classList.remove("drop-before", "drop-after"));
    lanes.addEventListener("dragstart", (event) => {
      const li = event.target.closest && event.target.closest("li.task");
      if (!li) return;
      dragged = li;
      li.classList.add("dragging");
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", li.dataset.id);
    });
    lanes.addEventListener("dragover", (event) => {
      const target = event.target.closest && event.target.closest("li.task");
      if (!dragged || !target || target.parentElement !== dragged.parentElement) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "move";
      clear();
      if (target === dragged) return;
      const box = target.getBoundingClientRect();
      target.classList.add(event.clientY < box.top + box.height / 2 ? "drop-before" : "drop-after");
    });
    lanes.addEventListener("drop", (event) => {
      const target = event.target.closest && event.target.closest("li.task");
      if (!dragged || !target || target.parentElement !== dragged.parentElement) return;
      event.preventDefault();
      const after = target.classList.contains("drop-after");
      clear();
      const siblings = [...target.parentElement.children].filter((x) => x !== dragged);
      let position = siblings.indexOf(target) + (after ? 1 : 0);
      if (target === dragged) position = [...target.parentElement.children].indexOf(dragged);
      moveTo(dragged, position);
    });
    lanes.addEventListener("dragend", () => {
      if (dragged) dragged.classList.remove("dragging");
      dragged = null;
      clear();
    });
    lanes.addEventListener("keydown", async (event) => {
      const handle = event.target.closest && event.target.closest("button.handle");
      if (!handle || !["ArrowUp", "ArrowDown"].includes(event.key)) return;
      event.preventDefault();
      const li = handle.closest("li.task");
      const index = [...li.parentElement.children].indexOf(li);
      await moveTo(li, index + (event.key === "ArrowUp" ? -1 : 1));
      handle.focus();
    });
  }

  // ---------------------------------------------------------------- add form

  const UNITS = { s: 1, m: 60, h: 3600, d: 86400 };
  function seconds(text) {
    const t = text.trim();
    if (/^\d+(\.\d+)?$/.test(t)) return Number(t);
    const parts = [...t.matchAll(/(\d+(?:\.\d+)?)([smhd])/g)];
    if (!parts.length || parts.map((m) => m[0]).join("") !== t) return t;
    return parts.reduce((sum, m) => sum + Number(m[1]) * UNITS[m[2]], 0);
  }

  function hours(text) {
    const m = text.trim().match(/^(\d{1,2})\s*-\s*(\d{1,2})$/);
    return m ? [Number(m[1]), Number(m[2])] : text.trim();
  }

  function setUpAddForm() {
    const form = document.getElementById("add-form");
    if (!form) return;
    const clearErrors = () => {
      form.querySelectorAll("[data-error-for]").forEach((p) => { p.textContent = ""; });
      form.querySelectorAll(".field.invalid").forEach((f) => f.classList.remove("invalid"));
      form.querySelectorAll("[aria-invalid]").forEach((f) => f.removeAttribute("aria-invalid"));
      document.getElementById("form-error").textContent = "";
    };
    const showError = (field, message) => {
      const slot = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
      if (!slot) return false;
      slot.textContent = message;
      const box = slot.closest(".field");
      box.classList.add("invalid");
      const input = box.querySelector("input, textarea");
      if (input) input.setAttribute("aria-invalid", "true");
      return true;
    };
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors();
      const v = Object.fromEntries(new FormData(form).entries());
      let kwargs;
      try {
        kwargs = JSON.parse(v.kwargs || "{}");
        if (!kwargs || typeof kwargs !== "object" || Array.isArray(kwargs)) throw new Error("must be a JSON object");
      } catch (err) {
        showError("kwargs", `not a JSON object: ${err.message}`);
        return;
      }
      if (v.command) kwargs.command = v.command;
      // The API takes add_task's keywords: the named ones, and every other key as a kwarg.
      const body = {
        ...kwargs,
        task_type: v.task_type, account_id: v.account_id, sys_type: v.sys_type,
        interval: seconds(v.interval), valid_time_range: hours(v.valid_time_range),
      };
      for (const key of ["account_name", "task_end_time", "task_id"]) if (v[key]) body[key] = v[key].trim();
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      const result = await call("add", undefined, body);
      button.disabled = false;
      if (result.ok) {
        const id = (result.data && (result.data.task_id || (result.data.task && result.data.task.task_id))) || body.task_id;
        location.assign(id ? `/tasks/${encodeURIComponent(id)}` : "/");
        return;
      }
      const errors = fieldErrors(result.data);
      let placed = false;
      for (const [field, message] of errors) {
        const name = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`) ? field : "kwargs";
        placed = showError(name, message) || placed;
      }
      if (!placed) document.getElementById("form-error").textContent = describe(result);
      const first = form.querySelector("[aria-invalid]");
      if (first) first.focus();
    });
  }

  // ---------------------------------------------------------------- edit form

  // Errors beside their fields: the API names the field (``run_policy.retries``, ``interval``).
  function formErrors(form, general) {
    const clear = () => {
      form.querySelectorAll("[data-error-for]").forEach((p) => { p.textContent = ""; });
      form.querySelectorAll(".field.invalid").forEach((f) => f.classList.remove("invalid"));
      form.querySelectorAll("[aria-invalid]").forEach((f) => f.removeAttribute("aria-invalid"));
      general.textContent = "";
    };
    const show = (result) => {
      let placed = false;
      for (const [field, message] of fieldErrors(result.data)) {
        const slot = form.querySelector(`[data-error-for="${CSS.escape(field)}"]`);
        if (!slot) continue;
        slot.textContent = message;
        const box = slot.closest(".field");
        box.classList.add("invalid");
        box.querySelector("input").setAttribute("aria-invalid", "true");
        placed = true;
      }
      if (!placed) general.textContent = describe(result);
      const first = form.querySelector("[aria-invalid]");
      if (first) first.focus();
    };
    return { clear, show };
  }

  function editedFields(form) {
    const changes = {};
    const policy = {};
    for (const input of form.querySelectorAll("input[name]")) {
      if (input.value === input.defaultValue) continue;
      const value = input.value.trim();
      if (input.name === "interval") changes.interval = seconds(value);
      else if (input.name === "valid_time_range") changes.valid_time_range = hours(value);
      else if (input.name === "task_end_time") changes.task_end_time = value || null;
      else if (input.name.startsWith("run_policy.")) {
        const name = input.name.slice("run_policy.".length);
        policy[name] = value === "" ? null : (/^-?\d+(\.\d+)?$/.test(value) ? Number(value) : value);
      }
    }
    if (Object.keys(policy).length) changes.run_policy = policy;
    return changes;
  }

  function setUpEditForm() {
    const form = document.getElementById("edit-form");
    if (!form) return;
    const id = form.closest("[data-id]").dataset.id;
    const errors = formErrors(form, document.getElementById("edit-error"));
    const box = document.getElementById("edit-preview-box");
    const list = document.getElementById("edit-preview-list");
    document.getElementById("edit-preview").addEventListener("click", async (event) => {
      errors.clear();
      const button = event.currentTarget;
      button.disabled = true;
      const result = await call("preview", id, editedFields(form));
      button.disabled = false;
      if (!result.ok) { box.hidden = true; errors.show(result); return; }
      const runs = result.data.runs || [];
      list.replaceChildren(...(runs.length ? runs : [null]).map((iso) => {
        const li = document.createElement("li");
        // The dispatcher's wall time, as the page shows it elsewhere.
        li.textContent = iso ? iso.slice(0, 19).replace("T", " ") : "none before the end time";
        return li;
      }));
      box.hidden = false;
    });
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      errors.clear();
      const changes = editedFields(form);
      if (!Object.keys(changes).length) {
        document.getElementById("edit-error").textContent = "Nothing changed.";
        return;
      }
      const button = form.querySelector("button[type=submit]");
      button.disabled = true;
      const result = await call("edit", id, changes);
      button.disabled = false;
      if (!result.ok) { errors.show(result); return; }
      location.reload();
    });
  }

  // ---------------------------------------------------------------- timeline axis

  // Keep the axis readable at any width: labels are kept in rank order (now, dates, then
  // hours at multiples of 12, 6, 3, 1) and one that would touch a kept one, or stick out of
  // the axis, is hidden.
  function thinAxis() {
    for (const axis of document.querySelectorAll(".axis")) {
      const labels = [...axis.querySelectorAll("span[data-rank]")];
      labels.forEach((label) => { label.style.visibility = ""; });
      labels.sort((a, b) => Number(a.dataset.rank) - Number(b.dataset.rank));
      const bounds = axis.getBoundingClientRect();
      const kept = [];
      const GAP = 4;
      for (const label of labels) {
        const box = label.getBoundingClientRect();
        const outside = box.left < bounds.left - 1 || box.right > bounds.right + 1;
        const touches = kept.some((k) => box.left < k.right + GAP && k.left < box.right + GAP
          && box.top < k.bottom && k.top < box.bottom);
        if (outside || touches) label.style.visibility = "hidden";
        else kept.push(box);
      }
    }
  }

  function setUpTimeline() {
    if (!document.querySelector(".axis")) return;
    thinAxis();
    let pending = 0;
    window.addEventListener("resize", () => {
      cancelAnimationFrame(pending);
      pending = requestAnimationFrame(thinAxis);
    });
  }

  // ---------------------------------------------------------------- start

  document.addEventListener("DOMContentLoaded", () => {
    setUpFilters();
    setUpActions();
    setUpReorder();
    setUpAddForm();
    setUpEditForm();
    setUpTimeline();
    tickTimes();
    setInterval(tickTimes, 1000);
    if (document.body.dataset.page === "overview" || document.body.dataset.page === "task") listen();
  });
})();
