// The edgemeta page: live predictions from the camera, enrollment, the enrolled classes.
// Plain JS, no build step, nothing fetched from elsewhere: it works with no internet.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { classes: [], cameraReady: false, busy: false, keyAsked: false, live: null, review: null, reviewKey: "",
                armed: null };
const CONFIRM_MS = 4000;     // a destructive button asks for a second click within this time
const FRAME_SIDE = 320;      // frames are scaled to this longest side before upload (the model needs far less)
const PREDICT_EVERY_MS = 120;

function apiKey() { return localStorage.getItem("edgemeta-key") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (apiKey()) headers["x-api-key"] = apiKey();
  const response = await fetch(path, Object.assign({}, options, { headers }));
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (response.status === 401) askForKey();
  if (!response.ok) throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  return body;
}

function askForKey() {
  if (state.keyAsked) return;
  state.keyAsked = true;
  $("key-card").hidden = false;
  say("This service needs an API key.", true);
}

function say(text, isError = false) {
  const m = $("message");
  m.textContent = text;
  m.className = "message" + (isError ? " error" : "");
}

function fmt(ms) { return ms === undefined || ms === null ? "–" : (ms < 10 ? ms.toFixed(2) : ms.toFixed(1)) + " ms"; }

// ------------------------------------------------------------------ camera
async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    noCamera("this page is not on https:// or localhost");
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" }, audio: false });
    const video = $("video");
    video.srcObject = stream;
    await video.play();
    state.cameraReady = true;
  } catch (e) {
    noCamera(e.message || String(e));
  }
}

function noCamera(why) {
  $("nocamera").hidden = false;
  $("camera-error").textContent = why;
  $("enroll-camera").disabled = true;
  $("live").hidden = true;
}

