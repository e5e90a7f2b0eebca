// The dashboard: polls GET /v1/dashboard each second and draws it. Every /v1 request carries
// the API key entered above (kept in this browser's localStorage) when there is one, which is
// why thumbnails and links are fetched here rather than left to <img src> and <a href>.
"use strict";

const KEY = "disagfusion-api-key";
const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
const thumbnails = new Map(); // job id -> object URL of its thumbnail (a job's output never changes)
let chart = null;

function headers() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, options = {}) {
  const answer = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!answer.ok) {
    let message = `${answer.status} ${answer.statusText}`;
    try { message = (await answer.json()).error.message; } catch (_) { /* not OpenAI's error shape */ }
    const error = new Error(message);
    error.status = answer.status;
    throw error;
  }
  return answer;
}

function cell(row, content, className) {
  const td = row.insertCell();
  if (content instanceof Node) td.append(content); else td.textContent = content ?? "–";
  if (className) td.className = className;
  return td;
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

// A link that also works when the API wants a key: the click fetches with it and opens the blob.
function link(text, path) {
  const a = document.createElement("a");
  a.textContent = text;
  a.href = path;
  a.onclick = async (event) => {
    if (!localStorage.getItem(KEY)) return;
    event.preventDefault();
    const blob = await (await api(path)).blob();
    window.open(URL.createObjectURL(blob), "_blank");
  };
  return a;
}

function thumbnail(job) {
  const img = document.createElement("img");
  img.alt = `job ${job.id}`;
  img.className = "thumbnail";
  if (thumbnails.has(job.id)) {
    img.src = thumbnails.get(job.id);
  } else {
    api(job.thumbnail_url).then((answer) => answer.blob()).then((blob) => {
      thumbnails.set(job.id, URL.createObjectURL(blob));
      img.src = thumbnails.get(job.id);
    }).catch(() => { img.alt = "no thumbnail"; });
  }
  return img;
}

function drawStages(view) {
  const body = $("stages").tBodies[0];
  body.replaceChildren();
  for (const stage of view.stages) {
    const row = body.insertRow();
    row.dataset.stage = stage.stage;
    cell(row, stage.stage);
    cell(row, stage.service);
    cell(row, String(stage.running), "running");
    cell(row, stage.desired === null ? "–" : String(stage.desired), "desired");
    cell(row, String(stage.backlog), "backlog");
  }
  $("scheduler").textContent = view.scheduler
    ? "desired: the scheduler's target instances"
    : "no scheduler runs: running instances only";
}

function drawJobs(view) {
  const body = $("jobs").tBodies[0];
  body.replaceChildren();
  for (const job of view.jobs) {
    const row = body.insertRow();
    row.dataset.job = job.id;
    cell(row, job.thumbnail_url ? thumbnail(job) : "", "thumb");
    const ids = document.createElement("span");
    ids.append(link(job.id, job.job_url));
    if (job.content_url) ids.append(" · ", link("content", job.content_url));
    cell(row, ids);
    cell(row, job.model);
    cell(row, job.prompt);
    cell(row, job.error ? `${job.status}: ${job.error}` : job.status, `status-${job.status}`);
    cell(row, fixed(job.seconds, 1));
  }
}

function drawChart(view) {
  const s = view.series;
  const data = [s.t, s.throughput_per_min, s.p95_s];
  if (chart === null) {
    chart = new uPlot({
      width: $("chart").clientWidth || 900,
      height: 220,
      series: [
        {},
        { label: "jobs / min", stroke: "#1565c0", width: 2, scale: "rate" },
        { label: "p95 latency (s)", stroke: "#ef6c00", width: 2, scale: "s", spanGaps: true },
      ],
      axes: [{}, { scale: "rate", label: "jobs / min" }, { scale: "s", side: 1, label: "seconds", grid: { show: false } }],
    }, data, $("chart"));
  } else {
    chart.setData(data);
  }
}

async function poll() {
  try {
    const view = await (await api("/v1/dashboard")).json();
    $("completed").textContent = view.completed;
    $("failed").textContent = view.failed;
    $("throughput").textContent = fixed(view.throughput_per_min, 1);
    $("p95").textContent = fixed(view.p95_s, 2);
    $("window").textContent = Math.round(view.window_s / 60);
    drawStages(view);
    drawChart(view);
    drawJobs(view);
    $("state").textContent = `live · ${new Date(view.t * 1000).toLocaleTimeString()}`;
    $("state").className = "state";
  } catch (error) {
    $("state").textContent = error.status === 401 ? `enter an API key: ${error.message}` : `not live: ${error.message}`;
    $("state").className = "state error";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

$("key-form").onsubmit = (event) => {
  event.preventDefault();
  const key = $("key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  thumbnails.clear();
};

$("generate").onsubmit = async (event) => {
  event.preventDefault();
  const body = {
    prompt: $("prompt").value, model: $("model").value, size: $("size").value,
    num_inference_steps: Number($("steps").value), seed: Number($("seed").value),
  };
  $("submit").disabled = true;
  $("generate-state").textContent = "generating…";
  const started = performance.now();
  try {
    const answer = await (await api("/v1/images/generations", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    $("generated").src = `data:image/${answer.output_format};base64,${answer.data[0].b64_json}`;
    $("generated").hidden = false;
    $("generate-state").textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s (${answer.size})`;
  } catch (error) {
    $("generate-state").textContent = `failed: ${error.message}`;
  } finally {
    $("submit").disabled = false;
  }
};

$("key").value = localStorage.getItem(KEY) || "";
poll();