function grabFrame() {
  const video = $("video"), canvas = $("canvas");
  const w = video.videoWidth, h = video.videoHeight;
  if (!w || !h) return Promise.resolve(null);
  const scale = Math.min(1, FRAME_SIDE / Math.max(w, h));
  canvas.width = Math.round(w * scale);
  canvas.height = Math.round(h * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ------------------------------------------------------------------ predictions
async function predictLoop() {
  for (;;) {
    const started = performance.now();
    if ($("running").checked && state.cameraReady && state.classes.length && !state.busy) {
      try {
        const frame = await grabFrame();
        if (frame) {
          const t0 = performance.now();
          const unknown = $("reject").checked ? "&unknown=auto" : "";
          const result = await api(`/v1/predict?top_k=3${unknown}`, { method: "POST", body: frame, headers: { "content-type": "image/jpeg" } });
          showPrediction(result, performance.now() - t0);
        }
      } catch (e) {
        showNothing(e.message);
      }
    } else if (!state.classes.length) {
      showNothing("enroll a class to start");
    }
    await sleep(Math.max(0, PREDICT_EVERY_MS - (performance.now() - started)));
  }
}

function showPrediction(result, rtt) {
  const p = result.predictions[0];
  const unknown = p.label === "unknown";
  state.live = p.label;
  $("correct").hidden = false;
  $("correct-not").hidden = unknown;
  $("correct-not").textContent = unknown ? "not this" : `not “${p.label}”`;
  $("live").className = "live" + (unknown ? " unknown" : "");
  $("live-label").textContent = p.label;
  $("live-prob").textContent = unknown ? `distance ${p.distance.toFixed(2)}` : `${Math.round(p.top_k[0].probability * 100)}%`;
  const top = $("top");
  top.replaceChildren(...p.top_k.map((item, i) => {
    const li = document.createElement("li");
    if (unknown && i === 0) li.className = "unknown";
    const name = document.createElement("span"); name.className = "name"; name.textContent = item.label;
    const prob = document.createElement("span"); prob.className = "p"; prob.textContent = (item.probability * 100).toFixed(1) + "%";
    const bar = document.createElement("div"); bar.className = "bar";
    const fill = document.createElement("span"); fill.style.width = (item.probability * 100).toFixed(1) + "%";
    bar.append(fill);
    li.append(name, prob, bar);
    return li;
  }));
  for (const stage of ["decode", "embed", "head", "total"]) $("ms-" + stage).textContent = fmt(result.ms[stage]);
  $("ms-rtt").textContent = fmt(rtt);
}

function showNothing(why) {
  state.live = null;
  $("correct").hidden = !state.classes.length;
  $("correct-not").hidden = true;
  $("live").className = "live unknown";
  $("live-label").textContent = "—";
  $("live-prob").textContent = why;
  $("top").replaceChildren();
}

// ------------------------------------------------------------------ classes
async function refreshClasses() {
  try {
    const body = await api("/v1/classes");
    state.classes = body.classes;
    const key = JSON.stringify(body.classes);
    if (key !== state.reviewKey) {   // the review changes only when the classes do
      state.reviewKey = key;
      state.review = body.classes.length ? await api("/v1/review") : null;
      const negatives = await api("/v1/negatives");
      $("negatives").textContent = negatives.negatives.length ?
        `${negatives.negatives.length} negative example${negatives.negatives.length === 1 ? "" : "s"} (corrections): ` +
        "images near them answer “unknown”" : "";
    }
    renderClasses();
  } catch (e) { /* the health pill says when the service is down */ }
}

function adviceList(lines) {
  const ul = document.createElement("ul"); ul.className = "advice";
  ul.replaceChildren(...lines.map((line) => { const li = document.createElement("li"); li.textContent = line; return li; }));
  return ul;
}

function confirmThen(label, action) {
  // the first click arms the class's button, a second within CONFIRM_MS acts: no single (framed,
  // stray) click destroys. The armed state outlives the list's re-rendering.
  if (state.armed && state.armed.label === label && performance.now() < state.armed.until) {
    state.armed = null;
    action();
  } else {
    state.armed = { label, until: performance.now() + CONFIRM_MS };
    setTimeout(renderClasses, CONFIRM_MS + 50);
  }
  renderClasses();
}

function renderClasses() {
  const list = $("classes");
  $("class-count").textContent = state.classes.length ? `(${state.classes.length})` : "";
  if (!state.classes.length) {
    const li = document.createElement("li"); li.className = "empty"; li.textContent = "none yet: enroll one from the camera or from photos";
    list.replaceChildren(li);
    return;
  }
  list.replaceChildren(...state.classes.map((c) => {
    const li = document.createElement("li");
    li.dataset.label = c.label;
    const name = document.createElement("span"); name.className = "name"; name.textContent = c.label;
    const shots = document.createElement("span"); shots.className = "shots"; shots.textContent = `${c.shots} shot${c.shots === 1 ? "" : "s"}`;
    const forget = document.createElement("button"); forget.type = "button";
    const armed = state.armed && state.armed.label === c.label && performance.now() < state.armed.until;
    forget.textContent = armed ? `forget “${c.label}”?` : "forget";
    if (armed) forget.className = "confirm";
    forget.addEventListener("click", () => confirmThen(c.label, () => forgetClass(c.label)));
    li.append(name, shots, forget);
    const advice = state.review && state.review.classes.find((r) => r.label === c.label);
    if (advice && advice.advice.length) li.append(adviceList(advice.advice));
    return li;
  }));
  const select = $("correct-is");
  const chosen = select.value;
  select.replaceChildren(...state.classes.map((c) => { const o = document.createElement("option"); o.value = o.textContent = c.label; return o; }));
  if (state.classes.some((c) => c.label === chosen)) select.value = chosen;
}

async function forgetClass(label) {
  try {
    await api(`/v1/classes/${encodeURIComponent(label)}`, { method: "DELETE" });
    say(`forgot “${label}”`);
  } catch (e) { say(e.message, true); }
  await refreshClasses();
}

async function enroll(label, blobs, names) {
  const form = new FormData();
  blobs.forEach((b, i) => form.append("images", b, names[i]));
  const mode = $("mode").value;
  const body = await api(`/v1/classes/${encodeURIComponent(label)}/images?mode=${mode}`, { method: "POST", body: form });
  say(`enrolled “${body.label}”: ${body.shots} shot${body.shots === 1 ? "" : "s"} (${fmt(body.ms.enroll)})`);
  const mine = body.feedback.classes.find((c) => c.label === body.label);
  showFeedback(mine ? mine.advice : []);
  await refreshClasses();
}

function showFeedback(lines) {
  $("feedback").replaceChildren(...lines.map((line) => { const li = document.createElement("li"); li.textContent = line; return li; }));
}

// ------------------------------------------------------------------ corrections
async function correct(params, what) {
  state.busy = true;
  try {
    const frame = await grabFrame();
    if (!frame) throw new Error("the camera gave no frame");
    const form = new FormData();
    form.append("images", frame, "correction.jpg");
    const body = await api(`/v1/corrections?${new URLSearchParams(params)}`, { method: "POST", body: form });
    say(body.correction === "is" ? `added this frame to “${body.label}”: ${body.shots} shots` :
      `kept as a negative example (${what}): ${body.total_negatives} in all`);
    showFeedback([]);
    state.reviewKey = "";
    await refreshClasses();
  } catch (e) { say(e.message, true); } finally { state.busy = false; }
}

async function enrollFromCamera(event) {
  event.preventDefault();
  const label = $("label").value.trim();
  if (!label) { say("give the class a name", true); return; }
  const shots = Math.max(1, Math.min(32, parseInt($("shots").value, 10) || 1));
  const spacing = Math.max(0, parseInt($("spacing").value, 10) || 0);
  const button = $("enroll-camera");
  button.disabled = true;
  state.busy = true;
  const strip = $("shots-strip");
  strip.replaceChildren();
  try {
    const blobs = [];
    for (let i = 0; i < shots; i++) {
      say(`capturing shot ${i + 1} of ${shots}…`);
      const frame = await grabFrame();
      if (!frame) throw new Error("the camera gave no frame");
      blobs.push(frame);
      const img = document.createElement("img"); img.src = URL.createObjectURL(frame); img.alt = `shot ${i + 1}`;
      strip.append(img);
      if (i + 1 < shots) await sleep(spacing);
    }
    await enroll(label, blobs, blobs.map((_, i) => `camera-${i + 1}.jpg`));
  } catch (e) {
    say(e.message, true);
  } finally {
    button.disabled = false;
    state.busy = false;
  }
}

async function enrollUploads() {
  const files = Array.from($("upload").files);
  const label = $("label").value.trim();
  $("upload").value = "";
  if (!files.length) return;
  if (!label) { say("give the class a name first", true); return; }
  try { await enroll(label, files, files.map((f) => f.name)); } catch (e) { say(e.message, true); }
}

// ------------------------------------------------------------------ model and health
async function showModel() {
  try {
    const m = await api("/v1/model");
    const side = `${m.input.width}×${m.input.height} ${m.input.colour}`;
    const weights = m.pretrained && m.pretrained.package ? " · ImageNet-pretrained (Apache-2.0)" : "";
    $("model").textContent = `${m.backbone || m.name}${weights} · ${side} · ${m.head.kind} head · ${m.backend.backend} ${m.variant}`;
  } catch (e) { $("model").textContent = e.message; }
}

async function watchHealth() {
  for (;;) {
    const pill = $("health");
    try {
      const r = await fetch("/v2/health/ready");
      pill.textContent = r.ok ? "ready" : "starting";
      pill.className = "pill " + (r.ok ? "ok" : "");
    } catch (e) {
      pill.textContent = "offline";
      pill.className = "pill bad";
    }
    await refreshClasses();
    await sleep(3000);
  }
}

function main() {
  $("enroll-form").addEventListener("submit", enrollFromCamera);
  $("upload").addEventListener("change", enrollUploads);
  $("correct-none").addEventListener("click", () => correct({ none: "true" }, "none of these"));
  $("correct-not").addEventListener("click", () => { if (state.live && state.live !== "unknown") correct({ not: state.live }, `not “${state.live}”`); });
  $("correct-is-button").addEventListener("click", () => { if ($("correct-is").value) correct({ is: $("correct-is").value }, ""); });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem("edgemeta-key", $("key").value.trim());
    state.keyAsked = false;
    $("key-card").hidden = true;
    say("key saved");
    showModel(); refreshClasses();
  });
  renderClasses();
  showModel();
  watchHealth();
  startCamera().then(predictLoop);
}

main();
